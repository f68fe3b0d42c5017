"""Beam search as vLLM serves it (``LLM.beam_search``; the OpenAI door's ``use_beam_search``).

vLLM v1 runs beam search above the engine, and so do we: every step asks the engine for one token
of every live beam with its top ``2 * beam_width`` log probabilities (each beam a request of its
own: the prefix cache serves the beams' shared prompt and history), extends each beam by each
candidate, and keeps the ``beam_width`` best by score; a candidate ending in the end-of-sequence
token is complete (unless ``ignore_eos``). After ``max_tokens`` steps the complete and live beams
are ranked together and the ``beam_width`` best returned. The score is vLLM's:
``cum_logprob / len(tokens) ** length_penalty`` with the prompt counted and a final EOS not.

This module is the algorithm (torch-free, no engine): :class:`BeamSearch` holds one prompt's
beams and takes each step's candidates; the offline ``LLM`` and the serving ``AsyncLLM`` drive
it with their engines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from gpu_worker.outputs import Logprob, RequestOutput
from gpu_worker.sampling_params import SamplingParams
from llmserve.sampling_extras import MAX_BEAM_WIDTH


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``: ``beam_width`` beams (1..:data:`MAX_BEAM_WIDTH`), at most
    ``max_tokens`` new tokens each (None: up to the model's context); ``ignore_eos``: an EOS does
    not complete a beam; ``length_penalty``: the exponent of the length in the score (higher
    favors longer beams)."""

    beam_width: int
    max_tokens: int | None
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature != 0.0:
            raise ValueError("beam search ranks by log probability: temperature must be 0")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")


@dataclass(frozen=True)
class BeamSearchSequence:
    """One beam, as vLLM returns it: ``tokens`` the prompt's then the generated ones,
    ``logprobs`` each generated position's candidates, ``cum_logprob`` the generated tokens'
    summed log probability, ``text`` the decoded tokens (set once finished, when there is a
    tokenizer), ``finish_reason`` "stop" (EOS) or "length"."""

    tokens: tuple[int, ...]
    logprobs: tuple[Mapping[int, Logprob], ...] = ()
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> tuple[int, ...]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass(frozen=True)
class BeamSearchOutput:
    """vLLM's ``BeamSearchOutput``: the best beams, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


# SamplingParams fields a served beam search takes (GenerateRequest, the OpenAI door); the
# sampling ones are ignored (the search ranks by log probability). Any other field set is refused.
_SERVED_FIELDS = ("n", "max_tokens", "ignore_eos", "logprobs")
_IGNORED_FIELDS = ("temperature", "seed", "top_p", "top_k", "min_p")


def served_beam_params(params: SamplingParams, beam_width: int, length_penalty: float) -> BeamSearchParams:
    """The beam search a served request asks for (``params`` its other fields); ``ValueError``
    naming a field beam search does not take, or ``n`` above ``beam_width``."""
    default = SamplingParams()
    for f in fields(SamplingParams):
        if f.name not in _SERVED_FIELDS and f.name not in _IGNORED_FIELDS:
            if getattr(params, f.name) != getattr(default, f.name):
                raise ValueError(f"{f.name} is not served with beam search")
    if params.n > beam_width:
        raise ValueError(f"n ({params.n}) must be at most the beam_width ({beam_width})")
    return BeamSearchParams(beam_width, params.max_tokens, ignore_eos=params.ignore_eos,
                            length_penalty=length_penalty)


def resolve_max_tokens(params: BeamSearchParams, prompt_len: int, max_model_len: int) -> BeamSearchParams:
    """``params`` with ``max_tokens`` set (None: what the context leaves after the prompt);
    ``ValueError`` when the prompt and ``max_tokens`` do not fit the context."""
    room = max_model_len - prompt_len
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens < 1 or max_tokens > room:
        raise ValueError(f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) must fit the model's "
                         f"context (max_model_len {max_model_len})")
    return replace(params, max_tokens=max_tokens)


def beam_score(beam: BeamSearchSequence, eos_token_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's score: ``cum_logprob / len ** length_penalty``, the length counting the prompt and
    not a final EOS."""
    length = len(beam.tokens)
    if beam.tokens and beam.tokens[-1] in eos_token_ids:
        length -= 1
    return beam.cum_logprob / (max(length, 1) ** length_penalty)


class BeamSearch:
    """One prompt's search. Each step: :attr:`live` are the beams to extend (one engine request
    each, :meth:`step_params`), :meth:`step` takes each live beam's candidates
    (:func:`candidates_of` its request's output); :attr:`done` once no beam is left to extend or
    the budget is spent; :meth:`best` then ranks."""

    def __init__(self, prompt: Sequence[int], params: BeamSearchParams, eos_token_ids: frozenset[int]
                 ) -> None:
        if not prompt:
            raise ValueError("beam search needs a prompt of at least one token")
        if params.max_tokens is None:
            raise ValueError("max_tokens: resolve it first (resolve_max_tokens)")
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.live = [BeamSearchSequence(tuple(prompt), num_prompt_tokens=len(prompt))]
        self.completed: list[BeamSearchSequence] = []
        self.steps = 0

    def step_params(self) -> SamplingParams:
        """What each live beam's request of a step asks for: one token and its top
        ``2 * beam_width`` log probabilities (greedy: the drawn token is the first of them)."""
        return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                              logprobs=2 * self.params.beam_width)

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= (self.params.max_tokens or 0)

    def _score(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos_token_ids, self.params.length_penalty)

    def step(self, candidates: Sequence[Mapping[int, Logprob]]) -> None:
        """``candidates[i]``: the live beam ``i``'s next-token log probabilities (its top ones)."""
        if len(candidates) != len(self.live):
            raise ValueError(f"{len(candidates)} candidate sets for {len(self.live)} live beams")
        extended: list[BeamSearchSequence] = []
        for beam, options in zip(self.live, candidates, strict=True):
            for token, logprob in options.items():
                new = BeamSearchSequence(beam.tokens + (token,), beam.logprobs + (options,),
                                         beam.cum_logprob + logprob.logprob,
                                         num_prompt_tokens=beam.num_prompt_tokens)
                if token in self.eos_token_ids and not self.params.ignore_eos:
                    self.completed.append(_finished(new, "stop"))
                else:
                    extended.append(new)
        # stable: equal scores keep the order of their beams and candidates (vLLM's)
        extended.sort(key=self._score, reverse=True)
        self.live = extended[: self.params.beam_width]
        self.steps += 1

    def best(self) -> list[BeamSearchSequence]:
        """The ``beam_width`` best of the complete and the live beams, best first."""
        everything = self.completed + [_finished(b, "length") for b in self.live]
        everything.sort(key=self._score, reverse=True)
        return everything[: self.params.beam_width]


def candidates_of(output: RequestOutput) -> dict[int, Logprob]:
    """A beam's next-token candidates from its one-token request's output."""
    logprobs = output.outputs[0].logprobs
    return dict(logprobs[0]) if logprobs else {}


def _finished(beam: BeamSearchSequence, reason: str) -> BeamSearchSequence:
    return BeamSearchSequence(beam.tokens, beam.logprobs, beam.cum_logprob, beam.text, reason,
                              beam.num_prompt_tokens)

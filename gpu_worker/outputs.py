"""What the offline and streaming APIs return, shaped as vLLM users know it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Logprob:
    """Log probability of one token under the model's raw distribution.

    ``rank`` is 1 for the most likely token; ``decoded_token`` is the token's text on its own.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(frozen=True)
class CompletionOutput:
    """One generated sequence (one of the ``n`` samples of a request).

    In a streaming (delta) output, ``text``, ``token_ids`` and ``logprobs`` hold only what is
    new since the previous output of this sequence; otherwise they hold everything so far.
    ``logprobs[i]`` maps the chosen token of position ``i`` and the requested top-N
    alternatives to their :class:`Logprob`; it is None unless ``SamplingParams.logprobs``
    was set. ``stop_reason`` is the stop string or stop token id that ended the sequence,
    None for EOS, a length limit or an abort.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    """The state of one request: its prompt and its ``n`` completions.

    ``num_cached_tokens`` is the number of prompt tokens served from the prefix cache
    (the largest over the request's samples). ``finished`` is True once every
    completion has finished. ``device_s``: device seconds the request has used so far, all
    samples together (its share of each engine step's time, split by tokens; cumulative in
    every output kind, delta outputs included).

    ``prompt_logprobs`` (vLLM's shape; None unless ``SamplingParams.prompt_logprobs`` was set):
    one entry per prompt token, the first None (nothing precedes it), then each maps the prompt
    token's id and the top-N alternatives at its position to their :class:`Logprob`. A
    streaming (delta) request gets them once, on the first output that has them (with the
    first token); the other kinds carry them on every output from then on.

    ``embedding``: a pooling engine's result (``runner`` "pooling"; L2-normalized), set on the
    request's final output; None from a generating engine.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    device_s: float = 0.0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    embedding: list[float] | None = None

"""Sampling parameters, with the names and defaults vLLM users know."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
MAX_BAD_WORDS = 128  # bad_words per request: each is checked against every sampled token
MAX_BAD_WORD_TOKENS = 64  # tokens of one bad word
MAX_BAD_WORDS_CHARS = 8192  # characters of a request's bad words together: checked before tokenizing
MAX_ALLOWED_TOKEN_IDS = 1 << 20  # entries of allowed_token_ids (each is checked against the vocabulary)
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "grammar", "choice", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Decoding constrained to a format (vLLM's ``StructuredOutputsParams``): exactly one of
    ``json`` (a JSON schema, as text or a dict), ``regex``, ``grammar`` (EBNF with a ``root``
    rule), ``choice`` (the output is one of these strings) or ``json_object=True`` (any JSON
    object). ``SamplingParams(structured_output={"json": schema})`` builds one from a dict.

    A schema given as a dict (or as text) is kept as compact JSON text in its own key order
    (the order properties are generated in), so equal schemas share one compiled grammar."""

    json: str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        schema: Any = self.json
        if schema is not None:
            try:
                if isinstance(schema, str):
                    try:
                        schema = json.loads(schema)
                    except ValueError as exc:
                        raise ValueError(f"structured_output.json is not valid JSON: {exc}") from None
                if not isinstance(schema, dict | bool):
                    raise ValueError("structured_output.json must be a JSON schema (an object)")
                object.__setattr__(self, "json", json.dumps(schema, ensure_ascii=False))
            except RecursionError:  # the parser's (or the encoder's) own nesting bound
                raise ValueError("structured_output.json is nested too deeply") from None
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not all(isinstance(c, str) for c in choice):
                raise ValueError("structured_output.choice must be a list of strings")
            if not choice or not all(choice):
                raise ValueError("structured_output.choice must hold at least one non-empty string")
            object.__setattr__(self, "choice", tuple(choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_output.{name} must be a non-empty string")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_output.json_object must be a boolean")
        kinds = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                f"structured_output must set exactly one of {list(STRUCTURED_OUTPUT_KINDS)}, got {kinds}"
            )

    @classmethod
    def from_value(cls, value: StructuredOutputsParams | Mapping[str, Any]) -> StructuredOutputsParams:
        """``value`` itself, or one built from a dict with one of the keys above."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                "structured_output must be a dict such as {'json': schema} or a StructuredOutputsParams"
            )
        unknown = sorted(set(value) - set(STRUCTURED_OUTPUT_KINDS))
        if unknown:
            raise ValueError(
                f"structured_output has unknown keys {unknown}; known: {list(STRUCTURED_OUTPUT_KINDS)}"
            )
        return cls(**dict(value))

    @property
    def kind(self) -> str:
        """Which one is set: ``json``, ``regex``, ``grammar``, ``choice`` or ``json_object``."""
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what identifies the compiled grammar (the compile cache's key)."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "choice":
            return kind, json.dumps(list(value), ensure_ascii=False)
        return kind, "" if kind == "json_object" else str(value)


@dataclass(frozen=True)
class PluginCall:
    """A request's use of an installed plug-in (logits processor or stopping criterion): its
    entry-point ``name`` and JSON-compatible ``args`` (the plug-in validates them). Only names
    are looked up, in the registry of installed entry points; nothing is imported from requests."""

    name: str
    args: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a plug-in name must be a non-empty string")
        try:
            json.dumps(self.args)
        except (TypeError, ValueError):
            raise ValueError(f"plug-in {self.name!r}: args must be JSON data (null, numbers, strings, "
                             "lists, objects)") from None

    @classmethod
    def from_value(cls, value: PluginCall | str | Mapping[str, Any]) -> PluginCall:
        """``value`` itself, a bare name, or ``{"name": ..., "args": ...}``."""
        if isinstance(value, PluginCall):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping) and set(value) <= {"name", "args"} and "name" in value:
            return cls(value["name"], value.get("args"))
        raise ValueError(f"a plug-in call must be a name or {{'name': ..., 'args': ...}}, got {value!r}")


def _plugin_calls(values: Sequence[Any] | None) -> list[PluginCall]:
    if isinstance(values, str | Mapping | PluginCall):
        values = [values]
    return [PluginCall.from_value(v) for v in values or ()]


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt.

    ``temperature == 0`` means greedy. ``top_k`` of 0 or -1 disables top-k. ``max_tokens``
    of None means "up to the model's context length". ``logprobs`` asks for the log
    probability of each chosen token plus the top-N alternatives (N may be 0); logprobs
    are those of the model's raw distribution, before penalties, temperature and
    truncation, as in vLLM. ``prompt_logprobs`` asks for the same at every prompt position from
    the second on (the prompt token itself plus the top-N; a request with it computes its whole
    prompt: no prefix-cache hit, as in vLLM). ``seed`` makes one request's sampling reproducible whatever
    else runs in the batch. ``truncate_prompt_tokens`` keeps only the prompt's last N tokens
    (-1: as many as the context holds with room for one output token), as vLLM's.

    ``allowed_token_ids`` keeps only those tokens samplable; ``bad_words`` are never generated:
    the last token of a word's token sequence is masked whenever the output so far ends with
    the rest of it (each word as tokenized alone and after a space, as vLLM;
    ``bad_words_token_ids`` holds those sequences: the worker's input processor fills it from
    its tokenizer, and a caller without a tokenizer may give it directly).

    ``structured_output`` constrains the output to a format (a dict such as ``{"json": schema}``
    or a :class:`StructuredOutputsParams`; docs/STRUCTURED_OUTPUT.md). ``logits_processors``
    and ``stopping_criteria`` name installed plug-ins, each a name or ``{"name", "args"}``
    (docs/PLUGINS.md).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured_output: StructuredOutputsParams | None = None
    logits_processors: list[PluginCall] = field(default_factory=list)
    stopping_criteria: list[PluginCall] = field(default_factory=list)
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.structured_output is not None:
            self.structured_output = StructuredOutputsParams.from_value(self.structured_output)
        self.logits_processors = _plugin_calls(self.logits_processors)
        self.stopping_criteria = _plugin_calls(self.stopping_criteria)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = list(self.bad_words)
        self.bad_words_token_ids = tuple(tuple(int(t) for t in ids) for ids in self.bad_words_token_ids)
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        checks: list[tuple[bool, str]] = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                0.0 <= self.temperature < math.inf,
                f"temperature must be finite and >= 0, got {self.temperature}",
            ),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                0.0 < self.repetition_penalty <= 2.0,
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be between 0 and 20, got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}",
            ),
            (all(s for s in self.stop), "stop must not contain empty strings"),
            (
                self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
                "allowed_token_ids must not be empty (leave it unset to allow every token)",
            ),
            (
                self.allowed_token_ids is None or len(self.allowed_token_ids) <= MAX_ALLOWED_TOKEN_IDS,
                f"allowed_token_ids may hold at most {MAX_ALLOWED_TOKEN_IDS} ids",
            ),
            (
                sum(len(w) for w in self.bad_words if isinstance(w, str)) <= MAX_BAD_WORDS_CHARS,
                f"bad_words may hold at most {MAX_BAD_WORDS_CHARS} characters together",
            ),
            (
                all(isinstance(w, str) and w.strip() for w in self.bad_words),
                "bad_words must be non-blank strings",
            ),
            (
                len(self.bad_words) <= MAX_BAD_WORDS and len(self.bad_words_token_ids) <= 2 * MAX_BAD_WORDS,
                f"bad_words may hold at most {MAX_BAD_WORDS} words",
            ),
            (
                all(0 < len(ids) <= MAX_BAD_WORD_TOKENS for ids in self.bad_words_token_ids),
                f"bad_words: a word must be 1 to {MAX_BAD_WORD_TOKENS} tokens long",
            ),
            (
                all(math.isfinite(v) for v in self.logit_bias.values()),
                "logit_bias values must be finite numbers",
            ),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (
                self.truncate_prompt_tokens is None or self.truncate_prompt_tokens == -1
                or self.truncate_prompt_tokens >= 1,
                f"truncate_prompt_tokens must be -1 or at least 1, got {self.truncate_prompt_tokens}",
            ),
        ]
        if self.structured_output is not None:
            checks += [
                (not self.ignore_eos, "ignore_eos cannot be combined with structured_output: the "
                 "format ends the output with EOS"),
                (self.min_tokens == 0, "min_tokens cannot be combined with structured_output: the "
                 "format decides where the output ends"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if vocab_size is not None:
            bad_word_ids = [t for ids in self.bad_words_token_ids for t in ids]
            for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias),
                              ("allowed_token_ids", self.allowed_token_ids or ()),
                              ("bad_words_token_ids", bad_word_ids)):
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(
                        f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}"
                    )

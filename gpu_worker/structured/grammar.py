"""A request's format as xgrammar input: syntax check (front) and the compile cache (engine core).

JSON is constrained to a compact layout (``", "`` and ``": "`` separators, no other whitespace):
a small model cannot then wander into endless whitespace, and the output is the same JSON. A
schema's objects admit no properties beyond those it lists unless it says otherwise (xgrammar's
strict mode); ``json_object`` is any JSON object.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from gpu_worker.sampling_params import StructuredOutputsParams

# "[13:47:46] /project/cpp/regex_converter.cc:94: " and "Check failed: (x) is false: " prefixes
_ERROR_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: |Check failed: .*? is false: ")
_ANY_OBJECT_SCHEMA = '{"type": "object"}'


def error_message(exc: BaseException) -> str:
    """xgrammar's error text without its source location prefix."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _ERROR_PREFIX.sub("", lines[0] if lines else type(exc).__name__).strip()


def choice_grammar(choices: Iterable[str]) -> str:
    """EBNF whose only sentences are ``choices`` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def check_syntax(spec: StructuredOutputsParams) -> None:
    """Parse the format without a tokenizer (milliseconds): ``ValueError`` naming the problem
    (``structured_output.json: ...``) when it cannot compile. What parses compiles."""
    import xgrammar as xgr

    kind = spec.kind
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(spec.json, any_whitespace=False)  # type: ignore[arg-type]
        elif kind == "regex":
            xgr.Grammar.from_regex(spec.regex)  # type: ignore[arg-type]
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(spec.grammar)  # type: ignore[arg-type]
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_grammar(spec.choice or ()))
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own types
        raise ValueError(f"structured_output.{kind} does not compile: {error_message(exc)}") from None


class GrammarCache:
    """Compiled grammars by :attr:`StructuredOutputsParams.key`, at most ``capacity`` of them
    (least recently used evicted), compiled on ``max_workers`` threads.

    :meth:`get` never blocks: it returns a future (shared by every request of the same format).
    xgrammar releases the GIL while it compiles, so compiling runs beside the engine loop.
    The tokenizer's xgrammar view is built on the pool too, with the first compile. Used from
    one thread (the engine core's); the pool threads touch only the compiler.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        capacity: int = 256,
        max_workers: int = 2,
    ) -> None:
        if capacity < 1:
            raise ValueError("the grammar cache needs a capacity of at least 1")
        self.capacity = capacity
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._entries: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, spec: StructuredOutputsParams) -> Future[Any]:
        """The compiled grammar of ``spec`` (an ``xgrammar.CompiledGrammar``), maybe still compiling."""
        key = spec.key
        future = self._entries.get(key)
        if future is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return future
        self.misses += 1
        future = self._pool.submit(self._compile, spec)
        self._entries[key] = future
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)  # requests holding it keep their reference
        return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        compiler = self._get_compiler()
        kind = spec.kind
        if kind == "json":
            return compiler.compile_json_schema(spec.json, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema(_ANY_OBJECT_SCHEMA, any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(spec.regex)
        if kind == "grammar":
            return compiler.compile_grammar(spec.grammar)
        return compiler.compile_grammar(choice_grammar(spec.choice or ()))

    def _get_compiler(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
                )
                # Our own LRU caches; xgrammar's cache would be a second, unbounded copy.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

"""A small PromQL reader: which metrics (and labels) an expression selects, and where.

Not a full parser: it tokenizes the expression and walks the tokens with just enough grammar to
tell a metric name from a function, an aggregation, a keyword, a grouping label list
(``by (le)``, ``on (model)``, ``group_left (x)``), a label matcher block, a range or subquery
(``[5m]``, ``[$__rate_interval]``, ``[1h:1m]``), an ``offset``/``@`` modifier, a number, a string
or a Grafana variable (``$model``, ``${model}``). Each selector comes back with its label matchers
and the innermost function or aggregation it sits in, so that callers can check that ``rate``
only sees counters. Real Prometheus parses the same expressions in the live tests
(tests/deploy/test_dashboards_live.py); this reader is what lets a test point at the metric
name that is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
})
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "atan2", "bool", "offset", "start", "end"}) | GROUPING
NUMBER_WORDS = frozenset({"inf", "nan"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]+\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[a-zA-Z]*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@,(){}\[\]])
""", re.VERBOSE)


class PromQLSyntaxError(ValueError):
    """The expression has a character or bracket this reader does not understand."""


@dataclass(frozen=True)
class Matcher:
    """One label matcher of a selector: ``label op value`` (``value`` unquoted)."""

    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    """One instant or range vector selector."""

    metric: str
    matchers: tuple[Matcher, ...]
    function: str | None  # innermost enclosing function or aggregation ("rate", "sum", ...)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


def tokenize(expr: str) -> list[Token]:
    """The tokens of ``expr`` without white space and comments."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLSyntaxError(f"unexpected {expr[pos]!r} at {pos} in {expr!r}")
        kind = m.lastgroup or ""
        if kind not in ("space", "comment"):
            tokens.append(Token(kind, m.group()))
        pos = m.end()
    return tokens


def _unquote(text: str) -> str:
    body = text[1:-1]
    return body if text[0] == "`" else re.sub(r"\\(.)", r"\1", body)


class _Reader:
    """Walks the tokens once, collecting selectors and grouping labels."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = tokenize(expr)
        self.i = 0
        self.selectors: list[Selector] = []
        self.grouping: list[str] = []
        self.stack: list[str | None] = []  # one entry per open "(": its function, or None

    def peek(self, offset: int = 0) -> Token | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def expect(self, text: str) -> None:
        tok = self.peek()
        if tok is None or tok.text != text:
            raise PromQLSyntaxError(f"expected {text!r} at token {self.i} of {self.expr!r}, got {tok}")
        self.i += 1

    def skip_until(self, closing: str) -> None:
        while (tok := self.peek()) is not None and tok.text != closing:
            self.i += 1
        self.expect(closing)

    def function(self) -> str | None:
        return next((f for f in reversed(self.stack) if f is not None), None)

    def label_list(self) -> None:
        """``(a, b)`` after by/without/on/ignoring/group_left/group_right (optional for the last two)."""
        if self.peek() is None or self.peek().text != "(":  # type: ignore[union-attr]
            return
        self.i += 1
        while (tok := self.peek()) is not None and tok.text != ")":
            if tok.kind in ("ident", "string"):
                self.grouping.append(tok.text if tok.kind == "ident" else _unquote(tok.text))
            self.i += 1
        self.expect(")")

    def matchers(self) -> tuple[Matcher, ...]:
        """``{label op "value", ...}`` (the opening brace is the current token)."""
        self.expect("{")
        out: list[Matcher] = []
        while (tok := self.peek()) is not None and tok.text != "}":
            if tok.text == ",":
                self.i += 1
                continue
            op, value = self.peek(1), self.peek(2)
            if tok.kind == "string" and (op is None or op.text in (",", "}")):
                out.append(Matcher("__name__", "=", _unquote(tok.text)))  # {"quoted.name"}
                self.i += 1
                continue
            if (tok.kind not in ("ident", "string") or op is None or op.text not in ("=", "!=", "=~", "!~")
                    or value is None or value.kind != "string"):
                raise PromQLSyntaxError(f"bad label matcher near token {self.i} of {self.expr!r}")
            label = tok.text if tok.kind == "ident" else _unquote(tok.text)
            out.append(Matcher(label, op.text, _unquote(value.text)))
            self.i += 3
        self.expect("}")
        return tuple(out)

    def selector(self, metric: str | None) -> None:
        matchers = self.matchers() if self.peek() is not None and self.peek().text == "{" else ()  # type: ignore[union-attr]
        named = [m for m in matchers if m.label == "__name__" and m.op == "="]
        if metric is None:
            if not named:
                raise PromQLSyntaxError(f"selector without a metric name in {self.expr!r}")
            metric = named[0].value
        rest = tuple(m for m in matchers if m.label != "__name__")
        self.selectors.append(Selector(metric, rest, self.function()))

    def read(self) -> None:
        pending: str | None = None  # an aggregation waiting for its "(" after a by/without list
        while (tok := self.peek()) is not None:
            nxt = self.peek(1)
            lower = tok.text.lower()
            if tok.kind == "ident" and lower in GROUPING:
                self.i += 1
                self.label_list()
                continue
            if tok.kind == "ident" and lower in ("offset", "@"):
                self.i += 2  # the duration or timestamp that follows
                continue
            if tok.kind == "ident" and nxt is not None and nxt.text == "(" and lower not in KEYWORDS:
                self.stack.append(tok.text)
                self.i += 2
                pending = None
                continue
            if tok.kind == "ident" and lower in AGGREGATIONS:
                pending = tok.text  # `sum by (le) (...)`: its "(" comes after the label list
                self.i += 1
                continue
            if tok.kind == "ident" and lower not in KEYWORDS and lower not in NUMBER_WORDS:
                self.i += 1
                self.selector(tok.text)
                continue
            if tok.text == "{":
                self.selector(None)
                continue
            if tok.text == "[":
                self.skip_until("]")
                continue
            if tok.text == "@":
                self.i += 2
                continue
            if tok.text == "(":
                self.stack.append(pending)
                pending = None
            elif tok.text == ")":
                if not self.stack:
                    raise PromQLSyntaxError(f"unbalanced ')' in {self.expr!r}")
                self.stack.pop()
            self.i += 1
        if self.stack:
            raise PromQLSyntaxError(f"unclosed '(' in {self.expr!r}")


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in ``expr``, in order of appearance."""
    reader = _Reader(expr)
    reader.read()
    return reader.selectors


def grouping_labels(expr: str) -> list[str]:
    """Labels named in ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right`` lists."""
    reader = _Reader(expr)
    reader.read()
    return reader.grouping


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects."""
    return {s.metric for s in selectors(expr)}

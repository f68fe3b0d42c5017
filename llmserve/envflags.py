"""Environment-variable equivalents for command-line flags (docs/CONFIG.md).

``--max-num-seqs`` reads ``LLMSERVE_MAX_NUM_SEQS`` when the flag is not given: flags win over
variables, variables win over built-in defaults. Call :func:`apply_env_defaults` on a parser
after all its arguments are added and before ``parse_args``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

PREFIX = "LLMSERVE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_BOOL_ACTIONS = (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)


def env_name(option: str) -> str:
    """``--redis-url`` -> ``LLMSERVE_REDIS_URL``."""
    return PREFIX + option.lstrip("-").upper().replace("-", "_")


def _long_option(action: argparse.Action) -> str | None:
    longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
    return longs[0] if longs else None


def _convert(action: argparse.Action, name: str, raw: str) -> object:
    if isinstance(action, _BOOL_ACTIONS):
        low = raw.strip().lower()
        if low in _TRUE:
            value: object = True
        elif low in _FALSE:
            value = False
        else:
            raise ValueError(f"{name}={raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
        if isinstance(action, argparse._StoreFalseAction):
            value = not value
        return value
    converter = action.type if callable(action.type) else str
    try:
        value = converter(raw)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{name}={raw!r} is invalid: {exc}") from exc
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{name}={raw!r} must be one of {sorted(map(str, action.choices))}")
    return value


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Let ``LLMSERVE_<FLAG>`` variables supply defaults for the parser's long flags.

    Also appends ``[env: NAME]`` to each flag's help. A bad value stops with a parser error
    naming the variable.
    """
    env = os.environ if environ is None else environ
    for action in parser._actions:
        option = _long_option(action)
        if option is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = env_name(option)
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env: {name}]".strip()
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            action.default = _convert(action, name, raw)
        except ValueError as exc:
            parser.error(str(exc))
        action.required = False

"""Structured output and plug-in calls as ``llmserve.v1`` messages, from plain JSON-like values.

Shared by the router's doors (OpenAI ``response_format`` and vLLM's extras, KServe sampling
parameters) and the Python client. Torch-free; only shapes are checked here (``ValueError``
naming the problem): whether a format compiles or a plug-in is installed is the worker's call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llmserve.limits import RequestLimits
from llmserve.v1 import generation_pb2 as gen_pb

STRUCTURED_KINDS = ("json", "regex", "grammar", "choice", "json_object")
# vLLM's older request fields and the structured-output kind each one sets.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_grammar": "grammar",
                 "guided_choice": "choice"}


def structured_output_message(value: Mapping[str, Any]) -> gen_pb.StructuredOutput:
    """``{"json": schema}`` (schema as a JSON object or text), ``{"regex": ...}``,
    ``{"grammar": ...}``, ``{"choice": [...]}`` or ``{"json_object": true}``: exactly one key."""
    if not isinstance(value, Mapping):
        raise ValueError("structured_output must be an object with one of " + ", ".join(STRUCTURED_KINDS))
    kinds = [k for k in value if value[k] not in (None, False)]
    unknown = [k for k in value if k not in STRUCTURED_KINDS]
    if unknown or len(kinds) != 1:
        raise ValueError(f"structured_output must set exactly one of {list(STRUCTURED_KINDS)}, "
                         f"got {sorted(value)}")
    kind = kinds[0]
    item = value[kind]
    msg = gen_pb.StructuredOutput()
    if kind == "json":
        msg.json = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    elif kind == "choice":
        if not isinstance(item, list) or not all(isinstance(c, str) for c in item):
            raise ValueError("structured_output.choice must be a list of strings")
        msg.choice.choices.extend(item)
    elif kind == "json_object":
        if item is not True:
            raise ValueError("structured_output.json_object must be true")
        msg.json_object = True
    else:
        if not isinstance(item, str):
            raise ValueError(f"structured_output.{kind} must be a string")
        setattr(msg, kind, item)
    return msg


def plugin_call_messages(field: str, values: Sequence[Any] | None) -> list[gen_pb.PluginCall]:
    """Plug-in calls given as names or ``{"name": ..., "args": <JSON>}`` objects."""
    if values is None:
        return []
    if not isinstance(values, list):
        raise ValueError(f"{field} must be a list of names or {{'name', 'args'}} objects")
    calls = []
    for value in values:
        if isinstance(value, str):
            calls.append(gen_pb.PluginCall(name=value))
        elif isinstance(value, Mapping) and isinstance(value.get("name"), str) and set(value) <= {"name",
                                                                                                 "args"}:
            args = value.get("args")
            args_json = "" if args is None else json.dumps(args)
            calls.append(gen_pb.PluginCall(name=value["name"], args_json=args_json))
        else:
            raise ValueError(f"{field} entries must be names or {{'name', 'args'}} objects, got {value!r}")
    return calls


# The widest beam search served (SamplingParams.beam_search): a step asks the engine for the top
# 2 * beam_width log probabilities of each beam, and it gives at most 20.
MAX_BEAM_WIDTH = 10


def check_sampling_limits(limits: RequestLimits, sampling: gen_pb.SamplingParams) -> None:
    """``n``, the stop strings and the structured-output format of ``sampling`` within ``limits``
    (``LimitExceeded``), before the format is parsed or compiled: router and worker alike."""
    if sampling.HasField("n"):
        limits.check_n(sampling.n)
    if sampling.HasField("beam_search"):  # each beam is a sequence in the engine, as a sample is
        limits.check_n(sampling.beam_search.beam_width)
    limits.check_stop(sampling.stop)
    if sampling.HasField("structured_output"):
        fmt = sampling.structured_output
        kind = fmt.WhichOneof("kind")
        if kind == "choice":
            limits.check_format(kind, choices=fmt.choice.choices)
        elif kind in ("json", "regex", "grammar"):
            limits.check_format(kind, getattr(fmt, kind))

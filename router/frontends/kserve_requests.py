"""A KServe v2 inference request, read as Triton's vLLM backend reads it, translated into the
router's internal request.

Inputs (the backend's names): ``text_input`` (BYTES, the prompt), ``stream`` (BOOL: one
response per chunk rather than one in all), ``sampling_parameters`` (BYTES: a JSON object of
vLLM sampling parameters; values may be JSON numbers or, as the backend's examples send them,
strings such as ``"0.7"``), ``exclude_input_in_output`` (BOOL: whole responses start with the
prompt unless set), ``return_finish_reason`` and ``return_num_output_tokens`` (BOOL: add those
outputs). Without a ``sampling_parameters`` input, the request's own ``parameters`` are the
sampling parameters (Triton's reserved ones left out), as in the backend.

Beyond vLLM's scalar parameters, the sampling parameters may hold ``priority`` (lower runs
first), ``structured_outputs`` (``{"json": schema}``, ``{"regex": ...}``, ``{"choice": [...]}``,
``{"grammar": ...}``, ``{"json_object": true}``) or vLLM's older ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar``, and ``logits_processors`` /
``stopping_criteria`` (installed plug-ins, docs/PLUGINS.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmserve.kserve import grpc_service_pb2 as kserve_pb
from llmserve.sampling_extras import GUIDED_FIELDS, plugin_call_messages, structured_output_message
from llmserve.v1 import generation_pb2 as gen_pb
from router.errors import InvalidRequest
from router.frontends.kserve_tensors import TensorSpec, one_element, parameter_value, read_inputs
from router.generation import RouterRequest

TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
NUM_OUTPUT_TOKENS = "num_output_tokens"

INPUTS = (
    TensorSpec("text_input", "BYTES", (1,)),
    TensorSpec("stream", "BOOL", (1,)),
    TensorSpec("sampling_parameters", "BYTES", (1,)),
    TensorSpec("exclude_input_in_output", "BOOL", (1,)),
    TensorSpec("return_finish_reason", "BOOL", (1,)),
    TensorSpec("return_num_output_tokens", "BOOL", (1,)),
)
OUTPUTS = (
    TensorSpec(TEXT_OUTPUT, "BYTES", (-1,)),
    TensorSpec(FINISH_REASON, "BYTES", (-1,)),
    TensorSpec(NUM_OUTPUT_TOKENS, "UINT32", (-1,)),
)
_INPUT_SPECS = {spec.name: spec for spec in INPUTS}
_OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)

# Request parameters Triton reserves for itself (never sampling parameters).
_RESERVED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"})
_RESERVED_PREFIX = "triton_"


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a boolean")
    return float(value)


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    return int(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("not a boolean")


def _as_stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("not a string or a list of strings")
    return stops


def _as_ids(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise ValueError("not a list of token ids")
    return [_as_int(v) for v in value]


def _as_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ValueError("not an object of token id -> bias")
    return {_as_int(k): _as_float(v) for k, v in value.items()}


# vLLM sampling parameter -> conversion; the lower bound the proto field needs (None: none).
_SCALARS: dict[str, tuple[Callable[[Any], Any], float | None]] = {
    "n": (_as_int, 1), "max_tokens": (_as_int, 1), "min_tokens": (_as_int, 0),
    "temperature": (_as_float, None), "top_p": (_as_float, None), "top_k": (_as_int, -1),
    "min_p": (_as_float, None), "seed": (_as_int, 0), "presence_penalty": (_as_float, None),
    "frequency_penalty": (_as_float, None), "repetition_penalty": (_as_float, None),
    "ignore_eos": (_as_bool, None), "include_stop_str_in_output": (_as_bool, None),
    "truncate_prompt_tokens": (_as_int, -1),
}
_UINT32_MAX = 2**32 - 1


def sampling_from(params: Mapping[str, Any]) -> gen_pb.SamplingParams:
    """vLLM sampling parameters (as JSON values) -> the worker's ``SamplingParams``; ranges are
    the worker's to check, except what the message's field types cannot hold."""
    s = gen_pb.SamplingParams()
    for name, value in params.items():
        try:
            if name in _SCALARS:
                convert, low = _SCALARS[name]
                converted = convert(value)
                if low is not None and converted < low:
                    raise ValueError(f"must be >= {low:g}")
                if name in ("n", "max_tokens", "min_tokens") and converted > _UINT32_MAX:
                    raise ValueError("too large")
                setattr(s, name, converted)
            elif name == "stop":
                s.stop.extend(_as_stop(value))
            elif name in ("stop_token_ids", "allowed_token_ids"):
                getattr(s, name).extend(_as_ids(value))
            elif name == "bad_words":
                s.bad_words.extend(_as_stop(value))
            elif name == "logit_bias":
                for token_id, bias in _as_bias(value).items():
                    s.logit_bias[token_id] = bias
            elif name in ("structured_outputs", *GUIDED_FIELDS):
                spec = value if name == "structured_outputs" else {GUIDED_FIELDS[name]: value}
                if s.HasField("structured_output"):
                    raise ValueError("only one structured output may be given")
                s.structured_output.CopyFrom(structured_output_message(spec))
            elif name in ("logits_processors", "stopping_criteria"):
                getattr(s, name).extend(plugin_call_messages(name, value))
            elif name == "priority":
                continue  # a request field, not sampling (priority_from)
            else:
                raise InvalidRequest(f"sampling_parameters: unsupported parameter {name!r}")
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidRequest(f"sampling_parameters: {name} = {value!r} is invalid ({exc})") from None
    return s


def priority_from(params: Mapping[str, Any]) -> int | None:
    """The sampling parameters' ``priority`` (lower runs first), None when absent."""
    if "priority" not in params:
        return None
    try:
        priority = _as_int(params["priority"])
        if not -(2**31) <= priority < 2**31:
            raise ValueError("out of the int32 range")
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(
            f"sampling_parameters: priority = {params['priority']!r} is invalid ({exc})"
        ) from None
    return priority


@dataclass(frozen=True)
class InferCall:
    """One decoded inference request."""

    routed: RouterRequest
    client_id: str  # the request's ``id``, echoed in its responses
    model_name: str
    stream: bool
    prompt_text: str  # what whole responses start with ("" with exclude_input_in_output)
    outputs: tuple[str, ...]  # output tensors to send, in the model's order


def decode_infer(request: kserve_pb.ModelInferRequest, request_id: str) -> InferCall:
    """The request as the router runs it; InvalidRequest naming the tensor or parameter."""
    values = read_inputs(request, _INPUT_SPECS)
    raw_text = one_element(values, "text_input", None)
    if raw_text is None:
        raise InvalidRequest("input 'text_input' is required")
    try:
        text = raw_text.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("input 'text_input' is not valid UTF-8") from None
    if not text:
        raise InvalidRequest("input 'text_input' must not be empty")
    stream = bool(one_element(values, "stream", False))
    params = _sampling_parameters(request, values)
    sampling = sampling_from(params)
    if stream and sampling.HasField("n") and sampling.n > 1:
        raise InvalidRequest("sampling_parameters: n > 1 needs stream=false")
    exclude_input = bool(one_element(values, "exclude_input_in_output", False))
    return InferCall(
        routed=RouterRequest(model=request.model_name, prompt=text, sampling=sampling, request_id=request_id,
                             priority=priority_from(params), request_id_unique=True),
        client_id=request.id,
        model_name=request.model_name,
        stream=stream,
        prompt_text="" if exclude_input or stream else text,
        outputs=_wanted_outputs(request, values),
    )


def _sampling_parameters(
    request: kserve_pb.ModelInferRequest, values: Mapping[str, list[Any]]
) -> dict[str, Any]:
    raw = one_element(values, "sampling_parameters", None)
    if raw is None:
        return {
            key: parameter_value(param) for key, param in request.parameters.items()
            if key not in _RESERVED_PARAMETERS and not key.startswith(_RESERVED_PREFIX)
        }
    try:
        params = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"input 'sampling_parameters' is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("input 'sampling_parameters' is nested too deeply") from None
    if not isinstance(params, dict):
        raise InvalidRequest("input 'sampling_parameters' must be a JSON object")
    return params


def _wanted_outputs(request: kserve_pb.ModelInferRequest, values: Mapping[str, list[Any]]) -> tuple[str, ...]:
    asked = {o.name for o in request.outputs}
    unknown = asked - set(_OUTPUT_NAMES)
    if unknown:
        raise InvalidRequest(f"unknown output(s) {sorted(unknown)}; "
                             f"the model's outputs are {list(_OUTPUT_NAMES)}")
    wanted = asked or {TEXT_OUTPUT}
    if one_element(values, "return_finish_reason", False):
        wanted.add(FINISH_REASON)
    if one_element(values, "return_num_output_tokens", False):
        wanted.add(NUM_OUTPUT_TOKENS)
    return tuple(name for name in _OUTPUT_NAMES if name in wanted)

"""Building KServe v2 inference inputs with ``tritonclient`` as Triton's vLLM backend expects them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient


def text_inputs(
    prompt: str | bytes, *, stream: bool | None = None, sampling: dict[str, Any] | str | None = None,
    flags: tuple[str, ...] = (),
) -> list[grpcclient.InferInput]:
    """``text_input`` plus the optional ``stream``, ``sampling_parameters`` and BOOL ``flags``."""
    data = prompt if isinstance(prompt, bytes) else prompt.encode()
    inputs = [_bytes_input("text_input", data)]
    if stream is not None:
        inputs.append(bool_input("stream", stream))
    if sampling is not None:
        raw = sampling if isinstance(sampling, str) else json.dumps(sampling)
        inputs.append(_bytes_input("sampling_parameters", raw.encode()))
    inputs.extend(bool_input(name, True) for name in flags)
    return inputs


def _bytes_input(name: str, data: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return tensor


def bool_input(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def texts(result: Any, name: str = "text_output") -> list[str]:
    """The BYTES output ``name`` of an ``InferResult`` as strings."""
    return [v.decode() for v in result.as_numpy(name)]


def is_final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)

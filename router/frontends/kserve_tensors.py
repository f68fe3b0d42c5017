"""KServe v2 tensors and parameters <-> Python values, for the router's KServe door.

Inputs arrive either as ``raw_input_contents`` (what ``tritonclient`` sends: one raw buffer per
input, BYTES elements each prefixed by a 4-byte little-endian length, BOOL one byte each) or as
typed ``contents``; both are read. Outputs are written as raw buffers, as Triton does. Errors
are :class:`~router.errors.InvalidRequest` naming the tensor (INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmserve.kserve import grpc_service_pb2 as kserve_pb
from router.errors import InvalidRequest

_LENGTH = struct.Struct("<I")
_UINT32 = struct.Struct("<I")


@dataclass(frozen=True)
class TensorSpec:
    """Name, data type and shape of one tensor of the model's metadata."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def read_inputs(
    request: kserve_pb.ModelInferRequest, specs: Mapping[str, TensorSpec]
) -> dict[str, list[Any]]:
    """Each input's elements by name (bytes for BYTES, bool for BOOL), checked against ``specs``."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    values: dict[str, list[Any]] = {}
    for i, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidRequest(f"unexpected input {tensor.name!r}; the model's inputs are {sorted(specs)}")
        if tensor.name in values:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(f"input {tensor.name!r} must be {spec.datatype}, got {tensor.datatype!r}")
        count = math.prod(tensor.shape) if tensor.shape else 0
        most = math.prod(spec.shape) if all(d >= 0 for d in spec.shape) else None
        if most is not None and count > most:  # before decoding: millions of elements are never read
            takes = "exactly one element" if most == 1 else f"at most {most} elements"
            raise InvalidRequest(f"input {tensor.name!r} must hold {takes}; its shape {list(tensor.shape)} "
                                 f"has {count}")
        elements = _decode_raw(tensor, raw[i], count) if raw else _decode_contents(tensor)
        if any(d < 0 for d in tensor.shape) or count != len(elements):
            found = f"{len(elements)}" if len(elements) <= max(count, 0) else f"more than {max(count, 0)}"
            raise InvalidRequest(f"input {tensor.name!r}: shape {list(tensor.shape)} does not match its "
                                 f"{found} element(s)")
        values[tensor.name] = elements
    return values


def _decode_raw(tensor: kserve_pb.ModelInferRequest.InferInputTensor, data: bytes, count: int) -> list[Any]:
    """The elements of a raw buffer, reading no more than one past the ``count`` its shape says."""
    if tensor.datatype == "BOOL":
        return [b != 0 for b in data[:count + 1]]
    if tensor.datatype == "BYTES":
        return decode_bytes_elements(data, tensor.name, most=count + 1)
    raise InvalidRequest(f"input {tensor.name!r}: data type {tensor.datatype} is not supported")


def _decode_contents(tensor: kserve_pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    if tensor.datatype == "BOOL":
        return list(tensor.contents.bool_contents)
    if tensor.datatype == "BYTES":
        return list(tensor.contents.bytes_contents)
    raise InvalidRequest(f"input {tensor.name!r}: data type {tensor.datatype} is not supported")


def decode_bytes_elements(data: bytes, name: str, most: int | None = None) -> list[bytes]:
    """The elements of a raw BYTES tensor (each a 4-byte little-endian length, then the bytes);
    ``most``: stop after that many (the caller finds the count wrong)."""
    out: list[bytes] = []
    offset = 0
    while offset < len(data) and (most is None or len(out) < most):
        if offset + 4 > len(data):
            raise InvalidRequest(f"input {name!r}: truncated BYTES element length")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidRequest(f"input {name!r}: BYTES element longer than its data")
        out.append(data[offset:offset + length])
        offset += length
    return out


def encode_bytes_elements(values: Sequence[bytes]) -> bytes:
    """A raw BYTES tensor of ``values``."""
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)


def one_element(values: Mapping[str, list[Any]], name: str, default: Any) -> Any:
    """The single element of input ``name`` (``default`` when absent)."""
    elements = values.get(name)
    if elements is None:
        return default
    if len(elements) != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one element, got {len(elements)}")
    return elements[0]


class OutputWriter:
    """Output tensors of one response, in the order they are added, as raw buffers."""

    def __init__(self, response: kserve_pb.ModelInferResponse) -> None:
        self._response = response

    def add_bytes(self, name: str, values: Sequence[bytes]) -> None:
        self._add(name, "BYTES", len(values), encode_bytes_elements(values))

    def add_uint32(self, name: str, values: Sequence[int]) -> None:
        self._add(name, "UINT32", len(values), b"".join(_UINT32.pack(v) for v in values))

    def _add(self, name: str, datatype: str, count: int, raw: bytes) -> None:
        self._response.outputs.add(name=name, datatype=datatype, shape=[count])
        self._response.raw_output_contents.append(raw)


def parameter_value(param: kserve_pb.InferParameter) -> Any:
    """The Python value of an ``InferParameter`` (None when unset)."""
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)

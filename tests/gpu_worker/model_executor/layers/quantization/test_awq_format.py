"""AWQ (AutoAWQ GEMM format) -> our 4-bit layout: exact against AWQ's own formula."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model_executor.layers.quantization.awq_format import (
    AWQ_ORDER,
    AwqConfig,
    convert_awq,
    dequantize_awq,
    pack_awq,
    unpack_awq,
)
from kernels.quant_reference import dequantize_wna16


def test_pack_order_is_awqs() -> None:
    """Field i of a word holds output AWQ_ORDER[i] (0 2 4 6 1 3 5 7), lowest bits first."""
    values = torch.arange(8, dtype=torch.int64).reshape(1, 8) + 1  # output j holds j + 1
    word = int(pack_awq(values)[0, 0]) & 0xFFFFFFFF
    fields = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert fields == [AWQ_ORDER[i] + 1 for i in range(8)]
    rows = torch.randint(0, 16, (5, 32), generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_awq(pack_awq(rows)), rows)


@pytest.mark.parametrize("symmetric", [False, True])
def test_convert_awq_is_exact(symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    k, n, group = 128, 48, 32
    q = torch.randint(0, 16, (k, n), generator=gen)
    shape = (k // group, n)
    zeros = torch.full(shape, 8) if symmetric else torch.randint(0, 16, shape, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).half()
    qweight, qzeros = pack_awq(q), pack_awq(zeros)
    w = convert_awq(qweight, qzeros, scales, group)
    assert (w.offsets is None) == symmetric
    got = dequantize_wna16(w.qweight, w.scales, w.offsets, w.bits, w.group_size)
    assert torch.equal(got, dequantize_awq(qweight, qzeros, scales, group))
    assert torch.equal(got, ((q - zeros.repeat_interleave(group, 0)).float()
                             * scales.float().repeat_interleave(group, 0)).t())


def test_config_and_refusals() -> None:
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM",
          "modules_to_not_convert": ["visual"]}
    assert AwqConfig.from_hf(qc) == AwqConfig(group_size=128, ignore=("visual",))
    for bad in ({"version": "gemv"}, {"bits": 8}, {"zero_point": False}, {"group_size": 20}):
        with pytest.raises(ValueError, match="AWQ"):
            AwqConfig.from_hf({**qc, **bad})
    with pytest.raises(ValueError, match="do not fit"):
        zero = torch.zeros(96, 8, dtype=torch.int64)
        convert_awq(pack_awq(zero), pack_awq(zero[:2]), torch.ones(2, 8, dtype=torch.float16), 64)

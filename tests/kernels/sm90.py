"""``kernels.sm90_compile.compile_sm90`` for tests: skipped where this Triton build cannot
compile for sm_90."""

from __future__ import annotations

from typing import Any

import pytest


def compile_sm90_or_skip(*args: Any, **kwargs: Any) -> Any:
    """:func:`kernels.sm90_compile.compile_sm90`, or the test skipped where there is no CUDA
    toolchain in this Triton build."""
    from kernels.sm90_compile import compile_sm90

    try:
        return compile_sm90(*args, **kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.skip(f"cannot compile for sm_90 here: {exc}")

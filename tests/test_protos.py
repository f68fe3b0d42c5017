"""The generated protobuf/gRPC code under llmserve/v1 is current and importable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "codegen.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_generated_code_imports_without_path_patching() -> None:
    """The proto package llmserve.v1 maps onto the Python package: plain imports work."""
    from llmserve.v1 import generation_pb2, generation_pb2_grpc, internal_pb2, internal_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "llmserve.v1"
    assert set(generation_pb2.DESCRIPTOR.services_by_name) == {"Generation"}
    assert set(internal_pb2.DESCRIPTOR.services_by_name) == {"WorkerControl"}
    assert hasattr(generation_pb2_grpc, "GenerationStub") and hasattr(internal_pb2_grpc, "WorkerControlStub")

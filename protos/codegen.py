"""Generate the Python protobuf/gRPC code for everything under protos/.

Run from anywhere: ``python protos/codegen.py`` (``make protos``). Output goes to the
package tree (``llmserve/v1/*_pb2*.py`` and ``.pyi``) with import paths that need no
patching, because the proto package ``llmserve.v1`` maps onto the Python package
``llmserve.v1``. ``--check`` regenerates into a temporary folder and fails if the
committed files differ (used by the tests).

The KServe v2 protocol (``protos/llmserve/kserve/``, proto package ``inference``) keeps the
protocol's own names for the wire, and ``tritonclient``'s generated code registers the same
names in protobuf's process-wide descriptor pool; one pool cannot hold both. Its module
therefore registers in a pool of its own (:data:`PRIVATE_POOL_MODULES`), so a process may load
the router's KServe door and Triton's client side by side. Nothing else changes: messages
serialize and parse as usual, and gRPC needs no descriptors.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PRIVATE_POOL_MODULES = ("llmserve/kserve/grpc_service_pb2.py",)
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto file; return the generated files (relative to out_dir)."""
    from grpc_tools import protoc  # imported here: grpcio-tools is a dev/test dependency

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    for module in PRIVATE_POOL_MODULES:
        _use_private_pool(out_dir / module)
    return sorted(p.relative_to(out_dir) for p in (out_dir / "llmserve").rglob("*_pb2*.py*"))


def _use_private_pool(path: Path) -> None:
    """Make a generated module register its descriptors in a new pool, not the default one."""
    text = path.read_text()
    if text.count(_DEFAULT_POOL) != 1:
        raise RuntimeError(f"{path}: expected one registration in the default descriptor pool")
    path.write_text(text.replace(_DEFAULT_POOL, _PRIVATE_POOL))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated files are stale")
    args = parser.parse_args(argv)
    if not args.check:
        files = generate(ROOT)
        print("generated:", *map(str, files))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        fresh = Path(tmp)
        stale = [f for f in files if not (ROOT / f).exists() or not filecmp.cmp(fresh / f, ROOT / f, False)]
    if stale:
        print("stale generated files (run `make protos`):", *map(str, stale), file=sys.stderr)
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())

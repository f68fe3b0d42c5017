"""Packaging: the router's dependency set stays free of torch/CUDA, and the entry points and flags
that deploy/ (Compose, Kubernetes) uses exist.

The dependency check reads the installed metadata of the ``llmserve`` distribution and follows
``Requires-Dist`` recursively through what is installed, evaluating markers as the router image
would (no extras), so a base dependency that starts pulling torch fails here before an image build.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ROUTER = ("torch", "triton")


def _load_deploy_helpers() -> ModuleType:
    path = ROOT / "tests" / "deploy" / "deploy_manifests.py"
    spec = importlib.util.spec_from_file_location("llmserve_tests_deploy_manifests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


deploy = _load_deploy_helpers()


def _requirements(dist: str, extras: Iterable[str]) -> list[Requirement]:
    """Requirements of an installed distribution that apply with these extras on this platform."""
    reqs = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None:
            reqs.append(req)
        elif any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
            reqs.append(req)
    return reqs


def resolve_installed(dist: str, extras: Iterable[str] = ()) -> tuple[dict[str, str], set[str]]:
    """Transitive dependency closure over installed distributions.

    Returns ({canonical name: version} of everything reached, {names required but not installed}).
    """
    seen: dict[str, str] = {}
    missing: set[str] = set()
    stack: list[tuple[str, tuple[str, ...]]] = [(dist, tuple(extras))]
    visited: set[tuple[str, tuple[str, ...]]] = set()
    while stack:
        name, wanted = stack.pop()
        key = (canonicalize_name(name), tuple(sorted(wanted)))
        if key in visited:
            continue
        visited.add(key)
        try:
            seen[key[0]] = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.add(key[0])
            continue
        for req in _requirements(name, wanted):
            stack.append((req.name, tuple(req.extras)))
    return seen, missing


def _is_gpu_package(name: str) -> bool:
    return name in FORBIDDEN_IN_ROUTER or name.startswith(("nvidia-", "cuda-", "pytorch-"))


def test_router_dependency_set_has_no_torch_and_no_nvidia() -> None:
    closure, missing = resolve_installed("llmserve")
    assert not missing, f"base requirements not installed, cannot check them: {sorted(missing)}"
    assert {"grpcio", "redis", "protobuf"} <= set(closure)
    offenders = sorted(name for name in closure if _is_gpu_package(name))
    assert not offenders, f"the router's (base) dependency set pulls {offenders}"


def test_worker_extra_lists_torch() -> None:
    worker_reqs = {canonicalize_name(r.name) for r in _requirements("llmserve", ["worker"])}
    base_reqs = {canonicalize_name(r.name) for r in _requirements("llmserve", [])}
    assert "torch" in worker_reqs - base_reqs
    assert "triton" in worker_reqs - base_reqs or sys.platform != "linux"


def test_declared_base_dependencies_mention_no_gpu_package() -> None:
    # Independent of what happens to be installed: the pyproject's own list.
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]]
    assert not [n for n in names if _is_gpu_package(n)]


def test_console_scripts_are_installed() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
               if ep.dist is not None and canonicalize_name(ep.dist.name) == "llmserve"}
    assert scripts == {
        "llmserve": "llmserve.cli:main",
        "llmserve-worker": "gpu_worker.__main__:main",
        "llmserve-router": "router.__main__:main",
    }


def test_router_cli_runs_where_torch_cannot_be_imported() -> None:
    """`llmserve-router --help` with torch and triton made unimportable, as in the router image."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "triton") or name.startswith("nvidia"):
                    raise ImportError(f"{name} is not in the router image")
                return None
        sys.meta_path.insert(0, Block())
        sys.argv = ["llmserve-router", "--help"]
        from router.__main__ import main
        try:
            main()
        except SystemExit as exc:
            sys.exit(exc.code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--redis-url" in result.stdout


INVOCATIONS = deploy.invocations()
ENTRY_POINTS = sorted({inv.command[0] for inv in INVOCATIONS})


def test_manifests_use_the_expected_entry_points() -> None:
    assert set(ENTRY_POINTS) == {"llmserve-router", "llmserve-worker", deploy.HEALTHCHECK_COMMAND,
                                 deploy.DRAIN_COMMAND}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_entry_point_help_runs(entry_point: str) -> None:
    result = deploy.help_output(entry_point)
    assert result.returncode == 0, f"`{entry_point} --help` failed:\n{result.stderr[-3000:]}"
    assert "usage:" in result.stdout.lower()


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_flag_the_manifests_pass_exists(entry_point: str) -> None:
    known = deploy.help_flags(entry_point)
    unknown: dict[str, list[str]] = {}
    for inv in INVOCATIONS:
        if inv.command[0] != entry_point:
            continue
        for flag in deploy.flags_of(inv.command[1:]):
            if flag not in known:
                unknown.setdefault(flag, []).append(inv.where)
    assert not unknown, f"`{entry_point} --help` does not list {sorted(unknown)}; used by {unknown}"


@pytest.mark.parametrize("entry_point", ["llmserve-router", "llmserve-worker"])
def test_flag_values_in_manifests_are_accepted_choices(entry_point: str) -> None:
    """For flags with a fixed set of choices ({a,b,c} in argparse help), the values used are valid."""
    text = deploy.help_output(entry_point).stdout
    choices = {m.group(1): set(m.group(2).split(","))
               for m in re.finditer(r"(--[a-z0-9-]+) \{([^}]+)\}", text)}
    for inv in (i for i in INVOCATIONS if i.command[0] == entry_point):
        for arg in inv.command[1:]:
            flag, _, value = arg.partition("=")
            if flag in choices and value and not value.startswith("$("):
                assert value in choices[flag], f"{inv.where}: {arg} not in {sorted(choices[flag])}"


def test_transformers_models_import_beside_our_kernels_package() -> None:
    """Our top-level ``kernels`` package is the one imported, and transformers' modeling code
    imports beside it: no installed distribution of Hugging Face's ``kernels`` (which
    transformers >= 5.25 requires) shadows it or is shadowed by it (pyproject's pin, DECISIONS 106)."""
    script = textwrap.dedent(
        """
        import kernels
        import transformers.modeling_utils  # imports Hugging Face's `kernels` if it is installed
        print(kernels.__file__)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve().parent == ROOT / "kernels"
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("kernels")

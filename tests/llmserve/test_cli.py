"""``llmserve generate`` / ``llmserve models`` against a real worker on loopback."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from llmserve.client import AsyncClient
from tests.llmserve.loopback_worker import loopback_worker

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "tiny-cli"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target(tiny_model: Callable[[str], Path]) -> AsyncIterator[str]:
    async with loopback_worker(tiny_model("llama"), MODEL, num_kv_blocks=128) as address:
        yield address


async def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in its own process (the worker shares this event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmserve.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_generate_streams_the_completion_to_stdout(target: str) -> None:
    async with AsyncClient(target) as client:
        expected = await client.complete(MODEL, "The sky is", max_tokens=12, temperature=0, ignore_eos=True)
    code, out, err = await cli(
        "generate",
        "--target",
        target,
        "--model",
        MODEL,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--usage",
        "The sky is",
    )
    assert code == 0, err
    assert out == expected.text + "\n"
    assert "completion_tokens=12" in err


async def test_generate_chat(target: str) -> None:
    async with AsyncClient(target) as client:
        expected = await client.complete(
            MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, ignore_eos=True
        )
    code, out, err = await cli(
        "generate",
        "--chat",
        "--target",
        target,
        "--model",
        MODEL,
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "Hi",
    )
    assert code == 0, err
    assert out == expected.text + "\n"


async def test_models_and_errors(target: str) -> None:
    code, out, err = await cli("models", "--target", target)
    assert code == 0, err
    assert out.split("\t")[0] == MODEL and "max_model_len=512" in out
    code, out, err = await cli("generate", "--target", target, "--model", "nope", "Hi")
    assert code != 0 and "NOT_FOUND" in err and MODEL in err
    assert "Traceback" not in err

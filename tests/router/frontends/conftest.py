"""One ``llmserve up`` stack (subprocess, tiny model, HTTP door on, tracing to an OTLP receiver in
this process) shared by the front-door tests of the session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.otlp_receiver import OtlpReceiver
from tests.router.frontends.stack_proc import StackProc, running_stack


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def stack(tiny_model: Callable[[str], Path], otlp_receiver: OtlpReceiver,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProc]:
    with running_stack(tiny_model("llama"), tmp_path_factory.mktemp("stack") / "llmserve-up.log",
                       otlp_receiver.endpoint) as proc:
        yield proc

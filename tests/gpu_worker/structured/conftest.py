"""The structured-output tests run SmolLM2 on the CPU on one torch thread: on the shared 2-core test
machine two OpenMP threads spin at every barrier while the other is descheduled, and
``test_structured_smollm2.py`` took 258 s of wall time (88 s of CPU) there, 20 s (12.5 s) on one
thread (docs/BENCHMARKS.md, "Structured output overhead")."""

from __future__ import annotations

from tests.helpers.torch_threads import _one_torch_thread  # noqa: F401 - autouse fixture

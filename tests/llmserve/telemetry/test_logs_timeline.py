"""Request logs (text and JSON lines) and RequestTimeline arithmetic."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from llmserve.telemetry import LogSettings, RequestTimeline, configure_logging, log_request_finished

FIELDS = dict(request_id="r-1", trace_id="0af7651916cd43dd8448eb211c80319c", model="m", worker="w0",
              prompt_tokens=12, completion_tokens=5, cached_tokens=8, ttft_s=0.25, e2e_s=1.5,
              finish_reason="stop")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level restored after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_log_line_has_every_field(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("INFO", fmt="json", stream=stream)
    log_request_finished(logging.getLogger("llmserve.worker"), **FIELDS)  # type: ignore[arg-type]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    ts = record.pop("ts")
    assert ts.endswith("Z") and "T" in ts
    assert record == {"level": "INFO", "logger": "llmserve.worker", "message": "request finished",
                      "event": "request finished", **FIELDS}


def test_text_log_line_is_key_values(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("info", fmt="text", stream=stream)
    log_request_finished(logging.getLogger("llmserve.router"), **{**FIELDS, "ttft_s": None})  # type: ignore[arg-type]
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(
        "INFO llmserve.router: request finished request_id=r-1 trace_id=0af7651916cd43dd8448eb211c80319c "
        "model=m worker=w0 prompt_tokens=12 completion_tokens=5 cached_tokens=8 ttft_s=None "
        "e2e_s=1.500000 finish_reason=stop")


def test_below_info_logs_nothing(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("WARNING", fmt="json", stream=stream)
    log_request_finished(logging.getLogger("x"), **FIELDS)  # type: ignore[arg-type]
    assert stream.getvalue() == ""


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", fmt="xml")


def test_log_settings_read_back_what_configure_logging_installed(root_logger: logging.Logger) -> None:
    for handler in list(root_logger.handlers):  # pytest's own capture handlers are not ours
        root_logger.removeHandler(handler)
    assert LogSettings.of_this_process() is None
    configure_logging("warning", fmt="json", stream=io.StringIO())
    assert LogSettings.of_this_process() == LogSettings(logging.WARNING, "json")
    configure_logging("DEBUG", fmt="text", stream=io.StringIO())
    assert LogSettings.of_this_process() == LogSettings(logging.DEBUG, "text")
    with pytest.raises(ValueError, match="log format"):
        LogSettings(logging.INFO, "xml")


def test_timeline_stages_and_inter_token_latencies() -> None:
    t = RequestTimeline.start(arrival_s=100.0)
    t.mark_scheduled(at_s=100.5)
    t.mark_scheduled(at_s=107.0)  # a preemption does not move the first scheduling
    t.mark_tokens(1, at_s=101.0)
    t.mark_tokens(2, at_s=102.0)  # two tokens in one chunk: two gaps of 0.5
    t.mark_tokens(0, at_s=103.0)  # nothing new: ignored
    t.mark_tokens(1, at_s=102.25)
    t.mark_finished(at_s=103.0)
    assert (t.queue_s, t.prefill_s, t.ttft_s, t.decode_s, t.e2e_s) == (0.5, 0.5, 1.0, 1.25, 3.0)
    assert t.itl_s == [0.5, 0.5, 0.25]
    assert t.num_generated_tokens == 4
    assert t.epoch_ns(101.0) - t.epoch_ns(100.0) == 1_000_000_000


def test_timeline_first_chunk_of_several_tokens() -> None:
    t = RequestTimeline.start(arrival_s=0.0)
    t.mark_tokens(3, at_s=2.0)  # e.g. speculative tokens: no gap is known inside the chunk
    assert t.scheduled_s == 2.0 and t.ttft_s == 2.0 and t.itl_s == [0.0, 0.0]


def test_timeline_of_a_request_that_never_ran() -> None:
    t = RequestTimeline.start(arrival_s=5.0)
    t.mark_finished(at_s=6.0)
    assert (t.queue_s, t.ttft_s, t.prefill_s, t.decode_s, t.e2e_s) == (None, None, None, None, 1.0)

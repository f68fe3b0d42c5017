"""Process logging for router and worker: text for people, JSON lines for machines.

Entry points call :func:`configure_logging` once (``--log-level``, ``--log-format``); servicers
call :func:`log_request_finished` once per finished request. Fields travel on the log record
(``llmserve_fields``), so the JSON formatter emits them as top-level keys while the text line
carries them as ``key=value`` in the message, readable under any formatter.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
REQUEST_FINISHED = "request finished"
FIELDS_ATTR = "llmserve_fields"
EVENT_ATTR = "llmserve_event"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "llmserve"  # names the root handler configure_logging installs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and,
    for records from :func:`log_request_finished`, ``event`` plus its fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, EVENT_ATTR, None)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": event if event is not None else record.getMessage(),
        }
        if event is not None:
            out["event"] = event
            out.update(getattr(record, FIELDS_ATTR, {}))
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str | int = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one writing ``fmt`` ("text" or "json") to
    ``stream`` (default stderr) at ``level``. Call from entry points only."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


@dataclass(frozen=True)
class LogSettings:
    """The arguments of :func:`configure_logging` (less the stream), picklable: how a child
    process (the engine core, for one) is told to log the way its parent does."""

    level: int
    fmt: str = "text"

    def __post_init__(self) -> None:
        if self.fmt not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {LOG_FORMATS}, got {self.fmt!r}")

    @classmethod
    def of_this_process(cls) -> LogSettings | None:
        """What :func:`configure_logging` installed here; None if it was never called (then
        logging belongs to whoever embeds us, and a child should leave its own alone)."""
        root = logging.getLogger()
        for handler in root.handlers:
            if handler.get_name() == _HANDLER_NAME:
                fmt = "json" if isinstance(handler.formatter, JsonFormatter) else "text"
                return cls(root.level, fmt)
        return None

    def apply(self) -> None:
        """:func:`configure_logging` with these settings, writing to this process's stderr."""
        configure_logging(self.level, self.fmt)


def _fmt_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    return text if text and " " not in text else json.dumps(text)


def log_request_finished(
    logger: logging.Logger,
    *,
    request_id: str,
    trace_id: str,
    model: str,
    worker: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    ttft_s: float | None,
    e2e_s: float | None,
    finish_reason: str,
    device_s: float | None = None,
    cost: float | None = None,
) -> None:
    """One INFO line for a finished request. ``trace_id``: ``span.trace_id`` ("" when untraced);
    ``worker``: the worker id (on the worker, its own). Timings in seconds, None when unknown.
    ``device_s`` (device seconds the request used) and ``cost`` (in the currency of
    ``--device-cost-per-hour``) are added to the line when given."""
    if not logger.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "trace_id": trace_id,
        "model": model,
        "worker": worker,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "ttft_s": ttft_s,
        "e2e_s": e2e_s,
        "finish_reason": finish_reason,
    }
    if device_s is not None:
        fields["device_s"] = device_s
    if cost is not None:
        fields["cost"] = cost
    text = " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
    logger.info("%s %s", REQUEST_FINISHED, text, extra={EVENT_ATTR: REQUEST_FINISHED, FIELDS_ATTR: fields})

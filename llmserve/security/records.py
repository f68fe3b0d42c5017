"""Never trust the state store: worker records are checked field by field before any use.

A worker record (``llmserve.fleet.WorkerRecord``) read from Redis is used to pick the address a
user's prompt is sent to, so a router accepts it only when

- it is a JSON object of at most ``MAX_RECORD_BYTES`` (no NaN/Infinity; unknown fields ignored),
- every field has its type and range: ``worker_id`` and ``address`` printable and bounded,
  ``address`` a plain ``host:port`` (never a gRPC target such as ``unix:/...``), ``model``
  bounded, ``block_size`` a power of two in [1, 2048], ``max_model_len`` >= 1, load counters
  non-negative integers, ``kv_usage`` in [0, 1], ``max_num_seqs`` >= 1, booleans (``draining``,
  ``standby``) real booleans, ``quantization`` / ``kv_cache_dtype`` short lowercase names and
  ``weight_bytes`` a non-negative integer when present, ``adapters`` (LoRA adapters served
  besides ``model``) a list of at most ``MAX_ADAPTERS`` distinct model names, none of them
  ``model``, when present,
- its ``worker_id`` is the id under which it is stored,
- its ``heartbeat_at`` (the worker's wall clock) is at most ``max_age_s`` old and not in the
  future, allowing ``clock_skew_s`` either way: a record whose key never expires is ignored
  once its worker stops heartbeating,
- and, when the router has a fleet secret, its ``sig`` is the HMAC-SHA256 of its canonical JSON
  under one of the fleet's secrets (:class:`FleetSecret`).

Anything else raises :class:`RecordRejected` with one of :data:`REJECT_REASONS` (a bounded
label set for metrics). Nothing here evaluates or unpickles: ``json.loads`` and type checks only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.fleet.records import LoadReport, WorkerRecord
from llmserve.security.files import WatchedFile

log = logging.getLogger(__name__)

REJECT_REASONS = (
    "too_large", "not_json", "schema", "out_of_range", "id_mismatch", "stale", "unsigned",
    "bad_signature", "over_limit",
)
MAX_RECORD_BYTES = 64 * 1024
MAX_ID_CHARS = 128
MAX_MODEL_CHARS = 256
MAX_ADDRESS_CHARS = 261  # 255-byte host name + ":" + 5-digit port
MAX_BLOCK_SIZE = 2048
MAX_MODEL_LEN = 1 << 30
MAX_COUNT = 1 << 31  # load counters
MAX_WEIGHT_BYTES = 1 << 50
MAX_ADAPTERS = 256  # LoRA adapters per worker record
_FORMAT_NAME = re.compile(r"[a-z0-9_+-]{1,32}")
SIGNATURE_FIELD = "sig"
_SIGNING_CONTEXT = b"llmserve.worker-record.v1\n"
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]+")
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]")


class RecordRejected(ValueError):
    """A record the router must not use; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- signatures ------------------------------------------------------------------------------

def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, ASCII, the signature field left out."""
    body = {k: v for k, v in fields.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


class FleetSecret:
    """HMAC-SHA256 keys shared by the fleet: the first signs, any of them verifies (rotation:
    add the new secret on a second line everywhere, then move it first, then drop the old one).

    Secrets are at least 16 bytes (use 32 random bytes, e.g. ``openssl rand -hex 32``)."""

    MIN_BYTES = 16

    def __init__(self, secrets: list[bytes]) -> None:
        if not secrets:
            raise ValueError("a fleet secret file needs at least one secret")
        for s in secrets:
            if len(s) < self.MIN_BYTES:
                raise ValueError(f"fleet secrets must be at least {self.MIN_BYTES} bytes")
        self._secrets = list(secrets)

    @classmethod
    def parse(cls, text: str) -> FleetSecret:
        """One secret per line; blank lines and ``#`` comments are ignored."""
        lines = [line.strip() for line in text.splitlines()]
        return cls([line.encode() for line in lines if line and not line.startswith("#")])

    def sign(self, fields: Mapping[str, Any], context: bytes = _SIGNING_CONTEXT) -> str:
        """Hex HMAC-SHA256 of the canonical JSON of ``fields`` under the first secret; ``context``
        names what is signed (a worker record by default), so one kind never passes for another."""
        message = context + canonical_json(fields)
        return hmac.new(self._secrets[0], message, hashlib.sha256).hexdigest()

    def verify(self, fields: Mapping[str, Any], context: bytes = _SIGNING_CONTEXT) -> bool:
        """True when ``fields[SIGNATURE_FIELD]`` is the signature (of ``context``) under one of
        the secrets."""
        sig = fields.get(SIGNATURE_FIELD)
        if not isinstance(sig, str):
            return False
        message = context + canonical_json(fields)
        ok = False
        for secret in self._secrets:  # every secret is tried: the time does not depend on which matched
            expected = hmac.new(secret, message, hashlib.sha256).hexdigest()
            ok = hmac.compare_digest(expected.encode(), sig.encode("ascii", "replace")) or ok
        return ok


class FleetSecretFile:
    """A :class:`FleetSecret` read from a file and re-read when the file changes."""

    def __init__(self, path: Path | str, *, min_interval_s: float = 1.0) -> None:
        self._file = WatchedFile(path, lambda paths: FleetSecret.parse(paths[0].read_text()),
                                 min_interval_s=min_interval_s)

    def current(self) -> FleetSecret:
        return self._file.get()


SecretSource = Callable[[], FleetSecret]


# -- parsing and checks ------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise RecordRejected("not_json", f"{name} is not a number")


def load_fields(blob: bytes | str) -> dict[str, Any]:
    """The JSON object in ``blob`` (size-checked first); RecordRejected otherwise."""
    size = len(blob)
    if size > MAX_RECORD_BYTES:
        raise RecordRejected("too_large", f"{size} bytes")
    try:
        fields = json.loads(blob, parse_constant=_reject_constant)
    except RecordRejected:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RecordRejected("not_json", str(exc)[:80]) from None
    if not isinstance(fields, dict):
        raise RecordRejected("schema", f"a JSON {type(fields).__name__}, not an object")
    return fields


def _field(fields: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    if name not in fields:
        if default is None:
            raise RecordRejected("schema", f"{name} is missing")
        return default
    value = fields[name]
    # bool is an int in Python: a JSON true is never a count, and a count never a flag
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise RecordRejected("schema", f"{name} has type {type(value).__name__}")
    return value


def _check(ok: bool, detail: str) -> None:
    if not ok:
        raise RecordRejected("out_of_range", detail)


def _int(fields: Mapping[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value: int = _field(fields, name, int, default)
    _check(low <= value <= high, f"{name}={value} not in [{low}, {high}]")
    return value


def _number(fields: Mapping[str, Any], name: str, low: float, high: float,
            default: float | None = None) -> float:
    value = _field(fields, name, (int, float), default)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    _check(math.isfinite(number) and low <= number <= high, f"{name} not in [{low}, {high}]")
    return number


def _text(fields: Mapping[str, Any], name: str, max_chars: int) -> str:
    value: str = _field(fields, name, str)
    _check(0 < len(value) <= max_chars, f"{name} has {len(value)} characters (1..{max_chars})")
    _check(value.isprintable(), f"{name} has unprintable characters")
    return value


def check_address(address: str) -> str:
    """``host:port`` with a DNS name, IPv4 or bracketed IPv6 host and a port in 1..65535."""
    _check(len(address) <= MAX_ADDRESS_CHARS, "address too long")
    host, sep, port = address.rpartition(":")
    _check(bool(sep) and port.isdigit() and 0 < int(port) < 65536, f"address {address[:64]!r}: bad port")
    _check(bool(_HOST.fullmatch(host) or _IPV6.fullmatch(host)), f"address {address[:64]!r}: bad host")
    return address


def check_model_name(name: str) -> bool:
    """Whether ``name`` may be a model name (bounded, printable)."""
    return 0 < len(name) <= MAX_MODEL_CHARS and name.isprintable()


def record_from_fields(fields: Mapping[str, Any]) -> WorkerRecord:
    """A :class:`WorkerRecord` from a parsed JSON object, every field checked (no freshness or
    signature check: see :class:`RecordReader`)."""
    worker_id = _text(fields, "worker_id", MAX_ID_CHARS)
    _check(bool(_PRINTABLE_ID.fullmatch(worker_id)), "worker_id has spaces")
    model = _text(fields, "model", MAX_MODEL_CHARS)
    address = check_address(_text(fields, "address", MAX_ADDRESS_CHARS))
    block_size = _int(fields, "block_size", 1, MAX_BLOCK_SIZE)
    _check(block_size & (block_size - 1) == 0, f"block_size={block_size} is not a power of two")
    raw_load = _field(fields, "load", dict, {})
    load = LoadReport(
        num_running=_int(raw_load, "num_running", 0, MAX_COUNT, 0),
        num_waiting=_int(raw_load, "num_waiting", 0, MAX_COUNT, 0),
        kv_usage=_number(raw_load, "kv_usage", 0.0, 1.0, 0.0),
        max_num_seqs=_int(raw_load, "max_num_seqs", 1, MAX_COUNT, 1),
        max_queue_len=_int(raw_load, "max_queue_len", 0, MAX_COUNT, 1),
        num_kv_blocks=_int(raw_load, "num_kv_blocks", 0, MAX_COUNT, 0),
    )
    sig = fields.get(SIGNATURE_FIELD, "")
    if not isinstance(sig, str) or len(sig) > 128:
        raise RecordRejected("schema", "sig is not a short string")
    return WorkerRecord(
        worker_id=worker_id,
        model=model,
        address=address,
        block_size=block_size,
        max_model_len=_int(fields, "max_model_len", 1, MAX_MODEL_LEN),
        load=load,
        draining=_field(fields, "draining", bool, False),
        heartbeat_at=_number(fields, "heartbeat_at", 0.0, 1e11),
        sig=sig,
        standby=_field(fields, "standby", bool, False),
        quantization=_format_name(fields, "quantization"),
        kv_cache_dtype=_format_name(fields, "kv_cache_dtype"),
        weight_bytes=_int(fields, "weight_bytes", 0, MAX_WEIGHT_BYTES, 0),
        adapters=_adapters(fields, model),
    )


def _adapters(fields: Mapping[str, Any], model: str) -> tuple[str, ...]:
    """The optional LoRA adapter names: distinct model names other than ``model``; () when absent."""
    if "adapters" not in fields:
        return ()
    names: list[Any] = _field(fields, "adapters", list)
    _check(len(names) <= MAX_ADAPTERS, f"adapters has {len(names)} names (at most {MAX_ADAPTERS})")
    if not all(isinstance(name, str) for name in names):
        raise RecordRejected("schema", "adapters holds a value that is not a string")
    _check(all(check_model_name(name) for name in names), "adapters holds a name that is no model name")
    _check(len(set(names)) == len(names), "adapters holds a name twice")
    _check(model not in names, "adapters holds the record's own model")
    return tuple(names)


def _format_name(fields: Mapping[str, Any], name: str) -> str:
    """An optional short lowercase name (a weight format, a KV cache dtype); "" when absent."""
    if name not in fields:
        return ""
    value: str = _field(fields, name, str)
    _check(bool(_FORMAT_NAME.fullmatch(value)), f"{name} is not a short lowercase name")
    return value


@dataclass(frozen=True)
class Rejection:
    """A record a read skipped (``count`` > 1: that many ids skipped for one reason at once)."""

    worker_id: str
    reason: str
    detail: str
    count: int = 1


def over_limit(ids: list[str], limit: int) -> tuple[list[str], list[Rejection]]:
    """The first ``limit`` of the sorted ``ids``, and one rejection counting the rest."""
    ids = sorted(ids)
    if len(ids) <= limit:
        return ids, []
    rest = len(ids) - limit
    skipped = Rejection(ids[limit], "over_limit", f"{rest} records beyond the first {limit}", rest)
    return ids[:limit], [skipped]


class RecordReader:
    """Turns the stored bytes of one worker record into a checked :class:`WorkerRecord`.

    ``max_age_s``: the record TTL (a heartbeat older than that, plus ``clock_skew_s``, is
    stale); ``secret``: when set (a :class:`FleetSecret` or a function returning the current
    one), unsigned and badly signed records are rejected. ``max_records`` bounds how many
    records one read of the store parses (ids in sorted order; the rest are ``over_limit``).
    """

    def __init__(
        self,
        *,
        max_age_s: float = 5.0,
        clock_skew_s: float = 1.0,
        secret: FleetSecret | SecretSource | None = None,
        max_records: int = 4096,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if max_age_s <= 0 or clock_skew_s < 0 or max_records < 1:
            raise ValueError("need max_age_s > 0, clock_skew_s >= 0, max_records >= 1")
        self.max_age_s = max_age_s
        self.clock_skew_s = clock_skew_s
        self.max_records = max_records
        if isinstance(secret, FleetSecret):
            fixed = secret
            self._secret: SecretSource | None = lambda: fixed
        else:
            self._secret = secret
        self._wall_clock = wall_clock

    @property
    def verifies_signatures(self) -> bool:
        return self._secret is not None

    def read(self, key_id: str, blob: bytes | str) -> WorkerRecord:
        """The checked record stored under ``key_id``; :class:`RecordRejected` otherwise."""
        fields = load_fields(blob)
        record = record_from_fields(fields)
        if record.worker_id != key_id:
            raise RecordRejected("id_mismatch", f"record of {record.worker_id!r} stored as {key_id!r}")
        age = self._wall_clock() - record.heartbeat_at
        if age > self.max_age_s + self.clock_skew_s:
            raise RecordRejected("stale", f"last heartbeat {age:.1f}s ago")
        if age < -self.clock_skew_s:
            raise RecordRejected("stale", f"heartbeat {-age:.1f}s in the future")
        if self._secret is not None:
            if SIGNATURE_FIELD not in fields or not record.sig:
                raise RecordRejected("unsigned", "no signature and the fleet secret is set")
            if not self._secret().verify(fields):
                raise RecordRejected("bad_signature", "the signature does not match the fleet secret")
        return record


class RejectionLog:
    """Logs skipped records at most once per reason per ``interval_s`` (with the count since the
    last line), so a store full of bad records cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, rejection: Rejection) -> None:
        reason = rejection.reason
        now = self._clock()
        if now < self._next.get(reason, 0.0):
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._next[reason] = now + self._interval_s
        more = self._suppressed.pop(reason, 0)
        self._log.warning("skipped worker record %r (%s)%s", rejection.worker_id[:MAX_ID_CHARS],
                          rejection.detail, f"; {more} more skipped for {reason} since the last report"
                          if more else "")

"""Worker records are checked field by field; signatures under the fleet secret (issue 17,
findings 3 and 4 at the record level; the router-level tests are in tests/router/test_security.py)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from llmserve.fleet import LoadReport, MemoryStateStore, PublisherTiming, WorkerIdentity, WorkerPublisher
from llmserve.fleet.records import WorkerRecord
from llmserve.security.records import FleetSecret, RecordReader, RecordRejected, Rejection, RejectionLog

SECRET = FleetSecret([b"s" * 32])


def fields(**overrides: Any) -> dict[str, Any]:
    good = WorkerRecord("w1", "m", "10.0.0.7:50061", 16, 2048, LoadReport(num_running=1, max_num_seqs=8),
                        heartbeat_at=time.time()).fields()
    good.update(overrides)
    return good


def blob(**overrides: Any) -> bytes:
    return json.dumps(fields(**overrides)).encode()


def reason(data: bytes | str, reader: RecordReader | None = None, key_id: str = "w1") -> str:
    with pytest.raises(RecordRejected) as err:
        (reader or RecordReader()).read(key_id, data)
    return err.value.reason


def test_a_good_record_reads_back_equal() -> None:
    record = RecordReader().read("w1", blob())
    assert record.load.num_running == 1 and record.address == "10.0.0.7:50061" and record.block_size == 16


@pytest.mark.parametrize("data,expected", [
    (b"\x80\x81 not json", "not_json"),
    (b"[1, 2]", "schema"),
    (b'{"worker_id": "w1"', "not_json"),
    (json.dumps(fields(kv_usage=1)).replace('"kv_usage": 1', '"x": NaN').encode(), "not_json"),
    (b"{" + b'"a":' * 0 + b'"pad": "' + b"x" * 70_000 + b'"}', "too_large"),
])
def test_bytes_that_are_not_a_record(data: bytes, expected: str) -> None:
    assert reason(data) == expected


@pytest.mark.parametrize("overrides,expected", [
    ({"block_size": 0}, "out_of_range"),
    ({"block_size": 24}, "out_of_range"),  # not a power of two
    ({"block_size": 4096}, "out_of_range"),
    ({"block_size": "16"}, "schema"),
    ({"block_size": True}, "schema"),
    ({"load": "oops"}, "schema"),
    ({"load": {"num_running": -1}}, "out_of_range"),
    ({"load": {"num_waiting": 1.5}}, "schema"),
    ({"load": {"kv_usage": 2.0}}, "out_of_range"),
    ({"load": {"max_num_seqs": 0}}, "out_of_range"),
    ({"max_model_len": 0}, "out_of_range"),
    ({"address": "unix:/var/run/docker.sock"}, "out_of_range"),
    ({"address": "dns:///evil:443"}, "out_of_range"),
    ({"address": "10.0.0.7"}, "out_of_range"),
    ({"address": "10.0.0.7:99999"}, "out_of_range"),
    ({"address": 7}, "schema"),
    ({"model": "x" * 300}, "out_of_range"),
    ({"model": "a\nb"}, "out_of_range"),
    ({"worker_id": "w 1"}, "out_of_range"),
    ({"draining": "no"}, "schema"),
    ({"heartbeat_at": 10**400}, "out_of_range"),
    ({"quantization": "FP8; rm -rf"}, "out_of_range"),
    ({"quantization": 8}, "schema"),
    ({"kv_cache_dtype": "x" * 40}, "out_of_range"),
    ({"weight_bytes": -1}, "out_of_range"),
    ({"weight_bytes": 1 << 60}, "out_of_range"),
])
def test_each_field_is_type_and_range_checked(overrides: dict[str, Any], expected: str) -> None:
    assert reason(blob(**overrides)) == expected


def test_model_formats_read_back_and_are_optional() -> None:
    record = RecordReader().read("w1", blob(quantization="fp8", kv_cache_dtype="fp8", weight_bytes=72 << 30))
    assert (record.quantization, record.kv_cache_dtype, record.weight_bytes) == ("fp8", "fp8", 72 << 30)
    assert "quantization" not in fields() and RecordReader().read("w1", blob()).quantization == ""


def test_missing_fields_and_id_mismatch() -> None:
    data = fields()
    del data["address"]
    assert reason(json.dumps(data)) == "schema"
    assert reason(blob(), key_id="w2") == "id_mismatch"


def test_ipv6_and_names_are_addresses() -> None:
    for address in ("[::1]:50061", "worker-cpu:50061", "llmserve_worker.default.svc:1"):
        assert RecordReader().read("w1", blob(address=address)).address == address


def test_a_heartbeat_older_than_the_ttl_or_in_the_future_is_stale() -> None:
    now = 1_000_000.0
    reader = RecordReader(max_age_s=5.0, clock_skew_s=1.0, wall_clock=lambda: now)
    assert RecordReader(wall_clock=lambda: now).read("w1", blob(heartbeat_at=now - 5.5)).worker_id == "w1"
    assert reason(blob(heartbeat_at=now - 6.5), reader) == "stale"
    assert reason(blob(heartbeat_at=0), reader) == "stale"  # a hand-written record with no heartbeat
    assert reason(blob(heartbeat_at=now + 60), reader) == "stale"  # "forever fresh" is not fresh


def test_signatures_under_the_fleet_secret() -> None:
    reader = RecordReader(secret=SECRET)
    signed = fields()
    signed["sig"] = SECRET.sign(signed)
    assert reader.read("w1", json.dumps(signed)).sig == signed["sig"]
    assert reason(blob(), reader) == "unsigned"
    tampered = dict(signed, address="203.0.113.9:50061")
    assert reason(json.dumps(tampered), reader) == "bad_signature"
    other = FleetSecret([b"o" * 32])
    assert reason(json.dumps(dict(signed, sig=other.sign(signed))), reader) == "bad_signature"
    # Rotation: a router holding both secrets accepts records signed with either.
    both = RecordReader(secret=FleetSecret([b"o" * 32, b"s" * 32]))
    assert both.read("w1", json.dumps(signed)).worker_id == "w1"


def test_secrets_are_long_enough() -> None:
    with pytest.raises(ValueError):
        FleetSecret.parse("short\n")
    assert FleetSecret.parse("# comment\n\n" + "k" * 32 + "\n").sign({"a": 1})


async def test_a_publisher_signs_what_routers_verify() -> None:
    store = MemoryStateStore()
    publisher = WorkerPublisher(
        store, WorkerIdentity("w1", "m", "127.0.0.1:1", 16, 2048),
        load_fn=lambda: LoadReport(num_running=2, kv_usage=0.25, max_num_seqs=8),
        kv_events_fn=list, cached_hashes_fn=_no_hashes, timing=PublisherTiming(), secret=lambda: SECRET)
    assert await publisher.publish_once()
    view = await store.read_fleet(RecordReader(secret=SECRET))
    assert [w.worker_id for w in view.workers] == ["w1"] and view.rejected == ()
    view = await store.read_fleet(RecordReader(secret=FleetSecret([b"o" * 32])))
    assert view.workers == () and [r.reason for r in view.rejected] == ["bad_signature"]


async def _no_hashes() -> list[bytes]:
    return []


def test_rejections_are_logged_at_most_once_per_reason_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    t = [0.0]
    log = RejectionLog(logging.getLogger("test.records"), interval_s=60, clock=lambda: t[0])
    with caplog.at_level("WARNING", logger="test.records"):
        for i in range(100):
            log.report(Rejection(f"w{i}", "stale", "old"))
        log.report(Rejection("x", "not_json", "bad"))
        t[0] = 61.0
        log.report(Rejection("w100", "stale", "old"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "99 more skipped for stale" in lines[2]

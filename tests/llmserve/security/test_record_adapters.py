"""A worker record's LoRA adapter names are checked like model names, and signed like the rest."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from llmserve.fleet.records import LoadReport, WorkerRecord
from llmserve.security.records import MAX_ADAPTERS, FleetSecret, RecordReader, RecordRejected

SECRET = FleetSecret([b"s" * 32])


def fields(**overrides: Any) -> dict[str, Any]:
    good = WorkerRecord("w1", "base", "10.0.0.7:50061", 16, 2048, LoadReport(max_num_seqs=8),
                        heartbeat_at=time.time(), adapters=("sql-lora",)).fields()
    good.update(overrides)
    return good


def reason(data: dict[str, Any], reader: RecordReader | None = None) -> str:
    with pytest.raises(RecordRejected) as err:
        (reader or RecordReader()).read("w1", json.dumps(data))
    return err.value.reason


def test_adapters_read_back_as_a_tuple_and_are_optional() -> None:
    assert RecordReader().read("w1", json.dumps(fields())).adapters == ("sql-lora",)
    many = [f"lora-{i}" for i in range(MAX_ADAPTERS)]
    assert RecordReader().read("w1", json.dumps(fields(adapters=many))).adapters == tuple(many)
    assert RecordReader().read("w1", json.dumps(fields(adapters=[]))).adapters == ()
    old = fields()
    del old["adapters"]  # a record from a worker that predates adapters
    assert RecordReader().read("w1", json.dumps(old)).adapters == ()


@pytest.mark.parametrize("adapters,expected", [
    ("sql-lora", "schema"),  # a string, not a list
    ({"sql-lora": 1}, "schema"),
    (None, "schema"),
    (["sql-lora", 7], "schema"),
    ([["sql-lora"]], "schema"),
    ([""], "out_of_range"),
    (["x" * 300], "out_of_range"),
    (["a\nb"], "out_of_range"),
    (["sql-lora", "sql-lora"], "out_of_range"),
    (["sql-lora", "base"], "out_of_range"),  # the record's own model
    ([f"l{i}" for i in range(MAX_ADAPTERS + 1)], "out_of_range"),
])
def test_bad_adapter_lists_are_refused(adapters: Any, expected: str) -> None:
    assert reason(fields(adapters=adapters)) == expected


def test_a_signed_record_with_adapters_verifies_and_a_tampered_list_does_not() -> None:
    reader = RecordReader(secret=SECRET)
    record = WorkerRecord("w1", "base", "10.0.0.7:50061", 16, 2048, heartbeat_at=time.time(),
                          adapters=("sql-lora", "chat-lora"))
    signed = record.fields()
    signed["sig"] = SECRET.sign(signed)
    assert reader.read("w1", json.dumps(signed)).adapters == ("sql-lora", "chat-lora")
    for adapters in (["sql-lora", "chat-lora", "evil-lora"], ["chat-lora"], ["chat-lora", "sql-lora"]):
        assert reason(dict(signed, adapters=adapters), reader) == "bad_signature"
    dropped = dict(signed)
    del dropped["adapters"]
    assert reason(dropped, reader) == "bad_signature"
    # A record signed without adapters does not gain some.
    plain = WorkerRecord("w1", "base", "10.0.0.7:50061", 16, 2048, heartbeat_at=time.time()).fields()
    plain["sig"] = SECRET.sign(plain)
    assert reader.read("w1", json.dumps(plain)).adapters == ()
    assert reason(dict(plain, adapters=["evil-lora"]), reader) == "bad_signature"

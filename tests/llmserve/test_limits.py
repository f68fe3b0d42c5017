"""The torch-free checks of ``llmserve.limits`` that both router and worker run: stop strings and
structured-output formats (their servers' statuses are tested in the admission tests)."""

from __future__ import annotations

import argparse

import pytest

from llmserve.limits import LimitExceeded, RequestLimits, add_limit_flags, json_depth, limits_from_args


@pytest.mark.parametrize(
    ("text", "depth"),
    [("1", 0), ('"[[["', 0), ("[]", 1), ('{"a": [1, {"b": {}}]}', 4), ("[[], [[[]]], []]", 4),
     ("not json [[[", 0)],
)
def test_json_depth_counts_objects_and_arrays(text: str, depth: int) -> None:
    assert json_depth(text, 100) == depth


def test_json_depth_stops_at_the_bound_and_past_the_parser() -> None:
    assert json_depth("[" * 10 + "]" * 10, 4) == 5
    assert json_depth("[" * 50_000 + "]" * 50_000, 64) == 65  # the parser's RecursionError


def test_format_checks_name_the_field_and_the_flag() -> None:
    limits = RequestLimits(max_format_chars=10, max_format_depth=2)
    limits.check_format("json", '{"a": {}}')
    with pytest.raises(LimitExceeded, match=r"json is nested too deeply.*--max-format-depth"):
        limits.check_format("json", '[[[]]]')
    with pytest.raises(LimitExceeded, match=r"structured_output.grammar is too large: 11 characters") as err:
        limits.check_format("grammar", "x" * 11)
    assert err.value.limit == "max_format_chars"
    limits.check_format("choice", choices=["abcde", "fghij"])
    with pytest.raises(LimitExceeded, match="structured_output.choice is too large: 11"):
        limits.check_format("choice", choices=["abcde", "fghijk"])
    limits.check_format("regex", "[[[[")  # depth is a JSON schema's only


def test_stop_checks() -> None:
    limits = RequestLimits(max_stop_strings=2, max_stop_chars=5)
    limits.check_stop(["ab", "cde"])
    with pytest.raises(LimitExceeded, match="stop is too large: 3 strings.*--max-stop-strings"):
        limits.check_stop(["a", "b", "c"])
    with pytest.raises(LimitExceeded, match="stop is too large: 6 characters.*--max-stop-chars"):
        limits.check_stop(["abc", "def"])


def test_every_limit_has_a_flag_and_a_positive_bound() -> None:
    parser = argparse.ArgumentParser()
    add_limit_flags(parser)
    args = parser.parse_args(["--max-stop-strings", "3", "--max-format-depth", "9"])
    limits = limits_from_args(args)
    assert (limits.max_stop_strings, limits.max_format_depth) == (3, 9)
    assert limits_from_args(parser.parse_args([])) == RequestLimits()
    with pytest.raises(ValueError, match="max_stop_chars must be at least 1"):
        RequestLimits(max_stop_chars=0)

"""Routing policies on hand-made candidates: prefix vs load, hot-prefix guard, determinism."""

from __future__ import annotations

import pytest

from llmserve.fleet import LoadReport, WorkerRecord
from router.policy import Candidate, RouteQuery, make_policy


def cand(wid: str, matched: int = 0, running: int = 0, waiting: int = 0, unreported: int = 0,
         kv: float = 0.0, max_num_seqs: int = 8, max_queue_len: int = 8, model: str = "m") -> Candidate:
    load = LoadReport(running, waiting, kv, max_num_seqs, max_queue_len, 64)
    return Candidate(WorkerRecord(wid, model, f"h:{wid}", 16, 512, load), matched, unreported)


Q = RouteQuery("m", prompt_blocks=10, affinity_key=b"k" * 16, request_key=b"r1")


def ids(ranked: object) -> list[str]:
    return [w.worker_id for w in ranked.workers]  # type: ignore[attr-defined]


def test_prefix_prefers_cached_worker_against_moderate_load() -> None:
    ranked = make_policy("prefix").rank(Q, [cand("a", running=2), cand("b", matched=8, running=2 + 2)])
    assert ids(ranked) == ["b", "a"] and ranked.reason == "prefix_hit"


def test_prefix_longer_match_wins_at_equal_load() -> None:
    ranked = make_policy("prefix").rank(Q, [cand("a", matched=3), cand("b", matched=9), cand("c")])
    assert ids(ranked) == ["b", "a", "c"]


def test_hot_prefix_guard_spreads_a_piled_up_prefix() -> None:
    # b holds the hot prefix but its queue exceeds the idlest by more than max(2, 0.5 * 8) = 4.
    piled = cand("b", matched=10, running=8, waiting=2)
    ranked = make_policy("prefix").rank(Q, [cand("a", running=1), piled])
    assert ids(ranked)[0] == "a" and ranked.reason == "hot_prefix_guard"
    # Requests this router sent since the last heartbeat count too.
    ranked = make_policy("prefix").rank(Q, [cand("a"), cand("b", matched=10, unreported=5)])
    assert ids(ranked)[0] == "a"


def test_kv_usage_counts_as_load() -> None:
    ranked = make_policy("least-load").rank(Q, [cand("a", kv=0.9), cand("b", kv=0.1)])
    assert ids(ranked) == ["b", "a"]


def test_ties_follow_the_affinity_key_the_same_way_every_time() -> None:
    cands = [cand(w) for w in "abcd"]
    first = {make_policy("prefix").rank(RouteQuery("m", 10, bytes([i]) * 16), cands).workers[0].worker_id
             for i in range(32)}
    assert len(first) > 1, "different prefixes spread over workers"
    again = [make_policy("prefix").rank(RouteQuery("m", 10, bytes([i]) * 16), cands[::-1]) for i in range(32)]
    assert [ids(r)[0] for r in again] == [
        ids(make_policy("prefix").rank(RouteQuery("m", 10, bytes([i]) * 16), cands))[0] for i in range(32)]


def test_least_load_ignores_prefix() -> None:
    ranked = make_policy("least-load").rank(Q, [cand("a", matched=10, running=3), cand("b", running=1)])
    assert ids(ranked) == ["b", "a"]


def test_round_robin_rotates() -> None:
    policy = make_policy("round-robin")
    cands = [cand("a", matched=10), cand("b"), cand("c")]
    assert [ids(policy.rank(Q, cands))[0] for _ in range(4)] == ["a", "b", "c", "a"]


def test_round_robin_rotates_each_model_on_its_own() -> None:
    policy = make_policy("round-robin")
    fleet = {m: [cand(f"{m}{i}", model=m) for i in range(2)] for m in ("x", "y")}
    # Interleaved x, y, x, y, ...: one shared counter would send every x to x0 and every y to y1.
    picks: dict[str, list[str]] = {"x": [], "y": []}
    for model in ["x", "y"] * 4 + ["x", "x", "y"]:
        picks[model].append(ids(policy.rank(RouteQuery(model, 10, b"k" * 16), fleet[model]))[0])
    assert picks == {"x": ["x0", "x1"] * 3, "y": ["y0", "y1", "y0", "y1", "y0"]}


def test_full_flag_and_unknown_policy() -> None:
    assert cand("a", running=8, waiting=8).full and not cand("a", running=8, waiting=7).full
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")


def test_a_new_prefix_goes_home_despite_small_load_differences() -> None:
    policy = make_policy("prefix")
    home = policy.rank(Q, [cand(w) for w in "abcd"]).workers[0].worker_id
    # Another router has sent a couple of requests home that this one does not know of: same choice.
    loaded = [cand(w, unreported=2 if w == home else 0) for w in "abcd"]
    assert policy.rank(Q, loaded).workers[0].worker_id == home
    # Far more load than the guard allows: the prefix moves elsewhere.
    piled = [cand(w, running=8, waiting=4 if w == home else 0) if w == home else cand(w) for w in "abcd"]
    assert policy.rank(Q, piled).workers[0].worker_id != home

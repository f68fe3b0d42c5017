"""Environment-variable defaults for flags (docs/CONFIG.md scheme)."""

from __future__ import annotations

import argparse

import pytest

from llmserve.envflags import apply_env_defaults, env_name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--policy", choices=["prefix", "round-robin"], default="prefix")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--verbose", action="store_true")
    return p


def test_env_name() -> None:
    assert env_name("--max-num-seqs") == "LLMSERVE_MAX_NUM_SEQS"


def test_variables_fill_defaults_and_required_flags() -> None:
    p = _parser()
    apply_env_defaults(
        p,
        {
            "LLMSERVE_REDIS_URL": "redis://r:6379/0",
            "LLMSERVE_MAX_NUM_SEQS": "8",
            "LLMSERVE_POLICY": "round-robin",
            "LLMSERVE_PREFIX_CACHING": "off",
            "LLMSERVE_VERBOSE": "yes",
        },
    )
    args = p.parse_args([])
    assert (args.redis_url, args.max_num_seqs, args.policy) == ("redis://r:6379/0", 8, "round-robin")
    assert args.prefix_caching is False and args.verbose is True


def test_flags_win_over_variables() -> None:
    p = _parser()
    apply_env_defaults(p, {"LLMSERVE_MAX_NUM_SEQS": "8"})
    args = p.parse_args(["--redis-url", "x", "--max-num-seqs", "3"])
    assert args.max_num_seqs == 3
    assert "[env: LLMSERVE_MAX_NUM_SEQS]" in p.format_help()


@pytest.mark.parametrize(
    "env",
    [{"LLMSERVE_MAX_NUM_SEQS": "many"}, {"LLMSERVE_POLICY": "random"}, {"LLMSERVE_VERBOSE": "maybe"}],
)
def test_bad_values_name_the_variable(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        apply_env_defaults(_parser(), env)
    assert next(iter(env)) in capsys.readouterr().err

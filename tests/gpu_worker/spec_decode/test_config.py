"""``speculative_config``: vLLM's shape, checked up front, from a dict, JSON, a flag or its variable."""

from __future__ import annotations

import pytest

from gpu_worker.__main__ import build_parser, configs_from_args
from gpu_worker.config import EngineConfig
from gpu_worker.spec_decode.config import SpeculativeConfig


def test_ngram_bounds_default_as_vllm() -> None:
    both = SpeculativeConfig("ngram", 4)
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_value(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    )
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = SpeculativeConfig("ngram", 2, prompt_lookup_min=2)
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)


@pytest.mark.parametrize(("value", "message"), [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "model is for method 'draft_model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "unknown keys"),
    ({"method": "ngram"}, "needs 'method' and 'num_speculative_tokens'"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_configs_name_the_problem(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_value(value)  # type: ignore[arg-type]


def test_engine_config_takes_the_dict_of_llm_kwargs() -> None:
    config = EngineConfig.from_kwargs(
        "m", speculative_config={"method": "draft_model", "model": "small", "num_speculative_tokens": 3}
    )
    assert config.speculative_config == SpeculativeConfig("draft_model", 3, model="small")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_config={"method": "ngram"})  # type: ignore[arg-type]


def test_worker_flag_and_variable() -> None:
    text = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}'
    args = build_parser({}).parse_args(["--model", "m", "--speculative-config", text])
    assert configs_from_args(args)[0].speculative_config == SpeculativeConfig("ngram", 3, 4, 4)
    args = build_parser({"LLMSERVE_SPECULATIVE_CONFIG": text}).parse_args(["--model", "m"])
    assert configs_from_args(args)[0].speculative_config == SpeculativeConfig("ngram", 3, 4, 4)
    assert configs_from_args(build_parser({}).parse_args(["--model", "m"]))[0].speculative_config is None


def test_worker_flag_errors_name_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["--model", "m", "--speculative-config", '{"method": "x"}'])
    assert "speculative_config needs 'method' and 'num_speculative_tokens'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser({"LLMSERVE_SPECULATIVE_CONFIG": "{"})
    assert "LLMSERVE_SPECULATIVE_CONFIG" in capsys.readouterr().err

"""tests/deploy/promql.py: metric names and labels read out of PromQL as dashboards write it."""

from __future__ import annotations

import pytest

from tests.deploy.promql import (
    Matcher,
    PromQLSyntaxError,
    Selector,
    grouping_labels,
    metric_names,
    selectors,
)


def test_quantile_of_a_rate_of_buckets() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, model_name) '
            '(rate(llmserve:time_to_first_token_seconds_bucket{model_name=~"$model"}[$__rate_interval])))')
    assert selectors(expr) == [Selector("llmserve:time_to_first_token_seconds_bucket",
                                        (Matcher("model_name", "=~", "$model"),), "rate")]
    assert grouping_labels(expr) == ["le", "model_name"]


def test_ratio_with_trailing_grouping_and_vector_matching() -> None:
    expr = """
      sum(rate(llmserve:prefix_cache_hits_total[5m])) by (instance)   # hits
        / on (instance) group_left
      sum(rate(llmserve:prefix_cache_queries_total{job="llmserve-worker"}[5m])) by (instance) > bool 0.5
    """
    found = selectors(expr)
    assert [s.metric for s in found] == ["llmserve:prefix_cache_hits_total",
                                         "llmserve:prefix_cache_queries_total"]
    assert found[1].matchers == (Matcher("job", "=", "llmserve-worker"),)
    assert {s.function for s in found} == {"rate"}
    assert grouping_labels(expr) == ["instance", "instance", "instance"]


def test_keywords_numbers_durations_and_modifiers_are_not_metrics() -> None:
    expr = ("max by (model) (max_over_time(llmserve:router_live_workers[1h] offset 5m)) "
            "unless max by (model) (llmserve:router_live_workers @ end() > 0) or vector(Inf) and NaN < 1e3")
    assert metric_names(expr) == {"llmserve:router_live_workers"}
    found = selectors(expr)
    assert [s.function for s in found] == ["max_over_time", "max"]


def test_subquery_and_functions_of_functions() -> None:
    expr = "max_over_time(deriv(rate(llmserve:generation_tokens_total[1m])[30m:1m])[1h:]) * 60"
    assert selectors(expr) == [Selector("llmserve:generation_tokens_total", (), "rate")]


def test_label_values_label_and_escaped_strings() -> None:
    expr = 'sum(llmserve:router_requests_total{outcome!~"ok|cancel\\"led", model=\'m\'})'
    (only,) = selectors(expr)
    assert only.matchers == (Matcher("outcome", "!~", 'ok|cancel"led'), Matcher("model", "=", "m"))


def test_name_matchers_and_quoted_names() -> None:
    assert metric_names('{__name__="llmserve:num_requests_waiting", model_name="x"}') == {
        "llmserve:num_requests_waiting"}
    assert metric_names('rate({"llmserve:prompt_tokens_total"}[5m])') == {"llmserve:prompt_tokens_total"}


def test_aggregation_parameters_and_without() -> None:
    expr = 'topk(5, sum without (instance, job) (llmserve:kv_cache_usage_perc)) + count_values("v", up)'
    assert metric_names(expr) == {"llmserve:kv_cache_usage_perc", "up"}
    assert grouping_labels(expr) == ["instance", "job"]


@pytest.mark.parametrize("bad", ["sum(rate(x[5m])", "rate(x[5m]))", 'x{a=}', "x ; y"])
def test_malformed_expressions_are_rejected(bad: str) -> None:
    with pytest.raises(PromQLSyntaxError):
        selectors(bad)

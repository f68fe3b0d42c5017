"""Router flags: each has its LLMSERVE_* variable; flags win; bad values name the variable."""

from __future__ import annotations

import pytest

from llmserve.grpc_limits import GrpcPortLimits
from router.__main__ import build_parser, config_from_args, parse_args
from router.frontends.http_limits import HttpConnectionLimits


def test_variables_supply_every_observability_and_drain_flag() -> None:
    env = {"LLMSERVE_REDIS_URL": "redis://r:6379/0", "LLMSERVE_METRICS_PORT": "9400",
           "LLMSERVE_LOG_FORMAT": "json", "LLMSERVE_LOG_LEVEL": "debug", "LLMSERVE_DRAIN_GRACE_S": "7.5",
           "LLMSERVE_POLICY": "round-robin"}
    args = parse_args([], env)
    assert (args.redis_url, args.log_format, args.log_level) == ("redis://r:6379/0", "json", "DEBUG")
    config = config_from_args(args)
    assert (config.metrics_port, config.drain_grace_s, config.policy) == (9400, 7.5, "round-robin")


def test_flags_win_and_defaults_hold() -> None:
    args = parse_args(["--redis-url", "redis://x", "--drain-grace-s", "2"], {"LLMSERVE_DRAIN_GRACE_S": "9"})
    config = config_from_args(args)
    assert (config.drain_grace_s, config.metrics_port, args.log_format) == (2.0, None, "text")


def test_bad_variable_is_an_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser({"LLMSERVE_LOG_FORMAT": "xml"})
    assert "LLMSERVE_LOG_FORMAT" in capsys.readouterr().err


def test_help_shows_the_variables() -> None:
    text = " ".join(build_parser({}).format_help().split())  # undo line wrapping
    names = ("LLMSERVE_METRICS_PORT", "LLMSERVE_LOG_FORMAT", "LLMSERVE_DRAIN_GRACE_S", "LLMSERVE_REDIS_URL")
    assert all(f"env: {name}" in text for name in names)


def test_size_limit_flags_reach_the_config_and_are_checked() -> None:
    env = {"LLMSERVE_MAX_HTTP_BODY_BYTES": "1048576"}
    config = config_from_args(parse_args(["--redis-url", "redis://x", "--max-message-bytes", "65536"], env))
    assert (config.max_message_bytes, config.max_http_body_bytes) == (65536, 1 << 20)
    defaults = config_from_args(parse_args(["--redis-url", "redis://x"], {}))
    assert defaults.max_message_bytes == defaults.max_http_body_bytes == 16 << 20
    with pytest.raises(ValueError, match="max_http_body_bytes"):
        config_from_args(parse_args(["--redis-url", "redis://x", "--max-http-body-bytes", "10"], {}))


def test_http_connection_flags_reach_the_config_and_are_checked() -> None:
    env = {"LLMSERVE_HTTP_HEADER_TIMEOUT_S": "2.5", "LLMSERVE_MAX_HTTP_CONNECTIONS": "64"}
    config = config_from_args(parse_args(
        ["--redis-url", "redis://x", "--http-body-timeout-s", "7", "--max-http-header-bytes", "4096"], env))
    assert config.http_limits == HttpConnectionLimits(header_timeout_s=2.5, body_timeout_s=7.0,
                                                      max_header_bytes=4096, max_connections=64)
    defaults = config_from_args(parse_args(["--redis-url", "redis://x"], {}))
    assert defaults.http_limits == HttpConnectionLimits()
    for flag, value, name in [("--http-header-timeout-s", "nan", "http_header_timeout_s"),
                              ("--http-body-timeout-s", "0", "http_body_timeout_s"),
                              ("--http-body-timeout-s", "inf", "http_body_timeout_s"),
                              ("--max-http-header-bytes", "100", "max_http_header_bytes"),
                              ("--max-http-connections", "0", "max_http_connections")]:
        with pytest.raises(ValueError, match=name):
            config_from_args(parse_args(["--redis-url", "redis://x", flag, value], {}))


def test_grpc_port_flags_reach_the_config_and_are_checked() -> None:
    env = {"LLMSERVE_MAX_GRPC_CONNECTIONS": "64", "LLMSERVE_MAX_CONCURRENT_RPCS": "100"}
    flags = ["--grpc-handshake-timeout-s", "2.5", "--grpc-max-connection-idle-s", "0",
             "--grpc-request-timeout-s", "5"]
    config = config_from_args(parse_args(["--redis-url", "redis://x", *flags], env))
    assert config.grpc_limits == GrpcPortLimits(max_connections=64, handshake_timeout_s=2.5,
                                                max_connection_idle_s=0.0, request_timeout_s=5.0)
    assert config.max_concurrent_rpcs == 100
    defaults = config_from_args(parse_args(["--redis-url", "redis://x"], {}))
    assert (defaults.grpc_limits, defaults.max_concurrent_rpcs) == (GrpcPortLimits(), 8192)
    # The doors' connections together: what the router's open-file limit is raised for.
    assert defaults.connection_count() == 4096
    with_http = config_from_args(parse_args(["--redis-url", "redis://x", "--http-port", "8000"], {}))
    assert with_http.connection_count() == 4096 + 4096
    for flag, value, name in [("--max-grpc-connections", "0", "max_grpc_connections"),
                              ("--grpc-handshake-timeout-s", "nan", "grpc_handshake_timeout_s"),
                              ("--grpc-max-connection-idle-s", "-1", "grpc_max_connection_idle_s"),
                              ("--grpc-request-timeout-s", "0", "grpc_request_timeout_s"),
                              ("--max-concurrent-rpcs", "0", "max_concurrent_rpcs")]:
        with pytest.raises(ValueError, match=name):
            config_from_args(parse_args(["--redis-url", "redis://x", flag, value], {}))

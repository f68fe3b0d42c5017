"""Command-line flags of the security settings, shared by ``llmserve-router`` and
``llmserve-worker`` (each flag also reads ``LLMSERVE_<FLAG>``; docs/CONFIG.md, docs/SECURITY.md).
"""

from __future__ import annotations

import argparse

from llmserve.security.tls import RedisTls, TlsSettings


def add_tls_flags(group: argparse._ArgumentGroup, *, router: bool) -> None:
    """``--tls-cert``, ``--tls-key``, ``--tls-ca`` (and the router's client-side flags)."""
    group.add_argument("--tls-cert", default=None,
                       help="PEM certificate (chain) of this server's gRPC port"
                       + (" and HTTP port" if router else "") + "; re-read when the file changes")
    group.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    if router:
        group.add_argument("--tls-ca", default=None,
                           help="fleet CA: dial workers over TLS, verify them against it and present "
                           "--tls-client-cert (mutual TLS)")
        group.add_argument("--tls-client-cert", default=None,
                           help="client certificate presented to workers (default: --tls-cert)")
        group.add_argument("--tls-client-key", default=None, help="private key of --tls-client-cert")
        group.add_argument("--tls-server-name", default=None,
                           help="name in the workers' certificates (default: the host of their address)")
    else:
        group.add_argument("--tls-ca", default=None,
                           help="fleet CA: require client certificates signed by it (mutual TLS; "
                           "needs --tls-cert)")


def tls_from_args(args: argparse.Namespace) -> TlsSettings:
    """The TLS files the flags name (ValueError when incomplete or missing)."""
    return TlsSettings(
        cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
        client_cert=getattr(args, "tls_client_cert", None), client_key=getattr(args, "tls_client_key", None),
        server_name=getattr(args, "tls_server_name", None),
    )


def add_redis_tls_flags(group: argparse._ArgumentGroup) -> None:
    """``--redis-ca``, ``--redis-tls-cert``, ``--redis-tls-key`` (for a ``rediss://`` URL)."""
    group.add_argument("--redis-ca", default=None,
                       help="CA bundle of Redis's certificate (rediss:// URLs; default: the system's)")
    group.add_argument("--redis-tls-cert", default=None,
                       help="client certificate for Redis (when it sets tls-auth-clients)")
    group.add_argument("--redis-tls-key", default=None, help="private key of --redis-tls-cert")


def redis_tls_from_args(args: argparse.Namespace) -> RedisTls:
    tls = RedisTls(ca_file=args.redis_ca, cert_file=args.redis_tls_cert, key_file=args.redis_tls_key)
    if args.redis_url:
        tls.connection_kwargs(args.redis_url)  # ValueError: TLS files with a redis:// URL
    return tls


def add_fleet_secret_flag(group: argparse._ArgumentGroup, *, router: bool) -> None:
    group.add_argument(
        "--fleet-secret-file", default=None,
        help=("only use worker records signed with a secret of this file (HMAC-SHA256)" if router
              else "sign this worker's records with the first secret of this file (HMAC-SHA256)"))


def add_worker_security_flags(parser: argparse.ArgumentParser) -> None:
    """The worker's security flags: TLS / mTLS, WorkerControl access, record signing, Redis TLS."""
    group = parser.add_argument_group("security (docs/SECURITY.md)")
    add_tls_flags(group, router=False)
    group.add_argument("--allow-remote-control", action=argparse.BooleanOptionalAction, default=False,
                       help="serve WorkerControl (Drain, GetWorkerInfo, GetTokenizer) to any peer; by "
                       "default only to peers with a fleet client certificate (--tls-ca) and local callers")
    add_fleet_secret_flag(group, router=False)
    add_redis_tls_flags(group)

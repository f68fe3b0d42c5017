"""The router's security settings in one frozen config (docs/SECURITY.md, docs/CONFIG.md).

- ``tls``: the router's certificate for its gRPC and HTTP ports (``--tls-cert``/``--tls-key``),
  and the fleet CA with the client certificate it presents to workers (``--tls-ca``,
  ``--tls-client-cert``/``--tls-client-key``, ``--tls-server-name``): mutual TLS to workers.
- ``access``: API keys and per-key rate limits (``router/access.py``).
- Trust in the state store: every worker record is checked (``llmserve.security.records``);
  with ``fleet_secret_file`` only records signed with the fleet secret are used; records older
  than the heartbeat TTL (``record_ttl_s``) plus ``max_clock_skew_s`` are ignored; at most
  ``max_workers_per_model`` workers of a model are considered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmserve.fleet import PublisherTiming
from llmserve.security.records import FleetSecretFile, RecordReader
from llmserve.security.tls import TlsSettings
from router.access import AccessConfig


@dataclass(frozen=True)
class RouterSecurityConfig:
    """How one router authenticates clients, talks to workers and trusts the state store."""

    tls: TlsSettings = field(default_factory=TlsSettings)
    access: AccessConfig = field(default_factory=AccessConfig)
    fleet_secret_file: str | None = None
    record_ttl_s: float = PublisherTiming().ttl_s
    max_clock_skew_s: float = 1.0
    max_workers_per_model: int = 256

    def __post_init__(self) -> None:
        if self.fleet_secret_file is not None and not Path(self.fleet_secret_file).is_file():
            raise ValueError(f"fleet_secret_file {self.fleet_secret_file!r} is not a file")
        if self.record_ttl_s <= 0 or self.max_clock_skew_s < 0:
            raise ValueError("record_ttl_s must be > 0 and max_clock_skew_s >= 0")
        if self.max_workers_per_model < 1:
            raise ValueError("max_workers_per_model must be >= 1")

    def record_reader(self) -> RecordReader:
        """The checks every worker record read from the store goes through."""
        secret = FleetSecretFile(self.fleet_secret_file).current if self.fleet_secret_file else None
        return RecordReader(max_age_s=self.record_ttl_s, clock_skew_s=self.max_clock_skew_s, secret=secret)

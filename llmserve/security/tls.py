"""TLS for the gRPC ports and the router's calls to workers, with certificates reloaded from disk.

Server side, :class:`ServerTls` gives ``grpc.dynamic_ssl_server_credentials`` whose fetcher
(called by gRPC before every new handshake) re-reads the certificate, key and client CA when
their files changed: replace the files (e.g. cert-manager renewing a Secret) and new connections
get the new certificate, with no restart; connections already open keep theirs. With a client
CA the port requires a client certificate signed by it (mutual TLS): a client without one, or
with one from another CA, fails the handshake (the caller sees UNAVAILABLE).

Client side (router -> worker), :class:`ClientTls` gives channel credentials that verify the
worker against the fleet CA and present the router's client certificate; its ``generation``
changes when the files change, and the router's channel pool then dials new channels.

:class:`HttpTls` is the same for the router's HTTP door (an ``ssl.SSLContext`` that switches to
the newly read certificate during the handshake).

Peer checks for authorization (``WorkerControl``): :func:`peer_has_verified_certificate` (the
connection presented a client certificate the server verified) and :func:`peer_is_loopback`.
Torch-free: the router imports it.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from llmserve.security.files import WatchedFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyPair:
    """A private key and its certificate chain, PEM."""

    key: bytes
    chain: bytes


def load_key_pair(cert: Path, key: Path) -> KeyPair:
    """Read a certificate chain and its key; ValueError when they do not parse or do not match."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise ValueError(f"{cert} / {key}: not a matching PEM certificate and key ({exc})") from exc
    return KeyPair(key=key.read_bytes(), chain=cert.read_bytes())


def load_ca(path: Path) -> bytes:
    """Read a PEM CA bundle; ValueError when it holds no certificate."""
    data = path.read_bytes()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{path}: not a PEM CA bundle ({exc})") from exc
    return data


@dataclass(frozen=True)
class _ServerMaterial:
    pair: KeyPair
    client_ca: bytes | None


class ServerTls:
    """TLS (and with ``client_ca``, mutual TLS) for a gRPC server port; files reloaded on change.

    ``min_interval_s`` bounds how often the files' metadata is checked (at most once per
    interval, on a new connection).
    """

    def __init__(self, cert: Path | str, key: Path | str, client_ca: Path | str | None = None,
                 *, min_interval_s: float = 1.0) -> None:
        paths: tuple[Path | str, ...] = (cert, key) if client_ca is None else (cert, key, client_ca)
        self.mutual = client_ca is not None
        self._files = WatchedFile(paths, _read_server_material, min_interval_s=min_interval_s)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for ``add_secure_port``."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._files.get()), self._fetch, require_client_authentication=self.mutual
        )

    @staticmethod
    def _configuration(material: _ServerMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.pair.key, material.pair.chain)], root_certificates=material.client_ca
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None (no change)."""
        try:
            if self._files.refresh():
                return self._configuration(self._files.get())
        except Exception:  # noqa: BLE001 - never break a handshake over a reload
            log.exception("reloading the TLS certificate failed; keeping the current one")
        return None


def _read_server_material(paths: tuple[Path, ...]) -> _ServerMaterial:
    pair = load_key_pair(paths[0], paths[1])
    return _ServerMaterial(pair, load_ca(paths[2]) if len(paths) > 2 else None)


@dataclass(frozen=True)
class _ClientMaterial:
    ca: bytes
    pair: KeyPair | None


class ClientTls:
    """Credentials for dialing workers: verify them against ``ca``, present ``cert``/``key``.

    ``server_name``: the name the workers' certificates carry, when it is not the host of the
    address they advertise (one certificate for every worker, e.g. ``llmserve-worker``).
    :attr:`generation` changes when the files change; channels dialed under an older
    generation should be replaced (the router's ``ChannelPool`` does).
    """

    def __init__(self, ca: Path | str, cert: Path | str | None = None, key: Path | str | None = None,
                 *, server_name: str | None = None, min_interval_s: float = 1.0) -> None:
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs both its certificate and its key file")
        paths: tuple[Path | str, ...] = (ca,) if cert is None or key is None else (ca, cert, key)
        self.server_name = server_name
        self._files = WatchedFile(paths, _read_client_material, min_interval_s=min_interval_s)
        self._cached: tuple[int, grpc.ChannelCredentials] | None = None

    @property
    def generation(self) -> int:
        """Changes whenever the files were re-read with new content."""
        self._files.refresh()
        return self._files.generation

    def credentials(self) -> grpc.ChannelCredentials:
        material = self._files.get()
        generation = self._files.generation
        if self._cached is None or self._cached[0] != generation:
            pair = material.pair
            creds = grpc.ssl_channel_credentials(
                root_certificates=material.ca,
                private_key=pair.key if pair else None,
                certificate_chain=pair.chain if pair else None,
            )
            self._cached = (generation, creds)
        return self._cached[1]

    def options(self) -> list[tuple[str, Any]]:
        """Channel options the credentials need (the expected server name)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def dial(self, target: str, options: Sequence[tuple[str, Any]] = (),
             interceptors: Sequence[Any] | None = None) -> grpc.aio.Channel:
        """A new secure channel to ``target`` with the current credentials."""
        return grpc.aio.secure_channel(target, self.credentials(), options=[*options, *self.options()],
                                       interceptors=interceptors)


def _read_client_material(paths: tuple[Path, ...]) -> _ClientMaterial:
    ca = load_ca(paths[0])
    return _ClientMaterial(ca, load_key_pair(paths[1], paths[2]) if len(paths) > 1 else None)


class HttpTls:
    """An ``ssl.SSLContext`` for an HTTP server whose certificate follows its files.

    The served context's SNI callback (run in every handshake, with or without SNI) switches
    the connection to a context built from the current files; a reload happens at most once
    per ``min_interval_s``.
    """

    def __init__(self, cert: Path | str, key: Path | str, *, min_interval_s: float = 1.0) -> None:
        self._files = WatchedFile((cert, key), _read_http_context, min_interval_s=min_interval_s)
        self.context = _read_http_context(self._files.paths)
        self.context.sni_callback = self._on_handshake

    def _on_handshake(self, connection: ssl.SSLObject, server_name: str | None,
                      context: ssl.SSLContext) -> None:
        try:
            current = self._files.get()
        except Exception:  # noqa: BLE001 - keep serving the loaded certificate
            log.exception("reloading the HTTPS certificate failed")
            return None
        if current is not connection.context:
            connection.context = current
        return None


def _read_http_context(paths: tuple[Path, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(paths[0]), keyfile=str(paths[1]))
    except ssl.SSLError as exc:
        raise ValueError(f"{paths[0]} / {paths[1]}: not a matching PEM certificate and key ({exc})") from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def peer_has_verified_certificate(context: grpc.aio.ServicerContext) -> bool:
    """True when the call came over TLS with a client certificate the server verified (mTLS)."""
    auth = context.auth_context()
    return auth.get("transport_security_type") == [b"ssl"] and bool(auth.get("x509_pem_cert"))


def peer_is_loopback(peer: str) -> bool:
    """True for a gRPC peer string on this host: ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``,
    an IPv4-mapped loopback, or a Unix socket."""
    if peer.startswith("unix:") or peer.startswith("unix-abstract:"):
        return True
    if peer.startswith("ipv4:"):
        host = peer[5:].rsplit(":", 1)[0]
    elif peer.startswith("ipv6:"):
        host = peer[5:].rsplit(":", 1)[0].strip("[]")
    else:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass(frozen=True)
class TlsSettings:
    """The certificate files of one process, as its flags give them.

    ``cert``/``key``: this process's certificate for its own ports. ``ca``: the fleet CA (a
    worker requires client certificates from it; a router verifies workers against it and dials
    them over TLS). ``client_cert``/``client_key``: what a router presents to workers (default
    ``cert``/``key``). ``server_name``: the name workers' certificates carry, when it is not the
    host of their advertised address.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("--tls-client-cert and --tls-client-key go together")
        for path in (self.cert, self.key, self.ca, self.client_cert, self.client_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path!r} does not exist")

    def server(self, *, require_client_certs: bool) -> ServerTls | None:
        """TLS for this process's gRPC port (None: plaintext); ``require_client_certs``: mutual
        TLS with the fleet CA (ValueError without one)."""
        if self.cert is None or self.key is None:
            if require_client_certs:
                raise ValueError("--tls-ca on a server needs --tls-cert and --tls-key")
            return None
        if require_client_certs and self.ca is None:
            raise ValueError("client certificates need the fleet CA (--tls-ca)")
        return ServerTls(self.cert, self.key, self.ca if require_client_certs else None)

    def client(self) -> ClientTls | None:
        """Credentials to dial the fleet's workers (None without the fleet CA: plaintext)."""
        if self.ca is None:
            return None
        cert, key = (self.client_cert, self.client_key) if self.client_cert else (self.cert, self.key)
        return ClientTls(self.ca, cert, key, server_name=self.server_name)

    def http(self) -> HttpTls | None:
        """TLS for an HTTP port with this process's certificate (None: plaintext)."""
        return None if self.cert is None or self.key is None else HttpTls(self.cert, self.key)


@dataclass(frozen=True)
class RedisTls:
    """TLS settings for a ``rediss://`` URL: the CA that signed Redis's certificate (default:
    the system's), and a client certificate when Redis requires one (``tls-auth-clients yes``)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a Redis client certificate needs both its certificate and its key file")

    def connection_kwargs(self, url: str) -> dict[str, Any]:
        """redis-py keyword arguments for ``url`` (ValueError: TLS files with a plain URL)."""
        given = any((self.ca_file, self.cert_file, self.key_file))
        if urlsplit(url).scheme != "rediss":
            if given:
                raise ValueError("Redis TLS files need a rediss:// URL")
            return {}
        kwargs: dict[str, Any] = {"ssl_cert_reqs": "required"}
        if self.ca_file:
            kwargs["ssl_ca_certs"] = self.ca_file
        if self.cert_file:
            kwargs["ssl_certfile"] = self.cert_file
            kwargs["ssl_keyfile"] = self.key_file
        return kwargs

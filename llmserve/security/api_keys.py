"""API keys of the router: a file of SHA-256 digests, each with an optional name, model
allow-list and rate limits. The router never stores a key itself.

File format (``--api-keys-file``; ``#`` starts a comment; re-read when it changes)::

    # digest (sha256 hex)                                              name   options
    3b1f...e9  alice  models=smollm2-135m,qwen3  rps=5  tps=2000
    sha256:9a0c...41  batch-jobs  tps=50000
    77d2...0f  mallory  revoked

- ``models=a,b``: the models this key may use (default: every model); others are refused with
  PERMISSION_DENIED (HTTP 403).
- ``rps=`` / ``tps=``: requests and tokens per second for this key (a number or ``unlimited``;
  default: the router's ``--rate-limit-rps`` / ``--rate-limit-tps``).
- ``revoked``: the key is refused (UNAUTHENTICATED, "revoked"); deleting the line works too.
- ``admin``: the key may also manage the fleet through the router (load and unload LoRA
  adapters: ``/v1/load_lora_adapter``); other keys are refused with PERMISSION_DENIED (HTTP 403).

Why SHA-256 and not a slow hash: keys are 256-bit random tokens (``new`` below), which no
guessing can reach, so a slow KDF would add only CPU per request (DECISIONS). A presented key
is hashed once and compared with every digest in the file with ``hmac.compare_digest`` (no early
exit), so the time taken does not depend on which digest, or how much of one, matched.

    python -m llmserve.security.api_keys new --name alice models=smollm2-135m rps=5
    python -m llmserve.security.api_keys hash < key.txt
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import math
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmserve.security.files import WatchedFile
from llmserve.security.rate_limit import RateLimits

KEY_PREFIX = "llms-"
_DIGEST_PREFIX = "sha256:"
_MAX_KEY_CHARS = 512  # longer "keys" are refused before hashing


@dataclass(frozen=True)
class ApiKey:
    """One line of the key file."""

    key_id: str  # the line's name, or key-<first 8 hex digits of the digest>
    digest: bytes  # SHA-256 of the key
    models: frozenset[str] | None = None  # allow-list; None: every model
    limits: RateLimits = RateLimits()
    revoked: bool = False
    admin: bool = False  # may load and unload LoRA adapters (docs/LORA.md)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class AuthFailure(Exception):
    """The caller could not be authenticated: ``reason`` is ``missing``, ``unknown`` or
    ``revoked`` (a metric label); the message is safe to send to the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def hash_key(key: str) -> str:
    """The hex SHA-256 digest written in the key file for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer_token(value: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value (None when absent or not Bearer)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _rate(value: str, where: str) -> float | None:
    if value == "unlimited":
        return None
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a number or 'unlimited'") from None
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{where}: rates must be positive, got {value!r}")
    return rate


def parse_line(line: str, defaults: RateLimits, where: str) -> ApiKey | None:
    """One line of the file (None for blank lines and comments); ValueError naming ``where``."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    digest_hex = fields[0].lower().removeprefix(_DIGEST_PREFIX)
    if len(digest_hex) != 64 or any(c not in "0123456789abcdef" for c in digest_hex):
        raise ValueError(f"{where}: the first field must be a SHA-256 hex digest (64 hex digits)")
    rest = fields[1:]
    name = f"key-{digest_hex[:8]}"
    if rest and "=" not in rest[0] and rest[0] not in ("revoked", "admin"):
        name, rest = rest[0], rest[1:]
    models: frozenset[str] | None = None
    rps, tps = defaults.requests_per_s, defaults.tokens_per_s
    revoked = admin = False
    for option in rest:
        key, eq, value = option.partition("=")
        if option == "revoked":
            revoked = True
        elif option == "admin":
            admin = True
        elif key == "models" and eq and value:
            models = frozenset(m for m in value.split(",") if m)
        elif key == "rps" and eq:
            rps = _rate(value, f"{where}: rps")
        elif key == "tps" and eq:
            tps = _rate(value, f"{where}: tps")
        else:
            raise ValueError(f"{where}: unknown option {option!r} (models=, rps=, tps=, revoked, admin)")
    return ApiKey(name, bytes.fromhex(digest_hex), models, RateLimits(rps, tps), revoked, admin)


def parse_key_file(text: str, defaults: RateLimits, source: str = "api keys") -> list[ApiKey]:
    """Every key of a key file; ValueError on a bad line, a repeated digest or a repeated name."""
    keys: list[ApiKey] = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = parse_line(line, defaults, f"{source}:{number}")
        if key is not None:
            keys.append(key)
    if len({k.digest for k in keys}) != len(keys):
        raise ValueError(f"{source}: a digest appears twice")
    if len({k.key_id for k in keys}) != len(keys):
        raise ValueError(f"{source}: a name appears twice (names identify a key's rate limits)")
    return keys


class ApiKeyFile:
    """The key file, re-read when it changes (a bad edit keeps the previous keys, logged)."""

    def __init__(self, path: Path | str, defaults: RateLimits = RateLimits(), *,
                 min_interval_s: float = 1.0) -> None:
        self._file = WatchedFile(
            path, lambda paths: parse_key_file(paths[0].read_text(), defaults, str(paths[0])),
            min_interval_s=min_interval_s)

    def keys(self) -> list[ApiKey]:
        return self._file.get()

    @property
    def generation(self) -> int:
        """Changes each time the file is re-read with new content."""
        return self._file.generation

    def authenticate(self, presented: str | None) -> ApiKey:
        """The key entry for the presented key; :class:`AuthFailure` when missing, unknown or
        revoked. Every digest is compared, in constant time each."""
        if not presented:
            raise AuthFailure("missing", "missing API key: send 'authorization: Bearer <key>'")
        if len(presented) > _MAX_KEY_CHARS:
            raise AuthFailure("unknown", "invalid API key")
        digest = hashlib.sha256(presented.encode()).digest()
        found: ApiKey | None = None
        for key in self.keys():
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise AuthFailure("unknown", "invalid API key")
        if found.revoked:
            raise AuthFailure("revoked", "this API key has been revoked")
        return found


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmserve.security.api_keys",
                                     description="Make API keys and their lines for --api-keys-file.")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="print a new key (stderr) and its key-file line (stdout)")
    new.add_argument("--name", default=None, help="name of the key (logs, rate limits)")
    new.add_argument("options", nargs="*", help="models=a,b rps=N tps=N admin")
    sub.add_parser("hash", help="print the digest of the key read from stdin")
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(hash_key(sys.stdin.read().strip()))
        return 0
    key = new_key()
    line = " ".join([hash_key(key), *([args.name] if args.name else []), *args.options])
    parse_line(line, RateLimits(), "new key")  # refuse options the router would refuse
    print(key, file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""Who may use the router, for which models, and how fast (docs/SECURITY.md).

The doors authenticate each call (``router/auth.py``: the gRPC interceptor, the HTTP
middleware) with :meth:`AccessControl.authenticate` and mark the call's task as acting for that
key (:func:`act_as`). The request path then asks, for each generation:

- :meth:`AccessControl.admit` once the model is resolved: the key may use the model
  (PERMISSION_DENIED otherwise) and its request bucket has room (RESOURCE_EXHAUSTED with
  ``retry-after`` otherwise);
- :meth:`AccessControl.charge_tokens` once the prompt is tokenized: prompt + ``max_tokens`` x
  ``n`` from the key's token bucket; the returned :class:`TokenCharge` gives back what the
  request did not use when it ends.

Without ``--api-keys-file`` every caller is the anonymous key: no authentication, every model,
and the default rate limits (``--rate-limit-rps`` / ``--rate-limit-tps``, off by default)
shared by all callers.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from llmserve.security.api_keys import ApiKey, ApiKeyFile, AuthFailure
from llmserve.security.rate_limit import KeyLimiter, RateLimits, Refusal
from llmserve.telemetry.metrics import RouterMetrics
from router.errors import PermissionDenied, RateLimited, Unauthenticated, model_name

# The API key the current call acts for. Each gRPC call and each HTTP request runs in its own
# asyncio task, and a task's context is its own: setting this in one call never leaks into another.
_CALLER: ContextVar[ApiKey | None] = ContextVar("llmserve_router_api_key", default=None)

RATE_LIMIT_LABELS = {"api_key_requests": "rate_limit_rps", "api_key_tokens": "rate_limit_tps"}
DEFAULT_MAX_TOKENS = 16  # the API's default when a request leaves max_tokens unset


@dataclass(frozen=True)
class AccessConfig:
    """``api_keys_file``: None = no authentication; ``limits``: the default per-key limits (the
    anonymous caller's when there is no key file); ``burst_s``: seconds of rate a bucket holds."""

    api_keys_file: str | None = None
    limits: RateLimits = RateLimits()
    burst_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.burst_s > 0:
            raise ValueError("rate_limit_burst_s must be > 0")
        if self.api_keys_file is not None and not Path(self.api_keys_file).is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file!r} is not a file")


def act_as(key: ApiKey) -> None:
    """Mark the running task (one call) as acting for ``key``."""
    _CALLER.set(key)


class TokenCharge:
    """Tokens taken from a key's bucket for one request; :meth:`settle` gives back the unused."""

    def __init__(self, access: AccessControl | None, key: ApiKey, estimate: int) -> None:
        self._access = access
        self._key = key
        self._estimate = estimate

    def settle(self, used_tokens: int) -> None:
        """The request ended having used ``used_tokens``; give back the rest (once)."""
        if self._access is not None:
            self._access.limiter.give_back_tokens(self._key.key_id, self._key.limits,
                                                  self._estimate - used_tokens)
            self._access = None


class AccessControl:
    """API keys, model allow-lists and per-key rate limits of one router."""

    def __init__(self, config: AccessConfig, metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self._metrics = metrics
        self._keys = ApiKeyFile(config.api_keys_file, config.limits) if config.api_keys_file else None
        self._anonymous = ApiKey("anonymous", b"", None, config.limits)
        self.limiter = KeyLimiter(config.burst_s)
        self._keys_generation = 0

    @property
    def requires_keys(self) -> bool:
        return self._keys is not None

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of a call from its bearer token (None: no token); :class:`Unauthenticated`."""
        if self._keys is None:
            return self._anonymous
        try:
            return self._keys.authenticate(authorization)
        except AuthFailure as exc:
            self._count_auth_failure(exc.reason)
            raise Unauthenticated(str(exc)) from None

    def caller(self) -> ApiKey:
        """The key the current call acts for (fails closed if a door forgot to authenticate)."""
        key = _CALLER.get()
        if key is not None:
            return key
        if self._keys is None:
            return self._anonymous
        self._count_auth_failure("missing")
        raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")

    def admit(self, model: str) -> None:
        """The caller may use ``model`` and has a request left in its budget; raises otherwise."""
        key = self.caller()
        if not key.allows(model):
            self._count_auth_failure("model_not_allowed")
            raise PermissionDenied(f"this API key may not use model {model_name(model)}")
        if self._keys is not None and self._keys.generation != self._keys_generation:
            self._keys_generation = self._keys.generation  # the file changed: drop removed keys' buckets
            self.limiter.retain(k.key_id for k in self._keys.keys())
        self._check(self.limiter.admit_request(key.key_id, key.limits), model)

    def charge_tokens(self, model: str, prompt_tokens: int, max_tokens: int | None, n: int) -> TokenCharge:
        """Take the request's token estimate from the caller's budget (RateLimited otherwise)."""
        key = self.caller()
        estimate = prompt_tokens + (DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens) * max(1, n)
        self._check(self.limiter.admit_tokens(key.key_id, key.limits, estimate), model)
        return TokenCharge(self if key.limits.tokens_per_s is not None else None, key, estimate)

    def admit_admin(self, action: str) -> None:
        """The caller may ``action`` (manage the fleet: LoRA adapters); PermissionDenied unless
        its key is an ``admin`` one. Without a key file every caller is the anonymous admin: the
        operator turned the endpoint on (``--allow-lora-updates``) for a trusted network."""
        key = self.caller()
        if self._keys is not None and not key.admin:
            self._count_auth_failure("not_admin")
            raise PermissionDenied(f"this API key may not {action} (an admin key may: 'admin' on its line "
                                   "of the API key file)")

    def visible_models(self, names: Iterable[str]) -> list[str]:
        """The names the caller may use (ListModels and ``/v1/models`` show only those)."""
        key = _CALLER.get() or self._anonymous
        return [n for n in names if key.allows(n)]

    def _check(self, refusal: Refusal | None, model: str) -> None:
        if refusal is None:
            return
        label = RATE_LIMIT_LABELS[refusal.limit]
        if self._metrics is not None:
            self._metrics.on_refusal(model, label)
        raise RateLimited(label, refusal.retry_after_s)

    def _count_auth_failure(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.on_auth_failure(reason)

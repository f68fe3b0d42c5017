"""Stored Responses API responses: what ``previous_response_id`` and ``GET /v1/responses/{id}`` read.

A response created with ``store`` (OpenAI's default) is kept in the fleet's state store (Redis;
any router reads it back, so routers stay stateless) for ``ttl_s`` as one JSON document: the
response object, the conversation it ended (chat messages: the earlier conversation, this
request's input and the response's output, instructions left out as OpenAI leaves them out of a
chain) and its owner (the API key that created it; other keys are told it does not exist).

Nothing read back is trusted (the store may hold anything): a document over
``max_record_bytes``, not JSON, of the wrong shape, stored under another id or, when the router
has a fleet secret, not signed with it (HMAC-SHA256 over its canonical JSON, in a context of
its own so no worker record passes for it) is not a response: it is logged and reported as
not found. A response whose document would be over ``max_record_bytes`` is not stored (its
``store`` says false).

A background response's cancel request is a small document of its own, which the router
running it polls (the request may reach any router).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from llmserve.fleet import StateStore
from llmserve.security.records import SIGNATURE_FIELD, FleetSecret
from router.frontends.openai_schemas import ChatMessageIn
from router.frontends.responses_config import ResponsesStoreConfig
from router.frontends.responses_output import STATUSES

log = logging.getLogger(__name__)

RESPONSE_KIND = "response"
CANCEL_KIND = "response-cancel"
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
_SIGNING_CONTEXT = b"llmserve.stored-response.v1\n"
_VERSION = 1


@dataclass(frozen=True)
class StoredResponse:
    """One stored response: the object as served, the conversation through its output, its owner."""

    response: dict[str, Any]
    conversation: tuple[dict[str, Any], ...]
    owner: str

    @property
    def response_id(self) -> str:
        return str(self.response["id"])


class StoredResponseRejected(ValueError):
    """A document read back that is not a stored response (the message says why)."""


def valid_response_id(response_id: str) -> bool:
    return RESPONSE_ID.fullmatch(response_id) is not None


def encode(stored: StoredResponse, secret: FleetSecret | None) -> bytes:
    fields: dict[str, Any] = {"v": _VERSION, "id": stored.response_id, "owner": stored.owner,
                              "response": stored.response, "conversation": list(stored.conversation)}
    if secret is not None:
        fields[SIGNATURE_FIELD] = secret.sign(fields, _SIGNING_CONTEXT)
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _no_constants(name: str) -> Any:
    raise StoredResponseRejected(f"{name} is not a number")


def decode(blob: bytes, response_id: str, secret: FleetSecret | None, max_bytes: int) -> StoredResponse:
    """The stored response in ``blob`` (read under ``response_id``); StoredResponseRejected otherwise."""
    if len(blob) > max_bytes:
        raise StoredResponseRejected(f"{len(blob)} bytes, over the limit of {max_bytes}")
    try:
        fields = json.loads(blob, parse_constant=_no_constants)
    except StoredResponseRejected:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StoredResponseRejected(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(fields, dict) or fields.get("v") != _VERSION:
        raise StoredResponseRejected("not a stored response of this version")
    if secret is not None and not secret.verify(fields, _SIGNING_CONTEXT):
        raise StoredResponseRejected("not signed with the fleet secret")
    response, owner, conversation = fields.get("response"), fields.get("owner"), fields.get("conversation")
    if fields.get("id") != response_id or not isinstance(response, dict) or response.get("id") != response_id:
        raise StoredResponseRejected("stored under another id")
    if response.get("object") != "response" or response.get("status") not in STATUSES \
            or not isinstance(response.get("output"), list) or not isinstance(owner, str):
        raise StoredResponseRejected("not a response object")
    if not isinstance(conversation, list):
        raise StoredResponseRejected("no conversation")
    try:
        for message in conversation:
            if not isinstance(message, dict):
                raise StoredResponseRejected("a conversation message is not an object")
            ChatMessageIn.model_validate(message)
    except ValidationError as exc:
        why = exc.errors()[0].get("msg")
        raise StoredResponseRejected(f"a conversation message is malformed: {why}") from None
    return StoredResponse(response, tuple(conversation), owner)


class ResponseStore:
    """Stored responses in the fleet's state store (see the module)."""

    def __init__(self, store: StateStore, config: ResponsesStoreConfig,
                 secret: Callable[[], FleetSecret] | None = None) -> None:
        self.store = store
        self.config = config
        self._secret = secret

    def _current_secret(self) -> FleetSecret | None:
        return self._secret() if self._secret is not None else None

    def encode(self, stored: StoredResponse) -> bytes | None:
        """The document of ``stored``; None when it is over the size limit (or storing is off)."""
        if not self.config.enabled:
            return None
        blob = encode(stored, self._current_secret())
        return blob if len(blob) <= self.config.max_record_bytes else None

    async def put(self, response_id: str, blob: bytes) -> None:
        """Store a document :meth:`encode` made. ``StoreUnavailable`` when the store is down."""
        await self.store.put_document(RESPONSE_KIND, response_id, blob, self.config.ttl_s)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The stored response ``response_id`` of ``owner``: None when there is none, it is not
        a stored response (logged) or another key's."""
        if not self.config.enabled or not valid_response_id(response_id):
            return None
        blob = await self.store.get_document(RESPONSE_KIND, response_id)
        if blob is None:
            return None
        try:
            stored = decode(blob, response_id, self._current_secret(), self.config.max_record_bytes)
        except StoredResponseRejected as exc:
            log.warning("stored response %s rejected: %s", response_id, exc)
            return None
        return stored if stored.owner == owner else None

    async def delete(self, response_id: str) -> bool:
        return await self.store.delete_document(RESPONSE_KIND, response_id)

    async def request_cancel(self, response_id: str) -> None:
        """Ask the router running background response ``response_id`` to cancel it."""
        ttl = max(60.0, 10 * self.config.cancel_poll_s)
        await self.store.put_document(CANCEL_KIND, response_id, b"1", ttl)

    async def cancel_requested(self, response_id: str) -> bool:
        return await self.store.get_document(CANCEL_KIND, response_id) is not None

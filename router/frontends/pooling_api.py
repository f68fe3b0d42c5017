"""The OpenAI door's pooling endpoints, for models whose workers embed (``--runner pooling``).

- ``POST /v1/embeddings``: OpenAI's embeddings.
- ``POST /v1/score`` (and ``/score``): vLLM's score API, bi-encoder: ``text_1`` against ``text_2``
  (one text against each of a list, or two lists of one length, pair by pair), each pair's score
  the cosine similarity of the two texts' embeddings.
- ``POST /v1/rerank`` (and ``/rerank``, ``/v2/rerank``): vLLM's (Jina's and Cohere's) rerank API,
  bi-encoder: each document's ``relevance_score`` is its cosine similarity to the query, results
  best first, ``top_n`` of them (0: all).

Each distinct text is embedded once, as one router request of its own (its own id, span and
worker, all at once, as a completions batch); at most ``max_batch_prompts`` texts a request (400
naming the flag beyond). ``usage`` counts the prompt tokens embedded. vLLM also scores with
cross-encoder (classifier) models, which this server does not serve.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmserve.v1 import generation_pb2 as gen_pb
from router.frontends.merged import merged
from router.frontends.openai_errors import InvalidParam
from router.frontends.openai_schemas import INT32_END, EmbeddingRequest, model_hint, prompt_batch, validate
from router.generation import GenerationCore, RouterRequest

EMBEDDINGS_ROUTE = "/v1/embeddings"
SCORE_ROUTES = ("/v1/score", "/score")
RERANK_ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank")

# (request index, chunk, resolved model, ...): what the door's observed generation path yields
Observe = Callable[[int, RouterRequest, str], AsyncGenerator[Any, None]]


class _PoolingRequest(BaseModel):
    """What score and rerank share with embeddings: the model, truncation, priority."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    truncate_prompt_tokens: int | None = Field(None, ge=-1, lt=INT32_END)
    priority: int | None = Field(None, ge=-(2**31), lt=2**31)

    def embed_requests(self, texts: Sequence[str], request_id: str) -> list[RouterRequest]:
        sampling = gen_pb.SamplingParams()
        if self.truncate_prompt_tokens is not None:
            sampling.truncate_prompt_tokens = self.truncate_prompt_tokens
        return [RouterRequest(model=self.model, prompt=text, sampling=sampling,
                              request_id=f"{request_id}-{i}", priority=self.priority, request_id_unique=True,
                              embed=True)
                for i, text in enumerate(texts)]


class ScoreRequest(_PoolingRequest):
    """vLLM's ``/v1/score`` body (texts only)."""

    text_1: str | list[str]
    text_2: str | list[str]

    def pairs(self, max_texts: int) -> tuple[list[str], list[tuple[int, int]]]:
        """The distinct texts to embed and each pair's indexes into them."""
        first = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        second = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        for param, texts in (("text_1", first), ("text_2", second)):
            if not texts or not all(texts):
                raise InvalidParam(param, f"{param} must hold texts, none empty")
        if len(first) == 1:
            first = first * len(second)
        elif len(first) != len(second):
            raise InvalidParam("text_2", f"text_1 has {len(first)} texts and text_2 {len(second)}: give one "
                               "text_1 for every text_2, or lists of one length")
        texts = _distinct(first + second, max_texts, "text_2")
        index = {text: i for i, text in enumerate(texts)}
        return texts, [(index[a], index[b]) for a, b in zip(first, second, strict=True)]


class RerankRequest(_PoolingRequest):
    """vLLM's ``/v1/rerank`` body: ``documents`` are texts or ``{"text": ...}`` objects."""

    query: str
    documents: list[str | dict[str, Any]]
    top_n: int = Field(0, ge=0)
    return_documents: bool = True

    def texts(self) -> list[str]:
        out = []
        for i, document in enumerate(self.documents):
            text = document.get("text") if isinstance(document, dict) else document
            if not isinstance(text, str) or not text:
                raise InvalidParam(f"documents[{i}]", f"documents[{i}] must be a non-empty text or "
                                   "{\"text\": ...}")
            out.append(text)
        if not out or not self.query:
            raise InvalidParam("documents" if self.query else "query",
                               "query and documents must not be empty")
        return out


def _distinct(texts: list[str], max_texts: int, param: str) -> list[str]:
    """``texts`` (none empty) without repeats, in first-seen order; more than ``max_texts`` is
    refused naming the flag."""
    distinct = list(dict.fromkeys(texts))
    prompt_batch(distinct, max_texts, param)
    return distinct


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity (0 for a zero vector)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm > 0 else 0.0


@dataclass(frozen=True)
class _Embedded:
    vectors: list[list[float]]  # per text, in order
    prompt_tokens: int
    model: str  # resolved


class PoolingEndpoints:
    """Embeddings, score and rerank over the door's generation path (``observe``)."""

    def __init__(self, core: GenerationCore, observe: Observe, max_texts: int) -> None:
        self._core = core
        self._observe = observe
        self._max_texts = max_texts

    async def _embed(self, requests: list[RouterRequest], operation: str) -> _Embedded:
        """Each request's vector (all at once, each in a task of its own)."""
        sources = [self._observe(i, r, operation) for i, r in enumerate(requests)]
        vectors: dict[int, list[float]] = {}
        tokens, model = 0, ""
        async with aclosing(sources[0] if len(sources) == 1 else merged(sources)) as items:
            async for i, chunk, resolved, *_ in items:
                model = resolved
                if chunk.HasField("usage"):
                    vectors[i] = list(chunk.embedding)
                    tokens += chunk.usage.prompt_tokens
        return _Embedded([vectors[i] for i in range(len(requests))], tokens, model)

    @staticmethod
    def input_param(route: str) -> str:
        """What ``route`` calls its input (errors about the prompt name it)."""
        return "input" if route == EMBEDDINGS_ROUTE else "text_1" if route in SCORE_ROUTES else "query"

    async def reply(self, route: str, data: dict[str, Any]) -> dict[str, Any]:
        """The JSON reply to one pooling request (``route``: which; ``data``: its body); raises
        what the door turns into its error JSON."""
        kind = "embd" if route == EMBEDDINGS_ROUTE else "score" if route in SCORE_ROUTES else "rerank"
        handle = {"embd": self._embeddings, "score": self._score, "rerank": self._rerank}[kind]
        return await handle(data, f"{kind}-{uuid.uuid4().hex}", model_hint(data))

    def _refused(self, model: str, request_id: str, exc: Exception) -> Exception:
        """The door's own refusal, counted as the request's outcome."""
        self._core.refused(model, request_id, exc, operation="embeddings")
        return exc

    async def _embeddings(self, data: dict[str, Any], request_id: str, hint: str) -> dict[str, Any]:
        try:
            parsed = validate(EmbeddingRequest, data)
            routed = parsed.to_router_requests(request_id, self._max_texts)
        except Exception as exc:
            raise self._refused(hint, request_id, exc) from None
        got = await self._embed(routed, "embeddings")
        return embeddings_response(request_id, got.model, got.vectors, got.prompt_tokens,
                                   parsed.encoding_format)

    async def _score(self, data: dict[str, Any], request_id: str, hint: str) -> dict[str, Any]:
        try:
            parsed = validate(ScoreRequest, data)
            texts, pairs = parsed.pairs(self._max_texts)
        except Exception as exc:
            raise self._refused(hint, request_id, exc) from None
        got = await self._embed(parsed.embed_requests(texts, request_id), "embeddings")
        scores = [cosine(got.vectors[a], got.vectors[b]) for a, b in pairs]
        return {"id": request_id, "object": "list", "created": int(time.time()), "model": got.model,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": _usage(got.prompt_tokens)}

    async def _rerank(self, data: dict[str, Any], request_id: str, hint: str) -> dict[str, Any]:
        try:
            parsed = validate(RerankRequest, data)
            documents = parsed.texts()
            texts = _distinct([parsed.query, *documents], self._max_texts, "documents")
        except Exception as exc:
            raise self._refused(hint, request_id, exc) from None
        got = await self._embed(parsed.embed_requests(texts, request_id), "embeddings")
        index = {text: i for i, text in enumerate(texts)}
        query = got.vectors[index[parsed.query]]
        scored = sorted(((cosine(query, got.vectors[index[d]]), i) for i, d in enumerate(documents)),
                        key=lambda pair: (-pair[0], pair[1]))
        top = scored[:parsed.top_n] if parsed.top_n else scored
        results = []
        for score, i in top:
            result: dict[str, Any] = {"index": i, "relevance_score": score}
            if parsed.return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        return {"id": request_id, "model": got.model, "usage": _usage(got.prompt_tokens), "results": results}


def _usage(prompt_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0}


def embeddings_response(request_id: str, model: str, vectors: list[list[float]], prompt_tokens: int,
                        encoding_format: str) -> dict[str, Any]:
    """OpenAI's embeddings reply: each vector as floats or, ``base64``, its float32 little-endian
    bytes in base64 (what the ``openai`` SDK decodes)."""
    def encoded(vector: list[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
    return {"id": request_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

"""The stop reason a ``GenerateResponse`` carries, typed as vLLM types it."""

from __future__ import annotations

from llmserve.v1 import generation_pb2 as pb


def stop_reason(chunk: pb.GenerateResponse) -> int | str | None:
    """The stop token id (int) or stop string / stopping criterion name (str) that ended the
    chunk's sequence; None when nothing of the request's did (end of sequence, a length limit,
    an abort, or a chunk that does not end its sequence)."""
    if chunk.HasField("stop_token_id"):
        return chunk.stop_token_id
    return chunk.stop_reason or None

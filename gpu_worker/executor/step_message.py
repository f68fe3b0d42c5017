"""A step's plan (:class:`SchedulerOutput`) as one compact byte message for the other ranks, and
a pipeline's step result (:class:`RunnerOutput`) on its way back to the driver.

Sent once per step from the driver to every rank, so it is packed as columns, not pickled per
request: integer columns (start positions, token and block counts, flags) and the concatenated
token and block ids as int64 arrays, request ids as one NUL-separated UTF-8 string, and, only
for requests new to the runner (admitted or resumed), their sampling parameters and token
history as JSON; a structured-output bitmask as raw int32 words (and its rows per request when
speculative decoding verifies several positions of one); a new request's images as their spans in
that JSON and their pixels as raw float32 (every rank runs the replicated vision tower itself).
Draft tokens travel at the end of their request's token ids, counted by a column. Nothing is
unpickled on the receiving side.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from gpu_worker.core.types import (
    GrammarBitmask,
    ImageInput,
    PromptLogprobs,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from gpu_worker.sampling_params import SamplingParams
from llmserve.multimodal import ImageSpan

_SEP = "\0"
_COLUMNS = ("start_pos", "num_tokens", "num_blocks", "sample", "is_new", "num_draft_tokens")


def _ids(names: Any) -> bytes:
    return _SEP.join(names).encode()


def _names(data: bytes) -> list[str]:
    return data.decode().split(_SEP) if data else []


def encode_step(sched: SchedulerOutput) -> bytes:
    """``sched`` as bytes for :func:`decode_step`."""
    reqs = sched.requests
    cols = np.array(
        [
            [r.start_pos, len(r.token_ids), len(r.block_ids), r.sample, r.is_new, r.num_draft_tokens]
            for r in reqs
        ],
        dtype=np.int64,
    ).reshape(len(reqs), len(_COLUMNS))
    tokens = np.fromiter((t for r in reqs for t in r.token_ids), dtype=np.int64)
    blocks = np.fromiter((b for r in reqs for b in r.block_ids), dtype=np.int64)
    pixels: list[bytes] = []
    new = [
        {
            "params": dataclasses.asdict(r.params) if r.params is not None else None,
            "prompt_len": r.prompt_len,
            "output_token_ids": list(r.output_token_ids),
            "prompt_token_ids": list(r.prompt_token_ids),
            "lora_name": r.lora_name,
            "images": [_image_entry(image, pixels) for image in r.images],
        }
        for r in reqs
        if r.is_new
    ]
    sections = [
        np.array([sched.num_scheduled_tokens], dtype=np.int64).tobytes(),
        cols.tobytes(),
        tokens.tobytes(),
        blocks.tobytes(),
        _ids(r.req_id for r in reqs),
        _ids(sorted(sched.finished_req_ids)),
        _ids(sorted(sched.preempted_req_ids)),
        json.dumps(new, separators=(",", ":")).encode(),
        *_grammar_sections(sched.grammar),
        b"".join(pixels),
    ]
    header = np.array([len(s) for s in sections], dtype=np.int64).tobytes()
    return np.array([len(sections)], dtype=np.int64).tobytes() + header + b"".join(sections)


def decode_step(data: bytes) -> SchedulerOutput:
    """The :class:`SchedulerOutput` that :func:`encode_step` packed."""
    count = int(np.frombuffer(data, dtype=np.int64, count=1)[0])
    sizes = np.frombuffer(data, dtype=np.int64, count=count, offset=8).tolist()
    offset, sections = 8 + 8 * count, []
    for size in sizes:
        sections.append(data[offset : offset + size])
        offset += size
    num_scheduled = int(np.frombuffer(sections[0], dtype=np.int64)[0])
    cols = np.frombuffer(sections[1], dtype=np.int64).reshape(-1, len(_COLUMNS)).tolist()
    tokens = np.frombuffer(sections[2], dtype=np.int64).tolist()
    blocks = np.frombuffer(sections[3], dtype=np.int64).tolist()
    req_ids = _names(sections[4])
    new = iter(json.loads(sections[7]))
    pixels = _Pixels(sections[11])
    requests, t, b = [], 0, 0
    for req_id, (start, n_tok, n_blk, sample, is_new, n_draft) in zip(req_ids, cols, strict=True):
        token_ids, block_ids = tuple(tokens[t : t + n_tok]), tuple(blocks[b : b + n_blk])
        t, b = t + n_tok, b + n_blk
        if not is_new:
            requests.append(
                ScheduledRequest(req_id, token_ids, start, block_ids, bool(sample), num_draft_tokens=n_draft)
            )
            continue
        extra = next(new)
        params = extra["params"]
        requests.append(
            ScheduledRequest(
                req_id, token_ids, start, block_ids, bool(sample), is_new=True,
                params=None if params is None else _sampling_params(params),
                prompt_len=extra["prompt_len"],
                output_token_ids=tuple(extra["output_token_ids"]),
                prompt_token_ids=tuple(extra["prompt_token_ids"]),
                num_draft_tokens=n_draft,
                lora_name=extra["lora_name"],
                images=tuple(pixels.image(entry) for entry in extra["images"]),
            )
        )
    return SchedulerOutput(
        requests=tuple(requests),
        num_scheduled_tokens=num_scheduled,
        finished_req_ids=frozenset(_names(sections[5])),
        preempted_req_ids=frozenset(_names(sections[6])),
        grammar=_grammar(sections[8], sections[9], sections[10]),
    )


def _image_entry(image: ImageInput, pixels: list[bytes]) -> dict[str, Any]:
    """An image's span and pixel shape as JSON; its float32 pixels appended to ``pixels``."""
    values = np.ascontiguousarray(np.asarray(image.pixel_values, dtype=np.float32))
    pixels.append(values.tobytes())
    span = image.span
    return {"offset": span.offset, "length": span.length, "hash": span.hash.hex(),
            "shape": list(values.shape)}


class _Pixels:
    """Reads the step's images' pixels in the order :func:`_image_entry` wrote them."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def image(self, entry: dict[str, Any]) -> ImageInput:
        shape = tuple(int(d) for d in entry["shape"])
        count = int(np.prod(shape))
        values = np.frombuffer(self._data, dtype=np.float32, count=count, offset=self._offset)
        self._offset += 4 * count
        span = ImageSpan(int(entry["offset"]), int(entry["length"]), bytes.fromhex(entry["hash"]))
        return ImageInput(span, values.reshape(shape).copy())


def _grammar_sections(grammar: GrammarBitmask | None) -> list[bytes]:
    """The structured-output bitmask of the step (the sampling rank may be another process)."""
    if grammar is None:
        return [b"", b"", b""]
    mask = np.ascontiguousarray(grammar.bitmask, dtype=np.int32)
    return [
        _ids(grammar.req_ids),
        np.array([mask.shape[1]], dtype=np.int64).tobytes() + mask.tobytes(),
        np.asarray(grammar.row_counts, dtype=np.int64).tobytes(),
    ]


def _grammar(ids: bytes, mask: bytes, row_counts: bytes) -> GrammarBitmask | None:
    if not mask:
        return None
    words = int(np.frombuffer(mask, dtype=np.int64, count=1)[0])
    bitmask = np.frombuffer(mask, dtype=np.int32, offset=8).reshape(-1, words).copy()
    counts = tuple(np.frombuffer(row_counts, dtype=np.int64).tolist())
    return GrammarBitmask(tuple(_names(ids)), bitmask, row_counts=counts)


def _sampling_params(fields: dict[str, Any]) -> SamplingParams:
    # SamplingParams.__post_init__ turns logit_bias's JSON string keys back into ints.
    return SamplingParams(**fields)


def encode_output(out: RunnerOutput) -> bytes:
    """A step's sampled ids (and logprobs; accepted drafts; prompt logprobs), from a pipeline's
    sampling rank to the driver."""
    ids = np.asarray(out.sampled_token_ids, dtype=np.int64).tobytes()
    logprobs = [None if lp is None else _logprob_json(lp) for lp in out.logprobs]
    drafts = [list(d) for d in out.accepted_draft_ids]
    draft_logprobs = [[_logprob_json(lp) for lp in lps] for lps in out.accepted_logprobs]
    prompt = [[p.req_id, p.first, [_logprob_json(lp) for lp in p.logprobs]] for p in out.prompt_logprobs]
    rest = json.dumps(
        [list(out.req_ids), logprobs, drafts, draft_logprobs, prompt, [list(v) for v in out.pooled]],
        separators=(",", ":")
    ).encode()
    return np.array([len(ids)], dtype=np.int64).tobytes() + ids + rest


def decode_output(data: bytes) -> RunnerOutput:
    size = int(np.frombuffer(data, dtype=np.int64, count=1)[0])
    ids = tuple(np.frombuffer(data, dtype=np.int64, count=size // 8, offset=8).tolist())
    req_ids, logprobs, drafts, draft_logprobs, prompt, pooled = json.loads(data[8 + size :])
    return RunnerOutput(
        req_ids=tuple(req_ids),
        sampled_token_ids=ids,
        logprobs=tuple(None if lp is None else _logprob(lp) for lp in logprobs),
        accepted_draft_ids=tuple(tuple(d) for d in drafts),
        accepted_logprobs=tuple(tuple(_logprob(lp) for lp in lps) for lps in draft_logprobs),
        prompt_logprobs=tuple(
            PromptLogprobs(req_id, first, tuple(_logprob(lp) for lp in lps)) for req_id, first, lps in prompt
        ),
        pooled=tuple(tuple(v) for v in pooled),
    )


def _logprob_json(lp: TokenLogprobs) -> list[Any]:
    return [lp.token_id, lp.logprob, lp.rank, [list(t) for t in lp.top]]


def _logprob(fields: list[Any]) -> TokenLogprobs:
    return TokenLogprobs(fields[0], fields[1], fields[2], tuple((int(t), v) for t, v in fields[3]))

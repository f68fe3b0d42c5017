"""When the prefill attention takes its split-KV path (:func:`choose_tiles`, host ints only).

The kernels themselves are checked against the reference in ``kernel_checks.py`` (forced
splits on the CPU, default thresholds on long contexts on the GPU); these tests pin which
step shapes split with the default thresholds of :class:`PrefillConfig` (``split_kv`` and
``long_chunk_tiles`` on by default since W6's ITL run), on llama3-8b heads in bf16.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("triton")

from kernels.triton_ops.prefill_attention import PrefillConfig, PrefillTiles, choose_tiles  # noqa: E402

GROUP, KV_HEADS, BF16 = 4, 8, 2  # llama3-8b: 32 query heads over 8 KV heads


def _tiles(specs: list[tuple[int, int]], config: PrefillConfig | None = None) -> PrefillTiles:
    """Tiles of a step of ``(seq_len, q_len)`` sequences."""
    num_tokens = sum(q for _, q in specs)
    config = config or PrefillConfig(long_chunk_tiles=False)
    return choose_tiles(config, num_tokens, len(specs), GROUP, KV_HEADS, max(s for s, _ in specs), BF16,
                        max(q for _, q in specs))


@pytest.mark.parametrize(
    "specs",
    [
        [(512, 512)] * 16,  # W1: 8,192-token step of 512-token prompts
        [(512, 256)] + [(700, 1)] * 255,  # W1: a chunk beside 255 decodes
        [(1, 1)],  # a lone first token
        [(8192, 8192)],  # a whole 8,192-token chunk
        [(32768, 8192)],  # W6: an 8,192-token chunk at the end of a 32k prompt (4,096 programs)
        [(32768, 8160)] + [(300, 1)] * 32,  # the same beside 32 decodes
        [(2048, 512)] + [(2048, 1)] * 63,  # bench_kernels' mixed case: contexts under 4,096
    ],
)
def test_default_config_leaves_these_steps_unsplit(specs: list[tuple[int, int]]) -> None:
    tiles = _tiles(specs)
    assert (tiles.partition, tiles.num_splits) == (0, 1), tiles


def test_short_chunk_at_the_end_of_a_long_context_splits() -> None:
    # 224 tokens alone: 64-row tiles of 16 tokens, 14 x 8 = 112 programs -> 8 partitions of 4k.
    assert _tiles([(32768, 224)]) == PrefillTiles(64, 16, 64, 4, 4096, 8)
    # Beside 32 decodes the mean query length picks 32-row tiles: 32 x 8 = 256 programs -> 4 x 8k.
    assert _tiles([(32768, 224)] + [(300, 1)] * 32) == PrefillTiles(32, 8, 64, 4, 8192, 4)
    # A chunk over a shorter context still splits the longest context of the step.
    mixed = _tiles([(20000, 480), (5000, 1), (40000, 1)])
    assert mixed.partition > 0 and mixed.num_splits == -(-40000 // mixed.partition)


def test_split_kv_off_and_thresholds() -> None:
    long_step = [(32768, 224)] + [(300, 1)] * 32
    assert _tiles(long_step, PrefillConfig()).num_splits > 1  # on by default (DECISIONS 96)
    assert _tiles(long_step, PrefillConfig(split_kv=False)).num_splits == 1
    assert _tiles(long_step, PrefillConfig(split_kv=True, split_min_context=65536)).num_splits == 1
    on = PrefillConfig(long_chunk_tiles=False)  # 32-row tiles: 256 programs
    assert _tiles(long_step, replace(on, split_target_programs=256)).num_splits == 1  # 256 programs
    # Partitions never below split_min_partition, and always a power of two >= block_n.
    small = _tiles(long_step, replace(on, split_target_programs=1 << 20, split_min_partition=1000))
    assert small.partition == 1024 and small.num_splits == 32
    # A partition as long as the context is no split.
    assert _tiles([(5000, 16)], PrefillConfig(split_kv=True, split_min_partition=8192)).num_splits == 1


@pytest.mark.parametrize("field", ["split_min_context", "split_target_programs", "split_min_partition"])
def test_thresholds_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PrefillConfig(**{field: 0})


def test_long_chunk_tiles_size_the_tile_from_the_chunk() -> None:
    # A 128-token chunk at 32k beside 32 decodes: the mean query length gives 32-row tiles (8
    # tokens: 16 tiles, each reading the whole 32k context); from the chunk, 64 rows (8 tiles).
    itl_step = [(32768, 128)] + [(300, 1)] * 32
    assert _tiles(itl_step, PrefillConfig(long_chunk_tiles=False)).block_m == 32
    assert _tiles(itl_step, PrefillConfig()).block_m == 64  # on by default (DECISIONS 96)
    # Short contexts (W1/W3) keep the mean: the decodes' tiles stay small.
    w1_step = [(512, 256)] + [(700, 1)] * 255
    assert _tiles(w1_step, PrefillConfig()) == _tiles(w1_step, PrefillConfig(long_chunk_tiles=False))
    # Without the longest query nothing changes.
    assert choose_tiles(PrefillConfig(), 160, 33, GROUP, KV_HEADS, 32768, BF16).block_m == 32


def test_short_contexts_step_over_32_keys_longer_ones_over_64() -> None:
    """``block_n`` (16-bit, not set): 32 keys per step while the longest sequence has at most
    ``short_context`` tokens (W1/W3's 512-token prompts: the diagonal tile is most of a 16-token
    query tile's work), 64 above; an explicit ``block_n`` and 32-bit queries are left alone."""
    assert _tiles([(512, 512)] * 16).block_n == 32
    assert _tiles([(1024, 1024)] * 8).block_n == 32
    assert _tiles([(2048, 256)] * 16).block_n == 64
    assert _tiles([(512, 512)] * 16, PrefillConfig(block_n=64)).block_n == 64
    assert _tiles([(2048, 256)] * 16, PrefillConfig(short_context=4096)).block_n == 32
    assert choose_tiles(PrefillConfig(), 8192, 16, GROUP, KV_HEADS, 512, 4, 512).block_n == 32
    assert choose_tiles(PrefillConfig(), 8192, 16, GROUP, KV_HEADS, 2048, 4, 512).block_n == 32
    with pytest.raises(ValueError, match="short_context"):
        PrefillConfig(short_context=0)

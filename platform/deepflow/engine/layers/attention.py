"""Paged attention: the torch reference path.

The KV cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim]. Position
p of a sequence lives in block `block_table[p // block_size]`, slot `p % block_size`; a step's
new keys and values are written to their flat slots first, then every chunk reads its whole
context back through its block table. A chunk that starts at position s attends, for its i-th
token, to positions <= s + i, so prefill chunks, chunked prefill and decodes (chunks of one
token) are the same computation and may share a batch.

This path is exact, runs on any torch device, and is the oracle faster kernels are tested
against; clarity beats speed here. When the runner fills `AttentionMetadata.fast`, the same
layer runs the Triton kernels of deepflow.engine.kernels.attention instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class DecodeBatch:
    """The step's single-token chunks, as device tensors, for the decode kernel."""

    rows: torch.Tensor  # [B] row of the chunk's token in q / out
    cached: torch.Tensor  # [B] positions before the new token (all already in the cache)
    tables: torch.Tensor  # [B, max_blocks] block tables
    slots: torch.Tensor  # [B] the new token's flat slot (-1: a padding row, written nowhere)


PREFILL_TILE = 64
"""Queries per program of the prefill kernel: chunks are cut into tiles of this many tokens."""


@dataclass(slots=True)
class PrefillBatch:
    """The step's multi-token chunks cut into query tiles, as device tensors."""

    tile_chunk: torch.Tensor  # [tiles] chunk of each tile
    tile_q: torch.Tensor  # [tiles] first query (index within its chunk) of each tile
    row0: torch.Tensor  # [chunks] row of the chunk's first token in q / out
    start: torch.Tensor  # [chunks] positions cached before the chunk
    length: torch.Tensor  # [chunks] tokens in the chunk
    tables: torch.Tensor  # [chunks, max_blocks]
    num_tiles: int


@dataclass(slots=True)
class FastMetadata:
    """What the kernels need; `decode_writes`: a pure decode step, whose decode kernel writes
    the new K/V itself (otherwise one store pass writes every new token first)."""

    decode: DecodeBatch | None
    prefill: PrefillBatch | None
    decode_writes: bool


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the cache and what each chunk attends to."""

    slot_mapping: torch.Tensor  # [tokens] flat slot (block * block_size + offset) per new token
    block_tables: torch.Tensor  # [chunks, max_blocks] int64, padded with block 0
    chunk_starts: list[int]  # positions already cached before each chunk
    chunk_lens: list[int]  # new tokens in each chunk; their rows are consecutive in the batch
    fast: FastMetadata | None = None  # set by the runner when it runs the Triton kernels

    @property
    def token_offsets(self) -> list[int]:
        offsets, total = [], 0
        for n in self.chunk_lens:
            offsets.append(total)
            total += n
        return offsets


def build_fast_metadata(
    chunk_starts: list[int],
    chunk_lens: list[int],
    tables: list[list[int]],
    slots: list[int],
    to_device: Callable[[torch.Tensor], torch.Tensor],
) -> FastMetadata:
    """The kernels' view of a step, moved to the device in one copy: single-token chunks go to
    the decode kernel, longer ones are cut into PREFILL_TILE-query tiles. `tables` are the
    chunks' block tables (unpadded); `slots` the new tokens' flat slots in batch order."""
    decodes = [i for i, n in enumerate(chunk_lens) if n == 1]
    prefills = [i for i, n in enumerate(chunk_lens) if n > 1]
    offsets = list(itertools.accumulate(chunk_lens, initial=0))
    flat: list[int] = []
    starts: list[int] = []
    sizes: list[int] = []

    def put(values: list[int]) -> None:
        # Every part starts 16-byte aligned and table widths are multiples of 16: Triton
        # specialises kernels on both, so a batch of another shape would compile anew.
        starts.append(len(flat))
        sizes.append(len(values))
        flat.extend(values)
        flat.extend([0] * (len(values) % 2))

    dec_width = _round16(max((len(tables[i]) for i in decodes), default=1))
    put([offsets[i] for i in decodes])
    put([chunk_starts[i] for i in decodes])
    put([slots[offsets[i]] for i in decodes])
    put([b for i in decodes for b in _padded(tables[i], dec_width)])
    pre_width = _round16(max((len(tables[i]) for i in prefills), default=1))
    tile_chunk = [c for c, i in enumerate(prefills) for _ in range(0, chunk_lens[i], PREFILL_TILE)]
    put(tile_chunk)
    put([q for i in prefills for q in range(0, chunk_lens[i], PREFILL_TILE)])
    put([offsets[i] for i in prefills])
    put([chunk_starts[i] for i in prefills])
    put([chunk_lens[i] for i in prefills])
    put([b for i in prefills for b in _padded(tables[i], pre_width)])
    staged = to_device(torch.tensor(flat, dtype=torch.int64))
    parts = [staged[start : start + size] for start, size in zip(starts, sizes, strict=True)]
    decode = prefill = None
    if decodes:
        decode = DecodeBatch(parts[0], parts[1], parts[3].view(len(decodes), dec_width), parts[2])
    if prefills:
        prefill = PrefillBatch(
            *parts[4:9], parts[9].view(len(prefills), pre_width), num_tiles=len(tile_chunk)
        )
    return FastMetadata(decode, prefill, decode_writes=not prefills)


def _round16(width: int) -> int:
    return -(-width // 16) * 16


def _padded(table: list[int], width: int) -> list[int]:
    return table + [0] * (width - len(table))


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values [tokens, kv_heads, head_dim] into their slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence: [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size]
    return cache.index_select(0, blocks).flatten(0, 1)[:length]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked grouped-query attention.

    q: [batch, queries, heads, dim]; k, v: [batch, keys, kv_heads, dim];
    mask: [batch, queries, keys], True where a query may look. Returns q's shape.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Single-token chunks as one padded batch: q [chunks, heads, dim], lens [chunks]."""
    block_size = k_cache.shape[1]
    longest = int(lens.max())
    tables = block_tables[:, : (longest + block_size - 1) // block_size]
    # Padding slots hold stale but finite values (the cache starts zeroed); the mask hides them.
    k = k_cache.index_select(0, tables.flatten()).view(len(tables), -1, *k_cache.shape[2:])
    v = v_cache.index_select(0, tables.flatten()).view(len(tables), -1, *v_cache.shape[2:])
    mask = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]
    return attend(q.unsqueeze(1), k, v, mask.unsqueeze(1), scale).squeeze(1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of q [tokens, heads, dim] over the cached context of each token's chunk."""
    out = torch.empty_like(q)
    offsets = meta.token_offsets
    decodes = [i for i, n in enumerate(meta.chunk_lens) if n == 1]
    if len(decodes) < 2:
        decodes = []
    else:
        rows = torch.tensor([offsets[i] for i in decodes], device=q.device)
        lens = torch.tensor([meta.chunk_starts[i] + 1 for i in decodes], device=q.device)
        tables = meta.block_tables[decodes]
        out[rows] = _decode_batch(q[rows], k_cache, v_cache, tables, lens, scale)
    batched = set(decodes)
    for i, (start, n) in enumerate(zip(meta.chunk_starts, meta.chunk_lens, strict=True)):
        if i in batched:
            continue
        length = start + n
        k = gather_kv(k_cache, meta.block_tables[i], length)
        v = gather_kv(v_cache, meta.block_tables[i], length)
        positions = torch.arange(start, length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
        span = slice(offsets[i], offsets[i] + n)
        out[span] = attend(q[span][None], k[None], v[None], mask[None], scale)[0]
    return out


class Attention(nn.Module):
    """Stores this step's K/V in the layer's cache, then attends over each chunk's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # Views into the runner's cache, attached after the model is built.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if meta.fast is not None:
            return self._forward_fast(q, k, v, meta, meta.fast)
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)

    def _forward_fast(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        fast: FastMetadata,
    ) -> torch.Tensor:
        from deepflow.engine.kernels import attention as kernels

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if not fast.decode_writes:
            kernels.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if fast.prefill is not None:
            kernels.prefill_attention(q, self.k_cache, self.v_cache, out, fast.prefill, self.scale)
        if fast.decode is not None:
            kernels.decode_attention(
                q, k, v, self.k_cache, self.v_cache, out, fast.decode, self.scale,
                write=fast.decode_writes,
            )  # fmt: skip
        return out

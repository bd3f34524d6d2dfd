"""What the Triton attention kernels read about a step, and building it in one host copy.

These are the kernels' own inputs, so they live with the kernels: the reference layers
(layers/attention.py) carry a `FastMetadata` in their `AttentionMetadata` and pass it through
without reading it, and nothing here imports layers/ or Triton (the CPU path builds no kernel
metadata but imports this module).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
        tile_q, row0, start, length = parts[5:9]
        tables_t = parts[9].view(len(prefills), pre_width)
        prefill = PrefillBatch(parts[4], tile_q, row0, start, length, tables_t, len(tile_chunk))
    return FastMetadata(decode, prefill, decode_writes=not prefills)


def _round16(width: int) -> int:
    return -(-width // 16) * 16


def _padded(table: list[int], width: int) -> list[int]:
    return table + [0] * (width - len(table))

"""Decode steps replayed from graphs captured for a ladder of batch sizes.

A pure decode step (every chunk one token) of n sequences replays the graph of the smallest
captured size >= n, its inputs padded: padding rows read token 0 at position 0 with no cached
context and write their K/V nowhere (slot -1), so they cost a little compute and change nothing.
The graphs read fixed device buffers (`DecodeInputs`): one [4, max] header (token ids,
positions, slots, cached lengths) and one [max, blocks per sequence] table. A step sends the
header in one host-to-device copy; block tables change every block_size tokens, so each running
sequence keeps a row of a device-side table store, a step sends only the rows that changed and
gathers the batch's rows into the graph's table on the device. Tokens the previous step sampled
on the device are scattered in last. Only the Triton path is captured: the torch reference reads
lengths back to the host, which a graph cannot.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from deepflow.engine import kernels
from deepflow.engine.layers.attention import AttentionMetadata, DecodeBatch, FastMetadata
from deepflow.engine.scheduler import PENDING_TOKEN, PendingTokens

if TYPE_CHECKING:
    from deepflow.engine.model_runner import ModelRunner
    from deepflow.engine.scheduler import ScheduledChunk


def batch_ladder(largest: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `largest` (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < largest]
    sizes += range(16, largest, 16)
    return [*sizes, largest]


class DecodeInputs:
    """The device buffers the decode graphs read, and filling them for one step."""

    def __init__(
        self,
        largest: int,
        width: int,
        block_size: int,
        device: torch.device,
        to_device: Callable[[list[int]], torch.Tensor],
    ) -> None:
        self.largest, self.block_size, self.to_device = largest, block_size, to_device
        self.header = torch.zeros(4, largest, dtype=torch.int64, device=device)
        self.header[2].fill_(-1)  # slots: capture writes nothing
        self.tables = torch.zeros(largest, width, dtype=torch.int64, device=device)
        self.store = torch.zeros(largest, width, dtype=torch.int64, device=device)
        """Row r holds the block table of the sequence self._row_of maps to r."""
        self._row_of: dict[int, int] = {}
        self._stored: list[list[int]] = [[] for _ in range(largest)]
        self._free_rows = list(range(largest - 1, -1, -1))

    def fill(self, chunks: list[ScheduledChunk], pending: PendingTokens | None, size: int) -> None:
        """Write the step's inputs for `chunks` (at most `size`; the rest is padding)."""
        bs, n, pad = self.block_size, len(chunks), size - len(chunks)
        ids, positions, slots, rows = [], [], [], []
        fill_dst, fill_src, dirty = [], [], []
        row_of, stored = self._row_of, self._stored
        if len(row_of) + n > self.largest:  # forget sequences this step does not run
            running = {c.seq.seq_id for c in chunks}
            for seq_id in [s for s in row_of if s not in running]:
                self._free_rows.append(row_of.pop(seq_id))
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            p = seq.num_computed_tokens
            token = seq.token_ids[p]
            if token == PENDING_TOKEN:
                if pending is None:
                    raise RuntimeError(f"sequence {seq.seq_id} feeds a token not sampled yet")
                fill_dst.append(i)
                fill_src.append(pending.rows[seq.seq_id])
                token = 0
            table = seq.block_table
            row = row_of.get(seq.seq_id)
            if row is None:
                row = row_of[seq.seq_id] = self._free_rows.pop()
            if stored[row] != table:
                stored[row] = list(table)
                dirty.append(row)
            ids.append(token)
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            rows.append(row)
        width = max((len(stored[r]) for r in dirty), default=0)
        flat = ids + [0] * pad + positions + [0] * pad + slots + [-1] * pad
        flat += positions + [0] * pad  # cached positions = the decode's start
        flat += rows + fill_dst + fill_src + dirty
        for r in dirty:
            flat += stored[r] + [0] * (width - len(stored[r]))
        staged = self.to_device(flat)
        self.header[:, :size].copy_(staged[: 4 * size].view(4, size))
        parts = staged[4 * size :].split(
            [n, len(fill_dst), len(fill_src), len(dirty), len(dirty) * width]
        )
        batch_rows, dst, src, dirty_rows, dirty_tables = parts
        if dirty:
            self.store[dirty_rows, :width] = dirty_tables.view(len(dirty), width)
        self.tables[:n] = self.store[batch_rows]
        if fill_dst:
            assert pending is not None
            self.header[0].index_copy_(0, dst, pending.tokens[src])


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, largest: int) -> None:
        self.runner = runner
        self.sizes = batch_ladder(largest)
        self.largest = largest
        device = runner.device.torch_device
        width = -(-runner.max_model_len // runner.block_size)
        self.inputs = DecodeInputs(largest, width, runner.block_size, device, runner.to_device)
        self.rows = torch.arange(largest, device=device)
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, cached = (row[:size] for row in self.inputs.header)
        tables = self.inputs.tables[:size]
        decode = DecodeBatch(self.rows[:size], cached, tables, slots)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables,
            chunk_starts=[],
            chunk_lens=[1] * size,
            fast=FastMetadata(decode, None, decode_writes=True),
        )
        model = self.runner.model
        return model.compute_logits(model(ids, positions, meta)).float()

    @torch.inference_mode()
    def _capture(self) -> None:
        device = self.runner.device
        pool = device.graph_pool_handle()
        # An unreachable engine's graphs must not be freed mid-capture: a graph destroyed
        # while a stream captures invalidates the capture. Collect them now, then keep the
        # collector out of the way until every size is captured.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with kernels.use_backend("triton"):
                for size in reversed(self.sizes):  # largest first: the rest fit in its pool
                    self._forward(size)  # compiles the kernels outside the capture
                    device.synchronize()
                    graph = device.graph()
                    with device.capture(graph, pool=pool):
                        self.outputs[size] = self._forward(size)
                    self.graphs[size] = graph
            device.synchronize()
        finally:
            if was_enabled:
                gc.enable()

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        return len(chunks) <= self.largest and all(c.num_tokens == 1 for c in chunks)

    def run(self, chunks: list[ScheduledChunk], pending: PendingTokens | None) -> torch.Tensor:
        """float32 logits [chunks that need them, vocab] (a copy: the graph reuses its output)."""
        n = len(chunks)
        size = next(s for s in self.sizes if s >= n)
        self.inputs.fill(chunks, pending, size)
        self.graphs[size].replay()  # type: ignore[attr-defined]
        logits = self.outputs[size][:n]
        if not all(c.needs_logits for c in chunks):
            rows = [i for i, c in enumerate(chunks) if c.needs_logits]
            return logits[self.runner.to_device(rows)]
        return logits.clone()

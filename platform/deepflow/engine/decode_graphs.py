"""Decode steps replayed from graphs captured for a ladder of batch sizes.

A pure decode step (every chunk one token) of n sequences replays the graph of the smallest
captured size >= n, its inputs padded: padding rows read token 0 at position 0 with no cached
context and write their K/V nowhere (slot -1), so they cost a little compute and change nothing.
The graphs read fixed device buffers: one [4, max] header (token ids, positions, slots, cached
lengths) and one [max, blocks per sequence] table; a step fills them with one host-to-device
copy of exactly what it needs and two device copies, then scatters in any tokens the previous
step sampled on the device. Only the Triton path is captured: the torch reference reads lengths
back to the host, which a graph cannot.
"""

from __future__ import annotations

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


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, largest: int) -> None:
        self.runner = runner
        self.sizes = batch_ladder(largest)
        self.largest = largest
        device = runner.device.torch_device
        width = -(-runner.max_model_len // runner.block_size)
        self.header = torch.zeros(4, largest, dtype=torch.int64, device=device)
        self.header[2].fill_(-1)  # slots: capture writes nothing
        self.tables = torch.zeros(largest, width, dtype=torch.int64, device=device)
        self.rows = torch.arange(largest, device=device)
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, cached = (row[:size] for row in self.header)
        decode = DecodeBatch(self.rows[:size], cached, self.tables[:size], slots)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=self.tables[:size],
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
        with kernels.use_backend("triton"):
            for size in reversed(self.sizes):  # largest first: the rest fit in its pool
                self._forward(size)  # compiles the kernels outside the capture
                device.synchronize()
                graph = device.graph()
                with device.capture(graph, pool=pool):
                    self.outputs[size] = self._forward(size)
                self.graphs[size] = graph
        device.synchronize()

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        return len(chunks) <= self.largest and all(c.num_tokens == 1 for c in chunks)

    def run(self, chunks: list[ScheduledChunk], pending: PendingTokens | None) -> torch.Tensor:
        """float32 logits [chunks that need them, vocab] (a copy: the graph reuses its output)."""
        n = len(chunks)
        size = next(s for s in self.sizes if s >= n)
        bs = self.runner.block_size
        ids, positions, slots, tables = [], [], [], []
        fill_dst, fill_src = [], []
        for i, chunk in enumerate(chunks):
            seq, p = chunk.seq, chunk.start
            token = seq.token_ids[p]
            if token == PENDING_TOKEN:
                if pending is None:
                    raise RuntimeError(f"sequence {seq.seq_id} feeds a token not sampled yet")
                fill_dst.append(i)
                fill_src.append(pending.rows[seq.seq_id])
                token = 0
            table = seq.block_table[: p // bs + 1]
            ids.append(token)
            positions.append(p)
            slots.append(table[-1] * bs + p % bs)
            tables.append(table)
        width = max(len(t) for t in tables)
        pad = size - n
        flat = ids + [0] * pad + positions + [0] * pad + slots + [-1] * pad
        flat += positions + [0] * pad  # cached positions = the decode's start
        flat += [b for t in tables for b in t + [0] * (width - len(t))]
        flat += fill_dst + fill_src
        staged = self.runner.to_device(flat)
        self.header[:, :size].copy_(staged[: 4 * size].view(4, size))
        end = 4 * size + n * width
        self.tables[:n, :width].copy_(staged[4 * size : end].view(n, width))
        if fill_dst:
            assert pending is not None
            dst, src = staged[end : end + len(fill_dst)], staged[end + len(fill_dst) :]
            self.header[0].index_copy_(0, dst, pending.tokens[src])
        self.graphs[size].replay()  # type: ignore[attr-defined]
        logits = self.outputs[size][:n]
        if not all(c.needs_logits for c in chunks):
            rows = [i for i, c in enumerate(chunks) if c.needs_logits]
            return logits[self.runner.to_device(rows)]
        return logits.clone()

"""Decode steps replayed from graphs captured for a ladder of batch sizes.

A pure decode step (every chunk one token) of n sequences replays the graph of the smallest
captured size >= n, its inputs padded: padding rows read token 0 at position 0 with no cached
context and write their K/V nowhere (slot -1), so they cost a little compute and change nothing.
The graphs read fixed device buffers (`DecodeInputs`): a [4, size] header per size (token ids,
positions, slots, cached lengths), the head of one staging buffer, and one [max, blocks per
sequence] table. A step sends everything in one pinned host-to-device copy straight into the
staging buffer; block tables change every block_size tokens, so each running sequence keeps a
row of a device-side table store, a step sends only the rows that changed and gathers the
batch's rows into the graph's table on the device (not at all when neither the rows nor the
tables changed). Tokens the previous step sampled on the device are scattered in last. Each
graph also samples its rows greedily (kernels/sampling.py) into a fixed buffer: where the rows
the runner samples are all plain greedy, that is the step's sampling, with no launch of its own
and one copy to the host (ModelRunner.sample decides). Only the Triton path is captured: the
torch reference reads lengths back to the host, which a graph cannot.

The graphs get what they run (the model, the device, the cache geometry) at construction and
know nothing of the runner that owns them.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Protocol

import torch

from deepflow.engine import kernels
from deepflow.engine.device import Device
from deepflow.engine.kernels.metadata import DecodeBatch, FastMetadata
from deepflow.engine.layers.attention import AttentionMetadata
from deepflow.engine.models.decoder import DecoderForCausalLM
from deepflow.engine.outputs import (
    PENDING_TOKEN,
    ModelRunnerOutput,
    PendingTokens,
    SampledBatch,
    ScheduledChunk,
    StepSequence,
)
from deepflow.engine.sampler import to_device

Chunks = Sequence[ScheduledChunk[StepSequence]]


class Graph(Protocol):
    """A captured graph, as Device.graph makes it (the vendor's graph class)."""

    def replay(self) -> None: ...


def batch_ladder(largest: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `largest` (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < largest]
    sizes += range(16, largest, 16)
    return [*sizes, largest]


class DecodeInputs:
    """The device buffers the decode graphs read, and filling them for one step."""

    def __init__(self, largest: int, width: int, block_size: int, device: torch.device) -> None:
        self.largest, self.block_size, self.device = largest, block_size, device
        self.staging = torch.zeros(largest * (8 + width), dtype=torch.int64, device=device)
        """A step's host values land here in one copy: its first 4 x size entries are the
        header of the graph of that size (`header`), the rest what fill() scatters."""
        self.tables = torch.zeros(largest, width, dtype=torch.int64, device=device)
        self.store = torch.zeros(largest, width, dtype=torch.int64, device=device)
        """Row r holds the block table of the sequence self._row_of maps to r."""
        self._row_of: dict[int, int] = {}
        self._stored: list[list[int]] = [[] for _ in range(largest)]
        self._free_rows = list(range(largest - 1, -1, -1))
        self._gathered: list[int] = []
        """The store rows self.tables holds, in order (a step with the same rows and no table
        change skips the gather)."""

    def header(self, size: int) -> torch.Tensor:
        """[4, size]: token ids, positions, slots, cached lengths of the graph of `size`."""
        return self.staging[: 4 * size].view(4, size)

    def fill(self, chunks: Chunks, pending: PendingTokens | None, size: int) -> None:
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
        self._send(flat, size, rows, fill_dst, fill_src, dirty, width, pending)

    def _send(
        self,
        flat: list[int],
        size: int,
        rows: list[int],
        fill_dst: list[int],
        fill_src: list[int],
        dirty: list[int],
        width: int,
        pending: PendingTokens | None,
    ) -> None:
        """One copy of `flat` into the staging buffer, then the device-side scatters."""
        n = len(rows)
        host = torch.tensor(flat, dtype=torch.int64)
        if self.device.type != "cpu":  # pinned: the copy does not wait for the queued steps
            host = host.pin_memory()
        staged = self.staging[: len(flat)]
        staged.copy_(host, non_blocking=True)
        parts = staged[4 * size :].split(
            [n, len(fill_dst), len(fill_src), len(dirty), len(dirty) * width]
        )
        batch_rows, dst, src, dirty_rows, dirty_tables = parts
        if dirty:
            self.store[dirty_rows, :width] = dirty_tables.view(len(dirty), width)
        if dirty or rows != self._gathered:  # else self.tables holds these rows already
            torch.index_select(self.store, 0, batch_rows, out=self.tables[:n])
            self._gathered = rows
        if fill_dst:
            assert pending is not None
            token_ids = self.staging[:size]
            k = len(fill_dst)
            if fill_dst == fill_src == list(range(k)):  # the same rows, in the same order
                token_ids[:k].copy_(pending.tokens[:k])
            else:
                token_ids.index_copy_(0, dst, pending.tokens[src])


class DecodeGraphs:
    def __init__(
        self,
        model: DecoderForCausalLM,
        device: Device,
        largest: int,
        block_size: int,
        max_model_len: int,
    ) -> None:
        self.model, self.device = model, device
        self.sizes = batch_ladder(largest)
        self.largest = largest
        torch_device = device.torch_device
        width = -(-max_model_len // block_size)
        self.inputs = DecodeInputs(largest, width, block_size, torch_device)
        self.rows = torch.arange(largest, device=torch_device)
        self.sampled = torch.zeros(2 * largest, dtype=torch.int64, device=torch_device)
        """Each graph of size s also samples greedily (kernels/sampling.py): the argmax of row
        i at sampled[i], its float32 log-probability in the bits of sampled[s:2 * s]."""
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, cached = self.inputs.header(size)
        tables = self.inputs.tables[:size]
        decode = DecodeBatch(self.rows[:size], cached, tables, slots)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables,
            chunk_starts=[],
            chunk_lens=[1] * size,
            fast=FastMetadata(decode, None, decode_writes=True),
        )
        logits = self.model.compute_logits(self.model(ids, positions, meta)).float()
        from deepflow.engine.kernels.sampling import greedy

        greedy(logits, out=self.greedy_buffers(size))
        return logits

    def greedy_buffers(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.sampled[:size]
        return tokens, self.sampled[size : 2 * size].view(torch.float32)[:size]

    @torch.inference_mode()
    def _capture(self) -> None:
        device = self.device
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
                    header = self.inputs.header(size)  # the sizes' headers overlap
                    header.zero_()
                    header[2].fill_(-1)  # slots: capture writes nothing
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

    def fits(self, chunks: Chunks) -> bool:
        return len(chunks) <= self.largest and all(c.num_tokens == 1 for c in chunks)

    def run(
        self, chunks: Chunks, pending: PendingTokens | None
    ) -> tuple[torch.Tensor, GreedySamples | None]:
        """float32 logits [chunks that need them, vocab] and, when every chunk needs them, the
        greedy samples the graph took of them. Both are the graph's own buffers (no copy):
        valid until the next replay is queued, so the caller samples before it runs again."""
        n = len(chunks)
        size = next(s for s in self.sizes if s >= n)
        self.inputs.fill(chunks, pending, size)
        self.graphs[size].replay()
        logits = self.outputs[size][:n]
        if not all(c.needs_logits for c in chunks):
            rows = [i for i, c in enumerate(chunks) if c.needs_logits]
            return logits[to_device(rows, logits.device, torch.int64)], None
        return logits, GreedySamples(self.sampled[: 2 * size], n, size)


class GreedySamples:
    """A decode graph's greedy samples of its n rows, packed in one buffer of 2 x size int64
    (tokens, then the float32 log-probabilities' bits): one copy brings them to the host."""

    def __init__(self, packed: torch.Tensor, n: int, size: int) -> None:
        self.packed, self.n, self.size = packed, n, size

    @property
    def tokens(self) -> torch.Tensor:
        return self.packed[: self.n]

    def unpack(self, host: torch.Tensor) -> tuple[list[int], list[float]]:
        """(tokens, logprobs) from the host copy of `packed`."""
        n, size = self.n, self.size
        return host[:n].tolist(), host[size : 2 * size].view(torch.float32)[:n].tolist()

    def sampled(self) -> SampledBatch:
        """These samples as the step's, their copy to the host started."""
        return SampledBatch(self.tokens, [self.packed], self._result)

    def _result(self, host: list[torch.Tensor]) -> ModelRunnerOutput:
        tokens, logprobs = self.unpack(host[0])
        return ModelRunnerOutput(tokens, logprobs, [None] * len(tokens))

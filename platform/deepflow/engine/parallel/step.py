"""What rank 0 sends the other ranks each step, and how a worker turns it back into a batch.

A step travels as one pickled tuple of plain ints and int lists: the block copies, per chunk
(sequence id, start, tokens fed, true length, the blocks it touches), and where the previous
step's samples go when they are still on the device (async scheduling).
No Sequence object crosses: a worker sees each chunk's sequence through `SeqView`, which holds
only the chunk's own tokens, and runs the very same `ModelRunner.execute` as rank 0, so every
rank builds identical inputs and meets the same collectives in the same order.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import overload

from deepflow.engine.outputs import ScheduledChunk, SchedulerOutput, StepSequence

STEP = b"S"
STOP = b"Q"

ChunkWire = tuple[int, int, list[int], int, list[int]]
"""(seq_id, start, tokens fed, sequence length, block table up to the chunk's end)."""


class TokenWindow:
    """A sequence's token ids as a worker knows them: only the chunk's [start, start + n).

    `len()` is the sequence's true length, so `needs_logits` agrees with rank 0; reading outside
    the window raises, which would mean the runner reads more than the contract says it does.
    """

    __slots__ = ("length", "start", "tokens")

    def __init__(self, start: int, tokens: list[int], length: int) -> None:
        self.start, self.tokens, self.length = start, tokens, length

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        end = self.start + len(self.tokens)
        if isinstance(index, slice):
            lo, hi, stride = index.indices(self.length)
            if stride == 1 and (lo >= hi or (self.start <= lo and hi <= end)):
                return self.tokens[max(lo - self.start, 0) : max(hi - self.start, 0)]
        else:
            i = index + self.length if index < 0 else index
            if self.start <= i < end:
                return self.tokens[i - self.start]
        raise IndexError(f"token {index} is outside the window [{self.start}, {end}) a rank sees")


@dataclass(slots=True)
class SeqView:
    """The parts of a Sequence that ModelRunner.execute reads (outputs.StepSequence)."""

    seq_id: int
    token_ids: TokenWindow
    num_computed_tokens: int
    block_table: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


PendingSpec = tuple[int, dict[int, int]]
"""(number of tokens, seq_id -> row) of the previous step's samples still on rank 0's device
(async scheduling); the tokens themselves follow the message as a broadcast."""


def pack(
    batch: SchedulerOutput[StepSequence], block_size: int, pending: PendingSpec | None = None
) -> bytes:
    chunks: list[ChunkWire] = []
    for chunk in batch.chunks:
        seq, start = chunk.seq, chunk.start
        end = start + chunk.num_tokens
        table = seq.block_table[: -(-end // block_size)]
        chunks.append((seq.seq_id, start, seq.token_ids[start:end], len(seq.token_ids), table))
    wire = (batch.block_copies, chunks, pending)
    return STEP + pickle.dumps(wire, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(message: bytes) -> tuple[SchedulerOutput[SeqView], PendingSpec | None]:
    if message[:1] != STEP:
        raise ValueError(f"not a step message: {message[:16]!r}")
    copies, chunks, pending = pickle.loads(memoryview(message)[1:])
    out: SchedulerOutput[SeqView] = SchedulerOutput(block_copies=[tuple(c) for c in copies])
    for seq_id, start, tokens, length, table in chunks:
        view = SeqView(seq_id, TokenWindow(start, tokens, length), start, table)
        out.chunks.append(ScheduledChunk(view, len(tokens)))
    return out, pending

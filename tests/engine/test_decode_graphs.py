"""decode_graphs.DecodeInputs on the CPU: what a decode graph would read after each step equals
the batch's inputs computed directly, while sequences come, go, reorder, grow blocks, get new
tables (copy-on-write) and feed tokens still on the device."""

from __future__ import annotations

import random

import torch

from deepflow.engine.decode_graphs import DecodeInputs, GreedySamples, batch_ladder
from deepflow.engine.outputs import PENDING_TOKEN, PendingTokens, ScheduledChunk
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import Sequence

BS, LARGEST, WIDTH = 4, 16, 12


def expected(chunks: list[ScheduledChunk], pending: PendingTokens | None, size: int):
    ids, positions, slots = [], [], []
    for c in chunks:
        p, table = c.seq.num_computed_tokens, c.seq.block_table
        token = c.seq.token_ids[p]
        if token == PENDING_TOKEN:
            assert pending is not None
            token = int(pending.tokens[pending.rows[c.seq.seq_id]])
        ids.append(token)
        positions.append(p)
        slots.append(table[p // BS] * BS + p % BS)
    pad = size - len(chunks)
    header = [ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, positions + [0] * pad]
    return torch.tensor(header), [c.seq.block_table for c in chunks]


def advance(running: list[Sequence], rng: random.Random, free: list[int]) -> None:
    """The step ran: its token is in, the next one comes (in a new block when one is full)."""
    for seq in running:
        seq.token_ids[-1] = 7
        seq.num_computed_tokens += 1
        seq.token_ids.append(rng.randrange(500))
        if seq.num_computed_tokens // BS >= len(seq.block_table):
            seq.block_table.append(free.pop())


def test_the_graph_buffers_hold_each_steps_inputs() -> None:
    rng = random.Random(0)
    inputs = DecodeInputs(LARGEST, WIDTH, BS, torch.device("cpu"))
    free = list(range(1000))
    rng.shuffle(free)
    live: list[Sequence] = []
    next_id = 0
    for step in range(200):
        while len(live) < LARGEST and rng.random() < 0.3:  # arrivals
            n = rng.randint(1, 20)
            seq = Sequence(
                next_id, str(next_id), [rng.randrange(500) for _ in range(n)], SamplingParams()
            )
            seq.num_computed_tokens = n - 1
            seq.block_table = [free.pop() for _ in range(-(-n // BS))]
            live.append(seq)
            next_id += 1
        for seq in list(live):  # finishes, and sequences skipping this step
            if rng.random() < 0.05 or len(seq.token_ids) >= WIDTH * BS:
                live.remove(seq)
        if step % 7 == 0:
            rng.shuffle(live)
        running = [s for s in live if rng.random() > 0.1]
        if not running:
            continue
        for seq in running:
            if rng.random() < 0.05:  # copy-on-write: a block replaced in place
                seq.block_table[rng.randrange(len(seq.block_table))] = free.pop()
        pending_rows = {s.seq_id: i for i, s in enumerate(running) if rng.random() < 0.5}
        for seq in running:
            if seq.seq_id in pending_rows:
                seq.token_ids[-1] = PENDING_TOKEN
        pending = PendingTokens(torch.arange(100, 100 + len(running)), pending_rows)
        size = next(s for s in batch_ladder(LARGEST) if s >= len(running))
        chunks = [ScheduledChunk(s, 1) for s in running]
        inputs.fill(chunks, pending, size)
        header, tables = expected(chunks, pending, size)
        assert torch.equal(inputs.header(size), header)
        for row, table in enumerate(tables):
            assert inputs.tables[row, : len(table)].tolist() == table
        advance(running, rng, free)


def test_greedy_samples_unpack_tokens_and_float32_logprobs() -> None:
    size, n = 4, 3
    packed = torch.zeros(2 * size, dtype=torch.int64)
    packed[:size] = torch.tensor([5, 6, 7, 0])
    packed[size:].view(torch.float32)[:size] = torch.tensor([-0.5, -1.25, -2.0, 0.0])
    samples = GreedySamples(packed, n, size)
    assert samples.tokens.tolist() == [5, 6, 7]
    assert samples.unpack(packed.clone()) == ([5, 6, 7], [-0.5, -1.25, -2.0])
    # As the step's samples (what ModelRunner.sample hands the engine): one row per sequence.
    sampled = samples.sampled()
    assert sampled.tokens.data_ptr() == packed.data_ptr()  # the next step feeds them in place
    out = sampled.result()
    assert (out.token_ids, out.logprobs, out.top_logprobs) == (
        [5, 6, 7],
        [-0.5, -1.25, -2.0],
        [None] * 3,
    )

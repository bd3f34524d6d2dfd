"""`Runner`: all the engine asks of whatever runs the model, on one device or on several.

Implemented by `ModelRunner` (model_runner.py: one device, with its decode graphs) and by
`TensorParallelRunner` (parallel/runner.py: rank 0 of a tensor-parallel group, which drives one
ModelRunner per rank); the tests add a fake one (tests/engine/conftest.py), the host-only
benchmark another (bench/engine_throughput.py). The engine never learns which it has.

A step is two calls. `execute` queues the forward pass and keeps its logits; `sample` turns
them into tokens. They are apart because the engine's async loop does its bookkeeping between
them: it launches step N+1's forward first, then waits for step N's samples, writes them into
the sequences (penalties read them), forks a prompt's n samples, and only then samples N+1.
How the tokens are drawn is the runner's business: a decode graph that already sampled its
rows greedily serves them from inside the graph (decode_graphs.py), with nothing to tell the
engine. The engine sees tokens and logprobs, never logits.
"""

from __future__ import annotations

from typing import Protocol

from deepflow.engine.device import Device
from deepflow.engine.outputs import PendingTokens, SampledBatch, SchedulerOutput, StepSequence
from deepflow.engine.sequence import Sequence


class Runner(Protocol):
    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int:
        """KV cache blocks the scheduler may hand out."""
        ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def device(self) -> Device:
        """Where the samples live; the engine overlaps steps by default on an accelerator."""
        ...

    def execute(
        self, batch: SchedulerOutput[StepSequence], pending: PendingTokens | None = None
    ) -> None:
        """Queue the step's forward pass (block copies first). `pending`: the previous step's
        samples, still on the device, for the sequences whose last token is PENDING_TOKEN.
        The step's logits wait in the runner until the next execute()."""
        ...

    def sample(
        self, seqs: list[Sequence], eos_token_ids: list[int], rows: list[int] | None = None
    ) -> SampledBatch:
        """Sample the last step's logits: one token per sequence, under its SamplingParams.
        `rows`: each sequence's logits row (a prompt's n samples share one); None: row i is
        seqs[i]'s. Queues device work only; SampledBatch.result() waits."""
        ...

"""The types one engine step hands between its parts: what the scheduler decided, the tokens the
runner sampled (with their logprobs), and the tokens still on the device.

A leaf module: it imports nothing of deepflow.engine, so the scheduler, both runners, the decode
graphs, the sampler and the engine all use it without importing one another (vLLM v1 keeps its
`v1/core/sched/output.py` and `v1/outputs.py` apart for the same reason). A scheduled chunk
names its sequence through `StepSequence`, the few fields a runner reads, which a `Sequence`
has on rank 0 and a `SeqView` (parallel/step.py) on the other tensor-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, overload

import torch

PENDING_TOKEN = -1
"""Stands in a sequence's token_ids for a token the previous step sampled that has not reached
the host yet (async scheduling); the runner feeds it from `PendingTokens` on the device."""


class TokenIds(Protocol):
    """A sequence's token ids as a runner indexes them (a list, or a rank's TokenWindow)."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...


class StepSequence(Protocol):
    """What a runner reads of a scheduled sequence; it never writes any of it."""

    @property
    def seq_id(self) -> int: ...

    @property
    def token_ids(self) -> TokenIds: ...

    @property
    def num_computed_tokens(self) -> int: ...

    @property
    def block_table(self) -> list[int]: ...


S = TypeVar("S", bound=StepSequence, covariant=True)
"""The scheduler's chunks hold Sequences, a worker rank's hold SeqViews; runners take either."""


@dataclass(slots=True)
class ScheduledChunk(Generic[S]):
    seq: S
    num_tokens: int
    """Feed seq.token_ids[start : start + num_tokens]."""

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def needs_logits(self) -> bool:
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass(slots=True)
class SchedulerOutput(Generic[S]):
    chunks: list[ScheduledChunk[S]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) blocks the runner copies before the step (copy-on-write)."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(slots=True)
class PendingTokens:
    """The previous step's sampled tokens, still on the device."""

    tokens: torch.Tensor
    """[rows] int64."""
    rows: dict[int, int]
    """seq_id -> its row in `tokens`."""


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int
    """1 for the most likely token."""
    decoded_token: str | None = None


@dataclass(slots=True)
class ModelRunnerOutput:
    """One step's samples on the host: row i belongs to the i-th sequence given to sample()."""

    token_ids: list[int]
    logprobs: list[float]
    """The chosen tokens' raw logprobs."""
    top_logprobs: list[dict[int, Logprob] | None]
    """Per row: the chosen token and the N most likely, where SamplingParams.logprobs=N."""


class SampledBatch:
    """One step's samples on the device, their copy to the host under way.

    Whoever sampled (the sampler, or a decode graph that sampled inside itself) names the device
    tensors to copy and how to read them back; the engine only feeds `tokens` to the next step
    and later waits once, in result(). Nothing here waits for the device before that.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        device_side: list[torch.Tensor],
        unpack: Callable[[list[torch.Tensor]], ModelRunnerOutput],
    ) -> None:
        self.tokens = tokens
        """[rows] int64: the sampled ids, which the next step may feed before they are read."""
        self._unpack = unpack
        self._done: torch.Event | None
        if tokens.device.type == "cpu":
            self._host, self._done = device_side, None
        else:
            self._host = [t.to("cpu", non_blocking=True) for t in device_side]
            self._done = torch.Event(device=tokens.device)
            self._done.record()

    def result(self) -> ModelRunnerOutput:
        """Wait for the copy (the step's one host synchronisation) and unpack it."""
        if self._done is not None:
            self._done.synchronize()
        return self._unpack(self._host)

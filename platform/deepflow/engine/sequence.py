"""A Sequence is one sample of one request: its tokens and where their K/V live in the cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deepflow.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from deepflow.engine.detokenizer import IncrementalDetokenizer
    from deepflow.engine.outputs import Logprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival: int = 0,
        index: int = 0,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        """Which of the request's ``n`` samples this is."""
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        """Chained hashes of the leading full blocks whose K/V are computed."""
        self.status = SequenceStatus.WAITING
        self.params = params
        self.priority = priority
        self.arrival = arrival
        """Admission order: the FCFS tie-break and the starvation guard."""
        self.generator: Any = None
        """A torch.Generator for seeded sampling, made by the sampler on the logits' device."""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.detokenizer: IncrementalDetokenizer | None = None

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, {self.status.value}, "
            f"tokens={len(self.token_ids)}, computed={self.num_computed_tokens}, "
            f"blocks={self.block_table})"
        )

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Lower runs first: priority, then arrival, then sample index."""
        return (self.priority, self.arrival, self.index)

    @property
    def seed(self) -> int | None:
        """Sample i > 0 of a seeded request draws from its own stream, derived from the seed."""
        if self.params.seed is None:
            return None
        if self.index == 0:
            return self.params.seed
        return hash((self.params.seed, self.index)) & (2**63 - 1)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def fork(self, seq_id: int, index: int) -> Sequence:
        """A sibling sample sharing everything computed so far (the caller shares the blocks)."""
        child = Sequence(
            seq_id, self.request_id, self.token_ids, self.params, self.priority, self.arrival, index
        )
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.block_table = list(self.block_table)
        child.block_hashes = list(self.block_hashes)
        child.status = self.status
        return child


@dataclass(slots=True)
class SequenceGroup:
    """One request: its prompt, its samples (one until the prompt is prefilled) and timings."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)
    stream: bool = True
    """An output after every step that gave it tokens; False: only the final output."""
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def is_finished(self) -> bool:
        # Before the fork there is one sample; it only finishes that early if aborted.
        return all(s.is_finished for s in self.seqs)

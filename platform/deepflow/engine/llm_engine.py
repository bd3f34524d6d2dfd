"""The engine core: admit requests, then step (schedule, execute, update) until they are done.

A step is the scheduler's batch, the runner's forward pass and samples (runner.py: the engine
sees tokens, never logits), the scheduler's bookkeeping, and the output processor's pass over the
new tokens (output_processor.py: text, stops, one RequestOutput per request). Here live what
touches the scheduler: forking a prompt's n samples onto its blocks, freeing what finished,
aborts.

With async scheduling (on accelerators) a step schedules and launches step N+1 before it reads
step N's samples: N's tokens stand in the sequences as PENDING_TOKEN and reach N+1's inputs on
the device; the host then waits once for N's samples, fills them in and emits N's outputs while
the device runs N+1. A sequence that N finishes (EOS, a stop string) has had one wasted step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, fields
from typing import Any

from deepflow.engine.config import EngineConfig
from deepflow.engine.output_processor import (
    CompletionOutput,
    OutputProcessor,
    RequestMetrics,
    RequestOutput,
)
from deepflow.engine.outputs import (
    PENDING_TOKEN,
    ModelRunnerOutput,
    PendingTokens,
    SampledBatch,
    SchedulerOutput,
)
from deepflow.engine.runner import Runner
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import Scheduler
from deepflow.engine.sequence import Sequence, SequenceGroup, SequenceStatus

__all__ = ["CompletionOutput", "EngineStats", "LLMEngine", "RequestMetrics", "RequestOutput"]


@dataclass(slots=True)
class EngineStats:
    """What the serving layer exports: queue sizes, cache use and token counters."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_kv_blocks: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int


@dataclass(slots=True)
class _InFlight:
    """A launched step whose samples have not reached the host: row i is seqs[i]'s token."""

    seqs: list[Sequence]
    sampled: SampledBatch

    def pending(self) -> PendingTokens:
        return PendingTokens(self.sampled.tokens, {s.seq_id: i for i, s in enumerate(self.seqs)})


class LLMEngine:
    def __init__(
        self, config: EngineConfig, model_runner: Runner | None = None, tokenizer: Any = None
    ) -> None:
        """``model_runner`` and ``tokenizer`` default to the ones built from ``config.model``."""
        if model_runner is None:
            from deepflow.engine.parallel.runner import make_runner

            model_runner = make_runner(config)
        if tokenizer is None:
            from deepflow.engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_folder(config.model)
        self.config = config
        self.model_runner = model_runner
        self.tokenizer = tokenizer
        block_size, num_blocks = model_runner.block_size, model_runner.num_blocks
        # One sequence may never need more blocks than exist, or preemption could not help it.
        self.max_model_len = min(model_runner.max_model_len, num_blocks * block_size)
        self.vocab_size = model_runner.vocab_size
        self.eos_token_ids = list(tokenizer.eos_token_ids)
        self.scheduler = Scheduler(config, num_blocks, block_size)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len)
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        overlap = config.async_scheduling
        self.async_scheduling = model_runner.device.is_accelerator if overlap is None else overlap
        self._inflight: _InFlight | None = None

    @classmethod
    def from_model(cls, model_dir: str, **kwargs: Any) -> LLMEngine:
        """EngineConfig fields as keyword arguments (plus model_runner= and tokenizer=)."""
        runner, tokenizer = kwargs.pop("model_runner", None), kwargs.pop("tokenizer", None)
        unknown = set(kwargs) - {f.name for f in fields(EngineConfig)}
        if unknown:
            raise TypeError(f"unknown engine options: {sorted(unknown)}")
        return cls(EngineConfig(model=model_dir, **kwargs), runner, tokenizer)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        stream: bool = True,
    ) -> None:
        """Queue a request; lower ``priority`` runs earlier, ties in arrival order. Raises
        ValueError, before any state changes, for a request that could never run. ``stream``:
        step() returns an output for it after every step that gave it tokens; False: only the
        final one (its text is then decoded once, at the end, unless stop strings need it)."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} already exists")
        self.admit(self.make_request(request_id, prompt, params, priority, stream))

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        stream: bool = True,
    ) -> SequenceGroup:
        """Tokenise and validate without touching the engine (AsyncLLMEngine calls it from the
        event loop, so that errors reach the caller)."""
        params = SamplingParams() if params is None else params
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, not {type(request_id).__name__}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, not {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an int, got {priority!r}")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size})")
        self._check_fits(ids, params)
        return SequenceGroup(request_id, text, ids, params, priority, time.time(), stream=stream)

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len}, "
                "with room for at least one generated token"
            )
        if not self.config.enable_chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, more than max_num_batched_tokens "
                f"({self.config.max_num_batched_tokens}) and chunked prefill is off"
            )
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        if any(t >= self.vocab_size for t in params.stop_token_ids or []):
            raise ValueError(f"stop_token_ids must be below the vocabulary size {self.vocab_size}")

    def admit(self, group: SequenceGroup) -> None:
        if group.request_id in self.requests:
            raise ValueError(f"request {group.request_id!r} already exists")
        seq_id, arrival = next(self._seq_ids), next(self._arrivals)
        seq = Sequence(
            seq_id, group.request_id, group.prompt_token_ids, group.params, group.priority, arrival
        )
        self.output.add_request(group, seq)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; its final output, if it existed."""
        group = self.requests.pop(request_id, None)
        if group is None:
            return None
        ended = [seq for seq in group.seqs if not seq.is_finished]
        for seq in ended:
            if seq.token_ids[-1] == PENDING_TOKEN:  # sampled by a step still in flight
                seq.token_ids.pop()
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        return self.output.aborted(group, ended)

    @property
    def requests(self) -> dict[str, SequenceGroup]:
        """Unfinished requests by id (the output processor's: it retires finished ones)."""
        return self.output.requests

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_stats(self) -> EngineStats:
        s, bm = self.scheduler, self.scheduler.block_manager
        out = self.output
        return EngineStats(
            len(s.running), len(s.waiting), bm.usage, bm.num_blocks, out.prompt_tokens,
            out.generation_tokens, s.prefix_cache_queried_tokens, s.prefix_cache_hit_tokens,
            s.num_preemptions,
        )  # fmt: skip

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass; outputs of the requests that got tokens in it (with async
        scheduling: in the pass before it, which this one overlaps)."""
        if not self.async_scheduling:
            return self._step_sync()
        batch = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        if batch.chunks:
            self.model_runner.execute(batch, prev.pending() if prev is not None else None)
        landed = self._land(prev) if prev is not None else None  # the step's one wait
        self._inflight = self._update_and_sample(batch)
        outputs = [] if landed is None else self._emit(*landed, appended=True)
        if self._inflight is not None:
            self._append_pending(self._inflight.seqs)
        return outputs

    def _step_sync(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return []
        self.model_runner.execute(batch)
        inflight = self._update_and_sample(batch)
        if inflight is None:
            return []
        return self._emit(inflight.seqs, inflight.sampled.result())

    def _land(self, prev: _InFlight) -> tuple[list[Sequence], ModelRunnerOutput]:
        """Wait for a launched step's samples and write them over its PENDING_TOKENs."""
        done = prev.sampled.result()
        for seq, token in zip(prev.seqs, done.token_ids, strict=True):
            if not seq.is_finished:
                seq.token_ids[-1] = token
        return prev.seqs, done

    def _update_and_sample(self, batch: SchedulerOutput[Sequence]) -> _InFlight | None:
        """Book the step's tokens as computed, fork prompts into their n samples, and have the
        runner sample every sequence whose chunk reached its last token."""
        if not batch.chunks:
            return None
        sampling = [c.seq for c in batch.chunks if c.needs_logits]  # before update moves starts
        self.scheduler.update(batch)
        if not sampling:
            return None
        seqs, rows = self._fork_samples(sampling)
        return _InFlight(seqs, self.model_runner.sample(seqs, self.eos_token_ids, rows))

    def _emit(
        self, seqs: list[Sequence], sampled: ModelRunnerOutput, appended: bool = False
    ) -> list[RequestOutput]:
        """The output processor's pass; the sequences it ended give their blocks back before
        it collects the outputs (a request finishes when all its samples have)."""
        processed = self.output.process(seqs, sampled, appended)
        for seq in processed.finished:
            self.scheduler.finish(seq)
        return self.output.collect(processed)

    def _append_pending(self, seqs: list[Sequence]) -> None:
        """Stand the in-flight samples in; a sequence one surely ends is not scheduled again."""
        finishing, limit = self.scheduler.finishing, self.max_model_len
        for seq in seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            tokens = seq.token_ids
            tokens.append(PENDING_TOKEN)
            max_tokens = seq.params.max_tokens
            if (
                max_tokens is not None and len(tokens) - seq.num_prompt_tokens >= max_tokens
            ) or len(tokens) >= limit:
                finishing.add(seq.seq_id)

    def _fork_samples(self, sampling: list[Sequence]) -> tuple[list[Sequence], list[int] | None]:
        """The sequences to sample and each one's logits row (None: one row each, in order). A
        prompt just prefilled for ``n`` samples forks into n sequences on its blocks, all
        sampling from its row."""
        seqs: list[Sequence] = []
        rows: list[int] = []
        for row, seq in enumerate(sampling):
            seqs.append(seq)
            rows.append(row)
            if seq.params.n > 1 and seq.index == 0 and seq.num_output_tokens == 0:
                for index in range(1, seq.params.n):
                    child = seq.fork(next(self._seq_ids), index)
                    self.scheduler.fork(seq, child)
                    self.output.add_sample(child)
                    seqs.append(child)
                    rows.append(row)
        return seqs, rows if len(seqs) > len(sampling) else None

"""The engine loop: admit requests, then step (schedule, run, sample, collect) until done.

With async scheduling (on accelerators) a step schedules and launches step N+1 before it reads
step N's samples: N's tokens stand in the sequences as PENDING_TOKEN and reach N+1's inputs on
the device; the host then waits once for N's samples, fills them in and emits N's outputs while
the device runs N+1. A sequence that N finishes (EOS, a stop string) has had one wasted step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from deepflow.engine.config import EngineConfig
from deepflow.engine.detokenizer import IncrementalDetokenizer, decode_windows
from deepflow.engine.sampler import Logprob, SampledBatch, Sampler, SamplerOutput, to_device
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import PENDING_TOKEN, PendingTokens, Scheduler
from deepflow.engine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    """All text so far (while streaming, less a possible stop string's beginning)."""
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    """'stop' | 'length' | 'abort' once finished."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended it (None for EOS)."""
    delta_text: str = ""
    """Text new since the previous output of this request: what a stream sends."""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


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
        self, config: EngineConfig, model_runner: Any = None, tokenizer: Any = None
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
        self.vocab_size = model_runner.model_config.vocab_size
        self.eos_token_ids = list(tokenizer.eos_token_ids)
        self.scheduler = Scheduler(config, num_blocks, block_size)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, SequenceGroup] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        overlap = config.async_scheduling
        if overlap is None:
            overlap = getattr(getattr(model_runner, "device", None), "is_accelerator", False)
        # A runner must be able to feed tokens still on the device (ModelRunner can).
        self.async_scheduling = bool(overlap) and getattr(
            model_runner, "supports_pending_tokens", False
        )
        self._inflight: _InFlight | None = None
        # This loop samples each step's logits before it queues anything else, so a runner
        # that can (ModelRunner) samples plain greedy decode steps inside its decode graphs.
        self._graph_greedy = self.async_scheduling and getattr(
            model_runner, "supports_graph_greedy", False
        )
        if self._graph_greedy:
            model_runner.graph_greedy = True

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
        seq = Sequence(
            next(self._seq_ids),
            group.request_id,
            group.prompt_token_ids,
            group.params,
            group.priority,
            next(self._arrivals),
        )
        self._attach_detokenizer(seq)
        group.seqs.append(seq)
        self.requests[group.request_id] = group
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; its final output, if it existed."""
        group = self.requests.pop(request_id, None)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.is_finished:
                if seq.token_ids[-1] == PENDING_TOKEN:  # sampled by a step still in flight
                    seq.token_ids.pop()
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
                if not group.stream:  # the text so far is all its final output has
                    assert seq.detokenizer is not None
                    seq.detokenizer.catch_up()
                    seq.detokenizer.take_delta(True)
        group.finished_time = time.time()
        return self._output(group, {} if group.stream else None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_stats(self) -> EngineStats:
        s, bm = self.scheduler, self.scheduler.block_manager
        return EngineStats(
            len(s.running),
            len(s.waiting),
            bm.usage,
            bm.num_blocks,
            self.prompt_tokens,
            self.generation_tokens,
            s.prefix_cache_queried_tokens,
            s.prefix_cache_hit_tokens,
            s.num_preemptions,
        )

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass; outputs of the requests that got tokens in it (with async
        scheduling: in the pass before it, which this one overlaps)."""
        if not self.async_scheduling:
            return self._step_sync()
        batch = self.scheduler.schedule()
        sampling = [c.seq for c in batch.chunks if c.needs_logits]
        prev, self._inflight = self._inflight, None
        if batch.chunks:
            pending = prev.pending() if prev is not None else None
            logits = self.model_runner.execute(batch, pending)
        done = prev.sampled.result() if prev is not None else None  # the step's one wait
        if prev is not None and done is not None:
            for seq, token in zip(prev.seqs, done.token_ids, strict=True):
                if not seq.is_finished:
                    seq.token_ids[-1] = token
        if batch.chunks:
            self.scheduler.update(batch)
            if sampling:
                seqs, rows = self._fork_samples(sampling)
                picked = self._rows(logits, rows)
                taken = self.model_runner.greedy_samples(picked) if self._graph_greedy else None
                if taken is not None:  # sampled by the decode graph
                    sampled = self.sampler.sample(picked, seqs, self.eos_token_ids, taken)
                else:
                    sampled = self.sampler.sample(picked, seqs, self.eos_token_ids)
                self._inflight = _InFlight(seqs, sampled)
        outputs = []
        if prev is not None and done is not None:
            outputs = self._postprocess(prev.seqs, done, appended=True)
        if self._inflight is not None:
            self._append_pending(self._inflight.seqs)
        return outputs

    def _step_sync(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return []
        sampling = [c.seq for c in batch.chunks if c.needs_logits]
        logits = self.model_runner.execute(batch)
        self.scheduler.update(batch)
        if not sampling:
            return []
        seqs, rows = self._fork_samples(sampling)
        sampled = self.sampler(self._rows(logits, rows), seqs, self.eos_token_ids)
        return self._postprocess(seqs, sampled)

    @staticmethod
    def _rows(logits: Any, rows: list[int]) -> Any:
        if rows == list(range(len(logits))):
            return logits
        return logits[to_device(rows, logits.device, torch.int64)]

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

    def _fork_samples(self, sampling: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """The logits row of each sequence to sample; a prompt just prefilled for ``n`` samples
        forks into n sequences on its blocks, all sampling from its row."""
        seqs: list[Sequence] = []
        rows: list[int] = []
        for row, seq in enumerate(sampling):
            group = [seq]
            if seq.params.n > 1 and seq.index == 0 and seq.num_output_tokens == 0:
                for index in range(1, seq.params.n):
                    child = seq.fork(next(self._seq_ids), index)
                    self._attach_detokenizer(child)
                    self.scheduler.fork(seq, child)
                    self.requests[seq.request_id].seqs.append(child)
                    group.append(child)
            seqs += group
            rows += [row] * len(group)
        return seqs, rows

    def _postprocess(
        self, seqs: list[Sequence], sampled: SamplerOutput, appended: bool = False
    ) -> list[RequestOutput]:
        """Emit the sampled tokens; ``appended``: they already stand in ``seqs`` (async). Only
        streamed requests get an output per step; the others only their final one."""
        now = time.time()
        requests, finished = self.requests, SequenceStatus.FINISHED
        live: list[tuple[Sequence, int, SequenceGroup]] = []
        for seq, token, logprob, top in zip(
            seqs, sampled.token_ids, sampled.logprobs, sampled.top_logprobs, strict=True
        ):
            if seq.status is finished:  # aborted, or ended by the step before (async)
                continue
            if not appended:
                seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            if top is not None and seq.logprobs is not None:
                for tid, lp in top.items():
                    lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
                seq.logprobs.append(top)
            group = requests[seq.request_id]
            if group.first_token_time is None:
                group.first_token_time = now
                self.prompt_tokens += len(group.prompt_token_ids)
            live.append((seq, token, group))
        self.generation_tokens += len(live)
        texts = self._detokenize_and_check(live)
        deltas: dict[str, dict[int, tuple[str, list[int]]]] = {}
        ended: dict[str, SequenceGroup] = {}
        for (seq, token, group), text in zip(live, texts, strict=True):
            if group.stream:
                deltas.setdefault(seq.request_id, {})[seq.index] = (text, [token])
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                ended[seq.request_id] = group
        return self._collect(deltas, ended, now)

    def _collect(
        self,
        deltas: dict[str, dict[int, tuple[str, list[int]]]],
        ended: dict[str, SequenceGroup],
        now: float,
    ) -> list[RequestOutput]:
        """Outputs of the streamed requests that got tokens and of the others that finished."""
        requests, outputs = self.requests, []
        for request_id, group_deltas in deltas.items():
            group = requests[request_id]
            if request_id in ended and group.is_finished:
                group.finished_time = now
                del requests[request_id]
            outputs.append(self._output(group, group_deltas))
        for request_id, group in ended.items():
            if not group.stream and group.is_finished:
                group.finished_time = now
                del requests[request_id]
                outputs.append(self._output(group, None))
        return outputs

    def _detokenize_and_check(self, live: list[tuple[Sequence, int, SequenceGroup]]) -> list[str]:
        """Set finish_reason where the new token ends its sequence; each one's text delta. A
        sequence nobody reads before it ends (not streamed, no stop strings) defers its text;
        the others' windows decode in one batch."""
        eos = self.eos_token_ids
        windows: list[list[int]] = []
        skips: list[bool] = []
        readers: list[Sequence] = []
        for seq, token, group in live:
            params, detok = seq.params, seq.detokenizer
            assert detok is not None
            stop_ids = params.stop_token_ids or ()
            if token in stop_ids or (token in eos and not params.ignore_eos):
                seq.finish_reason = "stop"
                seq.stop_reason = token if token in stop_ids else None
            if seq.finish_reason is None or params.include_stop_str_in_output:
                if not group.stream and not detok.stop_strings:
                    detok.defer(token)
                else:
                    windows += detok.window(token)
                    skips += [detok.skip_special_tokens] * 2
                    readers.append(seq)
        decoded = decode_windows(self.tokenizer, windows, skips)
        for i, seq in enumerate(readers):
            assert seq.detokenizer is not None
            new = seq.detokenizer.accept(decoded[2 * i], decoded[2 * i + 1])
            if seq.finish_reason is None and seq.num_output_tokens >= seq.params.min_tokens:
                stop = seq.detokenizer.find_stop(len(new))
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
        return [self._take_text(seq, group.stream) for seq, _, group in live]

    def _take_text(self, seq: Sequence, stream: bool) -> str:
        """Finish at the length limits; the text delta to emit now."""
        detok = seq.detokenizer
        assert detok is not None
        if seq.finish_reason is None and (
            seq.num_output_tokens == seq.params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return "" if not stream and not detok.stop_strings else detok.take_delta(False)
        if not isinstance(seq.stop_reason, str):
            detok.flush()
        return detok.take_delta(True)

    def _attach_detokenizer(self, seq: Sequence) -> None:
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, seq.params)

    def _output(
        self, group: SequenceGroup, deltas: dict[int, tuple[str, list[int]]] | None
    ) -> RequestOutput:
        """``deltas`` None: the request's only output, whose deltas are everything."""
        outputs = []
        for seq in group.seqs:
            assert seq.detokenizer is not None
            if deltas is None:
                delta_text, delta_ids = seq.detokenizer.emitted_text, seq.output_token_ids
            else:
                delta_text, delta_ids = deltas.get(seq.index, ("", []))
            outputs.append(
                CompletionOutput(
                    seq.index,
                    seq.detokenizer.emitted_text,
                    seq.output_token_ids,
                    seq.cumulative_logprob,
                    None if seq.logprobs is None else list(seq.logprobs),
                    seq.finish_reason,
                    seq.stop_reason,
                    delta_text,
                    delta_ids,
                )
            )
        metrics = RequestMetrics(group.arrival_time, group.first_token_time, group.finished_time)
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            outputs,
            group.is_finished,
            metrics,
        )

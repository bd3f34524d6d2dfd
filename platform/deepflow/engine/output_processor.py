"""From a step's sampled tokens to what callers read: text, stops, one output per request.

The engine core (llm_engine.py) hands over each step's samples with the sequences they belong
to. This module appends them, ends the sequences they finish (stop token ids, EOS, stop strings
found in the text, the length limits), detokenises incrementally, and merges a request's n
samples into one RequestOutput. It never touches the scheduler: `process` returns the sequences
it ended, the core frees their blocks, and `collect` builds the outputs (a request is finished
once every sample is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from deepflow.engine.detokenizer import Decoder, IncrementalDetokenizer, decode_windows
from deepflow.engine.outputs import Logprob, ModelRunnerOutput
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


Deltas = dict[int, tuple[str, list[int]]]
"""Sample index -> (text, token ids) new in this step."""


@dataclass(slots=True)
class ProcessedStep:
    """One step's samples applied; what collect() turns into outputs once the core has freed
    the `finished` sequences."""

    time: float
    finished: list[Sequence] = field(default_factory=list)
    deltas: dict[str, Deltas] = field(default_factory=dict)
    """Streamed requests that got tokens."""
    ended: dict[str, SequenceGroup] = field(default_factory=dict)
    """Requests with a sample that ended in this step."""


class OutputProcessor:
    def __init__(self, tokenizer: Decoder, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[str, SequenceGroup] = {}
        """Every unfinished request (the core shares this dict)."""
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def add_request(self, group: SequenceGroup, seq: Sequence) -> None:
        self.requests[group.request_id] = group
        self.add_sample(seq)

    def add_sample(self, seq: Sequence) -> None:
        """A request's first sample, or one forked from it; its text starts after the prompt."""
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, seq.params)
        self.requests[seq.request_id].seqs.append(seq)

    def process(
        self, seqs: list[Sequence], sampled: ModelRunnerOutput, appended: bool = False
    ) -> ProcessedStep:
        """Apply the sampled tokens; ``appended``: they already stand in ``seqs`` (async).
        Only streamed requests get an output per step; the others only their final one."""
        step = ProcessedStep(time.time())
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
                group.first_token_time = step.time
                self.prompt_tokens += len(group.prompt_token_ids)
            live.append((seq, token, group))
        self.generation_tokens += len(live)
        texts = self._detokenize_and_check(live)
        for (seq, token, group), text in zip(live, texts, strict=True):
            if group.stream:
                step.deltas.setdefault(seq.request_id, {})[seq.index] = (text, [token])
            if seq.finish_reason is not None:
                step.finished.append(seq)
                step.ended[seq.request_id] = group
        return step

    def collect(self, step: ProcessedStep) -> list[RequestOutput]:
        """Outputs of the streamed requests that got tokens and of the others that finished;
        finished requests leave `requests`."""
        requests, outputs = self.requests, []
        for request_id, group_deltas in step.deltas.items():
            group = requests[request_id]
            if request_id in step.ended and group.is_finished:
                group.finished_time = step.time
                del requests[request_id]
            outputs.append(self._output(group, group_deltas))
        for request_id, group in step.ended.items():
            if not group.stream and group.is_finished:
                group.finished_time = step.time
                del requests[request_id]
                outputs.append(self._output(group, None))
        return outputs

    def aborted(self, group: SequenceGroup, seqs: list[Sequence]) -> RequestOutput:
        """The final output of a request the core has taken out of `requests`, whose samples
        ``seqs`` it has just ended."""
        if not group.stream:  # the text so far is all its final output has
            for seq in seqs:
                assert seq.detokenizer is not None
                seq.detokenizer.catch_up()
                seq.detokenizer.take_delta(True)
        group.finished_time = time.time()
        return self._output(group, {} if group.stream else None)

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

    def _output(self, group: SequenceGroup, deltas: Deltas | None) -> RequestOutput:
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

"""Next tokens from logits, one row per sequence, each row under its own SamplingParams.

Order (vLLM's): min_tokens mask, penalties, then greedy argmax or temperature, min-p, top-k,
top-p and a draw. A seeded row draws from its own torch.Generator, so its tokens do not depend
on which other rows share the batch. Logprobs are the raw ones (see SamplingParams).

`sample()` only queues device work and starts one copy of its results to the host; `result()`
waits for that copy. Nothing in between waits for the device (host values reach it through
pinned memory), so the engine can queue the next step's forward before reading this one.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from deepflow.engine.outputs import Logprob, ModelRunnerOutput, SampledBatch
from deepflow.engine.sequence import Sequence

_F32 = torch.finfo(torch.float32)
"""Sampling runs in float32, where a request's float64 temperature or repetition penalty can
round to 0 (5e-324) or inf (1e39): both are clamped to a positive finite factor, and a logit
they push past float32 stays finite, so such a request samples (its limit, the argmax) instead
of making softmax NaN, which raises inside the engine loop and kills it for every request."""


def to_device(values: list[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host values on `device` without waiting for the work queued there (pinned copy)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]
    ) -> ModelRunnerOutput:
        return self.sample(logits, seqs, eos_token_ids).result()

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_ids: list[int],
        rows: list[int] | None = None,
    ) -> SampledBatch:
        """`rows`: the logits row of each sequence, where several share one (a prompt's n
        samples); None: row i is seqs[i]'s."""
        if rows is not None:
            logits = logits[to_device(rows, logits.device, torch.int64)]
        logits = logits.float()
        if _fused_greedy(logits, seqs):  # no row wants top logprobs
            from deepflow.engine.kernels.sampling import greedy

            tokens, chosen = greedy(logits)
            unpack = partial(_unpack, wanted=[None] * len(seqs))
            return SampledBatch(tokens, [tokens, chosen], unpack)
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        _mask_stops_before_min_tokens(logits, seqs, eos_token_ids)
        _apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            index = to_device(random_rows, logits.device, torch.int64)
            tokens[index] = self._draw(logits[index], [seqs[i] for i in random_rows])
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        wanted = [s.params.logprobs for s in seqs]
        top = _top_logprobs(raw_logprobs, tokens, wanted)
        device_side = [tokens, chosen, *(top or ())]
        return SampledBatch(tokens, device_side, partial(_unpack, wanted=wanted))

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temperature = to_device([s.params.temperature for s in seqs], device, torch.float32)
        temperature = temperature.clamp(_F32.tiny, _F32.max).unsqueeze(1)
        # Less the row's maximum first: then a tiny temperature overflows only towards -inf.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
        logits = _truncate(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        out = torch.empty(len(seqs), dtype=torch.long, device=device)
        unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if len(unseeded) == len(seqs):
            return torch.multinomial(probs, 1, generator=self._generator(device)).squeeze(1)
        if unseeded:
            rows = to_device(unseeded, device, torch.int64)
            out[rows] = torch.multinomial(
                probs[rows], 1, generator=self._generator(device)
            ).squeeze(1)
        for i, seq in enumerate(seqs):
            if seq.params.seed is None:
                continue
            if seq.generator is None:
                seed = seq.seed
                assert seed is not None  # params.seed is set
                seq.generator = torch.Generator(device=device).manual_seed(seed)
            out[i] = torch.multinomial(probs[i], 1, generator=seq.generator)[0]
        return out

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def _fused_greedy(logits: torch.Tensor, seqs: list[Sequence]) -> bool:
    """Whether the one-pass Triton kernel (kernels/sampling.py) gives this batch's samples:
    on CUDA, every row plain greedy (no logprobs, penalties or min_tokens still masking)."""
    if logits.device.type != "cuda" or not _triton_available():
        return False
    return all(plain_greedy(seq) for seq in seqs)


def plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing else to apply: no logprobs, penalties or min_tokens still masking."""
    p = seq.params
    return not (
        not p.greedy
        or p.logprobs is not None
        or (p.min_tokens and seq.num_output_tokens < p.min_tokens)
        or p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
    )


_TRITON: list[bool] = []


def _triton_available() -> bool:
    if not _TRITON:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON.append(False)
        else:
            _TRITON.append(True)
    return _TRITON[0]


def _mask_stops_before_min_tokens(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]
) -> None:
    for i, seq in enumerate(seqs):
        params = seq.params
        if params.min_tokens and seq.num_output_tokens < params.min_tokens:
            stops = list(params.stop_token_ids or [])
            if not params.ignore_eos:
                stops += eos_token_ids
            if stops:
                logits[i, to_device(stops, logits.device, torch.int64)] = float("-inf")


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [
        i
        for i, s in enumerate(seqs)
        if s.params.repetition_penalty != 1.0
        or s.params.presence_penalty != 0.0
        or s.params.frequency_penalty != 0.0
    ]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[1]
    counts = torch.zeros(len(rows), vocab, device=device)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for r, i in enumerate(rows):
        seq = seqs[i]
        seen[r, to_device(seq.token_ids, device, torch.int64)] = True
        out = to_device(seq.output_token_ids, device, torch.int64)
        counts[r].index_add_(0, out, torch.ones(len(out), device=device))

    def column(name: str) -> torch.Tensor:
        return to_device([getattr(seqs[i].params, name) for i in rows], device, torch.float32)[
            :, None
        ]

    index = to_device(rows, device, torch.int64)
    sub = logits[index]
    rep = column("repetition_penalty").clamp(_F32.tiny, _F32.max)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts
    sub = sub - column("presence_penalty") * (counts > 0).float()
    logits[index] = sub.clamp(max=_F32.max)


def _truncate(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """min-p, then top-k, then top-p: set the tokens each one drops to -inf."""
    device, vocab = logits.device, logits.shape[1]
    if any(s.params.min_p > 0 for s in seqs):
        min_p = to_device([s.params.min_p for s in seqs], device, torch.float32)
        probs = torch.softmax(logits, dim=-1)
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    k_list = [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs]
    p_list = [s.params.top_p for s in seqs]
    if all(k >= vocab for k in k_list) and all(p >= 1 for p in p_list):
        return logits
    top_k = to_device(k_list, device, torch.int64)
    top_p = to_device(p_list, device, torch.float32)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    positions = torch.arange(vocab, device=device).unsqueeze(0)
    drop = positions >= top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest head whose mass reaches top_p: drop a token once the mass before it does.
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _top_logprobs(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rank of the chosen token, top values, top ids) on the device, if any row wants them."""
    if all(n is None for n in wanted):
        return None
    most = max(n or 0 for n in wanted)
    top_values, top_ids = raw_logprobs.topk(most, dim=-1)
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1))
    ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
    return ranks, top_values, top_ids


def _unpack(host: list[torch.Tensor], wanted: list[int | None]) -> ModelRunnerOutput:
    tokens, logprobs, *top = (t.tolist() for t in host)
    return ModelRunnerOutput(tokens, logprobs, _unpack_top(top, tokens, logprobs, wanted))


def _unpack_top(
    top: list[Any], tokens: list[int], chosen: list[float], wanted: list[int | None]
) -> list[dict[int, Logprob] | None]:
    if not top:
        return [None] * len(wanted)
    ranks, top_values, top_ids = top
    out: list[dict[int, Logprob] | None] = []
    for i, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        row = {tokens[i]: Logprob(chosen[i], ranks[i])}
        for rank, (tid, lp) in enumerate(zip(top_ids[i][:n], top_values[i][:n], strict=True), 1):
            row.setdefault(tid, Logprob(lp, rank))
        out.append(row)
    return out

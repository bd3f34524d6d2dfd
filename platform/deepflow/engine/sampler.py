"""Next tokens from logits, one row per sequence, each row under its own SamplingParams.

Order (vLLM's): min_tokens mask, penalties, then greedy argmax or temperature, min-p, top-k,
top-p and a draw. A seeded row draws from its own torch.Generator, so its tokens do not depend
on which other rows share the batch. Logprobs are the raw ones (see SamplingParams).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepflow.engine.sequence import Sequence


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int
    """1 for the most likely token."""
    decoded_token: str | None = None


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    """The chosen tokens' raw logprobs."""
    top_logprobs: list[dict[int, Logprob] | None]
    """Per row: the chosen token and the N most likely, where SamplingParams.logprobs=N."""


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]
    ) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        _mask_stops_before_min_tokens(logits, seqs, eos_token_ids)
        _apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            tokens[random_rows] = self._draw(logits[random_rows], [seqs[i] for i in random_rows])
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        return SamplerOutput(
            tokens.tolist(), chosen.tolist(), _top_logprobs(raw_logprobs, tokens, seqs)
        )

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
        logits = logits / temperature.unsqueeze(1)
        logits = _truncate(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        out = torch.empty(len(seqs), dtype=torch.long, device=device)
        unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if unseeded:
            out[unseeded] = torch.multinomial(
                probs[unseeded], 1, generator=self._generator(device)
            ).squeeze(1)
        for i, seq in enumerate(seqs):
            if seq.params.seed is None:
                continue
            if seq.generator is None:
                seq.generator = torch.Generator(device=device).manual_seed(seq.seed)
            out[i] = torch.multinomial(probs[i], 1, generator=seq.generator)[0]
        return out

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def _mask_stops_before_min_tokens(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]
) -> None:
    for i, seq in enumerate(seqs):
        params = seq.params
        if seq.num_output_tokens < params.min_tokens:
            stops = list(params.stop_token_ids or [])
            if not params.ignore_eos:
                stops += eos_token_ids
            if stops:
                logits[i, stops] = float("-inf")


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
        seen[r, torch.tensor(seq.token_ids, device=device)] = True
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
        counts[r].index_add_(0, out, torch.ones(len(out), device=device))

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(seqs[i].params, name) for i in rows], device=device)[:, None]

    sub = logits[rows]
    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts
    sub = sub - column("presence_penalty") * (counts > 0).float()
    logits[rows] = sub


def _truncate(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """min-p, then top-k, then top-p: set the tokens each one drops to -inf."""
    device, vocab = logits.device, logits.shape[1]
    min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
    if (min_p > 0).any():
        probs = torch.softmax(logits, dim=-1)
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    top_k = torch.tensor(
        [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], device=device
    )
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    if (top_k >= vocab).all() and (top_p >= 1).all():
        return logits
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
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
) -> list[dict[int, Logprob] | None]:
    wanted = [s.params.logprobs for s in seqs]
    if all(n is None for n in wanted):
        return [None] * len(seqs)
    most = max(n or 0 for n in wanted)
    top_values, top_ids = raw_logprobs.topk(most, dim=-1) if most else (None, None)
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1))
    ranks = ((raw_logprobs > chosen).sum(dim=-1) + 1).tolist()
    chosen_list, tokens_list = chosen.squeeze(1).tolist(), tokens.tolist()
    out: list[dict[int, Logprob] | None] = []
    for i, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        row = {tokens_list[i]: Logprob(chosen_list[i], ranks[i])}
        if n:
            assert top_values is not None and top_ids is not None
            for rank, (tid, lp) in enumerate(
                zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist(), strict=True), 1
            ):
                row.setdefault(tid, Logprob(lp, rank))
        out.append(row)
    return out

"""Decode graphs on the accelerator (skipped without CUDA; bench/device_check.sh runs it).

A replayed step must equal the same step run eagerly through the same Triton kernels, padding
rows included; the greedy samples a graph takes inside itself must be the step's samples when
the runner serves them (and the sampler must run instead when a row wants more than greedy);
and an engine that replays graphs must generate what an eager one does. float32, so that the
only differences are the GEMM shapes of padded batches (far below the tolerances)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepflow.engine.config import EngineConfig
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.model_runner import ModelRunner
from deepflow.engine.outputs import (
    PENDING_TOKEN,
    PendingTokens,
    SampledBatch,
    ScheduledChunk,
    SchedulerOutput,
)
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import Sequence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="decode graphs need CUDA")

OPTIONS = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 256, "max_num_seqs": 8}
SCHEDULE = [[0, 1, 2], [0, 1, 2, 3, 4, 5, 6], [4], [5, 6], [6, 5, 3]]
"""Decode steps after the prefill: the sequences each one runs (3 rows pad to 4, 7 to 8)."""
LOGPROBS_SEQ = 2
"""This sequence asks for top logprobs: the steps it is in are sampled by the sampler."""


def make_runner(model: Path, eager: bool) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(model), enforce_eager=eager, **OPTIONS))


def count_calls(obj: object, name: str) -> list[int]:
    """Wrap obj.name; the list gets the length of each call's first argument."""
    calls: list[int] = []
    inner = getattr(obj, name)

    def wrapper(first, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(first))
        return inner(first, *args, **kwargs)

    setattr(obj, name, wrapper)
    return calls


def run_steps(runner: ModelRunner, pending: bool) -> list[tuple[torch.Tensor, list[int], list]]:
    """Prefill seven prompts in one step, then decode SCHEDULE, feeding each sequence its last
    sample: from the device (PENDING_TOKEN) when `pending` and it sampled in the step just
    before, as the engine's async loop does, else from the host. Per step: (logits on the host,
    sampled tokens, top logprobs)."""
    gen = torch.Generator().manual_seed(3)
    seqs = []
    for i in range(7):
        prompt = torch.randint(0, 512, (5 + 4 * i,), generator=gen).tolist()
        params = SamplingParams(temperature=0, logprobs=2 if i == LOGPROBS_SEQ else None)
        seq = Sequence(i, str(i), prompt, params)
        seq.block_table = list(range(20 * i, 20 * i + 20))
        seqs.append(seq)
    chunks = [ScheduledChunk(s, s.num_tokens) for s in seqs]
    last: dict[int, int] = {}
    prev: tuple[SampledBatch, dict[int, int]] | None = None
    out = []
    for subset in [None, *SCHEDULE]:
        if subset is not None:
            chunks = []
            for i in subset:
                seq = seqs[i]
                seq.num_computed_tokens = seq.num_tokens
                on_device = pending and prev is not None and seq.seq_id in prev[1]
                seq.token_ids.append(PENDING_TOKEN if on_device else last[seq.seq_id])
                chunks.append(ScheduledChunk(seq, 1))
        fed = PendingTokens(prev[0].tokens, prev[1]) if pending and prev is not None else None
        runner.execute(SchedulerOutput(chunks), fed)
        logits = runner.logits.cpu()
        stepped = [c.seq for c in chunks]
        sampled = runner.sample(stepped, [])
        result = sampled.result()
        for seq, token in zip(stepped, result.token_ids, strict=True):
            if seq.token_ids[-1] == PENDING_TOKEN:
                seq.token_ids[-1] = last[seq.seq_id]
            last[seq.seq_id] = token
        prev = sampled, {s.seq_id: row for row, s in enumerate(stepped)}
        out.append((logits, result.token_ids, result.top_logprobs))
    return out


def test_replayed_steps_equal_eager_steps_and_sample_in_the_graph(tiny_llama: Path) -> None:
    graphs = make_runner(tiny_llama, eager=False)
    assert graphs.graphs is not None and graphs.graphs.sizes == [1, 2, 4, 8]
    replays = count_calls(graphs.graphs, "run")
    sampler_calls = count_calls(graphs.sampler, "sample")
    fast = run_steps(graphs, pending=True)
    assert replays == [len(s) for s in SCHEDULE]
    # The prefill and the two steps with the logprobs row go through the sampler; the other
    # decode steps are served by the graph's own greedy samples.
    with_logprobs = [LOGPROBS_SEQ in s for s in SCHEDULE]
    assert len(sampler_calls) == 1 + sum(with_logprobs)
    del graphs
    eager = make_runner(tiny_llama, eager=True)
    assert eager.graphs is None
    ref = run_steps(eager, pending=False)
    for step, ((logits, tokens, top), (ref_logits, ref_tokens, ref_top)) in enumerate(
        zip(fast, ref, strict=True)
    ):
        assert logits.shape == ref_logits.shape, step
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
        assert tokens == ref_tokens == logits.argmax(-1).tolist(), step
        assert [t is None for t in top] == [t is None for t in ref_top], step


def test_an_engine_replaying_graphs_generates_what_an_eager_one_does(tiny_llama: Path) -> None:
    prompts = ["Hello there, how are you", "The quick brown fox", "Once upon", "a b c d e f"]
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, logprobs=3, max_tokens=16, ignore_eos=True),
    ]
    results = []
    for eager in (False, True):
        engine = LLMEngine(EngineConfig(model=str(tiny_llama), enforce_eager=eager, **OPTIONS))
        assert engine.async_scheduling
        runner = engine.model_runner
        assert isinstance(runner, ModelRunner) and (runner.graphs is None) == eager
        replays = [] if eager else count_calls(runner.graphs, "run")
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(str(i), prompt, p)
        final = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
        assert eager or len(replays) > 10
        results.append(final)
        del engine, runner
    fast, ref = results
    for request_id, out in ref.items():
        for o, r in zip(fast[request_id].outputs, out.outputs, strict=True):
            assert o.token_ids == r.token_ids, request_id
            assert o.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-3)
            assert (o.logprobs is None) == (r.logprobs is None)
            if r.logprobs is not None:  # one entry per token, the same values, fast or not
                assert o.logprobs is not None and len(o.logprobs) == len(r.logprobs)
                for fast_step, ref_step in zip(o.logprobs, r.logprobs, strict=True):
                    assert set(fast_step) == set(ref_step), request_id
                    for tid, lp in ref_step.items():
                        assert fast_step[tid].logprob == pytest.approx(lp.logprob, abs=1e-3)

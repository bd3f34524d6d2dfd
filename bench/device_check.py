"""FlowServe's fast path against its reference path on the device, and where a decode step's
time goes.

    PYTHONPATH=platform python3 bench/device_check.py [--model DIR] [--prompts 64]

1. Agreement: the same random 1.1B Llama test model in bf16, 64 prompts, greedy, 64 tokens
   each. The fast engine (LLMEngine: Triton kernels, decode graphs, async scheduling)
   generates. The reference is the torch path (kernel_backend="torch", eager) run as a second
   LLMEngine with the same EngineConfig otherwise, the same requests in the same order, its
   runner's sample() forced to emit the fast path's tokens: it runs the same steps over the same
   (sequence, position) rows (asserted step by step), and where the fast path replayed a decode
   graph padded to a captured size the reference runs the same padding rows (on a scratch KV
   block outside the scheduler's pool). So both sides' linear layers run cuBLAS GEMMs of the
   same shapes, which sum in the same order, and what differs is the fast path's own work:
   Triton paged attention and KV writes, fused add + RMSNorm, RoPE, SiLU·mul, the GEMV of 1-2
   row products (layers/linear.py: only under the Triton backend), the greedy kernel and the
   graphs. That pair decides PASS/FAIL: at every generated position, does the reference's
   argmax equal the token the fast path chose, and how far apart are the two float32 logit
   rows (the model writes float32 logits; nothing is rounded to bf16 before the comparison)?
   The relative error is ||fast - ref||_F / ||ref||_F over every generated position's whole row
   of 32,000 logits (the RMS error of a logit over the RMS logit); the worst single row and the
   median row are shown beside it. Pass: >= 99% of positions agree and the relative error is
   <= 1e-2.
   Why the same schedule: on this random model two bf16 implementations that differ only in
   the order a GEMM sums (cuBLAS picks kernels and split-K by shape) end up ~1.5e-2 apart
   (bench/precision_ablation.py), so a reference that runs other GEMM shapes measures cuBLAS's
   shape-dependent order as much as the kernels under test. The earlier comparison is kept
   beside it: the torch path scoring each prompt + output in one teacher-forced prefill pass
   ([prompt_len, hidden] GEMMs instead of the engine's batched steps), in bf16 and in float32
   (ground truth); "reference, same schedule vs reference, one prefill pass" (both torch) is
   what GEMM shapes alone do. How peaked the model's next-token distributions are (median
   top-1 probability and top-1 - top-2 logit gap, from the float32 reference) says how easily
   rounding can flip a choice.
2. Profile: one eager decode step of the fast path at batch 256 under torch.profiler, kernel
   time by kind, next to the graph replay of the same step.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from deepflow.engine.config import EngineConfig
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.model_runner import ModelRunner
from deepflow.engine.outputs import ModelRunnerOutput, SampledBatch, ScheduledChunk, SchedulerOutput
from deepflow.engine.sampler import to_device
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import Sequence

Step = tuple[tuple[int, int, int], ...]
"""One engine step: (prompt index, start position, tokens) of each chunk, in batch order."""


@dataclasses.dataclass
class Run:
    """What one engine run did: its tokens, its logits at every sampled position, its steps."""

    tokens: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    logits: dict[int, dict[int, torch.Tensor]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(dict)
    )
    """prompt index -> position whose next token the row scores -> float32 row (host)."""
    steps: list[Step] = dataclasses.field(default_factory=list)
    rows: list[int] = dataclasses.field(default_factory=list)
    """Per step: rows its decode graph ran (padding included), 0 where it ran eagerly."""

    def stacked(self, prompts: list[list[int]]) -> torch.Tensor:
        """[generated positions, vocab], prompt by prompt, in generation order."""
        return torch.cat(
            [
                torch.stack([self.logits[i][len(p) - 1 + j] for j in range(len(self.tokens[i]))])
                for i, p in enumerate(prompts)
            ]
        )


def make_prompts(model: str, count: int) -> list[list[int]]:
    vocab = ModelConfig.from_folder(model).vocab_size
    rng = random.Random(1)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(16, 200))] for _ in range(count)]


def graph_rows(runner, chunks: list[ScheduledChunk]) -> int:
    """Rows of the decode graph that runs this step (ModelRunner.execute's choice), else 0."""
    graphs = runner.graphs
    if graphs is None or not graphs.fits(chunks):
        return 0
    return next(s for s in graphs.sizes if s >= len(chunks))


def run_engine(engine: LLMEngine, prompts: list[list[int]], new: int, replay: Run | None = None):
    """Generate greedily, recording every step and every logits row. With ``replay`` (a run of
    the same requests on the same EngineConfig): emit its tokens instead of sampling, assert
    that each step schedules the same chunks, and pad each step that ``replay`` ran as a decode
    graph with the same padding rows (token 0 at position 0, K/V written to the runner's scratch
    block, the block past the scheduler's pool)."""
    runner, run = engine.model_runner, Run()
    execute, scratch = runner.execute, runner.num_blocks

    def recording(batch: SchedulerOutput, pending=None):
        chunks = batch.chunks
        step = tuple((int(c.seq.request_id), c.start, c.num_tokens) for c in chunks)
        index = len(run.steps)
        run.steps.append(step)
        rows = graph_rows(runner, chunks)
        if replay is not None:
            assert index < len(replay.steps) and replay.steps[index] == step, (
                f"step {index} differs from the fast path's: {step[:4]}... vs "
                f"{replay.steps[index][:4] if index < len(replay.steps) else None}..."
            )
            assert rows == 0, "the replaying engine must run eagerly"
            rows = replay.rows[index]
            pad = [
                Sequence(-1 - k, "pad", [0], SamplingParams()) for k in range(rows - len(chunks))
            ]
            for seq in pad:
                seq.block_table = [scratch]
            batch = SchedulerOutput(
                chunks + [ScheduledChunk(s, 1) for s in pad], batch.block_copies
            )
        run.rows.append(rows)
        execute(batch, pending)
        needs = [c for c in chunks if c.needs_logits]  # the padding rows' logits come after
        for row, chunk in zip(runner.logits[: len(needs)].cpu(), needs, strict=True):
            run.logits[int(chunk.seq.request_id)][chunk.start + chunk.num_tokens - 1] = row

    runner.execute = recording
    if replay is not None:

        def forced(seqs: list[Sequence], eos: list[int], rows=None) -> SampledBatch:
            chosen = [
                replay.tokens[int(s.request_id)][s.num_computed_tokens - s.num_prompt_tokens]
                for s in seqs
            ]
            device = runner.device.torch_device
            tokens = to_device(chosen, device, torch.int64)

            def unpack(host: list[torch.Tensor]) -> ModelRunnerOutput:
                return ModelRunnerOutput(host[0].tolist(), [0.0] * len(seqs), [None] * len(seqs))

            return SampledBatch(tokens, [tokens], unpack)

        runner.sample = forced
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                run.tokens[int(out.request_id)] = out.outputs[0].token_ids
    assert engine.scheduler.num_preemptions == 0, "a preemption: the schedule depends on timing"
    if replay is not None:
        assert run.steps == replay.steps and run.rows == replay.rows
        assert run.tokens == replay.tokens
    return run


def same_schedule_reference(config: EngineConfig, prompts, new: int, fast: Run) -> Run:
    """The torch reference as an LLMEngine on ``config`` (eager, torch kernels), replaying
    ``fast``'s schedule and tokens; its KV cache has one scratch block for padding rows."""
    config = dataclasses.replace(config, kernel_backend="torch", enforce_eager=True)
    assert config.num_kv_blocks is not None
    runner = ModelRunner(dataclasses.replace(config, num_kv_blocks=config.num_kv_blocks + 1))
    runner.num_blocks = config.num_kv_blocks  # the last block is the padding rows' scratch
    engine = LLMEngine(config, runner)
    run = run_engine(engine, prompts, new, replay=fast)
    del engine, runner
    free_device()
    return run


def free_device() -> None:
    """Free a deleted engine's device memory (its runner's execute wrapper is a cycle)."""
    gc.collect()
    torch.cuda.empty_cache()


def compare(x: torch.Tensor, y: torch.Tensor, chosen: torch.Tensor) -> tuple[float, ...]:
    """(share of rows where y's argmax is `chosen`, ||x - y|| / ||y|| overall, median row's,
    worst row's)."""
    agree = float((y.argmax(-1) == chosen).double().mean())
    rel = float((x - y).double().norm() / y.double().norm())
    rows = (x - y).double().norm(dim=-1) / y.double().norm(dim=-1)
    return agree, rel, float(rows.median()), float(rows.max())


def agreement(model: str, count: int, new: int, options: dict | None = None) -> bool:
    """``options``: EngineConfig fields for both engines (the CPU tests run the harness with
    the torch backend on both sides); without them the side under test must be the fast path."""
    prompts = make_prompts(model, count)
    config = EngineConfig(model=model, num_kv_blocks=4096, max_num_seqs=count, **(options or {}))
    engine = LLMEngine(config)
    if options is None:
        runner = engine.model_runner
        assert runner.backend == "triton" and runner.graphs is not None and engine.async_scheduling
        del runner
    dtype = str(engine.model_runner.dtype).removeprefix("torch.")
    fast = run_engine(engine, prompts, new)
    del engine
    free_device()
    ref = same_schedule_reference(config, prompts, new, fast)
    graphs = [r for r in fast.rows if r]
    print(
        f"schedule: {len(fast.steps)} steps, the same (sequence, position) rows in the same "
        f"batches on both engines (asserted); {len(fast.steps) - len(graphs)} eager, "
        f"{len(graphs)} decode-graph replays of {sorted(collections.Counter(graphs).items())} "
        "(rows, times), padding rows replayed by the reference",
        flush=True,
    )
    # The torch path in one prefill pass per prompt, in the run's dtype and in float32.
    one_pass = {name: teacher_forced(model, prompts, fast.tokens, dt) for name, dt in
                (("ref1", dtype), ("fp32", "float32"))}  # fmt: skip
    rows = {"fast": fast.stacked(prompts), "ref": ref.stacked(prompts)}
    rows |= {name: torch.cat([one_pass[name][i] for i in range(count)]) for name in one_pass}
    truth = rows["fp32"]
    top2 = truth.topk(2, dim=-1).values
    top1_prob = torch.softmax(truth, dim=-1).max(dim=-1).values
    tokens = torch.tensor([t for i in range(count) for t in fast.tokens[i]])
    print(
        f"model: median top-1 probability {float(top1_prob.median()):.3f}, median top-1 - top-2 "
        f"logit gap {float((top2[:, 0] - top2[:, 1]).median()):.3f}; {len(set(tokens.tolist()))} "
        f"distinct tokens among {len(tokens)} generated",
        flush=True,
    )
    label = {
        "fast": f"fast ({dtype})",
        "ref": f"reference ({dtype}), same schedule",
        "ref1": f"reference ({dtype}), one prefill pass per prompt (different GEMM shapes)",
        "fp32": "reference (float32), one prefill pass per prompt",
    }
    ok = True
    pairs = [("fast", "ref"), ("fast", "ref1"), ("ref", "ref1"), ("fast", "fp32"),
             ("ref", "fp32"), ("ref1", "fp32")]  # fmt: skip
    for a, b in pairs:
        chosen = tokens if a == "fast" else rows[a].argmax(-1)  # the fast path's own choices
        agree, rel, median, worst = compare(rows[a], rows[b], chosen)
        line = f"{label[a]} vs {label[b]}: greedy tokens agree at {100 * agree:.2f}% of "
        line += f"{len(chosen)} positions; logits relative error {rel:.2e} overall, "
        line += f"{median:.2e} median row, {worst:.2e} worst row"
        if (a, b) == ("fast", "ref"):
            ok = agree >= 0.99 and rel <= 1e-2
            line += " -> " + ("PASS" if ok else "FAIL") + " (the bar: >= 99%, <= 1e-2)"
        print(line, flush=True)
    return ok


def teacher_forced(model: str, prompts, outputs, dtype: str) -> dict[int, torch.Tensor]:
    """Logits at each generated position, from one eager reference pass over prompt + output."""
    ref = ModelRunner(
        EngineConfig(
            model=model, num_kv_blocks=64, kernel_backend="torch", enforce_eager=True, dtype=dtype
        )
    )
    out = {}
    for i, prompt in enumerate(prompts):
        seq_ids = prompt + outputs[i]
        seq = Sequence(0, "ref", seq_ids, SamplingParams())
        seq.block_table = list(range(-(-len(seq_ids) // ref.block_size)))
        with torch.inference_mode():
            ids, pos, meta, _ = ref.prepare([ScheduledChunk(seq, len(seq_ids) - 1)])
            logits = ref.model.compute_logits(ref.model(ids, pos, meta)).float().cpu()
        out[i] = logits[len(prompt) - 1 : len(prompt) - 1 + len(outputs[i])]
    del ref
    torch.cuda.empty_cache()
    return out


KINDS = [
    ("attention", ("_decode_", "_prefill_kernel", "_store_kv")),
    ("rmsnorm+residual", ("_rms_norm",)),
    ("rope", ("_rotary",)),
    ("silu*mul", ("_silu_and_mul",)),
    ("gemm", ("gemm", "gemv", "sm90", "cutlass", "nvjet", "xmma", "splitk", "Kernel2")),
]


def profile_decode(model: str, batch: int, context: int) -> None:
    """One decode step of `batch` sequences with `context` cached tokens each."""
    runner = ModelRunner(EngineConfig(model=model, max_num_seqs=batch, num_kv_blocks=batch * 40))
    bs = runner.block_size
    seqs = []
    for i in range(batch):
        seq = Sequence(i, str(i), [1] * (context + 1), SamplingParams())
        seq.block_table = list(range(i * 40, i * 40 + -(-(context + 1) // bs)))
        seq.num_computed_tokens = context
        seqs.append(seq)
    step = SchedulerOutput([ScheduledChunk(s, 1) for s in seqs])
    graphs, runner.graphs = runner.graphs, None
    for _ in range(3):
        runner.execute(step)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.execute(step)
        torch.cuda.synchronize()
    by_kind: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(
            event, "self_cuda_time_total", 0
        )
        if device_us <= 0 or event.key.startswith(("ProfilerStep", "aten::", "cuda")):
            continue
        kind = next((k for k, marks in KINDS if any(m in event.key for m in marks)), "other")
        by_kind[kind] += device_us
        counts[kind] += event.count
    runner.graphs = graphs
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        runner.execute(step)
    start.record()
    for _ in range(20):
        runner.execute(step)
    end.record()
    end.synchronize()
    total = sum(by_kind.values())
    print(
        f"\nprofile: one decode step, batch {batch}, {context} cached tokens each "
        f"(eager kernels, sum of kernel times {total / 1000:.3f} ms; graph replay incl. "
        f"input copies {start.elapsed_time(end) / 20:.3f} ms)"
    )
    for kind, us in by_kind.most_common():
        print(
            f"  {kind:<18} {us / 1000:8.3f} ms  {100 * us / total:5.1f}%  {counts[kind]:4d} kernels"
        )
    top = sorted(
        prof.key_averages(),
        key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0),
    )[:12]
    for e in top:
        print(
            f"    {getattr(e, 'self_device_time_total', 0) / 1000:8.3f} ms x{e.count:<4} "
            f"{e.key[:90]}"
        )
    del runner
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from deepflow.engine.testmodel import make_test_model

            start = time.perf_counter()
            model = str(make_test_model(Path(tmp) / "llama-1b", "llama", "1b"))
            print(f"built the 1b test model in {time.perf_counter() - start:.0f} s", flush=True)
        ok = agreement(model, args.prompts, args.new_tokens)
        if not args.no_profile:
            for batch, context in ((256, 384), (1, 384)):
                profile_decode(model, batch, context)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

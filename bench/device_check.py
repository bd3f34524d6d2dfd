"""FlowServe's fast path against its reference path on the device, and where a decode step's
time goes.

    PYTHONPATH=platform python3 bench/device_check.py [--model DIR] [--prompts 64]

1. Agreement: the same random 1.1B Llama test model in bf16, 64 prompts, greedy. The fast
   engine (Triton kernels, decode graphs, async scheduling) generates; the reference runner
   (torch layers, eager) then scores each prompt + generated text in one teacher-forced pass.
   At every generated position: does the reference's argmax equal the token the fast path
   chose, and how far apart are the two logit rows (both float32: the model writes float32
   logits, nothing is rounded to bf16 before the comparison)? The relative error is
   ||fast - ref||_F / ||ref||_F over every generated position's whole row of 32,000 logits (the
   RMS error of a logit over the RMS logit); the worst single row and the median row are shown
   beside it. Pass: >= 99% of positions agree and the relative error is <= 1e-2. How peaked the
   model's next-token distributions are (median top-1 probability and top-1 - top-2 logit gap,
   from the float32 reference) says how easily rounding can flip a choice.
2. Profile: one eager decode step of the fast path at batch 256 under torch.profiler, kernel
   time by kind, next to the graph replay of the same step.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from deepflow.engine.config import EngineConfig
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.model_runner import ModelRunner
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import ScheduledChunk, SchedulerOutput
from deepflow.engine.sequence import Sequence


def agreement(model: str, count: int, new: int) -> bool:
    rng = random.Random(1)
    prompts = [
        [rng.randrange(10, 32000) for _ in range(rng.randint(16, 200))] for _ in range(count)
    ]
    engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=4096, max_num_seqs=count))
    runner = engine.model_runner
    assert runner.backend == "triton" and runner.graphs is not None and engine.async_scheduling
    recorded: dict[int, dict[int, torch.Tensor]] = collections.defaultdict(dict)
    execute = runner.execute

    def recording(batch, pending=None):
        logits = execute(batch, pending)
        rows = [c for c in batch.chunks if c.needs_logits]
        host = logits.cpu()
        for row, chunk in zip(host, rows, strict=True):
            recorded[chunk.seq.seq_id][chunk.start + chunk.num_tokens - 1] = row
        return logits

    runner.execute = recording
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out.outputs[0].token_ids
    del engine, runner
    torch.cuda.empty_cache()

    # The bf16 reference, and a float32 one as ground truth: how far is each bf16 path from it?
    scored = {name: teacher_forced(model, prompts, outputs, dtype) for name, dtype in
              (("ref", "bfloat16"), ("fp32", "float32"))}  # fmt: skip
    fast = {i: torch.stack([recorded[i][len(p) - 1 + j] for j in range(len(outputs[i]))])
            for i, p in enumerate(prompts)}  # fmt: skip
    truth = torch.cat([scored["fp32"][i] for i in range(count)])
    top2 = truth.topk(2, dim=-1).values
    top1_prob = torch.softmax(truth, dim=-1).max(dim=-1).values
    tokens = [t for i in range(count) for t in outputs[i]]
    print(
        f"model: median top-1 probability {float(top1_prob.median()):.3f}, median top-1 - top-2 "
        f"logit gap {float((top2[:, 0] - top2[:, 1]).median()):.3f}; {len(set(tokens))} distinct "
        f"tokens among {len(tokens)} generated",
        flush=True,
    )
    ok = True
    for a, b in (("fast", "ref"), ("fast", "fp32"), ("ref", "fp32")):
        rows = {"fast": fast, **scored}
        x = torch.cat([rows[a][i] for i in range(count)])
        y = torch.cat([rows[b][i] for i in range(count)])
        if a == "fast":  # the tokens the fast path chose
            chosen = torch.tensor([t for i in range(count) for t in outputs[i]])
        else:
            chosen = x.argmax(-1)
        agree = float((y.argmax(-1) == chosen).double().mean())
        rel = float((x - y).double().norm() / y.double().norm())
        rows_rel = (x - y).norm(dim=-1) / y.norm(dim=-1)
        line = f"{a} vs {b}: greedy tokens agree at {100 * agree:.2f}% of {len(x)} positions; "
        line += f"logits relative error {rel:.2e} overall, {float(rows_rel.median()):.2e} "
        line += f"median row, {float(rows_rel.max()):.2e} worst row"
        if (a, b) == ("fast", "ref"):
            ok = agree >= 0.99 and rel <= 1e-2
            line += " -> " + ("PASS" if ok else "FAIL")
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

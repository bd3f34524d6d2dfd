"""Where FlowServe's time goes on the accelerator, one device call (results under $OUT).

    PYTHONPATH=platform python3 bench/engine_profile.py --model DIR [--what throughput,batch1,gemv]

- throughput: the engine_throughput batch (256 x 256 prompt + 256 output tokens) timed plain,
  then again with each engine-loop phase timed on the host (schedule, execute, wait for the
  samples, sample, the output processor's pass), prefill steps apart from pure decode steps;
  then a few decode steps of the real loop under torch.profiler (CPU + CUDA; trace written to
  $OUT), and the batch once more under cProfile.
- batch1: per-token latency of one request, the bare graph replay, and one engine step under
  torch.profiler (what runs besides the graph).
- gemv: cuBLAS vs the Triton GEMV (deepflow.engine.kernels.gemv) on the decoder's shapes, over
  rotating weight copies (so the 50 MB L2 does not hold them), and a few block configurations.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))

OUT = Path(os.environ.get("OUT", "/tmp/flowserve-profile"))
DEEP = bool(os.environ.get("DEEP"))
"""Also torch.profiler, sync debug and cProfile over the throughput batch."""
COMPILES: list[tuple[float, str, float, str]] = []


def log_compiles() -> None:
    """Record every Triton compilation (when, which kernel, how long, its specialisation)."""
    import triton.compiler as tc

    original = tc.compile

    def compile(src, *args, **kwargs):
        start = time.perf_counter()
        kernel = original(src, *args, **kwargs)
        name = getattr(getattr(src, "fn", None), "__name__", "?")
        attrs = str(getattr(src, "attrs", ""))[:160]
        COMPILES.append((start, name, time.perf_counter() - start, attrs))
        return kernel

    tc.compile = compile


def make_llm(model: str, n: int):
    from deepflow.engine import LLM

    return LLM(
        model,
        max_num_seqs=n,
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
        kv_cache_memory_fraction=0.5,
    )


def instrument(engine) -> dict[str, list]:
    """Wrap the loop's phases; returns the per-call durations, keyed by phase."""
    from deepflow.engine import outputs as outputs_mod

    times: dict[str, list] = collections.defaultdict(list)
    runner, sched = engine.model_runner, engine.scheduler

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            times[name].append(time.perf_counter() - t)
            return r

        return wrapper

    sched.schedule = timed("schedule", sched.schedule)
    sched.update = timed("update", sched.update)
    runner.execute = timed("execute", runner.execute)
    runner.sample = timed("sample", runner.sample)
    engine._emit = timed("postprocess", engine._emit)
    engine._append_pending = timed("append_pending", engine._append_pending)
    orig_result = outputs_mod.SampledBatch.result
    outputs_mod.SampledBatch.result = timed("wait+unpack", orig_result)
    step = engine.step

    def step_wrapper():
        batch_sizes = times.setdefault("_kinds", [])
        t = time.perf_counter()
        out = step()
        times["step"].append(time.perf_counter() - t)
        batch_sizes.append(getattr(engine, "_last_kind", "?"))
        return out

    engine.step = step_wrapper
    sched_schedule = sched.schedule

    def schedule_kind():
        batch = sched_schedule()
        engine._last_kind = (
            "prefill"
            if any(c.num_tokens > 1 for c in batch.chunks)
            else f"decode{len(batch.chunks)}"
        )
        return batch

    sched.schedule = schedule_kind
    times["_restore"] = [lambda: setattr(outputs_mod.SampledBatch, "result", orig_result)]
    return times


def throughput(model: str) -> None:
    from engine_throughput import make_prompts

    from deepflow.engine import SamplingParams

    n, new = 256, 256
    prompts = make_prompts(n, 256, 32000, 0)
    llm = make_llm(model, n)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    torch.cuda.synchronize()
    engine = llm.engine
    times = instrument(engine)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    sec = time.perf_counter() - start
    times.pop("_restore")[0]()
    kinds = times.pop("_kinds")
    steps = times["step"]
    print(f"first run (instrumented): {sec:.3f} s, {len(steps)} steps", flush=True)
    during = [c for c in COMPILES if c[0] >= start]
    print(f"  Triton compiles during it: {len(during)}, {sum(c[2] for c in during):.2f} s")
    for c in during[:20]:
        print(f"    {c[1]} {c[2]:.2f} s {c[3]}")
    slow = [(i, k, round(t * 1000, 1)) for i, (t, k) in enumerate(zip(steps, kinds, strict=True))
            if t > 0.035 or (k.startswith("decode") and t > 0.006)]  # fmt: skip
    print(f"  slow steps (index, kind, ms): {slow[:40]}")
    pre = [t for t, k in zip(steps, kinds, strict=True) if k == "prefill"]
    dec = [t for t, k in zip(steps, kinds, strict=True) if k.startswith("decode")]
    print(f"  prefill-containing steps: {len(pre)}, {sum(pre) * 1000:.1f} ms total, "
          f"{[round(t * 1000, 1) for t in pre]}")  # fmt: skip
    dec_sorted = sorted(dec)
    if dec:
        print(f"  decode steps: {len(dec)}, {sum(dec) * 1000:.1f} ms total, median "
              f"{dec_sorted[len(dec) // 2] * 1000:.2f} ms, min {dec_sorted[0] * 1000:.2f}, "
              f"max {dec_sorted[-1] * 1000:.2f}")  # fmt: skip
    for name, vals in times.items():
        if name == "step" or not vals:
            continue
        s = sorted(vals)
        print(f"  {name:<15} calls {len(vals):4d} total {sum(vals) * 1000:8.1f} ms  median "
              f"{s[len(s) // 2] * 1000:7.3f} ms  max {s[-1] * 1000:7.2f} ms")  # fmt: skip
    # per-step phase breakdown for decode steps (phases align with steps 1:1 for these)
    del engine.step, engine._emit, engine._append_pending
    del engine.scheduler.schedule, engine.scheduler.update
    del engine.model_runner.execute, engine.model_runner.sample

    for rep in range(2):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sec = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"plain run {rep + 1}: {sec:.3f} s, {tokens / sec:.0f} out tok/s", flush=True)
    if not DEEP:
        del llm
        return
    # torch.profiler over a few decode steps of the real loop

    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params, stream=False)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(20):
        engine.step()
    sync_debug(engine)
    prof = profile_steps(engine, 6, "self_cpu_time_total", "6 decode steps at batch 256")
    prof.export_chrome_trace(str(OUT / "decode_steps_trace.json"))
    while engine.has_unfinished_requests():
        engine.step()

    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print("\ncProfile of one more batch, by tottime:\n" + text.getvalue()[-9000:])
    del llm
    torch.cuda.empty_cache()


def sync_debug(engine, steps: int = 3) -> None:
    """Run a few steps with torch's sync debug mode on; print each synchronising call site."""
    import traceback
    import warnings

    seen: dict[tuple, str] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        key = (str(message)[:100], filename, lineno)
        seen.setdefault(key, "".join(traceback.format_stack(limit=10)[:-1]))

    old = warnings.showwarning
    warnings.showwarning = show
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = old
    print(f"\nsync debug over {steps} steps: {len(seen)} synchronising call sites")
    for (msg, filename, lineno), stack in seen.items():
        print(f"--- {msg} ({filename}:{lineno})\n{stack}")


def profile_steps(engine, steps: int, sort_by: str, what: str):
    """torch.profiler over ``steps`` engine steps: the op table and the device's idle gaps."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    print(f"\ntorch.profiler, {what}, by {sort_by}:")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60))
    gaps(prof)
    return prof


def gaps(prof) -> None:
    """GPU busy time vs wall over the profiled window, from the kernel/memcpy events."""
    events = []
    for e in prof.events():
        dev = getattr(e, "device_type", None)
        if dev is not None and "CUDA" in str(dev) and e.time_range.elapsed_us() > 0:
            events.append((e.time_range.start, e.time_range.end, e.name))
    if not events:
        print("no device events")
        return
    events.sort()
    busy, cur_s, cur_e, idle = 0.0, events[0][0], events[0][1], []
    for s, e, name in events[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            idle.append((s - cur_e, name))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = events[-1][1] - events[0][0]
    idle.sort(reverse=True)
    print(f"device busy {busy / 1000:.2f} ms of {span / 1000:.2f} ms span; largest idle gaps "
          f"(us, next op): {[(round(g), n[:40]) for g, n in idle[:12]]}")  # fmt: skip


def batch1(model: str) -> None:
    from engine_throughput import batch1_latency, make_prompts

    from deepflow.engine import SamplingParams
    from deepflow.engine.layers import linear

    prompts = make_prompts(1, 256, 32000, 0)
    llm = make_llm(model, 256)
    engine = llm.engine
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for label in ("cublas", "gemv"):
        linear.USE_GEMV = label == "gemv"
        runner = engine.model_runner
        runner.graphs = runner._capture_graphs()
        r = batch1_latency(llm, prompts[0], 256)
        print(f"batch-1 [{label}]: {r['latency_ms']:.3f} ms/token engine, "
              f"graph {r['graph_ms']:.3f} ms, floor {r['floor_ms']:.3f} ms -> "
              f"{r['latency_ms'] / r['floor_ms']:.2f}x "
              f"(graph {r['graph_ms'] / r['floor_ms']:.2f}x)", flush=True)  # fmt: skip

    engine.add_request(
        "one", prompts[0], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    )
    for _ in range(20):
        engine.step()
    profile_steps(engine, 5, "device_time_total", "5 batch-1 engine steps")
    while engine.has_unfinished_requests():
        engine.step()
    del llm
    torch.cuda.empty_cache()


def timeit(fn, x, ws) -> float:
    """Microseconds per call of fn(x, w), over the weights ws in turn, replayed as a graph."""
    for w in ws[:3]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000 / (5 * len(ws))


def gemv_bench() -> None:
    import torch.nn.functional as F

    from deepflow.engine.kernels import gemv as g

    shapes = {"qkv": (3072, 2048), "o_proj": (2048, 2048), "gate_up": (16384, 2048),
              "down": (2048, 8192), "lm_head": (32000, 2048)}  # fmt: skip
    from engine_throughput import measure_bandwidth

    copy_bw = measure_bandwidth()
    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s")
    configs = [(4, 512, 4), (8, 512, 4), (8, 512, 8), (4, 1024, 8), (8, 1024, 8), (16, 512, 8),
               (4, 512, 8), (8, 256, 8), (16, 256, 8), (8, 2048, 16), (4, 2048, 8)]  # fmt: skip
    for m in [int(v) for v in os.environ.get("GEMV_M", "1,2,4").split(",")]:
        print(f"M={m}: us per call (TB/s of weights); cuBLAS | default gemv | configs")
        for name, (n, k) in shapes.items():
            copies = max(2, (400 * 2**20) // (n * k * 2))
            ws = [
                torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)
            ]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = F.linear(x.double(), ws[0].double())
            errs = []

            res = []
            t = timeit(F.linear, x, ws)
            res.append(f"{t:6.1f}({n * k * 2 / t / 1e6:4.2f})")
            for cfg in [None, *configs]:
                try:
                    out = g.gemv(x, ws[0], config=cfg)
                    errs.append(float((out.double() - ref).norm() / ref.norm()))
                    t = timeit(lambda x, w, cfg=cfg: g.gemv(x, w, config=cfg), x, ws)
                    res.append(f"{t:6.1f}({n * k * 2 / t / 1e6:4.2f})")
                except Exception as e:
                    res.append(f"err {type(e).__name__}")
            if name == "gate_up":
                for cfg in [None, *configs]:
                    t = timeit(lambda x, w, cfg=cfg: g.gemv_silu_and_mul(x, w, config=cfg), x, ws)
                    res.append(f"|silu {t:6.1f}")
            print(f"  {name:<8} {' '.join(res)}  max rel err {max(errs):.1e}", flush=True)
            del ws
            torch.cuda.empty_cache()
    print(f"  configs: default, {configs}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--what", default="throughput,batch1,gemv")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    import traceback

    log_compiles()
    sections = {"gemv": gemv_bench, "throughput": throughput, "batch1": batch1}
    failed = 0
    for name in args.what.split(","):
        try:
            fn = sections[name]
            fn() if name == "gemv" else fn(args.model)
        except Exception:  # report it and go on to the next section
            traceback.print_exc()
            failed += 1
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

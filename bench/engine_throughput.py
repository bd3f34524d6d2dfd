"""FlowServe vs transformers on one accelerator: offline throughput and batch-1 decode latency.

    PYTHONPATH=platform python3 bench/engine_throughput.py [--model DIR] [--out FILE.json]

The same random-weight 1.1B Llama-architecture test model in bf16 (hidden 2048, 16 layers, 32
heads, 8 KV heads, intermediate 8192, vocab 32000; built here unless --model is given), the same
prompts (random token ids), greedy, EOS ignored. Rows, each system in its own process so one
cannot inherit another's memory or compiled state:
- FlowServe `LLM.generate` (Triton kernels, decode graphs, async scheduling);
- transformers `generate` on static batches of 64 (eager, dynamic cache);
- the same with `cache_implementation="static"`, which makes generate compile the forward;
- transformers continuous batching, `model.generate_batch`.
Each is warmed up first (for the compiled row: one whole batch, compilation included) and then
timed end to end; tokens/s counts output tokens. Then batch-1 decode latency per token, against
the memory floor: weight bytes / the HBM bandwidth of a large device-to-device copy measured in
the same process.

    PYTHONPATH=platform python3 bench/engine_throughput.py --host [--num-requests 256]

`--host` (no accelerator needed): the engine's host work per step alone, the thing that must stay
below the device's step time. The real scheduler, sampler, detokeniser and output path, and
the runner's input packing (the decode graphs' `DecodeInputs`, or `prepare` with the kernels'
metadata), on the tiny test model's tokenizer and vocabulary, with async scheduling on; the model
itself is not run (zero logits), so what is timed is Python, not arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

SYSTEMS = {
    "flowserve": "FlowServe LLM.generate",
    "hf_static": "transformers generate, static batches of 64",
    "hf_compiled": "transformers generate, static cache + compile, batches of 64",
    "hf_cb": "transformers generate_batch (continuous batching)",
}


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(count)]


def measure_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write), median of 20."""
    src = torch.randn(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / sorted(times[3:])[len(times[3:]) // 2]


def run_flowserve(model: str, prompts: list[list[int]], new: int, args) -> dict:
    from deepflow.engine import LLM, SamplingParams

    llm = LLM(
        model,
        max_num_seqs=len(prompts),
        max_num_batched_tokens=args.max_batched_tokens,
        enable_prefix_caching=False,
        kv_cache_memory_fraction=0.5,
    )
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"seconds": seconds, "tokens": tokens}
    if args.profile_host:  # the same batch again under cProfile: where the host's time goes
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["host_profile"] = text.getvalue()
    result.update(batch1_latency(llm, prompts[0], new))
    return result


def batch1_latency(llm, prompt: list[int], new: int) -> dict:
    """Per-token decode latency of one request through the engine, and of the bare graph."""
    from deepflow.engine import SamplingParams

    engine = llm.engine
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model_runner.model.parameters())
    per_token = []
    for run in range(3):
        engine.add_request(
            f"lat{run}", prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        )
        times = []
        while engine.has_unfinished_requests():
            for _ in engine.step():
                times.append(time.perf_counter())
        per_token.append((times[-1] - times[1]) / (len(times) - 2))
    graphs = engine.model_runner.graphs
    graph_ms = None
    if graphs is not None:
        graph = graphs.graphs[1]
        for _ in range(10):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            graph.replay()
        end.record()
        end.synchronize()
        graph_ms = start.elapsed_time(end) / 100
    bandwidth = measure_bandwidth()
    return {
        "latency_ms": 1000 * sorted(per_token)[1],
        "graph_ms": graph_ms,
        "weight_bytes": weight_bytes,
        "bandwidth": bandwidth,
        "floor_ms": 1000 * weight_bytes / bandwidth,
    }


def load_hf(model: str):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None  # EOS ignored, as FlowServe's ignore_eos
    hf.generation_config.pad_token_id = 0
    return hf


def run_hf_static(model: str, prompts: list[list[int]], new: int, args, compiled: bool) -> dict:
    from transformers import GenerationConfig

    hf = load_hf(model)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
        pad_token_id=0,
    )  # fmt: skip
    if compiled:
        config.cache_implementation = "static"
    batches = [prompts[i : i + args.hf_batch] for i in range(0, len(prompts), args.hf_batch)]

    def generate(batch: list[list[int]], cfg=config) -> int:
        ids = torch.tensor(batch, device="cuda")
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    warm = batches[0] if compiled else batches[0][:4]  # compiled: the real shapes, compiled once
    generate(
        warm,
        config
        if compiled
        else GenerationConfig(**{**config.to_dict(), "max_new_tokens": 8, "min_new_tokens": 8}),
    )
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(generate(b) for b in batches)
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def run_hf_cb(model: str, prompts: list[list[int]], new: int, args) -> dict:
    from transformers import GenerationConfig

    hf = load_hf(model)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0
    )
    # No inference_mode here: generate_batch runs the model on its own thread, which must not
    # meet inference tensors made on this one.
    hf.generate_batch(inputs=prompts[:4], generation_config=config)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = hf.generate_batch(inputs=prompts, generation_config=config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(o.generated_tokens) for o in outputs.values())}


class HostOnlyRunner:
    """A Runner (deepflow.engine.runner) with a ModelRunner's host side: packs each step's
    inputs as the accelerator path does, runs no model and samples zero logits."""

    def __init__(self, runner, largest: int) -> None:
        from deepflow.engine.decode_graphs import DecodeInputs
        from deepflow.engine.sampler import Sampler

        self.runner = runner
        runner.backend = "triton"  # prepare() builds the kernels' metadata too
        for name in ("block_size", "num_blocks", "max_model_len", "vocab_size", "device"):
            setattr(self, name, getattr(runner, name))
        width = -(-runner.max_model_len // runner.block_size)
        self.inputs = DecodeInputs(largest, width, runner.block_size, torch.device("cpu"))
        self.zeros = torch.zeros(largest, runner.vocab_size)
        self.logits = self.zeros[:0]
        self.sampler = Sampler()

    def execute(self, batch, pending=None) -> None:
        chunks = batch.chunks
        if len(chunks) <= self.inputs.largest and all(c.num_tokens == 1 for c in chunks):
            self.inputs.fill(chunks, pending, len(chunks))
        else:
            self.runner.prepare(chunks, pending)
        self.logits = self.zeros[: sum(1 for c in chunks if c.needs_logits)]

    def sample(self, seqs, eos_token_ids, rows=None):
        return self.sampler.sample(self.logits, seqs, eos_token_ids, rows)


def host_step_time(args) -> None:
    """Milliseconds of host work per engine step, best of three runs."""
    from deepflow.engine import LLM, SamplingParams
    from deepflow.engine.config import EngineConfig
    from deepflow.engine.llm_engine import LLMEngine
    from deepflow.engine.model_runner import ModelRunner
    from deepflow.engine.testmodel import make_test_model

    torch.set_num_threads(1)
    n = args.num_requests
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_test_model(Path(tmp) / "tiny", "llama", "tiny"))
        options = dict(model=model, num_kv_blocks=n * 40, max_num_seqs=n, device="cpu",
                       max_num_batched_tokens=args.max_batched_tokens)  # fmt: skip
        host = HostOnlyRunner(ModelRunner(EngineConfig(**options)), n)
        llm = LLM.__new__(LLM)
        prompts = make_prompts(n, args.prompt_len, 500, args.seed)
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        for label, stream in (("LLM.generate", False), ("streamed (AsyncLLMEngine's way)", True)):
            best = float("inf")
            for _ in range(3):
                config = EngineConfig(**options, enable_prefix_caching=False, async_scheduling=True)
                engine = llm.engine = LLMEngine(config, model_runner=host)
                for i, prompt in enumerate(prompts):
                    engine.add_request(str(i), prompt, params, stream=stream)
                steps, start = 0, time.perf_counter()
                while engine.has_unfinished_requests():
                    engine.step()
                    steps += 1
                best = min(best, (time.perf_counter() - start) / steps)
            print(
                f"{label}: {n} requests x {args.prompt_len} prompt + {args.output_len} output "
                f"tokens, {steps} steps: {1000 * best:.2f} ms of host work per step"
            )


def run_one(system: str, args) -> dict:
    from deepflow.engine.model_config import ModelConfig

    vocab = ModelConfig.from_folder(args.model).vocab_size
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
    new = args.output_len
    if system == "flowserve":
        return run_flowserve(args.model, prompts, new, args)
    if system in ("hf_static", "hf_compiled"):
        return run_hf_static(args.model, prompts, new, args, compiled=system == "hf_compiled")
    return run_hf_cb(args.model, prompts, new, args)


def spawn(system: str, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--run-system", system, "--model", args.model]
    for name in (
        "num_requests",
        "prompt_len",
        "output_len",
        "seed",
        "hf_batch",
        "max_batched_tokens",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--profile-host"] if args.profile_host else []
    print(f"--- {SYSTEMS[system]}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    sys.stderr.write(proc.stderr[-3000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def print_table(results: dict, args) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\n{args.num_requests} requests x {args.prompt_len} prompt + {args.output_len} output "
        f"tokens, greedy, EOS ignored, bf16, on {device}\n"
    )
    print(f"{'system':<58} {'seconds':>8} {'out tok/s':>10} {'FlowServe x':>11}")
    flow = results.get("flowserve", {})
    flow_tps = flow["tokens"] / flow["seconds"] if "tokens" in flow else None
    for system, label in SYSTEMS.items():
        r = results.get(system)
        if r is None:
            continue
        if "error" not in r and not r["tokens"]:
            r = {"error": "no tokens generated"}
        if "error" in r:
            print(f"{label:<58} {'failed: ' + r['error']}")
            continue
        tps = r["tokens"] / r["seconds"]
        ratio = f"{flow_tps / tps:.2f}x" if flow_tps else "-"
        print(f"{label:<58} {r['seconds']:>8.2f} {tps:>10.0f} {ratio:>11}")
    if "latency_ms" in flow:
        print(
            f"\nbatch-1 decode: {flow['latency_ms']:.3f} ms/token through the engine, "
            f"{flow['graph_ms']:.3f} ms per graph replay; floor {flow['floor_ms']:.3f} ms "
            f"({flow['weight_bytes'] / 1e9:.2f} GB of weights at "
            f"{flow['bandwidth'] / 1e12:.2f} TB/s): {flow['latency_ms'] / flow['floor_ms']:.2f}x "
            f"the floor (graph {flow['graph_ms'] / flow['floor_ms']:.2f}x)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: build the 1b test model)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=400, help="seconds per system")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--host", action="store_true", help="host work per step, on the CPU")
    parser.add_argument(
        "--profile-host", action="store_true", help="FlowServe: cProfile a second, untimed batch"
    )
    parser.add_argument("--run-system", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host:
        host_step_time(args)
        return 0
    if args.run_system:
        print("RESULT " + json.dumps(run_one(args.run_system, args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from deepflow.engine.testmodel import make_test_model

            start = time.perf_counter()
            args.model = str(make_test_model(Path(tmp) / "llama-1b", "llama", "1b"))
            print(f"built the 1b test model in {time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        for system in args.systems.split(","):
            results[system] = spawn(system, args, args.timeout)
            print(json.dumps(results[system]), flush=True)
    print_table(results, args)
    if "host_profile" in results.get("flowserve", {}):
        print(
            "\nFlowServe's host, one more batch under cProfile:\n"
            + results["flowserve"]["host_profile"]
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

"""FlowServe vs transformers on the CPU: the same random-weight test model, the same prompts,
greedy decoding of the same number of tokens, timed in one run.

    python bench/engine_cpu.py                 # small llama, 32 prompts x 128 tokens
    python bench/engine_cpu.py --quick         # tiny llama, 8 prompts x 32 tokens
    python bench/engine_cpu.py --model DIR     # an existing Hugging Face folder

Rows: FlowServe's LLM.generate (continuous batching, paged KV cache); transformers' generate on
all prompts at once (left-padded); transformers' generate one prompt at a time. `vs FlowServe`
is FlowServe's tokens/s over the row's. Load time is excluded; each system is warmed up first.
One torch thread by default: these models are too small for BLAS threads to pay, and on a
shared machine a second thread waiting on a busy core makes timings erratic.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import deepflow.engine  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from deepflow.engine import LLM, SamplingParams
from deepflow.engine.testmodel import CORPUS, make_test_model
from deepflow.engine.tokenizer import Tokenizer


def make_prompts(tokenizer: Tokenizer, count: int, seed: int) -> list[list[int]]:
    """Slices of the bundled corpus, 16 to 128 tokens long, different for each prompt."""
    ids = tokenizer.encode(CORPUS.read_text(), add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.randint(16, 128)
        start = rng.randrange(len(ids) - length)
        prompts.append(ids[start : start + length])
    return prompts


def run_flowserve(folder: Path, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    llm = LLM(str(folder), device="cpu", enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, [o.outputs[0].token_ids for o in outputs]


def hf_generate(model, batch: list[list[int]], max_tokens: int, pad: int) -> list[list[int]]:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=pad,
        )
    return out[:, width:].tolist()


def run_hf(folder: Path, prompts: list[list[int]], max_tokens: int, batched: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as FlowServe's ignore_eos does
    pad = model.config.pad_token_id or 0
    hf_generate(model, [prompts[0][:8]], 4, pad)
    start = time.perf_counter()
    if batched:
        outputs = hf_generate(model, prompts, max_tokens, pad)
    else:
        outputs = [hf_generate(model, [p], max_tokens, pad)[0] for p in prompts]
    return time.perf_counter() - start, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: build a test model)")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--size", default=None, choices=["tiny", "small"])
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 prompts x 32 tokens")
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "small")
    count = args.num_prompts or (8 if args.quick else 32)
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            Path(args.model) if args.model else make_test_model(tmp, args.arch, size, args.seed)
        )
        prompts = make_prompts(Tokenizer.from_folder(folder), count, args.seed)
        rows = [("FlowServe LLM.generate", *run_flowserve(folder, prompts, max_tokens))]
        rows.append(("transformers, batched", *run_hf(folder, prompts, max_tokens, True)))
        rows.append(("transformers, one by one", *run_hf(folder, prompts, max_tokens, False)))

    name = args.model or f"{args.arch}-{size} test model"
    print(
        f"\n{name}, {count} prompts (16-128 tokens), {max_tokens} greedy tokens each, "
        f"float32, {torch.get_num_threads()} torch thread(s)\n"
    )
    print(
        f"{'system':<26} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'tok/s':>8} "
        f"{'vs FlowServe':>12}"
    )
    flow_tps = count * max_tokens / rows[0][1]
    for label, seconds, _ in rows:
        tps = count * max_tokens / seconds
        print(
            f"{label:<26} {count:>8} {count * max_tokens:>10} {seconds:>8.2f} {tps:>8.1f} "
            f"{flow_tps / tps:>11.2f}x"
        )
    same = sum(a == b for a, b in zip(rows[0][2], rows[2][2], strict=True))
    print(
        f"\nFlowServe's outputs equal transformers' one-by-one outputs for {same}/{count} prompts"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

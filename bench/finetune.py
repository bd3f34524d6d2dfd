"""Training tokens per second: DeepFlow's fine-tuning loop against the same steps through
transformers + peft, in one run, on the same model, batches and precision.

    PYTHONPATH=platform python bench/finetune.py --size 1b --steps 24    # the device
    PYTHONPATH=platform python bench/finetune.py --size small --steps 6  # a CPU check

Both sides start from the same weights (and the same LoRA initialisation), take the same
examples in the same order (``deepflow.finetune.train.batches``), use bf16 autocast on an
accelerator, AdamW and gradient clipping. What differs is what DeepFlow does differently:
a step's examples are packed into one row without padding (position ids restart, so the
attention stays per example), and logits are made only where a target is. The peer is what a
transformers user writes: the batch padded to its longest example, ``labels`` with -100 on the
prompt and the padding, ``model(...).loss``. Both keep LoRA's frozen base in bf16 on an
accelerator and full fine-tuning's weights in float32 (``peer_model``). The examples are
synthetic chat turns of varied length (a prompt, then an answer that carries the loss), so
padding costs what it costs in real data of that spread. Tokens per second count real tokens
(no padding) over the timed steps (after ``--warmup``); the first step's losses must agree
(same function, same batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from deepflow.engine.device import Device
from deepflow.engine.testmodel import make_test_model
from deepflow.finetune import train
from deepflow.finetune.data import IGNORE, Example

LORA = {"rank": 16, "alpha": 32.0}


def synthetic(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[Example]:
    """Examples of ``lo``..``hi`` tokens; the last 20-60% of each is the answer (the loss)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        answer_from = int(length * rng.uniform(0.4, 0.8))
        targets = [ids[t + 1] if t + 1 >= answer_from else IGNORE for t in range(length - 1)]
        out.append(Example(ids, [*targets, IGNORE]))
    return out


class Clock:
    """The training loop's progress as step end times (the loss read syncs the device)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, step: int, epoch: int, loss: float, tokens: int, lr: float) -> None:
        self.times.append(time.perf_counter())
        self.losses.append(loss)

    def checkpoint(self, step: int, path: Path, loss: float, valid_loss: float | None) -> None:
        return None

    def paused(self) -> bool:
        return False


def run_ours(plan: train.Plan, examples: list[Example], work: Path) -> Clock:
    clock = Clock()
    clock.times.append(time.perf_counter())
    train.train(plan, examples, [], work, clock)
    return clock


def peer_model(plan: train.Plan) -> torch.nn.Module:
    """The model as transformers + peft recipes load it: for LoRA the base in bf16 on an
    accelerator (peft keeps the adapters float32), for full fine-tuning float32 weights under
    bf16 autocast (the Trainer's ``bf16=True``); transformers' default attention (SDPA)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    on_cpu = torch.device(plan.device).type == "cpu"
    dtype = torch.float32 if plan.lora is None or on_cpu else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(
        str(plan.base), dtype=dtype, attn_implementation="sdpa"
    ).to(plan.device)
    if plan.lora is None:
        return model
    torch.manual_seed(plan.seed)
    config = LoraConfig(
        r=plan.lora["rank"],
        lora_alpha=plan.lora["alpha"],
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def run_peer(plan: train.Plan, examples: list[Example], steps: int) -> Clock:
    """The same steps as transformers + peft users write them: padded batches, the model's own
    loss over every position."""
    model = peer_model(plan)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)
    device = torch.device(plan.device)
    clock = Clock()
    clock.times.append(time.perf_counter())
    chunks = train.batches(len(examples), plan.batch_size, plan.seed, 0)
    for chunk in chunks[:steps]:
        batch = [examples[i] for i in chunk]
        longest = max(len(e.input_ids) for e in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            mask[row, :n] = 1
            labels[row, 1:n] = torch.tensor(e.targets[:-1])  # labels are unshifted
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu"):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        labels=labels.to(device), use_cache=False)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        clock.step(0, 0, float(out.loss.detach()), 0, 0.0)
    return clock


def rate(clock: Clock, examples: list[Example], plan: train.Plan, warmup: int) -> float:
    chunks = train.batches(len(examples), plan.batch_size, plan.seed, 0)
    timed = chunks[warmup : len(clock.times) - 1]
    tokens = sum(len(examples[i].input_ids) for chunk in timed for i in chunk)
    return tokens / (clock.times[-1] - clock.times[warmup])


def padding_share(examples: list[Example], plan: train.Plan, steps: int) -> float:
    chunks = train.batches(len(examples), plan.batch_size, plan.seed, 0)[:steps]
    real = sum(len(examples[i].input_ids) for c in chunks for i in c)
    padded = sum(len(c) * max(len(examples[i].input_ids) for i in c) for c in chunks)
    return 1 - real / padded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", help="a test model size (tiny, small, 1b)")
    parser.add_argument("--model", type=Path, help="a model folder instead of a test model")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument(
        "--attention",
        default="auto",
        help="our side's attention: auto (train.attention_for), sdpa, flex_attention; "
        "comma-separated to run each",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/deepflow-bench-finetune"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = Device.pick()
    model = args.model or make_test_model(args.work / f"model-{args.size}", "llama", args.size)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    examples = synthetic(args.steps * args.batch_size, vocab, args.min_len, args.max_len, 0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    print(f"device {name}, torch {torch.__version__}, model {model.name}, "
          f"{args.steps} steps of {args.batch_size} examples ({args.min_len}-{args.max_len} "
          "tokens)", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        lr = train.BASE_LEARNING_RATE["lora" if method == "lora" else "full"]
        plan = train.Plan(
            base=model, lora=LORA if method == "lora" else None, epochs=1,
            batch_size=args.batch_size, learning_rate=lr, seed=0,
            checkpoint_every=10**9, device=str(device.torch_device),
        )  # fmt: skip
        results: dict[str, Any] = {"method": method}
        ours_variants = [f"deepflow/{a}" for a in args.attention.split(",")]
        for side in (*ours_variants, "transformers+peft"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            work = args.work / f"ckpt-{method}"
            if side.startswith("deepflow/"):
                attention = side.split("/", 1)[1]
                variant = dataclasses.replace(
                    plan, attention=None if attention == "auto" else attention
                )
                clock = run_ours(variant, examples, work)
            else:
                clock = run_peer(plan, examples, args.steps)
            results[side] = {
                "tokens_per_s": rate(clock, examples, plan, args.warmup),
                "first_loss": clock.losses[0],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30
                if device.type == "cuda" else None,
            }  # fmt: skip
            print(f"  {method} {side}: {results[side]}", flush=True)
        peer = results["transformers+peft"]
        for variant in ours_variants:
            ours = results[variant]
            ours["ratio"] = ours["tokens_per_s"] / peer["tokens_per_s"]
            ours["loss_rel_diff"] = (
                abs(ours["first_loss"] - peer["first_loss"]) / peer["first_loss"]
            )
        results["variants"] = ours_variants
        results["padding_share"] = padding_share(examples, plan, args.steps)
        rows.append(results)

    print()
    print(f"{'method':7} {'ours (attention)':24} {'tok/s':>9} {'transformers+peft':>18} "
          f"{'ratio':>6} {'padding':>8} {'1st-loss diff':>14}")  # fmt: skip
    for r in rows:
        for variant in r["variants"]:
            ours = r[variant]
            print(f"{r['method']:7} {variant:24} {ours['tokens_per_s']:9,.0f} "
                  f"{r['transformers+peft']['tokens_per_s']:18,.0f} {ours['ratio']:6.2f} "
                  f"{r['padding_share']:8.0%} {ours['loss_rel_diff']:14.1e}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    bad = [(r["method"], v) for r in rows for v in r["variants"] if r[v]["loss_rel_diff"] > 2e-2]
    if bad:
        print(f"the two sides' first losses disagree for {bad}: not the same computation")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training loop: full fine-tuning or LoRA (peft) over packed examples, with checkpoints a
killed attempt resumes from.

The model runs in transformers' own modules (the engine's are inference-only). A step's
examples are packed into one row without padding: position ids restart at each example, and
transformers builds a block-diagonal causal mask from them, so no example attends to another
(``tests/finetune/test_train.py`` checks the packed loss equals the examples' one by one).
The order of examples is a function of the seed and the epoch alone, so a resumed attempt
takes exactly the batches the killed one would have.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from deepflow.finetune.data import IGNORE, Example

BASE_LEARNING_RATE = {"lora": 1e-3, "full": 5e-5}
"""Multiplied by the job's ``learning_rate_multiplier``."""
KEEP_CHECKPOINTS = 3


class Progress(Protocol):
    """Where the loop reports (the operator writes it to the store)."""

    def step(self, step: int, epoch: int, loss: float, tokens: int, lr: float) -> None: ...

    def checkpoint(self, step: int, path: Path, loss: float, valid_loss: float | None) -> None: ...

    def paused(self) -> bool: ...


@dataclass(frozen=True)
class Plan:
    """What to train, from the job's spec."""

    base: Path
    lora: dict[str, Any] | None
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    checkpoint_every: int
    device: str = "cpu"
    """A torch device: the worker's accelerator (``finetune.operators`` picks it)."""
    attention: str | None = None
    """transformers' attention implementation; None: ``attention_for(device)``."""


def attention_for(device: str) -> str:
    """SDPA everywhere: the path measured on the H100 (BENCHMARKS, "Fine-tuning throughput").
    With a packed row's block-diagonal mask it computes and masks the whole square; flex
    attention (``Plan.attention="flex_attention"``) skips the ruled-out blocks and is the
    candidate on CUDA, to be made the default there once ``bench/finetune.py --attention
    flex_attention,sdpa`` shows it faster."""
    del device
    return "sdpa"


def load_model(
    base: Path,
    lora: dict[str, Any] | None,
    seed: int,
    device: str = "cpu",
    attention: str | None = None,
) -> torch.nn.Module:
    """The base model on ``device``, with fresh LoRA adapters (float32) on every linear layer
    if asked. Weights that train are float32. On an accelerator LoRA's frozen base is bf16:
    autocast casts it to bf16 for every matrix product anyway, but caches the cast only for
    weights that train, so a float32 frozen base is read and cast again in every forward and
    backward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.float32, attn_implementation=attention or attention_for(device)
    ).to(device)
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    if torch.device(device).type != "cpu":
        model = model.to(torch.bfloat16)

    torch.manual_seed(seed)  # the adapters' initial weights
    config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable(model: torch.nn.Module, folder: Path) -> None:
    state = torch.load(folder / "trainable.pt", map_location="cpu", weights_only=True)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks {missing[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def packed(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row holding every example: (input ids, position ids, targets), each [1, tokens]."""
    ids = [t for e in examples for t in e.input_ids]
    positions = [p for e in examples for p in range(len(e.input_ids))]
    targets = [t for e in examples for t in e.targets]
    return (torch.tensor([ids]), torch.tensor([positions]), torch.tensor([targets]))


def loss_sum(model: torch.nn.Module, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the examples' targets, and how many targets there were.
    Logits are made only where a target is (``logits_to_keep``): the prompt's positions never
    reach the LM head, which over a large vocabulary is a tenth of a small model's work."""
    device = next(model.parameters()).device
    ids, positions, targets = (t.to(device) for t in packed(examples))
    keep = (targets[0] != IGNORE).nonzero().squeeze(-1)
    with _autocast(device):
        out = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep)
    total = F.cross_entropy(out.logits[0].float(), targets[0, keep], reduction="sum")
    return total, int(keep.numel())


def _autocast(device: torch.device) -> Any:
    """bf16 matrix work on an accelerator (weights and optimizer stay float32); none on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu")


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: list[Example], batch_size: int) -> float | None:
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        s, n = loss_sum(model, examples[i : i + batch_size])
        total, count = total + float(s), count + n
    return total / max(count, 1)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch ``epoch``'s batches of example indices: a function of the seed and epoch alone."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _schedule(step: int, total: int) -> float:
    """Linear decay to a tenth of the rate over the run."""
    return 1.0 - 0.9 * step / max(total, 1)


def _save_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> Path:
    final = folder / f"step-{step:06d}"
    partial = folder / f".step-{step:06d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(trainable_state(model), partial / "trainable.pt")
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, partial / "optimizer.pt")
    for name in ("trainable.pt", "optimizer.pt"):
        with open(partial / name, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a redone step's earlier, unrecorded save
    partial.rename(final)
    return final


def _steps(plan: Plan, n: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
    """(global step, epoch, example indices) from step ``start + 1`` on."""
    step = 0
    for epoch in range(plan.epochs):
        for chunk in batches(n, plan.batch_size, plan.seed, epoch):
            step += 1
            if step > start:
                yield step, epoch, chunk


def total_steps(plan: Plan, n: int) -> int:
    return math.ceil(n / plan.batch_size) * plan.epochs


def train(
    plan: Plan,
    train_set: list[Example],
    valid_set: list[Example],
    checkpoints: Path,
    progress: Progress,
    resume: Path | None = None,
    wait_s: float = 1.0,
) -> None:
    """Train from the base (or ``resume``, a checkpoint folder) to the last step, reporting
    each step and checkpoint. The last step always ends in a checkpoint: the trained weights."""
    torch.manual_seed(plan.seed)
    model = load_model(plan.base, plan.lora, plan.seed, plan.device, plan.attention)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)
    total = total_steps(plan, len(train_set))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total))
    start = 0
    if resume is not None:
        load_trainable(model, resume)
        state = torch.load(resume / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _schedule(s, total), last_epoch=start - 1
        )
        print(f"resuming from {resume.name} (step {start} of {total})", flush=True)
    for step, epoch, chunk in _steps(plan, len(train_set), start):
        model.train()
        lr = scheduler.get_last_lr()[0]
        summed, count = loss_sum(model, [train_set[i] for i in chunk])
        loss_value = summed / max(count, 1)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        loss = float(loss_value.detach())
        progress.step(step, epoch, loss, count, lr)
        print(f"step {step}/{total} epoch {epoch + 1} loss {loss:.4f} lr {lr:.2e}", flush=True)
        pause = progress.paused()
        if step % plan.checkpoint_every == 0 or step == total or pause:
            saved = _save_checkpoint(checkpoints, model, optimizer, step)
            progress.checkpoint(step, saved, loss, mean_loss(model, valid_set, plan.batch_size))
        if pause:
            print(f"paused at step {step}", flush=True)
            while progress.paused():
                time.sleep(wait_s)
            print("resumed", flush=True)

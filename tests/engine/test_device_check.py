"""bench/device_check.py's same-schedule reference, on the CPU with the tiny model: the torch
path on both sides, so a correct replay reproduces the run exactly (the device runs the fast
path against it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import device_check as dc
from deepflow.engine.config import EngineConfig
from deepflow.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OPTIONS = {"async_scheduling": True, "max_num_batched_tokens": 128}


def test_agreement_of_the_torch_path_with_itself_is_exact(tiny_llama, capsys):
    assert dc.agreement(str(tiny_llama), 4, 6, OPTIONS)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "vs reference (float32), same schedule:" in x)
    assert line.startswith("fast (float32) vs")
    assert "agree at 100.00% of 24 positions" in line and "0.00e+00 overall" in line
    assert line.endswith("PASS (the bar: >= 99%, <= 1e-2)")
    assert "one prefill pass per prompt (different GEMM shapes)" in out


def fake_graphs(runner, chunks) -> int:
    """Pretend the side under test replays pure decode steps as 8-row graphs."""
    if runner.config.enforce_eager or any(c.num_tokens > 1 for c in chunks):
        return 0
    return 8


def test_replay_pads_forces_tokens_and_catches_another_schedule(tiny_llama, monkeypatch):
    config = EngineConfig(model=str(tiny_llama), num_kv_blocks=256, max_num_seqs=4, **OPTIONS)
    prompts = dc.make_prompts(str(tiny_llama), 4)
    monkeypatch.setattr(dc, "graph_rows", fake_graphs)
    fast = dc.run_engine(LLMEngine(config), prompts, 6)
    assert 8 in fast.rows and 0 in fast.rows and len(fast.steps) > 6
    ref = dc.same_schedule_reference(config, prompts, 6, fast)
    assert ref.rows == fast.rows and ref.steps == fast.steps  # padding rows ran
    x, y = fast.stacked(prompts), ref.stacked(prompts)
    chosen = torch.tensor([t for i in range(4) for t in fast.tokens[i]])
    agree, rel, _, worst = dc.compare(x, y, chosen)
    assert agree == 1.0 and rel < 1e-5 and worst < 1e-5

    # The replay emits the recorded tokens, not its own choices.
    other = dataclasses.replace(fast, tokens={i: list(t) for i, t in fast.tokens.items()})
    other.tokens[1][2] = (other.tokens[1][2] + 1) % 512
    forced = dc.same_schedule_reference(config, prompts, 6, other)
    assert forced.tokens == other.tokens
    position = len(prompts[1]) + 2  # the logits row after the changed token
    assert not torch.equal(forced.logits[1][position], fast.logits[1][position])
    assert torch.equal(forced.logits[0][len(prompts[0])], fast.logits[0][len(prompts[0])])

    # A different batch order is caught at the step where it happens.
    swapped = dataclasses.replace(fast, steps=list(fast.steps))
    swapped.steps[-2] = swapped.steps[-2][::-1]
    assert len(swapped.steps[-2]) > 1
    with pytest.raises(AssertionError, match=f"step {len(fast.steps) - 2} differs"):
        dc.same_schedule_reference(config, prompts, 6, swapped)

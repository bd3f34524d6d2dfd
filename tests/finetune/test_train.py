"""The training loop on the tiny random model: targets on assistant tokens only, packing that
changes no loss, a resumed run identical to an uninterrupted one, and merged LoRA weights
that answer as base + adapter do (in transformers and in our engine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from deepflow.engine.tokenizer import Tokenizer
from deepflow.files import InvalidFile
from deepflow.finetune import data, train
from deepflow.finetune.operators import save_merged
from tests.finetune.conftest import TRAIN_FILE, VALID_FILE

LORA = {"rank": 4, "alpha": 8.0}


class Recorder:
    """Progress that keeps what the loop reports; ``die_after`` raises past that step, as a
    killed worker would stop (its unsaved steps are lost)."""

    def __init__(self, die_after: int | None = None, pause_at: int | None = None) -> None:
        self.steps: dict[int, float] = {}
        self.saved: list[tuple[int, Path]] = []
        self.die_after = die_after
        self.pause_at = pause_at
        self.polls = 0

    def step(self, step: int, epoch: int, loss: float, tokens: int, lr: float) -> None:
        if self.die_after is not None and step > self.die_after:
            raise KeyboardInterrupt("killed")
        self.steps[step] = loss

    def checkpoint(self, step: int, path: Path, loss: float, valid_loss: float | None) -> None:
        self.saved.append((step, path))

    def paused(self) -> bool:
        """Paused after step ``pause_at`` for three looks (the user resumes)."""
        if self.pause_at is None or max(self.steps, default=0) != self.pause_at:
            return False
        self.polls += 1
        return self.polls <= 3


@pytest.fixture(scope="module")
def examples(tiny_model: Path) -> tuple[list[data.Example], list[data.Example]]:
    tokenizer = Tokenizer.from_folder(tiny_model)
    return (
        data.encode_file(tokenizer, TRAIN_FILE, 512)[:24],
        data.encode_file(tokenizer, VALID_FILE, 512),
    )


def _plan(model: Path, **changes: Any) -> train.Plan:
    defaults: dict[str, Any] = dict(
        base=model, lora=LORA, epochs=2, batch_size=4, learning_rate=1e-2, seed=3,
        checkpoint_every=4,
    )  # fmt: skip
    return train.Plan(**(defaults | changes))


def test_only_the_assistant_turn_is_learned(tiny_model: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye now"},
    ]
    example = data.encode(tokenizer, messages)
    learned = tokenizer.decode([t for t in example.targets if t != data.IGNORE])
    assert "Hello there" in learned and "Goodbye now" in learned
    assert "Hi" not in learned and "Bye" not in learned and "brief" not in learned
    # Targets are the next tokens: shifted by one, never past the example's end.
    assert example.targets[-1] == data.IGNORE
    for t, target in enumerate(example.targets[:-1]):
        assert target in (data.IGNORE, example.input_ids[t + 1])


def test_files_that_cannot_train_name_their_line(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_model)
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    long = {"messages": [{"role": "user", "content": "word " * 400},
                         {"role": "assistant", "content": "a"}]}  # fmt: skip
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, long)) + "\n")
    with pytest.raises(InvalidFile, match=r"line 3: \d+ tokens, longer than the context \(64"):
        data.encode_file(tokenizer, path, 64)
    assert len(data.encode_file(tokenizer, path, 4096)) == 3


def test_packing_changes_no_loss(tiny_model: Path, examples: Any) -> None:
    model = train.load_model(tiny_model, None, 0).eval()
    batch = examples[0][:5]
    with torch.no_grad():
        packed, count = train.loss_sum(model, batch)
        alone = [train.loss_sum(model, [e]) for e in batch]
    assert count == sum(n for _, n in alone) == sum(e.trained_tokens for e in batch)
    torch.testing.assert_close(packed, sum(s for s, _ in alone), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_a_resumed_run_equals_an_uninterrupted_one(
    tiny_model: Path, examples: Any, tmp_path: Path, lora: dict[str, Any] | None
) -> None:
    """Killed after step 6 (its last checkpoint at 4), resumed from step 4: steps 5.. are
    redone with exactly the losses of a run that never stopped, and the final weights match."""
    train_set, valid_set = examples
    plan = _plan(tiny_model, lora=lora)
    whole = Recorder()
    train.train(plan, train_set, valid_set, tmp_path / "whole", whole)
    total = train.total_steps(plan, len(train_set))
    assert sorted(whole.steps) == list(range(1, total + 1)) and whole.saved[-1][0] == total

    killed = Recorder(die_after=6)
    with pytest.raises(KeyboardInterrupt):
        train.train(plan, train_set, valid_set, tmp_path / "parts", killed)
    last_step, last = killed.saved[-1]
    assert last_step == 4
    resumed = Recorder()
    train.train(plan, train_set, valid_set, tmp_path / "parts", resumed, resume=last)
    assert sorted(resumed.steps) == list(range(5, total + 1))
    for step, loss in resumed.steps.items():
        assert loss == pytest.approx(whole.steps[step], rel=1e-5, abs=1e-6), step
    ours = torch.load(resumed.saved[-1][1] / "trainable.pt", weights_only=True)
    theirs = torch.load(whole.saved[-1][1] / "trainable.pt", weights_only=True)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5)


def test_merged_lora_answers_as_base_plus_adapter(
    tiny_model: Path, examples: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from deepflow.engine import LLM, SamplingParams

    train_set, valid_set = examples
    recorder = Recorder()
    train.train(_plan(tiny_model, epochs=1), train_set, valid_set, tmp_path / "ck", recorder)
    checkpoint = recorder.saved[-1][1]
    spec = {"method": {"supervised": {"lora": LORA}}, "seed": 3}
    merged = tmp_path / "merged"
    save_merged(spec, str(tiny_model), checkpoint, merged)

    adapted = train.load_model(tiny_model, LORA, 3).eval()
    train.load_trainable(adapted, checkpoint)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.tensor([valid_set[0].input_ids])
    with torch.no_grad():
        expected, got = adapted(input_ids=ids).logits, plain(input_ids=ids).logits
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # Our engine serves the merged folder: its greedy tokens are transformers' on it.
    prompt = valid_set[0].input_ids[:12]
    reference = plain.generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
    )[0, len(prompt) :].tolist()
    engine = LLM(str(merged), dtype="float32", device="cpu")
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)  # fmt: skip
    assert out[0].outputs[0].token_ids == reference
    assert not (merged.with_name("merged.partial")).exists()
    shutil.rmtree(merged)


def test_a_pause_saves_a_checkpoint_and_waits_for_resume(
    tiny_model: Path, examples: Any, tmp_path: Path
) -> None:
    recorder = Recorder(pause_at=3)
    plan = _plan(tiny_model, epochs=1)
    train.train(plan, examples[0], examples[1], tmp_path, recorder, wait_s=0.01)
    assert recorder.polls == 4  # paused, waited twice, then resumed
    assert [step for step, _ in recorder.saved] == [3, 4, 6]  # the pause's, then every 4th, last
    assert sorted(recorder.steps) == list(range(1, 7))


@pytest.mark.parametrize(("trained", "served"), [(2.0, 2.0), (2.5, 2.0), (None, 2.0)])
def test_a_pipeline_promotes_nothing_that_is_not_better(
    trained: float | None, served: float
) -> None:
    """Equal or worse held-out loss (or none): no version, no rollout, and no store read."""
    from deepflow.finetune.operators import BODIES

    scores = {"base_valid_loss": served, "valid_loss": trained}
    args = {"job": {"model": "m"}, "context": {"upstream": {"evaluate": scores}}}
    assert BODIES["promote"](args) == {**scores, "promoted": False}

"""Training examples as the model sees them: a conversation rendered with the base model's chat
template, tokenized, with a loss target only on the assistant's tokens.

Targets are already shifted (``targets[t]`` is the token that should follow ``input_ids[t]``,
-100 where no loss is taken), so examples concatenate into one packed row with no target
crossing from one example into the next. Imports no torch: the API checks a file with it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepflow.engine.tokenizer import Tokenizer
from deepflow.files import InvalidFile

IGNORE = -100
"""The target of a token that carries no loss (PyTorch's cross-entropy ``ignore_index``)."""


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: list[int]
    targets: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def read_conversations(path: Path) -> list[tuple[int, list[dict[str, Any]]]]:
    """(line number, messages) of every non-blank line of a fine-tune JSONL file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                out.append((number, json.loads(line)["messages"]))
    return out


def _assistant_spans(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list]:
    """The rendered conversation and the character spans of its assistant turns (their end
    markers included: the model learns to stop)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"the chat template does not render messages[{i}] as a continuation of the "
                "messages before it, so its tokens cannot be told apart"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> Example:
    text, spans = _assistant_spans(tokenizer, messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    learn = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    targets = [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets)


def encode_file(tokenizer: Tokenizer, path: Path, max_seq_len: int) -> list[Example]:
    """Every example of the file; InvalidFile naming the first line that cannot train."""
    examples = []
    for number, messages in read_conversations(path):
        try:
            example = encode(tokenizer, messages)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidFile(f"line {number}: {exc}") from None
        if len(example.input_ids) > max_seq_len:
            raise InvalidFile(
                f"line {number}: {len(example.input_ids)} tokens, longer than the context "
                f"({max_seq_len} tokens)"
            )
        if not example.trained_tokens:
            raise InvalidFile(f"line {number}: no assistant tokens to learn from")
        examples.append(example)
    return examples


def hold_out(examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """Without a validation file: a tenth of the examples (at least one, when there are two
    or more), chosen by ``seed``, are held out to measure the loss on."""
    if len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, len(examples) // 10)])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def save(path: Path, train: list[Example], valid: list[Example]) -> None:
    partial = path.with_name(path.name + ".partial")
    rows = {
        name: [[e.input_ids, e.targets] for e in part]
        for name, part in (("train", train), ("valid", valid))
    }
    partial.write_text(json.dumps(rows))
    partial.rename(path)


def load(path: Path) -> tuple[list[Example], list[Example]]:
    rows = json.loads(path.read_text())
    train, valid = ([Example(i, t) for i, t in rows[name]] for name in ("train", "valid"))
    return train, valid

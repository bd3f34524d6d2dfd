"""tokenizer.py: round trips, special tokens and chat templates, against transformers' tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deepflow.engine.testmodel import train_tokenizer
from deepflow.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The fishing boats came in a little after six.",
    "def f(x: int) -> int:\n    return x * 2  # doubled\n\n",
    "   leading spaces, 1234567 digits,\ttabs and trailing space ",
    "café, naïve, Zürich, ½ cup, 21 °C, α β γ, 漢字, emoji 🙂",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of Westmarch?"},
    {"role": "assistant", "content": "It has none; it is a small town."},
    {"role": "user", "content": "Then where is the market?"},
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny_model_dirs: dict[str, Path], arch: str, text: str) -> None:
    tok = Tokenizer.from_folder(tiny_model_dirs[arch])
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_transformers(tiny_model_dirs: dict[str, Path], arch: str) -> None:
    folder = tiny_model_dirs[arch]
    ours, ref = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids
        assert (
            ours.encode(text, add_special_tokens=False)
            == ref(text, add_special_tokens=False).input_ids
        )
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_ids[0] == ref.eos_token_id


def test_special_tokens(tiny_llama: Path, tiny_qwen2: Path) -> None:
    llama = Tokenizer.from_folder(tiny_llama)
    assert llama.vocab_size == 512
    assert llama.encode("hi")[0] == llama.bos_token_id == 0  # a BOS is added
    assert llama.encode("hi", add_special_tokens=False)[0] != llama.bos_token_id
    eos = [llama.id_to_token(i) for i in llama.eos_token_ids]
    assert eos == ["<|end_of_text|>", "<|eot_id|>"]  # the chat turn end stops generation too
    assert llama.decode([llama.bos_token_id, *llama.encode("hi", False), 1]) == "hi"
    qwen = Tokenizer.from_folder(tiny_qwen2)
    assert qwen.bos_token_id is None
    assert qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)
    assert [qwen.id_to_token(i) for i in qwen.eos_token_ids] == ["<|im_end|>", "<|endoftext|>"]
    assert qwen.pad_token_id is not None and qwen.id_to_token(qwen.pad_token_id) == "<|endoftext|>"


def test_ids_past_the_tokenizer_vocab_decode_to_nothing(tiny_llama: Path) -> None:
    """A padded model vocab (the 1b model's) can sample ids the tokenizer lacks."""
    tok = Tokenizer.from_folder(tiny_llama)
    ids = tok.encode("boats", add_special_tokens=False)
    assert tok.decode([*ids, 31999]) == "boats"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tiny_model_dirs: dict[str, Path], arch: str, add_generation_prompt: bool
) -> None:
    folder = tiny_model_dirs[arch]
    ours, ref = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for messages in (MESSAGES, MESSAGES[1:2]):
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        expected = ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert text == expected


def test_chat_template_shapes(tiny_llama: Path, tiny_qwen2: Path) -> None:
    llama = Tokenizer.from_folder(tiny_llama).apply_chat_template(MESSAGES[1:2])
    assert llama == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is the capital of Westmarch?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    qwen = Tokenizer.from_folder(tiny_qwen2).apply_chat_template(MESSAGES[1:2])
    assert qwen == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of Westmarch?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tok = Tokenizer.from_folder(tiny_qwen2)
    ids = tok.encode(qwen, add_special_tokens=False)
    assert tok.id_to_token(ids[0]) == "<|im_start|>"  # special tokens are single ids


def test_template_from_list_and_jinja_file(tiny_qwen2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "t"
    shutil.copytree(tiny_qwen2, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"},
    ]
    config_path.write_text(json.dumps(config))
    assert (
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "a"}])
        == "[a]"
    )
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{{ messages | length }} message(s)")
    assert Tokenizer.from_folder(folder).apply_chat_template(MESSAGES) == "4 message(s)"
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_folder(folder).apply_chat_template(MESSAGES)


def test_1b_tokenizer_fits_its_vocab() -> None:
    tok = train_tokenizer("llama", 32000)
    assert 1000 < tok.get_vocab_size() <= 32000  # the corpus runs out of merges first


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)

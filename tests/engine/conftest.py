"""Shared fixtures for tests/engine (model side and scheduling side each add their own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tests.engine.triton_setup  # noqa: F401  (first: the kernels' mode is set at their import)
from deepflow.engine.block_manager import BlockManager
from deepflow.engine.config import EngineConfig
from deepflow.engine.device import Device
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.outputs import PENDING_TOKEN, PendingTokens, SampledBatch, SchedulerOutput
from deepflow.engine.sampler import Sampler
from deepflow.engine.sequence import Sequence

# ---- scheduling side: a byte-level fake tokenizer and a fake runner with a checked KV cache ----
FAKE_EOS = 256
FAKE_VOCAB = 300
# Multi-byte tokens after the 256 byte tokens and EOS: words, and characters split over bytes.
_FAKE_PIECES = [b"hello", b" world", b"ab", b"cd", "é".encode(), "€".encode(), b"\xe2\x82", b"\xac"]


class FakeTokenizer:
    """Byte-level like GPT-2's: token i < 256 is byte i, so a character can span tokens."""

    def __init__(self) -> None:
        self.eos_token_ids = [FAKE_EOS]
        self.bos_token_id = None
        self.vocab_size = FAKE_VOCAB

    def piece(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        if token_id == FAKE_EOS:
            return b"" if skip_special_tokens else b"<eos>"
        index = token_id - FAKE_EOS - 1
        return _FAKE_PIECES[index] if index < len(_FAKE_PIECES) else b""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data, ids = text.encode(), []
        while data:
            for i, piece in enumerate(_FAKE_PIECES[:6]):
                if data.startswith(piece):
                    ids.append(FAKE_EOS + 1 + i)
                    data = data[len(piece) :]
                    break
            else:
                ids.append(data[0])
                data = data[1:]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(self.piece(i, skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="replace")

    def token(self, piece: str | bytes) -> int:
        piece = piece.encode() if isinstance(piece, str) else piece
        return FAKE_EOS + 1 + _FAKE_PIECES.index(piece)


class FakeRunner:
    """A Runner (deepflow.engine.runner) on the CPU: keeps (position, token) per KV slot and,
    before giving logits, checks that the cache seen through the block table holds exactly the
    sequence's tokens (with a token still pending from the step before filled in, as the real
    runner feeds it). Logits: seeded noise plus a bump on ``favour(context)``, so greedy
    decoding is predictable; the real Sampler samples them."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int = 512) -> None:
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.vocab_size = FAKE_VOCAB
        self.device = Device("cpu")
        self.sampler = Sampler()
        self.logits = torch.empty(0, FAKE_VOCAB)
        self.kv: list[list[tuple[int, int] | None]] = [[None] * block_size] * num_blocks
        self.kv = [list(block) for block in self.kv]
        self.block_manager: BlockManager | None = None
        self.steps: list[list[tuple[int, int, int]]] = []
        """Per step: (seq_id, start, num_tokens) of each chunk."""
        self.copies: list[tuple[int, int]] = []
        self.favour = lambda ids: 97 + (sum(ids) * 7 + len(ids)) % 26  # a..z

    def logits_for(self, ids: list[int]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash(tuple(ids)) & 0x7FFFFFFF)
        row = torch.randn(FAKE_VOCAB, generator=gen)
        row[self.favour(ids)] += 8.0
        return row

    def execute(self, batch: SchedulerOutput, pending: PendingTokens | None = None) -> None:
        bs = self.block_size
        for src, dst in batch.block_copies:
            self.kv[dst] = list(self.kv[src])
            self.copies.append((src, dst))
        self.steps.append([(c.seq.seq_id, c.start, c.num_tokens) for c in batch.chunks])
        rows = []
        for chunk in batch.chunks:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            ids = list(seq.token_ids[:end])
            if ids[-1] == PENDING_TOKEN:
                assert pending is not None, "a pending token without the pending samples"
                ids[-1] = int(pending.tokens[pending.rows[seq.seq_id]])
            for p in range(chunk.start, end):
                block = seq.block_table[p // bs]
                if self.block_manager is not None:
                    assert self.block_manager.ref_count(block) == 1, "write into a shared block"
                self.kv[block][p % bs] = (p, ids[p])
            if chunk.needs_logits:
                seen = [self.kv[seq.block_table[p // bs]][p % bs] for p in range(end)]
                assert seen == list(enumerate(ids)), "KV cache corrupted"
                rows.append(self.logits_for(ids))
        self.logits = torch.stack(rows) if rows else torch.empty(0, FAKE_VOCAB)

    def sample(
        self, seqs: list[Sequence], eos_token_ids: list[int], rows: list[int] | None = None
    ) -> SampledBatch:
        return self.sampler.sample(self.logits, seqs, eos_token_ids, rows)


def assert_blocks_ok(engine: LLMEngine) -> None:
    """Exact accounting: refcounts match the live block tables; with nothing live, every block
    is free or cached-free and none leaked."""
    scheduler = engine.scheduler
    live = scheduler.running + scheduler.waiting
    bm = scheduler.block_manager
    bm.check(live)
    if not engine.has_unfinished_requests():
        assert not live
        assert bm.num_used_blocks == 0
        assert bm.num_free_blocks + bm.num_cached_free == bm.num_blocks


@pytest.fixture
def fake_tokenizer() -> FakeTokenizer:
    return FakeTokenizer()


@pytest.fixture
def make_fake_engine():
    """make_fake_engine(num_blocks=64, block_size=4, max_model_len=512, **EngineConfig fields)
    -> an LLMEngine on FakeRunner/FakeTokenizer; block accounting is checked at teardown."""
    engines: list[LLMEngine] = []

    def make(num_blocks: int = 64, block_size: int = 4, max_model_len: int = 512, **kwargs):
        runner = FakeRunner(num_blocks, block_size, max_model_len)
        config = EngineConfig(
            model="fake", block_size=block_size, num_kv_blocks=num_blocks, **kwargs
        )
        engine = LLMEngine(config, model_runner=runner, tokenizer=FakeTokenizer())
        runner.block_manager = engine.scheduler.block_manager
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_blocks_ok(engine)


@pytest.fixture
def check_blocks():
    """check_blocks(engine): the exact block accounting assertion, for use mid-test."""
    return assert_blocks_ok


# ---- model side: tiny random-weight models (real tokenizers), built once per session ----------
@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"llama": folder, "qwen2": folder}: tiny test models, two safetensors shards each."""
    from deepflow.engine.testmodel import make_test_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_test_model(root / arch, arch, "tiny") for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["qwen2"]


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(folder) -> transformers' own CausalLM for the folder, float32, eval; cached."""
    cache: dict[Path, Any] = {}

    def load(folder: Path) -> Any:
        if folder not in cache:
            transformers = pytest.importorskip("transformers")
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            cache[folder] = model.eval()
        return cache[folder]

    return load


@pytest.fixture
def torch_one_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a shared 2-core
    machine a busy second core stalls every op (seen: 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

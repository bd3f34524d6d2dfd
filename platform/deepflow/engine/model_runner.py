"""`ModelRunner`: owns the model and its paged KV cache, runs one scheduled step and samples it.

The step's chunks (prefill chunks and decodes, any mix) become one flat batch of new tokens,
with each token's cache slot and each chunk's block table; the model writes the new K/V into
the cache and attends over it. On CUDA the layers run the fused Triton kernels
(`kernel_backend`) and pure decode steps replay captured graphs (deepflow.engine.decode_graphs,
off with `enforce_eager`); elsewhere the torch reference layers run eagerly. Startup profiles a
worst-case step before sizing the KV cache, which also compiles the kernels. Under tensor
parallelism one ModelRunner runs per rank, given its `tp` group, and holds that rank's shard of
the weights and of the KV heads (deepflow.engine.parallel.runner drives them).

It implements the engine's `Runner` protocol (runner.py): `execute` keeps the step's logits on
the device and `sample` draws from them, serving a decode graph's own greedy samples where
they are the answer (every row plain greedy, one row per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from deepflow.engine import kernels
from deepflow.engine.config import EngineConfig
from deepflow.engine.decode_graphs import DecodeGraphs, GreedySamples
from deepflow.engine.device import Device
from deepflow.engine.kernels.metadata import build_fast_metadata
from deepflow.engine.layers.attention import AttentionMetadata
from deepflow.engine.loader import load_weights
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.models.decoder import DecoderForCausalLM
from deepflow.engine.outputs import (
    PENDING_TOKEN,
    PendingTokens,
    SampledBatch,
    ScheduledChunk,
    SchedulerOutput,
    StepSequence,
)
from deepflow.engine.parallel.group import TPGroup
from deepflow.engine.sampler import Sampler, plain_greedy
from deepflow.engine.sequence import Sequence

Chunks = Seq[ScheduledChunk[StepSequence]]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup | None = None) -> None:
        self.tp = tp or TPGroup()
        if config.tensor_parallel_size != self.tp.size:
            raise ValueError(
                f"tensor_parallel_size={config.tensor_parallel_size} needs one ModelRunner per "
                "rank: build deepflow.engine.parallel.runner.make_runner(config)"
            )
        self.config = config
        self.device: Device = self.tp.device(config.device)
        self.device.set_current()
        self.model_config = ModelConfig.from_folder(config.model)
        self.dtype = self._pick_dtype()
        self.max_model_len = self.model_config.max_model_len(config.max_model_len)
        self.block_size = config.block_size
        self.model = self._load_model()
        self.backend = self._pick_backend()
        self.activation_bytes = self._profile_step()
        self.num_blocks = self._count_blocks()
        self.kv_cache = self._allocate_cache()
        self.graphs = self._capture_graphs()
        self.sampler = Sampler(config.seed)
        self._no_logits = torch.empty(0, self.vocab_size, device=self.device.torch_device)
        self._logits = self._no_logits
        self._greedy: GreedySamples | None = None
        """The last step's greedy samples taken inside its decode graph, if it replayed one."""

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def _pick_dtype(self) -> torch.dtype:
        if self.config.dtype != "auto":
            return DTYPES[self.config.dtype]
        # Accelerators run the checkpoint's own precision; the CPU reference runs float32.
        return self.model_config.torch_dtype if self.device.is_accelerator else torch.float32

    def _load_model(self) -> DecoderForCausalLM:
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device.torch_device:
                model = DecoderForCausalLM(self.model_config, self.max_model_len, self.tp)
        finally:
            torch.set_default_dtype(default)
        load_weights(model, self.config.model)
        return model.eval().requires_grad_(False)

    def _pick_backend(self) -> str:
        if self.config.kernel_backend != "auto":
            return self.config.kernel_backend
        return self.device.kernel_backend

    @torch.inference_mode()
    def _profile_step(self) -> int:
        """Peak bytes of activations of the largest eager step, measured by running one on a
        scratch cache (on an accelerator; the CPU's budget is fixed). Compiles the kernels."""
        if not self.device.is_accelerator:
            return 0
        from deepflow.engine.sampling_params import SamplingParams

        bs, budget = self.block_size, self.config.max_num_batched_tokens
        decodes = max(0, min(self.config.max_num_seqs - 1, budget // 2, 32))
        length = max(1, min(budget - decodes, self.max_model_len))
        blocks = [-(-length // bs)] + [1] * decodes
        chunks, first = [], 0
        for i, count in enumerate(blocks):
            n = length if i == 0 else 1
            seq = Sequence(i, "profile", [0] * n, SamplingParams())
            seq.block_table = list(range(first, first + count))
            chunks.append(ScheduledChunk(seq, n))
            first += count
        self.device.synchronize()
        self.device.empty_cache()
        before = self.device.memory_allocated()
        self.device.reset_peak_memory_stats()
        scratch = self._cache_tensor(first)
        self._attach_cache(scratch)
        logits = self._run_eager(chunks, None)
        # The sampler's worst case: a few float32 copies of max_num_seqs rows of logits.
        del logits
        self.device.synchronize()
        peak = self.device.max_memory_allocated() - before - scratch.numel() * scratch.itemsize
        del scratch
        self._attach_cache(torch.empty(2, self.model_config.num_layers, 0))
        self.device.empty_cache()
        sampler = 4 * self.config.max_num_seqs * self.model_config.vocab_size * 4
        return max(peak, 0) + sampler

    def _capture_graphs(self) -> DecodeGraphs | None:
        if (
            self.config.enforce_eager
            or self.backend != "triton"
            or not self.device.supports_graphs
            or self.tp.size > 1
        ):
            return None
        largest = self.config.max_graph_batch_size or min(self.config.max_num_seqs, 512)
        return DecodeGraphs(self.model, self.device, largest, self.block_size, self.max_model_len)

    @property
    def bytes_per_block(self) -> int:
        cfg = self.model_config
        per_token = self.model.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        return 2 * cfg.num_layers * self.block_size * per_token

    def _count_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.is_accelerator:
            self.device.synchronize()
            self.device.empty_cache()
            free, _ = self.device.mem_get_info()
            free = max(free - self.activation_bytes, 0)
            budget = int(free * self.config.kv_cache_memory_fraction)
        else:
            budget = self.config.kv_cache_bytes
        blocks = budget // self.bytes_per_block
        if blocks < 1:
            raise RuntimeError(
                f"the KV cache budget ({budget} bytes) is less than one block "
                f"({self.bytes_per_block} bytes)"
            )
        return blocks

    def _allocate_cache(self) -> torch.Tensor:
        """[2 (K, V), layers, blocks, block_size, kv_heads, head_dim], zeroed.

        Zeroed so that the padding slots a batched read masks out hold finite numbers.
        """
        cache = self._cache_tensor(self.num_blocks)
        self._attach_cache(cache)
        return cache

    def _cache_tensor(self, num_blocks: int) -> torch.Tensor:
        cfg = self.model_config
        shape = (
            2,
            cfg.num_layers,
            num_blocks,
            self.block_size,
            self.model.num_kv_heads,
            cfg.head_dim,
        )
        return torch.zeros(shape, dtype=self.dtype, device=self.device.torch_device)

    def _attach_cache(self, cache: torch.Tensor) -> None:
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = cache[0, i], cache[1, i]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: each dst block of every layer gets its src block's K and V."""
        if not copies:
            return
        src, dst = self.to_device([s for s, _ in copies] + [d for _, d in copies]).chunk(2)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def to_device(self, values: list[int] | torch.Tensor) -> torch.Tensor:
        """int64 values on the device, through pinned memory without waiting for the device
        (a pageable copy would wait for every step queued before it)."""
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values)
        tensor = tensor.to(torch.int64)
        if self.device.is_accelerator:
            return tensor.pin_memory().to(self.device.torch_device, non_blocking=True)
        return tensor

    def prepare(
        self, chunks: Chunks, pending: PendingTokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input ids, positions, attention metadata, rows that need logits) for one step.
        A sequence's last token may still be on the device (PENDING_TOKEN): `pending` has it."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        starts, lens, logit_rows, fill_dst, fill_src = [], [], [], [], []
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            end = start + n
            if end > self.max_model_len:
                raise ValueError(f"sequence {seq.seq_id} reaches {end} tokens > max_model_len")
            table = seq.block_table[: (end + bs - 1) // bs]
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            tables.append(table)
            starts.append(start)
            lens.append(n)
            if chunk.needs_logits:
                logit_rows.append(len(ids) - 1)
                if ids[-1] == PENDING_TOKEN:
                    if pending is None:
                        raise RuntimeError(f"sequence {seq.seq_id} feeds a token not sampled yet")
                    ids[-1] = 0
                    fill_dst.append(len(ids) - 1)
                    fill_src.append(pending.rows[seq.seq_id])
        width = max(len(t) for t in tables)
        padded = [b for t in tables for b in t + [0] * (width - len(t))]
        parts = [ids, positions, slots, logit_rows, fill_dst, fill_src, padded]
        staged = self.to_device([v for part in parts for v in part]).split([len(p) for p in parts])
        input_ids, positions_t, slot_mapping, rows, dst, src, table_t = staged
        if fill_dst:
            assert pending is not None
            input_ids.index_copy_(0, dst, pending.tokens[src])
        meta = AttentionMetadata(slot_mapping, table_t.view(len(tables), width), starts, lens)
        if self.backend == "triton":
            meta.fast = build_fast_metadata(starts, lens, tables, slots, self.to_device)
        return input_ids, positions_t, meta, rows

    @torch.inference_mode()
    def execute(
        self, batch: SchedulerOutput[StepSequence], pending: PendingTokens | None = None
    ) -> None:
        """Queue the step's forward pass; its float32 logits [chunks that need them, vocab], in
        chunk order, stay on the device (`logits`) for sample(), until the next execute().
        `pending`: the previous step's sampled tokens, for sequences whose last token is
        PENDING_TOKEN (the engine schedules a step before the one before it has finished)."""
        # Let the last step's logits go before this step allocates its own (a view of them
        # would keep the whole [rows, vocab] tensor alive).
        self._greedy, self._logits = None, self._no_logits
        self.copy_blocks(batch.block_copies)
        if not batch.chunks:
            return
        if self.graphs is not None and self.graphs.fits(batch.chunks):
            self._logits, self._greedy = self.graphs.run(batch.chunks, pending)
        else:
            self._logits = self._run_eager(batch.chunks, pending)

    @property
    def logits(self) -> torch.Tensor:
        """The last step's logits (a decode graph's own buffer: read before the next step)."""
        return self._logits

    def sample(
        self, seqs: list[Sequence], eos_token_ids: list[int], rows: list[int] | None = None
    ) -> SampledBatch:
        """The Runner protocol's sample (runner.py). The decode graph sampled its rows greedily
        with the sampler's own kernel: where that is the answer, its samples are the step's."""
        greedy, self._greedy = self._greedy, None
        if (
            greedy is not None
            and (rows is None and greedy.n == len(seqs))  # one row per sequence, in order
            and all(plain_greedy(s) for s in seqs)
        ):
            return greedy.sampled()
        return self.sampler.sample(self._logits, seqs, eos_token_ids, rows)

    def _run_eager(self, chunks: Chunks, pending: PendingTokens | None) -> torch.Tensor:
        prepared = self.prepare(chunks) if pending is None else self.prepare(chunks, pending)
        input_ids, positions, meta, logit_rows = prepared
        with kernels.use_backend(self.backend):
            hidden = self.model(input_ids, positions, meta)
            return self.model.compute_logits(hidden[logit_rows]).float()

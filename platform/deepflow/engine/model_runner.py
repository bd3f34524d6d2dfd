"""`ModelRunner`: owns the model and its paged KV cache, and runs one scheduled step.

The step's chunks (prefill chunks and decodes, any mix) become one flat batch of new tokens,
with each token's cache slot and each chunk's block table; the model writes the new K/V into
the cache and attends over it. Graph capture will slot in behind `enforce_eager`: today every
step runs eagerly (enforce_eager=False is accepted and changes nothing yet). Under tensor
parallelism one ModelRunner runs per rank, given its `tp` group, and holds that rank's shard of
the weights and of the KV heads (deepflow.engine.parallel.runner drives them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from deepflow.engine.config import EngineConfig
from deepflow.engine.device import Device
from deepflow.engine.layers.attention import AttentionMetadata
from deepflow.engine.loader import load_weights
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.models.decoder import DecoderForCausalLM
from deepflow.engine.parallel.group import TPGroup

if TYPE_CHECKING:
    from deepflow.engine.scheduler import ScheduledChunk, SchedulerOutput

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
        self.num_blocks = self._count_blocks()
        self.kv_cache = self._allocate_cache()

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
        cfg = self.model_config
        shape = (
            2,
            cfg.num_layers,
            self.num_blocks,
            self.block_size,
            self.model.num_kv_heads,
            cfg.head_dim,
        )
        cache = torch.zeros(shape, dtype=self.dtype, device=self.device.torch_device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = cache[0, i], cache[1, i]
        return cache

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: each dst block of every layer gets its src block's K and V."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device.torch_device)
        dst = torch.tensor([d for _, d in copies], device=self.device.torch_device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _to_device(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.int64)
        if self.device.is_accelerator:
            return tensor.pin_memory().to(self.device.torch_device, non_blocking=True)
        return tensor

    def prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input ids, positions, attention metadata, rows that need logits) for one step."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        starts, lens, logit_rows = [], [], []
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
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            block_tables=self._to_device(padded),
            chunk_starts=starts,
            chunk_lens=lens,
        )
        return self._to_device(ids), self._to_device(positions), meta, self._to_device(logit_rows)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> torch.Tensor:
        """float32 logits [chunks that need them, vocab], in chunk order, on the device."""
        self.copy_blocks(batch.block_copies)
        if not batch.chunks:
            return torch.empty(0, self.model_config.vocab_size, device=self.device.torch_device)
        input_ids, positions, meta, logit_rows = self.prepare(batch.chunks)
        hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[logit_rows]).float()

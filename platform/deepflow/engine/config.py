"""Engine configuration: one slotted dataclass, validated on construction and passed whole."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class EngineConfig:
    model: str
    """A Hugging Face model folder (config.json, *.safetensors, tokenizer files)."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (the model's dtype on an accelerator, float32 on CPU)."""
    device: str | None = None
    """None picks npu, then cuda, then cpu (deepflow.engine.device)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory_fraction: float = 0.9
    """On an accelerator: the fraction of free device memory the KV cache may take after loading."""
    kv_cache_bytes: int = 256 * 1024**2
    """On the CPU: the KV cache's byte budget."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks; overrides both budgets (tests use it to force preemption)."""
    max_num_seqs: int = 256
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Per-step token budget shared by prefill chunks and decodes."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the model's max_position_embeddings."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    enforce_eager: bool = False
    """No graph capture. Otherwise decode steps on an accelerator running the Triton kernels
    replay graphs captured for a ladder of batch sizes (the CPU always runs eagerly)."""
    kernel_backend: str = "auto"
    """auto | torch | triton: the fused Triton kernels or the torch reference layers; auto takes
    the device's choice (triton on CUDA when it imports, torch elsewhere)."""
    async_scheduling: bool | None = None
    """Schedule and prepare step N+1 while the device runs step N (sampled tokens come back
    one step late). None: on for accelerators, off on the CPU, where there is nothing to hide."""
    max_graph_batch_size: int | None = None
    """Largest decode batch replayed from a graph; None takes max_num_seqs (at most 512)."""
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16: {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be at least 1")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend must be auto, torch or triton: {self.kernel_backend}")
        if self.max_graph_batch_size is not None and self.max_graph_batch_size < 1:
            raise ValueError("max_graph_batch_size must be at least 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")

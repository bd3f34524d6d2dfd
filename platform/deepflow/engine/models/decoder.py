"""One decoder-only transformer for the Llama, Mistral and Qwen2 families.

The families differ only in what config.json says: GQA head counts, RoPE scaling, biases on
q/k/v (Qwen2) and tied embeddings. Module names follow the checkpoints', so
`checkpoint_tensors()` can map every stored tensor to the parameter (slice) it fills.

Under tensor parallelism (`tp`) each rank builds its shard: its query and KV heads (column-
parallel q/k/v), its columns of o_proj (row-parallel, summed over ranks), its slice of the MLP's
intermediate size likewise, and its rows of the vocabulary; norms and RoPE are replicated.

Precision (the same on the reference layers and the Triton kernels): weights, GEMM inputs and
outputs, the KV cache and attention's operands are in the model's dtype; the residual stream,
RMSNorm, RoPE (float32 cos/sin), SiLU * up, attention scores and softmax, and the logits are
float32, each rounded once where a GEMM or the cache reads it. On the 1b test model in bf16
this took the fast path's logits from 2.97e-2 to 1.92e-2 relative error against the reference
(bench/precision_ablation.py; BENCHMARKS.md, "FlowServe on the accelerator").
"""

from __future__ import annotations

import re

import torch
from torch import nn

from deepflow.engine.layers.activation import SiluAndMul
from deepflow.engine.layers.attention import Attention, AttentionMetadata
from deepflow.engine.layers.embedding import LMHead, VocabEmbedding
from deepflow.engine.layers.linear import MergedLinear, RowParallelLinear, gate_up_silu_and_mul
from deepflow.engine.layers.norm import RMSNorm
from deepflow.engine.layers.rotary import RotaryEmbedding, apply_rotary
from deepflow.engine.loader import Target
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.parallel.group import TPGroup

# Checkpoint tensors that carry nothing the decoder needs: cached RoPE tables some exporters save.
HARMLESS_EXTRAS = re.compile(r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        tp = tp or TPGroup()
        heads = tp.even(cfg.num_heads, "num_attention_heads")
        kv_heads = tp.kv_heads(cfg.num_kv_heads)
        self.heads, self.kv_heads, self.head_dim = heads.size, kv_heads.size, cfg.head_dim
        q_rows, kv_rows = heads.scaled(self.head_dim), kv_heads.scaled(self.head_dim)
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}, cfg.qkv_bias
        )
        self.o_proj = RowParallelLinear(q_rows, cfg.hidden_size, cfg.o_bias, tp)
        self.attn = Attention(self.heads, self.kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = apply_rotary(q.view(-1, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(-1, self.kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.kv_heads, self.head_dim)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        tp = tp or TPGroup()
        inter = tp.even(cfg.intermediate_size, "intermediate_size")
        self.gate_up_proj = MergedLinear(
            cfg.hidden_size, {"gate_proj": inter, "up_proj": inter}, cfg.mlp_bias
        )
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = gate_up_silu_and_mul(x, self.gate_up_proj)  # one GEMV launch for a few rows
        if fused is not None:
            return self.down_proj(fused)
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        tp = tp or TPGroup()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: the stream starts as the embedding, in float32
            residual, x = x.float(), self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_model_len: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        tp = tp or TPGroup()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_scaling,
            cfg.max_position_embeddings,
            max_model_len,
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, torch.float32)  # RoPE is computed in float32
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, meta)
        x, _ = self.norm(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_model_len: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp or TPGroup()
        self.model = DecoderModel(cfg, max_model_len, self.tp)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tied, self.tp)
        self.num_kv_heads = self.tp.kv_heads(cfg.num_kv_heads).size
        """KV heads on this rank: what its cache holds."""

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Final hidden states [tokens, hidden] for the flat batch of new tokens."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits (the head's GEMM reads the model's dtype, writes float32)."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def checkpoint_tensors(self) -> dict[str, Target]:
        """Every tensor name a checkpoint must hold -> where it (this rank's shard) goes."""
        expected: dict[str, Target] = {}
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            if isinstance(module, MergedLinear):
                expected |= module.checkpoint_targets(prefix.rpartition(".")[0] + ".")
            elif hasattr(module, "checkpoint_targets"):
                expected |= module.checkpoint_targets(dot)
            else:
                for kind, param in module.named_parameters(recurse=False):
                    expected[f"{dot}{kind}"] = Target(param, tuple(param.shape))
        return expected

    def ignores(self, name: str) -> bool:
        """True for a checkpoint tensor that is known to be safe to skip."""
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            return True  # a tied checkpoint may store the head too; it equals the embedding
        return HARMLESS_EXTRAS.match(name) is not None

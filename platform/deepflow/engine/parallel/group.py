"""The tensor-parallel group one rank belongs to: its rank, the world size and the collectives.

Layers call `all_reduce` and `all_gather` unconditionally; with one rank both return their input,
so the single-device path runs the same code and never touches torch.distributed. With several,
they use the default process group, which the runner and the workers initialise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepflow.engine.device import Device


@dataclass(frozen=True, slots=True)
class Split:
    """This rank's share [start, start + size) of a dimension of `total` entries."""

    total: int
    start: int
    size: int

    @classmethod
    def whole(cls, total: int) -> Split:
        return cls(total, 0, total)

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.size)

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.size == self.total

    def scaled(self, factor: int) -> Split:
        """The same share in finer units: heads to rows of head_dim each."""
        return Split(self.total * factor, self.start * factor, self.size * factor)


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.size}")

    def even(self, total: int, what: str) -> Split:
        """An equal share; `what` names the dimension in the error when it does not divide."""
        if total % self.size:
            raise ValueError(
                f"{what} ({total}) is not divisible by tensor_parallel_size ({self.size})"
            )
        per = total // self.size
        return Split(total, self.rank * per, per)

    def kv_heads(self, num_kv_heads: int) -> Split:
        """This rank's KV heads. With fewer KV heads than ranks each head is replicated on
        size / num_kv_heads consecutive ranks: exactly those whose query heads read it."""
        if num_kv_heads >= self.size:
            return self.even(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size ({self.size}) must be a multiple of num_key_value_heads "
                f"({num_kv_heads}) when it exceeds it"
            )
        return Split(num_kv_heads, self.rank * num_kv_heads // self.size, 1)

    def padded(self, total: int) -> tuple[Split, int]:
        """(share, rows per rank) for the vocabulary: ceil(total / size) rows on every rank, so
        shards gather into one tensor; the last rank's share stops at `total`."""
        per = -(-total // self.size)
        start = min(self.rank * per, total)
        return Split(total, start, min(per, total - start)), per

    def device(self, name: str | None) -> Device:
        """This rank's device: the configured one, its index shifted by the rank."""
        picked = Device.pick(name)
        if self.size == 1 or not picked.is_accelerator:
            return picked
        return Device(picked.type, (picked.index or 0) + self.rank)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)

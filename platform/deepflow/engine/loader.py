"""Streams safetensors checkpoints into a model's preallocated parameters.

First every shard's header is read (names and shapes only) and checked against what the model
expects, so a bad checkpoint fails before any copying, with one message that names each missing,
mis-shaped or unknown tensor and its file. Then tensors are read one at a time and copied into
their parameter (or its slice, for fused projections): the model never exists twice in memory.
Under tensor parallelism a rank reads only its shard of each tensor (safetensors slices lazily).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint does not hold exactly the tensors the model needs."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one checkpoint tensor goes: its `shard` (a slice along `dim`; None: all of it)
    is copied into `param[rows]` (None: the whole parameter)."""

    param: torch.Tensor
    shape: tuple[int, ...]
    """The tensor's full shape in the checkpoint."""
    rows: slice | None = None
    dim: int = 0
    shard: slice | None = None

    def read(self, f: Any, name: str) -> torch.Tensor:
        if self.shard is None:
            return f.get_tensor(name)
        return f.get_slice(name)[(slice(None),) * self.dim + (self.shard,)]

    @property
    def destination(self) -> torch.Tensor:
        return self.param.data if self.rows is None else self.param.data[self.rows]


class Loadable(Protocol):
    def checkpoint_tensors(self) -> dict[str, Target]: ...

    def ignores(self, name: str) -> bool: ...


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The shard files, from the index when there is one."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(
                f"{index} lists shard files that do not exist: {', '.join(absent)}"
            )
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    return files


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape) for every tensor in the shards, without reading any data."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in found:
                    raise CheckpointError(
                        f"tensor {name} appears in both {found[name][0].name} and {path.name}"
                    )
                found[name] = (path, tuple(f.get_slice(name).get_shape()))
    return found


def _index_mismatches(folder: Path, found: dict[str, tuple[Path, tuple[int, ...]]]) -> list[str]:
    index = folder / INDEX
    if not index.is_file():
        return []
    problems = []
    for name, file in json.loads(index.read_text())["weight_map"].items():
        if name not in found:
            problems.append(f"index puts {name} in {file}, which does not hold it")
        elif found[name][0].name != file:
            problems.append(f"index puts {name} in {file}, but it is in {found[name][0].name}")
    return problems


def check(model: Loadable, folder: Path, found: dict[str, tuple[Path, tuple[int, ...]]]) -> None:
    expected = model.checkpoint_tensors()
    problems = _index_mismatches(folder, found)
    for name, target in expected.items():
        want = target.shape
        if name not in found:
            problems.append(f"missing tensor {name} (expected shape {list(want)}) in {folder}")
        elif found[name][1] != want:
            path, got = found[name]
            problems.append(
                f"tensor {name} in {path.name} has shape {list(got)}, expected {list(want)}"
            )
    for name, (path, _) in found.items():
        if name not in expected and not model.ignores(name):
            problems.append(
                f"unexpected tensor {name} in {path.name}: the model has no such weight"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint {folder} does not match the model:\n  {shown}{more}")


@torch.no_grad()
def load_weights(model: Loadable, folder: str | Path) -> None:
    """Check, then stream every expected tensor from `folder` into the model."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    found = read_headers(files)
    check(model, folder, found)
    expected = model.checkpoint_tensors()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                if name not in expected:
                    continue
                target = expected[name]
                data, destination = target.read(f, name), target.destination
                if data.shape != destination.shape:  # a model-side bug, not a checkpoint one
                    raise RuntimeError(
                        f"{name}: read {list(data.shape)} for a destination of "
                        f"{list(destination.shape)}"
                    )
                destination.copy_(data)

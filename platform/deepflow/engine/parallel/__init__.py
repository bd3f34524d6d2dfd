"""Tensor parallelism: one process per device, each holding a slice of every layer.

`group` is what the layers see (rank, world size, collectives); `runner` is rank 0, the
engine's side; `worker` is every other rank; `step` is what travels between them each step.
Nothing here is imported eagerly, so the layers can use `group` without pulling in the runner.
"""

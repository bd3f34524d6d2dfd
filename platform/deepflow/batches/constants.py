"""The Batch API's limits and rhythms, with the reasons for each value."""

from __future__ import annotations

import os

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
"""What a batch may run: the endpoints the engine serves (``deepflow.files.BATCH_URLS``)."""

COMPLETION_WINDOWS = {"24h": 24 * 3600.0}
"""OpenAI offers one window; a batch not done within it ends ``expired``."""

LINES_PER_SHARD_ENV = "DEEPFLOW_BATCH_LINES_PER_SHARD"
LINES_PER_SHARD = 4096
"""A shard is one task: one worker loads the model once and runs its lines as one continuous
batch. Shards of a few thousand lines keep the engine's batch full (its ``max_num_seqs`` is
256 by default) while letting a big file spread over several workers; each shard pays one
model load."""

MAX_SHARDS = 256
"""``BatchSpec.num_shards``' ceiling: past it, shards grow instead."""

PROGRESS_EVERY = 64
"""A shard reports its counts after this many finished requests..."""
PROGRESS_EVERY_S = 0.5
"""...or this long after its last report, whichever comes first: ``request_counts`` moves
while a batch runs, at one small UPDATE per report."""

METADATA_KEYS = 16
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512
"""OpenAI's limits on a batch's ``metadata``."""


def lines_per_shard() -> int:
    """``LINES_PER_SHARD``, or the operator's choice in DEEPFLOW_BATCH_LINES_PER_SHARD."""
    value = os.environ.get(LINES_PER_SHARD_ENV)
    return max(int(value), 1) if value else LINES_PER_SHARD


def shard_count(records: int) -> int:
    """How many shards a file of ``records`` requests splits into (each at least one)."""
    wanted = -(-records // lines_per_shard())
    return max(1, min(wanted, MAX_SHARDS, records))

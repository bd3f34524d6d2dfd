"""Continuous batching: which sequences run how many tokens in the next step.

Each step spends a token budget: running decodes first, then the running prompts' next chunks,
then waiting sequences in (priority, arrival) order until the budget, the sequence limit or the
cache runs out. When a running sequence needs a block and none is left, the least important
running sequence (highest priority value, latest arrival) is preempted by recompute: its blocks
are freed and it waits again, ahead of everything that arrived after it. The most important
sequence therefore always progresses and everyone else becomes the most important in time.
"""

from __future__ import annotations

import bisect

from deepflow.engine.block_manager import BlockManager
from deepflow.engine.config import EngineConfig
from deepflow.engine.outputs import ScheduledChunk, SchedulerOutput
from deepflow.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, block_size: int) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        """Both kept sorted by Sequence.sort_key, most important first."""
        self.num_preemptions = 0
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.finishing: set[int] = set()
        """Sequences whose in-flight sample surely ends them (async scheduling): not scheduled."""
        self._budget = 0
        self._chunks: dict[int, ScheduledChunk[Sequence]] = {}
        self._copies: dict[int, list[tuple[int, int]]] = {}

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run ``child`` (made by parent.fork) on the parent's blocks."""
        self.block_manager.fork(parent, child)
        bisect.insort(self.running, child, key=lambda s: s.sort_key)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is (waiting, running, preempted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self.finishing.discard(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput[Sequence]:
        self._budget = self.max_num_batched_tokens
        self._chunks, self._copies = {}, {}
        decodes = [
            s
            for s in self.running
            if s.num_uncomputed_tokens == 1 and s.seq_id not in self.finishing
        ]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is SequenceStatus.RUNNING:  # not preempted by an earlier one
                self._schedule_running(seq)
        self._admit_waiting()
        copies = [c for seq_id in self._chunks for c in self._copies.get(seq_id, [])]
        return SchedulerOutput(list(self._chunks.values()), copies)

    def update(self, batch: SchedulerOutput[Sequence]) -> None:
        """The step ran: its tokens' K/V are in the cache."""
        for chunk in batch.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_blocks(chunk.seq)

    # ---- one step's decisions -----------------------------------------------------------
    def _schedule_running(self, seq: Sequence) -> None:
        num_tokens = min(seq.num_uncomputed_tokens, self._budget)
        if num_tokens == 0:
            return
        if num_tokens == 1 and self.block_manager.writable_in_place(seq):  # most decodes
            self._chunks[seq.seq_id] = ScheduledChunk(seq, 1)
            self._budget -= 1
            return
        if not self.enable_chunked_prefill and num_tokens < seq.num_uncomputed_tokens:
            return
        while not self.block_manager.can_append(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return
        self._add_chunk(seq, num_tokens)

    def _admit_waiting(self) -> None:
        bm = self.block_manager
        while self.waiting and self._budget > 0:
            seq = self.waiting[0]
            if len(self.running) + self._seats(seq) > self.max_num_seqs:
                return
            hits = bm.match_prefix(seq.token_ids)
            remaining = seq.num_tokens - len(hits) * bm.block_size
            num_tokens = min(remaining, self._budget)
            if not self.enable_chunked_prefill and num_tokens < remaining:
                if self._chunks:
                    return
                # Alone it may exceed the budget (a preempted sequence that grew past it).
                num_tokens = remaining
            end = len(hits) * bm.block_size + num_tokens
            if not bm.can_admit(hits, end) and not self._make_room(seq, hits, end):
                return
            self.waiting.pop(0)
            self.prefix_cache_queried_tokens += seq.num_tokens
            self.prefix_cache_hit_tokens += len(hits) * bm.block_size
            bm.admit(seq, hits)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            self._add_chunk(seq, num_tokens)

    def _make_room(self, seq: Sequence, hits: list[int], end: int) -> bool:
        """Preempt less important running sequences for a waiting one, if that is enough."""
        bm = self.block_manager
        victims = [s for s in reversed(self.running) if s.sort_key > seq.sort_key]
        hit_set = set(hits)
        reclaimable = sum(
            1 for v in victims for b in v.block_table if bm.ref_count(b) == 1 and b not in hit_set
        )
        revived = sum(1 for b in hits if bm.ref_count(b) == 0)
        needed = -(-end // bm.block_size) - len(hits) + revived
        if not victims or bm.num_allocatable + reclaimable < needed:
            return False
        for victim in victims:
            if bm.can_admit(hits, end):
                break
            self._preempt(victim)
        return bm.can_admit(hits, end)

    def _add_chunk(self, seq: Sequence, num_tokens: int) -> None:
        copies = self.block_manager.append_slots(seq, num_tokens)
        if copies:
            self._copies[seq.seq_id] = copies
        self._chunks[seq.seq_id] = ScheduledChunk(seq, num_tokens)
        self._budget -= num_tokens

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the blocks, undo this step's chunk, wait in arrival order."""
        chunk = self._chunks.pop(seq.seq_id, None)
        if chunk is not None:
            self._budget += chunk.num_tokens
        self._copies.pop(seq.seq_id, None)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        self.add(seq)
        self.num_preemptions += 1

    def _seats(self, seq: Sequence) -> int:
        """A prompt not yet forked into its n samples reserves a seat for each of them."""
        if seq.index == 0 and seq.num_output_tokens == 0:
            return seq.params.n
        return 1

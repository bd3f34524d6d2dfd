"""The paged KV cache's bookkeeping: which physical block holds which tokens, and who uses it.

A block is in exactly one of three states: used (ref_count > 0), cached-free (ref_count 0 but
holding a full block's tokens under its hash, reusable until its slot is needed, evicted least
recently freed first) or free. Only full blocks whose K/V are computed get a hash; the hash
chains the parent block's hash with this block's token ids, so a hit means the whole prefix
matches.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from deepflow.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(parent: int | None, token_ids: Iterable[int]) -> int:
    return hash((parent, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self.num_used_blocks = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Free blocks holding nothing worth keeping."""
        return len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Unused blocks kept for prefix hits; allocation takes them (LRU) once the free run out."""
        return len(self._cached_free)

    @property
    def num_allocatable(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def check(self, seqs: Iterable[Sequence] = ()) -> None:
        """Raise AssertionError unless every block is in exactly one state and, given every
        live sequence, each ref_count equals the number of block tables naming the block."""
        free, cached = set(self._free), set(self._cached_free)
        assert len(free) == len(self._free), "a block is free twice"
        assert not free & cached, "a block is both free and cached-free"
        used = {b.block_id for b in self.blocks if b.ref_count > 0}
        assert not used & (free | cached), "a used block is on a free list"
        assert len(used) == self.num_used_blocks
        assert len(used) + len(free) + len(cached) == self.num_blocks, "a block leaked"
        for block_id in cached:
            assert self.blocks[block_id].hash is not None, "a cached-free block has no hash"
        for h, block_id in self._hash_to_block.items():
            assert self.blocks[block_id].hash == h
        refs = [0] * self.num_blocks
        seqs = list(seqs)
        for seq in seqs:
            for block_id in seq.block_table:
                refs[block_id] += 1
        if seqs or self.num_used_blocks == 0:
            assert refs == [b.ref_count for b in self.blocks], "ref_count != block-table uses"

    # ---- prefix cache -----------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the prompt's leading full blocks. The block of the last token
        is never matched: at least one token must run to give logits, and it would write into
        a block others share."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = None
        for i in range((len(token_ids) - 1) // self.block_size):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            block_id = self._hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = h
        return hits

    def cache_blocks(self, seq: Sequence) -> None:
        """Hash the sequence's newly computed full blocks so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = seq.block_hashes[-1] if i else None
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            # Two sequences may compute the same prefix at once: the first one wins the hash.
            if block.hash is None and h not in self._hash_to_block:
                block.hash, block.token_ids = h, tokens
                self._hash_to_block[h] = block.block_id

    # ---- allocation -------------------------------------------------------------------------
    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a waiting sequence can take ``hits`` and blocks for ``num_tokens`` tokens."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new = -(-num_tokens // self.block_size) - len(hits)
        return new + revived <= self.num_allocatable

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a waiting sequence (holding no blocks) its prefix hits."""
        assert not seq.block_table
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.block_hashes = [self.blocks[b].hash for b in hits]  # type: ignore[misc]
        seq.num_computed_tokens = len(hits) * self.block_size

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks that writing the next ``num_tokens`` tokens would take (copy-on-write too)."""
        end = seq.num_computed_tokens + num_tokens
        new = max(0, -(-end // self.block_size) - len(seq.block_table))
        return new + self._shared_write_block(seq)

    def writable_in_place(self, seq: Sequence) -> bool:
        """The next token's slot is in a block the sequence holds alone: no block to take."""
        idx = seq.num_computed_tokens // self.block_size
        table = seq.block_table
        return idx < len(table) and self.blocks[table[idx]].ref_count == 1

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= self.num_allocatable

    def append_slots(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Make the block table cover the next ``num_tokens`` positions; return (src, dst) copies
        for a shared block about to be written (the runner copies before the step)."""
        copies = []
        if self._shared_write_block(seq):
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            dst = self._allocate()
            self.blocks[src].ref_count -= 1  # still > 0: another sequence holds it
            seq.block_table[idx] = dst
            copies.append((src, dst))
        end = seq.num_computed_tokens + num_tokens
        while len(seq.block_table) * self.block_size < end:
            seq.block_table.append(self._allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares all of the parent's blocks (its table is a copy of the parent's)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Tail blocks are released first so that LRU eviction
        takes a prefix's leaves before its root."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.num_used_blocks -= 1
                if block.hash is not None:
                    self._cached_free[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []

    def _shared_write_block(self, seq: Sequence) -> int:
        idx = seq.num_computed_tokens // self.block_size
        table = seq.block_table
        return int(idx < len(table) and self.blocks[table[idx]].ref_count > 1)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[block_id]
            self.num_used_blocks += 1
        block.ref_count += 1

    def _allocate(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)
            block = self.blocks[block_id]
            del self._hash_to_block[block.hash]  # type: ignore[arg-type]
            block.hash = block.token_ids = None
        self.blocks[block_id].ref_count = 1
        self.num_used_blocks += 1
        return block_id

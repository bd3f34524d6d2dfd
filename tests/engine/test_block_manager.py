from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from deepflow.engine.block_manager import BlockManager
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import Sequence

BS = 4


def make_seq(tokens, seq_id=0):
    return Sequence(seq_id, f"r{seq_id}", list(tokens), SamplingParams())


def compute(bm, seq, num_tokens=None):
    """Admit (with prefix hits) and 'run' the whole uncomputed tail, as one step would."""
    if not seq.block_table:
        bm.admit(seq, bm.match_prefix(seq.token_ids))
    num_tokens = seq.num_uncomputed_tokens if num_tokens is None else num_tokens
    copies = bm.append_slots(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.cache_blocks(seq)
    return copies


def test_allocate_and_free_account_exactly():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))
    compute(bm, seq)
    assert seq.block_table == [0, 1, 2]
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    bm.check([seq])
    bm.free(seq)
    # The two full blocks stay cached; the partial one is plainly free.
    assert bm.num_cached_free == 2 and bm.num_free_blocks == 6
    assert bm.num_free_blocks + bm.num_cached_free == bm.num_blocks
    bm.check()


def test_prefix_hit_reuses_full_blocks_and_never_the_last_token():
    bm = BlockManager(16, BS)
    a = make_seq(range(12), 0)
    compute(bm, a)
    # Same 12 tokens: 3 full blocks cached, but the last token's block is not matched.
    assert bm.match_prefix(list(range(12))) == a.block_table[:2]
    assert bm.match_prefix(list(range(13))) == a.block_table[:3]
    assert bm.match_prefix([*list(range(8)), 99, 100]) == a.block_table[:2]
    assert bm.match_prefix([0, 1, 2, 99, 4, 5, 6, 7, 8]) == []
    b = make_seq([*list(range(9)), 50, 51], 1)
    bm.admit(b, bm.match_prefix(b.token_ids))
    assert b.num_computed_tokens == 8 and b.block_table == a.block_table[:2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    bm.check([a, b])


def test_chained_hash_depends_on_the_whole_prefix():
    bm = BlockManager(16, BS)
    compute(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Second block's tokens equal, first block's differ: no hit at all.
    assert bm.match_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []


def test_freed_cached_block_is_reusable_until_its_slot_is_needed():
    bm = BlockManager(4, BS)
    a = make_seq(range(9), 0)  # blocks 0, 1 full, 2 partial
    compute(bm, a)
    bm.free(a)
    assert bm.num_cached_free == 2
    # Reuse: the hit revives a cached-free block.
    b = make_seq(range(9), 1)
    compute(bm, b)
    assert b.block_table[:2] == [0, 1]
    bm.free(b)
    # A different sequence needing all 4 blocks evicts the cached ones.
    c = make_seq(range(100, 116), 2)
    compute(bm, c)
    assert bm.num_cached_free == 0 and bm.match_prefix(list(range(9))) == []
    bm.check([c])


def test_eviction_is_lru_and_takes_leaves_first():
    bm = BlockManager(6, BS)
    a = make_seq(range(12), 0)  # 3 full blocks (the third is computed: 12 tokens)
    compute(bm, a)
    bm.free(a)
    b = make_seq(range(100, 104), 1)
    compute(bm, b)
    bm.free(b)
    # The 2 plain free blocks go first; then the oldest freed cached block: a's last block.
    c = make_seq(range(200, 212), 2)
    compute(bm, c)
    assert c.block_table == [4, 5, 2]
    assert bm.match_prefix([*list(range(12)), 7]) == [0, 1]
    assert bm.match_prefix([*list(range(100, 104)), 7]) == [3]


def test_fork_shares_blocks_and_copy_on_write_on_the_partial_block():
    bm = BlockManager(8, BS)
    parent = make_seq(range(6), 0)
    compute(bm, parent)
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    assert [bm.ref_count(b) for b in parent.block_table] == [2, 2]
    for seq, token in ((parent, 40), (child, 41)):
        seq.append_token(token)
    # The first writer copies the shared partial block; the last one writes in place.
    copies = bm.append_slots(parent, 1)
    assert copies == [(1, parent.block_table[1])] and parent.block_table[1] != 1
    assert bm.append_slots(child, 1) == []
    assert child.block_table == [0, 1]
    assert [bm.ref_count(b) for b in (0, 1, parent.block_table[1])] == [2, 1, 1]
    bm.check([parent, child])
    bm.free(parent)
    bm.free(child)
    bm.check()
    assert bm.num_used_blocks == 0


def test_no_copy_when_the_shared_prompt_ends_on_a_block_boundary():
    bm = BlockManager(8, BS)
    parent = make_seq(range(8), 0)
    compute(bm, parent)
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    parent.append_token(1)
    child.append_token(2)
    assert bm.append_slots(parent, 1) == [] and bm.append_slots(child, 1) == []
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]


def test_num_new_blocks_counts_copy_on_write_and_hits():
    bm = BlockManager(4, BS)
    parent = make_seq(range(6), 0)
    compute(bm, parent)
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    parent.append_token(9)
    assert bm.num_new_blocks(parent, 1) == 1  # the copy
    assert bm.num_new_blocks(parent, 3) == 2  # the copy and the next block
    assert bm.can_admit([], 8) and not bm.can_admit([], 9)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(12))
    compute(bm, a)
    bm.free(a)
    assert bm.match_prefix(list(range(12))) == [] and bm.num_cached_free == 0


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admits, chunked steps, forks, appends and frees keep the accounting exact, and a
    sequence's cache (as tokens written per block slot) always reads back its own tokens."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(12, BS)
        self.seqs: list[Sequence] = []
        self.kv: dict[int, list] = {b: [None] * BS for b in range(12)}
        self.next_id = 0

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
          tail=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def admit(self, prefix, tail):
        seq = make_seq(prefix + tail, self._new_id())
        hits = self.bm.match_prefix(seq.token_ids)
        if self.bm.can_admit(hits, len(hits) * BS + 1):
            self.bm.admit(seq, hits)
            self._run(seq, 1)
            self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(1, 6))
    def step(self, data, n):
        seq = data.draw(st.sampled_from(self.seqs))
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(data.draw(st.integers(0, 3)))
        n = min(n, seq.num_uncomputed_tokens)
        if self.bm.can_append(seq, n):
            self._run(seq, n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.seqs))
        child = parent.fork(self._new_id(), 1)
        self.bm.fork(parent, child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.seqs))
        self.bm.free(seq)
        self.seqs.remove(seq)

    def _run(self, seq, n):
        for src, dst in self.bm.append_slots(seq, n):
            self.kv[dst] = list(self.kv[src])
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_table[p // BS]
            assert self.bm.ref_count(block) == 1
            self.kv[block][p % BS] = seq.token_ids[p]
        seq.num_computed_tokens += n
        self.bm.cache_blocks(seq)

    @invariant()
    def accounting_is_exact(self):
        self.bm.check(self.seqs)

    @invariant()
    def caches_read_back(self):
        for seq in self.seqs:
            n = seq.num_computed_tokens
            seen = [self.kv[seq.block_table[p // BS]][p % BS] for p in range(n)]
            assert seen == seq.token_ids[:n]

    def teardown(self):
        for seq in self.seqs:
            self.bm.free(seq)
        self.bm.check()
        assert self.bm.num_free_blocks + self.bm.num_cached_free == self.bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.engine.config import EngineConfig
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import Scheduler
from deepflow.engine.sequence import Sequence, SequenceStatus

BS = 4


class Sim:
    """Drives a Scheduler the way LLMEngine does, with no model: every sampled token is 7."""

    def __init__(self, num_blocks=32, **kwargs):
        kwargs.setdefault("max_num_batched_tokens", 16)
        config = EngineConfig(model="none", block_size=BS, num_kv_blocks=num_blocks, **kwargs)
        self.s = Scheduler(config, num_blocks, BS)
        self.ids = itertools.count()
        self.max_tokens: dict[int, int] = {}
        self.finished: list[Sequence] = []

    def add(self, prompt_len, max_tokens=4, priority=0, tokens=None):
        i = next(self.ids)
        tokens = [1000 * i + k for k in range(prompt_len)] if tokens is None else tokens
        seq = Sequence(i, f"r{i}", tokens, SamplingParams(), priority, arrival=i)
        self.max_tokens[seq.seq_id] = max_tokens
        self.s.add(seq)
        return seq

    def step(self):
        out = self.s.schedule()
        self.spans = [(c.seq, c.start, c.num_tokens) for c in out.chunks]
        sampled = [c.seq for c in out.chunks if c.needs_logits]
        self.s.update(out)
        for seq in sampled:
            seq.append_token(7)
            if seq.num_output_tokens >= self.max_tokens[seq.seq_id]:
                self.s.finish(seq)
                self.finished.append(seq)
        self.check()
        return out

    def check(self):
        self.s.block_manager.check(self.s.running + self.s.waiting)

    def run(self, max_steps=1000):
        for _ in range(max_steps):
            if not self.s.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish")


def chunks(out):
    return [(c.seq.seq_id, c.num_tokens) for c in out.chunks]


def test_budget_is_shared_decodes_first_then_prefill_chunks():
    sim = Sim(max_num_batched_tokens=10)
    a = sim.add(6, max_tokens=10)
    assert chunks(sim.step()) == [(a.seq_id, 6)]
    b = sim.add(20)
    assert chunks(sim.step()) == [(a.seq_id, 1), (b.seq_id, 9)]
    c = sim.add(3)
    out = sim.step()
    assert chunks(out) == [(a.seq_id, 1), (b.seq_id, 9)] and out.num_tokens == 10
    assert chunks(sim.step()) == [(a.seq_id, 1), (b.seq_id, 2), (c.seq_id, 3)]
    # b's prefill ended last step: now three decodes.
    assert sorted(chunks(sim.step())) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 1)]


def test_max_num_seqs_caps_the_batch():
    sim = Sim(max_num_seqs=2)
    seqs = [sim.add(2) for _ in range(3)]
    assert [c.seq for c in sim.step().chunks] == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING
    sim.run()


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits():
    sim = Sim(max_num_batched_tokens=10, enable_chunked_prefill=False)
    a = sim.add(4, max_tokens=8)
    sim.step()
    b = sim.add(10)  # 1 decode + 10 > 10: waits whole
    assert chunks(sim.step()) == [(a.seq_id, 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    sim.s.finish(a)
    assert chunks(sim.step()) == [(b.seq_id, 10)]


def test_priorities_then_fcfs():
    sim = Sim(max_num_seqs=1)
    low = sim.add(2, max_tokens=1, priority=5)
    high1 = sim.add(2, max_tokens=1, priority=-1)
    mid = sim.add(2, max_tokens=1, priority=0)
    high2 = sim.add(2, max_tokens=1, priority=-1)
    sim.run()
    assert sim.finished == [high1, high2, mid, low]


def test_preemption_by_recompute_victimises_the_latest_arrival():
    sim = Sim(num_blocks=4)
    a = sim.add(8, max_tokens=6)
    b = sim.add(8, max_tokens=6)
    sim.step()  # both prefilled: 4 blocks in use
    assert sim.s.block_manager.num_allocatable == 0
    out = sim.step()  # a needs a 3rd block: b is preempted
    assert chunks(out) == [(a.seq_id, 1)]
    assert sim.s.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sim.s.waiting[0] is b
    sim.run()
    assert sim.finished == [a, b]


def test_preemption_victimises_lower_priority_even_if_older():
    sim = Sim(num_blocks=4)
    old_low = sim.add(8, max_tokens=6, priority=1)
    new_high = sim.add(8, max_tokens=6, priority=0)
    sim.step()
    sim.step()
    assert old_low.status is SequenceStatus.WAITING and new_high.status is SequenceStatus.RUNNING
    sim.run()
    assert sim.finished == [new_high, old_low]


def test_a_more_important_waiting_sequence_preempts_for_room():
    sim = Sim(num_blocks=4)
    low = sim.add(12, max_tokens=3, priority=3)
    sim.step()
    high = sim.add(8, max_tokens=2, priority=0)
    out = sim.step()
    assert chunks(out) == [(high.seq_id, 8)] and low.status is SequenceStatus.WAITING
    sim.run()
    assert sim.finished == [high, low]


def test_prefix_cache_hit_skips_full_blocks_but_never_the_whole_prompt():
    sim = Sim()
    first = sim.add(12, max_tokens=1)
    sim.run()
    second = sim.add(0, tokens=first.token_ids[:12], max_tokens=1)
    out = sim.step()
    # 3 full blocks cached, but the last token must run: 2 blocks (8 tokens) hit.
    assert chunks(out) == [(second.seq_id, 4)]
    assert sim.s.prefix_cache_hit_tokens == 8
    assert sim.s.prefix_cache_queried_tokens == 24
    assert first.is_finished and second.is_finished
    third = sim.add(0, tokens=[*first.token_ids[:9], 99, 98], max_tokens=1)
    assert chunks(sim.step()) == [(third.seq_id, 3)]
    assert sim.s.prefix_cache_hit_tokens == 16


def test_prefix_caching_off():
    sim = Sim(enable_prefix_caching=False)
    a = sim.add(12, max_tokens=1)
    sim.run()
    b = sim.add(0, tokens=a.token_ids[:12], max_tokens=1)
    assert chunks(sim.step()) == [(b.seq_id, 12)] and sim.s.prefix_cache_hit_tokens == 0


def _abort_and_check(sim, seq):
    sim.s.finish(seq)
    assert seq.is_finished and seq.block_table == []
    assert seq not in sim.s.running and seq not in sim.s.waiting
    sim.check()


@pytest.mark.parametrize("phase", ["waiting", "mid-prefill", "decoding", "preempted"])
def test_abort_at_every_phase_frees_blocks(phase):
    sim = Sim(num_blocks=6, max_num_batched_tokens=8)
    sim.add(8, max_tokens=12)
    seq = sim.add(12, max_tokens=12)
    if phase != "waiting":
        sim.step()  # other 8 tokens: seq still waits
        sim.step()  # other decodes, seq gets 7
        assert seq.num_computed_tokens == 7
    if phase in ("decoding", "preempted"):
        sim.step()
        assert seq.num_uncomputed_tokens == 1
    if phase == "preempted":
        while seq.status is SequenceStatus.RUNNING:
            sim.step()
        assert sim.s.num_preemptions >= 1
    _abort_and_check(sim, seq)
    sim.run()
    bm = sim.s.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks + bm.num_cached_free == bm.num_blocks


workloads = st.lists(
    st.tuples(
        st.integers(1, 20),  # prompt length
        st.integers(1, 12),  # max tokens
        st.integers(-1, 1),  # priority
        st.integers(0, 3),  # arrival step
        st.integers(0, 2),  # shared-prefix family
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=80, deadline=None)
@given(
    workload=workloads,
    num_blocks=st.integers(8, 14),
    budget=st.integers(4, 24),
    chunked=st.booleans(),
    max_num_seqs=st.integers(1, 5),
)
def test_random_workloads_finish_within_limits_and_never_preempt_the_most_important(
    workload, num_blocks, budget, chunked, max_num_seqs
):
    if not chunked:
        budget = max(budget, 20)
    sim = Sim(num_blocks=num_blocks, max_num_batched_tokens=budget,
              enable_chunked_prefill=chunked, max_num_seqs=max_num_seqs)
    pending = sorted(enumerate(workload), key=lambda x: x[1][3])
    for step in range(2000):
        while pending and pending[0][1][3] <= step:
            _, (plen, max_tokens, prio, _, family) = pending.pop(0)
            tokens = [family] * 8 + list(range(100, 100 + plen))
            tokens = tokens[: min(len(tokens), num_blocks * BS - max_tokens)]
            sim.add(0, max_tokens=max_tokens, priority=prio, tokens=tokens)
        if not pending and not sim.s.has_unfinished():
            break
        live = sim.s.running + sim.s.waiting
        most_important = min(live, key=lambda s: s.sort_key) if live else None
        was_running = list(sim.s.running)
        out = sim.step()
        preempted = [s for s in was_running if s.status is SequenceStatus.WAITING]
        assert most_important is None or most_important not in preempted
        assert len(preempted) <= sim.s.num_preemptions
        if chunked:
            assert out.num_tokens <= budget
        assert len(out.chunks) <= max_num_seqs and len(sim.s.running) <= max_num_seqs
        for seq, start, num_tokens in sim.spans:
            assert len(seq.block_table) * BS >= start + num_tokens or seq.is_finished
    else:
        raise AssertionError("starvation: the workload never finished")
    assert len(sim.finished) == len(workload)
    bm = sim.s.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks + bm.num_cached_free == num_blocks

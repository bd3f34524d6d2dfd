"""Routing policies, on endpoints with known load and remembered prefixes."""

from __future__ import annotations

from collections import Counter
from typing import get_args

import pytest

from deepflow.api.deployments import Policy as DeploymentPolicy
from deepflow.gateway.policies import (
    CHUNK_CHARS,
    POLICIES,
    Endpoint,
    LeastOutstandingTokens,
    PrefixCacheAware,
    RoundRobin,
    make_policy,
    prefix_hashes,
)


def endpoints(n: int = 3) -> list[Endpoint]:
    return [Endpoint(f"inst_{i}", f"http://127.0.0.1:{9000 + i}") for i in range(n)]


def test_prefix_hashes_share_exactly_the_common_whole_chunks() -> None:
    a = "x" * CHUNK_CHARS * 3 + "tail a"
    b = "x" * CHUNK_CHARS * 2 + "y" * CHUNK_CHARS + "tail b"
    ha, hb = prefix_hashes(a), prefix_hashes(b)
    assert len(ha) == len(hb) == 3
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    assert prefix_hashes("short") == []
    # chained: the same chunk after a different prefix hashes differently
    assert (
        prefix_hashes("y" * CHUNK_CHARS * 2)[1]
        != prefix_hashes("x" * CHUNK_CHARS + "y" * CHUNK_CHARS)[1]
    )


def test_round_robin_cycles() -> None:
    eps, policy = endpoints(), RoundRobin()
    picks = [policy.choose(eps, [], 10).instance_id for _ in range(6)]
    assert picks == ["inst_0", "inst_1", "inst_2"] * 2


def test_least_outstanding_tokens_picks_the_lightest() -> None:
    eps = endpoints()
    eps[0].outstanding_tokens, eps[1].outstanding_tokens, eps[2].outstanding_tokens = 50, 5, 20
    assert LeastOutstandingTokens().choose(eps, [], 10) is eps[1]


def test_prefix_aware_follows_the_cache_until_overloaded() -> None:
    eps, policy = endpoints(), PrefixCacheAware()
    prompt = prefix_hashes("system prompt " * 40)
    eps[2].remember(prompt[:5])
    eps[2].outstanding_tokens = 100
    eps[0].outstanding_tokens, eps[1].outstanding_tokens = 90, 80
    assert policy.choose(eps, prompt, 50) is eps[2]  # a hit beats a slightly lighter queue
    eps[2].outstanding_tokens = 1000
    assert policy.choose(eps, prompt, 50) is eps[1]  # overloaded: go to the least loaded
    assert policy.choose(eps, prefix_hashes("other " * 40), 50) is eps[1]  # no hit anywhere


def test_prefix_aware_spreads_distinct_prompts_and_keeps_shared_ones_together() -> None:
    eps, policy = endpoints(2), PrefixCacheAware()
    sent: Counter[str] = Counter()
    for i in range(20):
        shared = prefix_hashes(("shared system prompt " * 20) + f"question {i}")
        ep = policy.choose(eps, shared, 30)
        ep.remember(shared)
        sent[ep.instance_id] += 1
    assert sorted(sent.values()) == [20]  # every one went where the prefix was cached
    for i in range(6):
        distinct = prefix_hashes(f"unrelated prompt number {i} " * 10)
        ep = policy.choose(eps, distinct, 30)
        ep.outstanding_tokens += 30
        ep.remember(distinct)
    assert eps[0].outstanding_tokens and eps[1].outstanding_tokens


def test_remembered_prefixes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deepflow.gateway.policies.REMEMBERED_CHUNKS", 4)
    ep = endpoints(1)[0]
    ep.remember(prefix_hashes("a" * CHUNK_CHARS * 6))
    assert len(ep.cached) == 4


@pytest.mark.parametrize(
    ("name", "chosen"),
    [
        ("round_robin", "inst_0"),  # first in turn, though the most loaded
        ("least_outstanding_tokens", "inst_1"),  # the lightest
        ("prefix_cache_aware", "inst_2"),  # holds the prompt's prefix, not overloaded
    ],
)
def test_policies_by_name(name: str, chosen: str) -> None:
    """Each name makes the policy that routes as the name says: one request that the three
    policies send to three different instances."""
    eps = endpoints()
    eps[0].outstanding_tokens, eps[1].outstanding_tokens, eps[2].outstanding_tokens = 20, 5, 10
    prompt = prefix_hashes("system prompt " * 40)
    eps[2].remember(prompt)
    assert make_policy(name).choose(eps, prompt, 10).instance_id == chosen


def test_every_policy_a_deployment_may_name_can_be_made() -> None:
    assert set(get_args(DeploymentPolicy)) == set(POLICIES)
    with pytest.raises(KeyError):
        make_policy("random")

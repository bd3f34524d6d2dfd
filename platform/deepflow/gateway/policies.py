"""Which instance gets a request: round-robin, least outstanding tokens, or prefix-cache aware.

The gateway does not tokenize. It estimates a request's cost in tokens from its text and
``max_tokens``, and it fingerprints prompts by chained hashes of fixed-size character chunks:
two prompts that share their first k chunks share their first k hashes, as the engine's own
prefix cache shares blocks. Each endpoint remembers (LRU) the hashes of prompts it was sent,
which approximates what its KV cache holds.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

CHUNK_CHARS = 64
"""About one KV block (16 tokens) of English text."""
REMEMBERED_CHUNKS = 50_000
OVERLOAD_FACTOR = 1.5
"""Prefix-aware routing follows the cache unless that instance carries this many times the
least-loaded instance's outstanding tokens (plus one request's worth)."""


@dataclass(eq=False)
class Endpoint:
    """One ready instance as the gateway sees it."""

    instance_id: str
    address: str
    outstanding_tokens: int = 0
    outstanding_requests: int = 0
    down_until: float = 0.0
    """Monotonic time before which a failed connection keeps it out of rotation."""
    cached: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def remember(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.cached[h] = None
            self.cached.move_to_end(h)
        while len(self.cached) > REMEMBERED_CHUNKS:
            self.cached.popitem(last=False)

    def matched_chunks(self, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cached:
                break
            n += 1
        return n


def prefix_hashes(text: str) -> list[bytes]:
    """Chained hashes of the whole ``CHUNK_CHARS`` chunks of ``text``."""
    out: list[bytes] = []
    prev = b""
    data = text.encode()
    for start in range(0, len(data) - CHUNK_CHARS + 1, CHUNK_CHARS):
        prev = hashlib.blake2b(prev + data[start : start + CHUNK_CHARS], digest_size=12).digest()
        out.append(prev)
    return out


class Policy(Protocol):
    name: str

    def choose(self, endpoints: list[Endpoint], hashes: list[bytes], cost: int) -> Endpoint: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, endpoints: list[Endpoint], hashes: list[bytes], cost: int) -> Endpoint:
        return endpoints[next(self._counter) % len(endpoints)]


class LeastOutstandingTokens:
    name = "least_outstanding_tokens"

    def choose(self, endpoints: list[Endpoint], hashes: list[bytes], cost: int) -> Endpoint:
        return min(endpoints, key=lambda e: (e.outstanding_tokens, e.outstanding_requests))


class PrefixCacheAware:
    name = "prefix_cache_aware"

    def __init__(self) -> None:
        self._fallback = LeastOutstandingTokens()

    def choose(self, endpoints: list[Endpoint], hashes: list[bytes], cost: int) -> Endpoint:
        least = self._fallback.choose(endpoints, hashes, cost)
        if not hashes:
            return least
        best = max(endpoints, key=lambda e: (e.matched_chunks(hashes), -e.outstanding_tokens))
        if best.matched_chunks(hashes) == 0:
            return least
        if best.outstanding_tokens > OVERLOAD_FACTOR * least.outstanding_tokens + cost:
            return least  # the cache hit is not worth the queue
        return best


POLICIES: dict[str, type[RoundRobin] | type[LeastOutstandingTokens] | type[PrefixCacheAware]] = {
    p.name: p for p in (RoundRobin, LeastOutstandingTokens, PrefixCacheAware)
}


def make_policy(name: str) -> Policy:
    return POLICIES[name]()

"""Prefix reuse: the keys and values of prompt prefixes that were already prefilled, kept so that a
later request starting with the same tokens (a system prompt, few-shot examples, lm-eval's repeated
contexts) copies them into its slot and prefills only the rest.

Why copies and not pointers into other slots: model.kv.onnx binds one contiguous row per slot, so
two slots cannot share memory, and a slot's rows are overwritten (a new request, `SlotCache.move`
compacting the rows) at times the index would have to track. A saved block is the store's own
array, so nothing a slot does later can make it stale.

The index is hashed blocks (vLLM's automatic prefix caching): a prompt's tokens in blocks of
`block` tokens, block j keyed by sha256(key of block j-1 + block j's token ids), so a key names the
whole prefix up to the end of its block. A lookup walks a prompt's blocks until the first miss.
Bounded by bytes, least recently used first; a chain is touched deepest block first, so a parent is
always more recent than its children and eviction takes leaves (a prompt's own tail) before the
shared start they hang from.

At least one prompt token is always left to prefill: its logits choose the first new token. A
prompt that is all cached reuses len - 1 positions (a block may be used in part).
"""
from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

DEFAULT_BLOCK = 64
DEFAULT_MAX_BYTES = 1 << 30


@dataclass
class Hit:
    """What a lookup found: `tokens` positions to copy (0: none), from `blocks` (held here, so an
    eviction between the lookup and the copy frees nothing this hit still needs)."""

    tokens: int = 0
    blocks: list[np.ndarray] = field(default_factory=list)


class PrefixCache:
    """Saved key/value blocks of prompt prefixes; not thread-safe (the scheduler thread owns it)."""

    def __init__(self, block: int = DEFAULT_BLOCK, max_bytes: int = DEFAULT_MAX_BYTES):
        if block < 1 or max_bytes < 0:
            raise ValueError(f"prefix cache block ({block}) must be >= 1 and its size ({max_bytes} bytes) >= 0")
        self.block, self.max_bytes = int(block), int(max_bytes)
        self._blocks: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()  # LRU first
        self.bytes = 0
        # counters: requests admitted with a lookup, those that hit, positions copied (the
        # scheduler counts admissions, since a waiting request may be looked up more than once)
        self.queries = self.hits = self.tokens_reused = self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, ids: Sequence[int], blocks: int) -> list[bytes]:
        keys, h = [], b""
        arr = np.asarray(ids[: blocks * self.block], np.int64)
        for j in range(blocks):
            h = hashlib.sha256(h + arr[j * self.block : (j + 1) * self.block].tobytes()).digest()
            keys.append(h)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        for k in reversed(keys):  # deepest first: parents end up more recent than their children
            self._blocks.move_to_end(k)

    def match(self, ids: Sequence[int]) -> Hit:
        """The longest saved prefix of `ids` (at most len - 1 positions); touches what it uses."""
        limit = len(ids) - 1
        keys = self._keys(ids, -(-limit // self.block) if limit > 0 else 0)
        found: list[bytes] = []
        for k in keys:
            if k not in self._blocks:
                break
            found.append(k)
        if not found:
            return Hit()
        self._touch(found)
        return Hit(min(len(found) * self.block, limit), [self._blocks[k] for k in found])

    def load(self, cache: Any, slot: int, hit: Hit) -> None:
        """Copy a hit's positions into row `slot` of a SlotCache; the row then holds hit.tokens."""
        for j, data in enumerate(hit.blocks):
            start = j * self.block
            n = min(self.block, hit.tokens - start)
            if n > 0:
                cache.write_positions(slot, start, data[:, :, :n])
        cache.lengths[slot] = hit.tokens

    def save(self, cache: Any, slot: int, ids: Sequence[int]) -> int:
        """Keep the whole blocks of `ids`, whose keys and values row `slot` holds now, that are not
        kept yet; returns how many were added."""
        keys = self._keys(ids, len(ids) // self.block)
        added = 0
        for j, k in enumerate(keys):
            if k in self._blocks:
                continue
            data = cache.read_positions(slot, j * self.block, (j + 1) * self.block)
            if data.nbytes > self.max_bytes:
                break
            self._blocks[k] = data
            self.bytes += data.nbytes
            added += 1
        self._touch([k for k in keys if k in self._blocks])
        while self.bytes > self.max_bytes and self._blocks:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
        return added

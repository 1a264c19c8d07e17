"""Which KV-cache blocks each sequence owns, on the leader: allocation, sharing, prefix caching.

The pool has ``num_blocks`` blocks of ``block_size`` positions (``tensorpar.runtime.kv_cache``;
every rank holds the same block ids, each for its own KV heads). Block 0 pads block tables and
is never handed out. A block is in one of four states:

- *fresh*: never handed out (ids ``fresh..num_blocks-1``; its memory untouched, not yet resident);
- *owned*: in the block tables of ``refs[b]`` running sequences;
- *cached*: owned by none, but full of a known prefix (``hash_of``): reusable until evicted;
- *free*: owned by none, holding nothing worth keeping.

Prefix caching (vLLM's automatic prefix caching): once a block is full, it is named by the hash
of its tokens and of every token before it, h_i = hash((h_{i-1}, tokens of block i)), so that
equal hashes mean equal prefixes. A new sequence whose prompt starts with cached blocks takes
them (``admit``) and computes only what follows; at least its last prompt token is always
computed, since that one's logits give the first new token. A chain may start from a ``root``
other than None: keys written under other rules (LongRoPE's long factors, which a prompt past
the pretrained length uses for all its tokens) are then found only by prompts under the same
rules. Blocks whose owners have all ended
stay cached, least recently released evicted first, when no free or fresh block is left.

New blocks come from the free ones first (most recently released: their memory is resident),
then fresh ones, then evicted cached ones.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one pads), got {num_blocks}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.fresh = 1
        self.free: list[int] = []
        self.cached: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self.refs: dict[int, int] = {}
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.queries = self.hits = 0  # prompt tokens looked up in the prefix cache, and found there

    # ---- counts ----------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Blocks sequences can own (all but the padding block)."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks a sequence could be given now: fresh, free and cached ones."""
        return self.num_blocks - self.fresh + len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        return self.capacity - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- sequences -------------------------------------------------------------------------------

    def hashes(self, tokens: list[int], n: int, parent: int | None = None, start: int = 0) -> list[int]:
        """The chained hashes of the ``n`` full blocks of ``tokens`` from block ``start`` on
        (``parent``: the hash of block ``start - 1``)."""
        out, bs = [], self.block_size
        for i in range(start, start + n):
            parent = hash((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            out.append(parent)
        return out

    def admit(self, tokens: list[int], root: object = None) -> tuple[list[int], list[int]] | None:
        """Blocks for a sequence of ``tokens`` to compute: (its block table, the hashes of the
        cached blocks it starts with, chained from ``root``), the cached ones first; None when too
        few blocks are left."""
        cached: list[int] = []
        hashes: list[int] = []
        if self.prefix_caching:
            for h in self.hashes(tokens, (len(tokens) - 1) // self.block_size, root):
                b = self.by_hash.get(h)
                if b is None:
                    break
                cached.append(b)
                hashes.append(h)
        need = self.blocks_for(len(tokens)) - len(cached)
        if self.available - sum(1 for b in cached if b in self.cached) < need:
            return None
        for b in cached:
            self._own(b)
        if self.prefix_caching:
            self.queries += len(tokens)
            self.hits += len(cached) * self.block_size
        return cached + [self._take() for _ in range(need)], hashes

    def grow(self, table: list[int], tokens: int) -> bool:
        """Add blocks to ``table`` until it holds ``tokens`` positions; False (nothing added)
        when too few are left."""
        need = self.blocks_for(tokens) - len(table)
        if need > self.available:
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def trim(self, table: list[int], tokens: int) -> None:
        """Give back the blocks of ``table`` past those ``tokens`` positions need (speculative
        decoding's rejected drafts had them)."""
        keep = self.blocks_for(tokens)
        if len(table) > keep:
            extra = table[keep:]
            del table[keep:]
            self.release(extra)

    def register(self, table: list[int], hashes: list[int], tokens: list[int], computed: int,
                 root: object = None) -> None:
        """Name the blocks of ``table`` that ``computed`` positions have filled and that have no
        name yet (``hashes``, chained from ``root``, extended in place), so that later prompts can
        reuse them."""
        if not self.prefix_caching:
            return
        full = computed // self.block_size
        if full <= len(hashes):
            return
        start = len(hashes)
        new = self.hashes(tokens, full - start, hashes[-1] if hashes else root, start)
        for b, h in zip(table[start:full], new):
            if h not in self.by_hash and b not in self.hash_of:  # a twin computed at the same time stays unnamed
                self.by_hash[h] = b
                self.hash_of[b] = h
        hashes.extend(new)

    def release(self, table: list[int]) -> None:
        """A sequence gives its blocks back: the last ones first in line for eviction."""
        for b in reversed(table):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]
                if b in self.hash_of:
                    self.cached[b] = None
                else:
                    self.free.append(b)
        table.clear()

    def forget_prefixes(self) -> None:
        """No block names a prefix any more (after new weights: its keys and values are stale)."""
        self.free.extend(self.cached)
        self.cached.clear()
        self.by_hash.clear()
        self.hash_of.clear()

    def reset_stats(self) -> None:
        self.queries = self.hits = 0

    # ---- blocks ----------------------------------------------------------------------------------

    def _own(self, b: int) -> None:
        self.cached.pop(b, None)
        self.refs[b] = self.refs.get(b, 0) + 1

    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.fresh < self.num_blocks:
            b, self.fresh = self.fresh, self.fresh + 1
        else:
            b, _ = self.cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
        self.refs[b] = 1
        return b

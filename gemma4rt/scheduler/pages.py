"""KV page pools and the prefix cache.

A `PagePool` is one free list of page ids for one `PoolSpec`, with a reference count per page and
an LRU set of unreferenced pages that still hold a cached prefix page (evicted on demand). The
prefix cache keys FULL pages by a hash chain: the key of page i is (hash of key i-1, the page's token
ids, the content hashes of multimodal items overlapping it); each pool maps keys to its page ids.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from gemma4rt.config import PoolSpec


class PagePool:
    """Free list + refcounts + an LRU of cached unreferenced pages for one pool."""

    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.name = spec.name
        self.page_size = spec.page_size
        self.window = spec.sliding_window
        self.num_pages = spec.num_pages
        # pop() from the end: hand out low ids first (deterministic and easy to read in tests)
        self.free: list[int] = list(range(spec.num_pages - 1, -1, -1))
        self.ref = [0] * spec.num_pages
        self.page_key: dict[int, tuple] = {}            # page id -> prefix key (cached pages)
        self.key_page: dict[tuple, int] = {}            # prefix key -> page id
        self.evictable: OrderedDict[int, None] = OrderedDict()   # ref 0 cached pages, LRU first

    # -- capacity -----------------------------------------------------------------------------
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    def num_used(self) -> int:
        return self.num_pages - self.num_available()

    def usage(self) -> float:
        return self.num_used() / self.num_pages if self.num_pages else 0.0

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, n: int) -> Optional[list[int]]:
        """n fresh pages (ref 1), evicting LRU cached pages if the free list is short; None if
        the pool cannot provide n pages (nothing changes then)."""
        if n <= 0:
            return []
        if n > self.num_available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                p = self.free.pop()
            else:
                p, _ = self.evictable.popitem(last=False)
                del self.key_page[self.page_key.pop(p)]
            self.ref[p] = 1
            out.append(p)
        return out

    def incref(self, page: int) -> None:
        if self.ref[page] == 0:
            self.evictable.pop(page, None)
        self.ref[page] += 1

    def decref(self, page: int) -> None:
        r = self.ref[page] - 1
        assert r >= 0, f"pool {self.name}: page {page} released twice"
        self.ref[page] = r
        if r == 0:
            if page in self.page_key:
                self.evictable[page] = None      # most recently used at the end
            else:
                self.free.append(page)

    # -- prefix cache -------------------------------------------------------------------------
    def lookup(self, key: tuple) -> Optional[int]:
        return self.key_page.get(key)

    def register(self, key: tuple, page: int) -> None:
        """Make a full, referenced page findable under `key` (no-op if the key is already cached
        by another page or the page already has a key)."""
        if key in self.key_page or page in self.page_key:
            return
        self.key_page[key] = page
        self.page_key[page] = key

    def flush(self) -> None:
        """Forget every cached key: unreferenced cached pages go back to the free list; referenced
        ones become private (freed when their requests release them)."""
        for p in self.evictable:
            self.free.append(p)
        self.evictable.clear()
        self.page_key.clear()
        self.key_page.clear()


def page_keys(token_ids: list[int], page_size: int, num_pages: int, mm_spans: list[tuple[int, int, str]],
              prev: Optional[list[tuple]] = None) -> list[tuple]:
    """Prefix keys of the first `num_pages` full pages of `token_ids`. `prev` (keys already
    computed for this sequence) is extended in place and returned. mm_spans: (start, end, hash)."""
    keys = prev if prev is not None else []
    parent = hash(keys[-1]) if keys else 0
    for i in range(len(keys), num_pages):
        s, e = i * page_size, (i + 1) * page_size
        mm = tuple((a, h) for (a, b, h) in mm_spans if a < e and b > s) if mm_spans else ()
        key = (parent, tuple(token_ids[s:e]), mm)
        keys.append(key)
        parent = hash(key)
    return keys

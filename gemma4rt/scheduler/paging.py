"""Per-request page operations of the scheduler: growing page tables, releasing sliding pages that
left the window, registering full pages in the prefix cache and taking cached prefixes."""
from __future__ import annotations

from gemma4rt.scheduler.pages import page_keys
from gemma4rt.scheduler.request import Request

INF = 1 << 62


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PageOps:
    """Mixed into Scheduler; uses self.pools, self.full_pools, self.sliding_pools, self.page_size."""

    # ------------------------------------------------------------------------------------------
    def _release_pages(self, r: Request) -> None:
        for name, table in r.pages.items():
            pool = self.pools[name]
            for p in table:
                if p >= 0:
                    pool.decref(p)
        r.pages = {}

    def _release_window(self, r: Request) -> None:
        """Hand back sliding pages entirely before the window of the next query."""
        check = INF
        for pool in self.sliding_pools:
            lo = r.slide_lo.get(pool.name, 0)
            table = r.pages.get(pool.name)
            if table:
                first = max(0, r.num_computed - pool.window + 1) // pool.page_size
                if self.prefix_enabled:   # not before the prefix cache has it (overlap registers a step late)
                    first = min(first, r.num_registered)
                if first > lo:
                    for j in range(lo, min(first, len(table))):
                        p = table[j]
                        if p >= 0:
                            pool.decref(p)
                            table[j] = -1
                    r.slide_lo[pool.name] = lo = first
            # the next num_computed at which this pool's lowest held page can leave the window
            check = min(check, (lo + 1) * pool.page_size + pool.window - 1)
        r.slide_check = check

    def _max_end(self, r: Request) -> int:
        """The largest sequence end (exclusive) the free pages could cover for this request."""
        end = INF
        for pool in self.pools.values():
            n = len(r.pages.get(pool.name, ()))
            end = min(end, (n + pool.num_available()) * pool.page_size)
        return end

    def _alloc_to(self, r: Request, end: int) -> bool:
        """Grow every page table to cover tokens [0, end). All or nothing."""
        need = []
        pages = r.pages
        cap = INF
        for name, pool in self.pools.items():
            have = len(pages.get(name, ()))
            want = -(-end // pool.page_size)
            if want > have:
                if want - have > pool.num_available():
                    return False
                need.append((name, pool, want - have))
                have = want
            cap = min(cap, have * pool.page_size)     # what the tables cover once grown
        for name, pool, k in need:
            pages.setdefault(name, []).extend(pool.alloc(k))
        if need:
            r.pages_dirty = True
        r.cap = cap
        return True

    def _register(self, r: Request) -> None:
        """Make the request's newly completed full pages findable in the prefix cache."""
        ps = self.page_size
        num_full = min(r.num_computed, len(r.token_ids)) // ps
        if num_full <= r.num_registered:
            return
        keys = page_keys(r.token_ids, ps, num_full, r.mm_spans, r.keys)
        for name, table in r.pages.items():
            pool = self.pools[name]
            for j in range(r.num_registered, min(num_full, len(table))):
                if table[j] >= 0:
                    pool.register(keys[j], table[j])
        r.num_registered = num_full

    def _match_prefix(self, r: Request) -> None:
        """Take the cached prefix pages of a waiting request (increfs them)."""
        ps = self.page_size
        L = len(r.token_ids)
        max_pages = (L - 1) // ps              # always recompute the last known token
        if max_pages <= 0:
            return
        keys = page_keys(r.token_ids, ps, max_pages, r.mm_spans, r.keys if r.keys else None)
        r.keys = keys
        k = 0
        while k < max_pages and all(p.lookup(keys[k]) is not None for p in self.full_pools):
            k += 1
        while k > 0:
            cut = k * ps
            inside = [a for (a, b) in r.bidi_spans if a < cut < b]
            if inside:
                k = min(inside) // ps
                continue
            ok = True
            for pool in self.sliding_pools:
                first = max(0, cut - pool.window + 1) // ps
                if any(pool.lookup(keys[j]) is None for j in range(first, k)):
                    ok = False
                    break
            if ok:
                break
            k -= 1
        if k == 0:
            return
        for pool in self.full_pools:
            table = [pool.lookup(keys[j]) for j in range(k)]
            for p in table:
                pool.incref(p)
            r.pages[pool.name] = table
        for pool in self.sliding_pools:
            first = max(0, k * ps - pool.window + 1) // ps
            table = [-1] * first + [pool.lookup(keys[j]) for j in range(first, k)]
            for p in table[first:]:
                pool.incref(p)
            r.pages[pool.name] = table
            r.slide_lo[pool.name] = first
        r.num_computed = k * ps
        r.num_registered = k


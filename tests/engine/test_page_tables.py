"""PageTableRows (the worker's persistent page tables) against a table built from each request's page
list, through random adds, extensions past the initial width, removals and row reuse."""
import random

import numpy as np

from gemma4rt.worker.page_tables import PageTableRows


def test_page_table_rows_match_lists():
    rnd = random.Random(0)
    pt = PageTableRows(["sliding", "full"], width=4, rows=2)
    live: dict[int, dict[str, list[int]]] = {}          # row -> pool -> pages
    for _ in range(400):
        op = rnd.random()
        if op < 0.3 or not live:
            row = pt.alloc()
            assert row not in live
            live[row] = {"sliding": [], "full": []}
        elif op < 0.4:
            row = rnd.choice(list(live))
            pt.release(row)
            del live[row]
        else:
            row = rnd.choice(list(live))
            pool = rnd.choice(["sliding", "full"])
            pages = [rnd.randrange(1000) for _ in range(rnd.randrange(0, 7))]
            pt.extend(pool, row, pages)
            live[row][pool] += pages
        if live:
            rows = rnd.sample(list(live), rnd.randint(1, len(live)))
            for pool in ("sliding", "full"):
                got = pt.table(pool, np.array(rows))
                w = max(1, max(len(live[r][pool]) for r in rows))
                want = np.full((len(rows), w), -1, dtype=np.int32)
                for i, r in enumerate(rows):
                    want[i, :len(live[r][pool])] = live[r][pool]
                assert got.dtype == np.int32 and np.array_equal(got, want)
    assert pt.width > 4 and next(iter(pt.mat.values())).shape[0] > 2      # both grew

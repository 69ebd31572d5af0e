"""The worker's page tables: one int32 row per running request and pool, kept across steps, so that a
step's table is one gather of its requests' rows rather than a list-to-array conversion per request and
pool (at batch 100 with 1k-token contexts that conversion cost ~0.3 ms of host time per decode step)."""
from __future__ import annotations

import numpy as np


class PageTableRows:
    def __init__(self, pools: list[str], width: int = 64, rows: int = 16):
        self.width = max(1, width)
        self.mat = {n: np.full((rows, self.width), -1, dtype=np.int32) for n in pools}
        self.count = {n: np.zeros(rows, dtype=np.int64) for n in pools}
        self.free = list(range(rows - 1, -1, -1))

    def alloc(self) -> int:
        if not self.free:
            n = next(iter(self.mat.values())).shape[0]
            for k in self.mat:
                self.mat[k] = np.concatenate([self.mat[k], np.full((n, self.width), -1, dtype=np.int32)])
                self.count[k] = np.concatenate([self.count[k], np.zeros(n, dtype=np.int64)])
            self.free = list(range(2 * n - 1, n - 1, -1))
        return self.free.pop()

    def release(self, row: int) -> None:
        for k, m in self.mat.items():
            m[row, :int(self.count[k][row])] = -1
            self.count[k][row] = 0
        self.free.append(row)

    def extend(self, pool: str, row: int, pages: list[int]) -> None:
        if not pages:
            return
        c = int(self.count[pool][row])
        end = c + len(pages)
        if end > self.width:
            w = max(end, 2 * self.width)
            for k in self.mat:
                m = self.mat[k]
                self.mat[k] = np.concatenate([m, np.full((m.shape[0], w - self.width), -1, dtype=np.int32)], axis=1)
            self.width = w
        self.mat[pool][row, c:end] = pages
        self.count[pool][row] = end

    def table(self, pool: str, rows: np.ndarray) -> np.ndarray:
        """[len(rows), the longest of them (≥ 1)] int32, -1 past each request's pages (a copy)."""
        w = max(1, int(self.count[pool][rows].max())) if len(rows) else 1
        return self.mat[pool][rows, :w]

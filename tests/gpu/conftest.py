"""GPU kernel tests: each native op against its reference in gemma4rt/ops/reference.py. On a machine
without a CUDA device or without the built extension every module here is reported as skipped
("not run: ..."), never passed."""
import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _give_back_device_memory():
    """After each module: collect the runners its tests left in reference cycles and empty torch's cache. Runners
    size their KV pools from the free device memory, so one module's leftovers would shrink the next module's
    pools (the likely cause of a TP test's failure in a full run, H200 x 2, 2026-11-29 23:01)."""
    yield
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:      # (no torch or no CUDA: nothing to give back)
        pass

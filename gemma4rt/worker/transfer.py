"""Host -> device copies that do not wait for the device."""
from __future__ import annotations

from typing import Optional

import torch


def to_device(data, device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A host list, array or tensor on `device`. On CUDA it is staged in pinned memory and copied
    asynchronously: a copy from pageable memory first waits for every kernel queued on the stream, which
    would end the overlap of host work (overlap scheduling, the next step's planning) with the device's."""
    t = data if isinstance(data, torch.Tensor) else torch.as_tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

"""Moving a step's small tensors between host and device without waiting for the GPU.

With overlapped scheduling the host prepares step N+1 while step N runs. A copy from pageable
host memory, or any blocking copy, would wait for step N to finish and undo that, so inputs go
up through pinned memory and results come down into pinned memory behind a CUDA event. The
caching host allocator keeps a pinned block alive until the copies that use it have run.
"""

from __future__ import annotations

import torch


def to_device(values: torch.Tensor | list, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (or list) on `device`, copied without blocking the host."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_to_device(target: torch.Tensor, values: torch.Tensor) -> None:
    """Copies a host tensor into `target` (a device buffer) without blocking the host."""
    if target.device.type != "cuda":
        target.copy_(values)
        return
    target.copy_(values.pin_memory(), non_blocking=True)


class HostCopy:
    """Device tensors copied to the host as soon as the GPU has computed them; `get()`
    waits for that copy alone (not for work queued after it)."""

    def __init__(self, *tensors: torch.Tensor):
        on_gpu = any(t.device.type == "cuda" for t in tensors)
        self._tensors = tuple(
            torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            if on_gpu else t for t in tensors)
        self._done = None
        if on_gpu:
            self._done = torch.cuda.Event()
            self._done.record()

    def get(self) -> tuple[torch.Tensor, ...]:
        if self._done is not None:
            self._done.synchronize()
        return self._tensors

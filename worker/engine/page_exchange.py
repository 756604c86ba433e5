"""Prefix pages between replicas: one replica exports the pages it holds, another imports them
into its host tier, from where a prefix hit copies them to the device like any host hit.

Export reads a page from the device cache or the host tier; import checks each page's digest
(`PagePayload.intact`) and layout before it takes a host slot. A page that fails the check is
refused, and so is every page after it: a prefix page is only usable after all of its
predecessors, and the request recomputes from the first refused one. Both run on the engine's
thread, between steps (`AsyncLLMEngine.call`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worker.engine.block_manager import BlockManager
from worker.engine.kv_cache import HostKVCache
from worker.wire import PagePayload


@dataclass
class ImportResult:
    accepted: int  # pages now in the host tier
    present: int  # pages this replica held already
    refused: int  # pages whose bytes did not match their digest or layout, and those after


class PageExchange:
    def __init__(self, block_manager: BlockManager, host_cache: HostKVCache):
        """block_manager: one with a host tier, whose bytes host_cache holds."""
        self.block_manager = block_manager
        self.host_index = block_manager.host
        self.host_cache = host_cache
        self.num_pages_pulled = 0
        self.num_pages_refused = 0

    def export(self, page_hashes: list[str]) -> list[PagePayload]:
        """The leading pages of the chain this replica holds, in either tier."""
        self.host_cache.settle()  # copies queued by running steps land first
        payloads = []
        for page_hash in page_hashes:
            page = self.block_manager.device_page(page_hash)
            if page is not None:
                tensors = self.host_cache.read_device_page(page)
            elif (slot := self.host_index.lookup(page_hash)) is not None:
                tensors = self.host_cache.read_slot(slot)
            else:
                break
            payloads.append(PagePayload.of(page_hash, tuple(_as_bytes(t) for t in tensors)))
        return payloads

    def import_(self, page_hashes: list[str], payloads: list[PagePayload]) -> ImportResult:
        """Stores the payloads of the chain `page_hashes` (the pages asked for, in order)."""
        result = ImportResult(0, 0, 0)
        self.host_cache.settle()  # a queued copy may still read a slot about to be reused
        layout = self.host_cache.slot_layout()
        for index, page_hash in enumerate(page_hashes):
            payload = payloads[index] if index < len(payloads) else None
            tensors = _as_tensors(payload, page_hash, layout)
            if tensors is None:
                result.refused = len(payloads) - index if payload is not None else 0
                break
            if self.block_manager.holds(page_hash):
                result.present += 1
                continue
            slot = self.host_index.store(page_hash)
            self.host_cache.write_slot(slot, tensors)
            result.accepted += 1
        self.num_pages_pulled += result.accepted
        self.num_pages_refused += result.refused
        return result


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.uint8).reshape(-1).numpy()


def _as_tensors(payload: PagePayload | None, page_hash: str,
                layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor] | None:
    """The page's tensors, or None when it is missing, not the page asked for, altered on the
    way, or of another layout (another model or tensor-parallel split)."""
    if payload is None or payload.page_hash != page_hash or not payload.intact:
        return None
    if len(payload.arrays) != len(layout):
        return None
    tensors = []
    for array, (dtype, shape) in zip(payload.arrays, layout):
        expected = math.prod(shape) * dtype.itemsize
        if array.dtype != np.uint8 or array.size != expected:
            return None
        # A copy: arrays that Ray hands over from its object store are read-only.
        tensors.append(torch.from_numpy(array.reshape(-1).copy()).view(dtype).reshape(shape))
    return tensors

"""Prefix pages between replicas: one replica exports the pages it holds, another imports them
into its host tier, from where a prefix hit copies them to the device like any host hit.

Export reads a page from the device cache or the host tier; import checks each page's digest
(`PagePayload.intact`) and layout before it takes a host slot. A page that fails the check is
refused, and so is every page after it: a prefix page is only usable after all of its
predecessors, and the request recomputes from the first refused one. Both run on the engine's
thread, between steps (`AsyncLLMEngine.call`).

A tensor-parallel replica's page is every rank's shard of it (each rank holds its KV heads, at
the same page id and host slot). Rank 0 decides where the pages lie, sends the other ranks a
`PageRead` or `PageWrite` in the stream of step inputs, and gathers or scatters their shards
over the metadata group; a payload carries the shards in rank order, so only a replica of the
same split accepts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from worker.engine.block_manager import BlockManager
from worker.engine.kv_cache import HostKVCache
from worker.errors import PageTransferError
from worker.wire import PagePayload

if TYPE_CHECKING:  # rank_workers imports this module in its rank loop
    from worker.engine.rank_workers import RankWorkers

# Where a page lies on a replica: (in the device cache, page id) or (in the host tier, slot).
PageLocation = tuple[bool, int]


@dataclass(frozen=True)
class PageRead:
    """Rank 0 to the other ranks: gather your shards of these pages to rank 0."""

    locations: list[PageLocation]


@dataclass(frozen=True)
class PageWrite:
    """Rank 0 to the other ranks: take your shards of pages by scatter, into these host slots."""

    slots: list[int]


def read_pages(host_cache: HostKVCache, locations: list[PageLocation]
               ) -> list[list[torch.Tensor]]:
    """This rank's tensors of each page."""
    host_cache.settle()  # copies queued by running steps land first
    return [host_cache.read_device_page(where) if on_device else host_cache.read_slot(where)
            for on_device, where in locations]


def write_pages(host_cache: HostKVCache, slots: list[int],
                pages: list[list[torch.Tensor]]) -> int:
    """Stores this rank's tensors of each page in its host slot: how many pages."""
    host_cache.settle()  # a queued copy may still read a slot about to be reused
    for slot, tensors in zip(slots, pages, strict=True):
        host_cache.write_slot(slot, tensors)
    return len(slots)


@dataclass
class ImportResult:
    accepted: int  # pages now in the host tier
    present: int  # pages this replica held already
    refused: int  # pages whose bytes did not match their digest or layout, and those after


class PageExchange:
    def __init__(self, block_manager: BlockManager, host_cache: HostKVCache,
                 peers: RankWorkers | None = None):
        """block_manager: one with a host tier, whose bytes host_cache holds; peers: the other
        ranks of a tensor-parallel replica (`RankWorkers`), None in a single process."""
        self.block_manager = block_manager
        self.host_index = block_manager.host
        self.host_cache = host_cache
        self.peers = peers
        self.num_ranks = 1 + (len(peers.ranks) if peers is not None else 0)
        self.num_pages_pulled = 0
        self.num_pages_refused = 0

    @property
    def payload_bytes(self) -> int:
        """Bytes of one page's payload: every rank's K, V and index keys."""
        return self.num_ranks * sum(host[0].nbytes for host in self.host_cache.slots)

    def export(self, page_hashes: list[str]) -> list[PagePayload]:
        """The leading pages of the chain this replica holds, in either tier."""
        locations: list[PageLocation] = []
        for page_hash in page_hashes:
            page = self.block_manager.device_page(page_hash)
            if page is not None:
                locations.append((True, page))
            elif (slot := self.host_index.lookup(page_hash)) is not None:
                locations.append((False, slot))
            else:
                break
        if not locations:
            return []
        shards = [read_pages(self.host_cache, locations)]
        if self.peers is not None:
            shards += self.peers.read_pages(PageRead(locations))
        return [PagePayload.of(page_hash, tuple(_as_bytes(tensor) for rank in shards
                                                for tensor in rank[index]))
                for index, page_hash in enumerate(page_hashes[:len(locations)])]

    def import_(self, page_hashes: list[str], payloads: list[PagePayload]) -> ImportResult:
        """Stores the payloads of the chain `page_hashes` (the pages asked for, in order)."""
        result = ImportResult(0, 0, 0)
        rank_layout = self.host_cache.slot_layout()
        per_rank = len(rank_layout)
        stored, slots, pages = [], [], []
        for index, page_hash in enumerate(page_hashes):
            payload = payloads[index] if index < len(payloads) else None
            tensors = _as_tensors(payload, page_hash, rank_layout * self.num_ranks)
            if tensors is None:
                result.refused = len(payloads) - index if payload is not None else 0
                break
            if self.block_manager.holds(page_hash):
                result.present += 1
                continue
            stored.append(page_hash)
            slots.append(self.host_index.store(page_hash))
            pages.append(tensors)
            result.accepted += 1
        if slots:
            write_pages(self.host_cache, slots, [page[:per_rank] for page in pages])
            if self.peers is not None:
                try:
                    self.peers.write_pages(PageWrite(slots), [
                        [page[rank * per_rank:(rank + 1) * per_rank] for page in pages]
                        for rank in range(1, self.num_ranks)])
                except PageTransferError:  # a shard missing: none of the pages is usable
                    for page_hash in stored:
                        self.host_index.discard(page_hash)
                    raise
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

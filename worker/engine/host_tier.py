"""The host-memory KV tier's bookkeeping: which prefix pages it holds, in which slot, LRU first.

Pages the device cache evicts are copied here, K, V and index keys together (MSA cannot rebuild
index keys from K/V), instead of being dropped; a later prefix hit copies them back instead of
recomputing them. The tier is inclusive: a page copied back keeps its host copy, so evicting it
again costs no copy. The bytes live in `kv_cache.HostKVCache`; the BlockManager records each
copy as a `PageTransfer`, and the ModelRunner executes a step's transfers in the order they were
recorded, before the step's forward and on the same stream, so a page is always copied out
before its device page is reused and copied in before anything reads it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from worker.wire import PageEvent, PageEventListener


@dataclass(frozen=True)
class PageTransfer:
    """One page copy between the device cache and the host tier."""

    to_host: bool  # device page -> host slot; else host slot -> device page
    page: int
    slot: int


class HostPageIndex:
    def __init__(self, num_slots: int, listener: PageEventListener | None = None):
        self.num_slots = num_slots
        self.listener = listener
        self._slots: OrderedDict[str, int] = OrderedDict()  # hash -> slot, least recent first
        self._free: deque[int] = deque(range(num_slots))

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, page_hash: str) -> bool:
        return page_hash in self._slots

    def hashes(self) -> list[str]:
        return list(self._slots)

    def lookup(self, page_hash: str) -> int | None:
        """The slot holding page_hash (now the most recently used), or None."""
        slot = self._slots.get(page_hash)
        if slot is not None:
            self._slots.move_to_end(page_hash)
        return slot

    def store(self, page_hash: str) -> int | None:
        """A slot for a page that is not here yet, evicting the least recently used page when
        the tier is full; None when the page is here already (it only becomes most recent)."""
        if self.lookup(page_hash) is not None or self.num_slots == 0:
            return None
        if self._free:
            slot = self._free.popleft()
        else:
            evicted, slot = self._slots.popitem(last=False)
            self._emit("removed", evicted)
        self._slots[page_hash] = slot
        self._emit("stored", page_hash)
        return slot

    def discard(self, page_hash: str) -> None:
        """Forgets a page whose bytes did not all land (its slot is free again)."""
        slot = self._slots.pop(page_hash, None)
        if slot is not None:
            self._free.append(slot)
            self._emit("removed", page_hash)

    def _emit(self, kind, page_hash: str) -> None:
        if self.listener is not None:
            self.listener(PageEvent(kind, (page_hash,), tier="host"))

    def check_invariants(self) -> None:
        slots = list(self._slots.values()) + list(self._free)
        assert sorted(slots) == list(range(self.num_slots)), "a host slot is lost or shared"

"""The page pool: refcounts, prefix caching by chained hash, LRU eviction, events.

A page is in exactly one of three states:
    free        no content worth keeping                      (in `_free`)
    cached      full page with a hash, no sequence uses it      (in `_evictable`, LRU order)
    in use      referenced by >= 1 sequence, maybe hashed       (refcount > 0)
Free pages are handed out first; when none are left the least recently used cached page is
evicted (its hash is dropped and a `removed` event emitted). With a host tier (`HostPageIndex`)
an evicted page is copied to host memory first, and a prefix page found only there is copied
back into a fresh page: both copies are recorded in `transfers`, for the step to execute.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Literal

from kernels import BLOCK_SIZE
from worker.engine.host_tier import HostPageIndex, PageTransfer
from worker.engine.sequence import Sequence
from worker.wire import PageEvent, PageEventListener


def pages_for(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


class BlockManager:
    def __init__(self, num_pages: int, salt: str, enable_prefix_caching: bool = True,
                 listener: PageEventListener | None = None, debug_checks: bool = False,
                 host: HostPageIndex | None = None):
        self.num_pages = num_pages
        self.salt = salt
        self.enable_prefix_caching = enable_prefix_caching
        self.listener = listener
        self.debug_checks = debug_checks
        self._ref_counts = [0] * num_pages
        self._page_hash: list[str | None] = [None] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._cached: dict[str, int] = {}  # hash -> page holding that prefix page
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.host = host
        self.transfers: list[PageTransfer] = []  # recorded copies the next step executes
        self.num_pages_from_host = 0  # prefix pages copied back from the host tier, ever

    @property
    def num_available_pages(self) -> int:
        """Pages a new allocation can get: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_pages_in_use(self) -> int:
        """Pages referenced by live sequences (not free, not merely cached)."""
        return self.num_pages - self.num_available_pages

    def cached_hashes(self) -> list[str]:
        """Every prefix page hash this pool can serve now (for re-publishing an index)."""
        return list(self._cached)

    def hashes_by_tier(self) -> dict[str, list[str]]:
        """Every prefix page hash this replica can serve, by tier (for re-publishing an index)."""
        return {"device": self.cached_hashes(),
                "host": self.host.hashes() if self.host is not None else []}

    def holds(self, page_hash: str) -> bool:
        """Whether this replica holds the page, in either tier."""
        return page_hash in self._cached or (self.host is not None and page_hash in self.host)

    def num_leading_cached(self, page_hashes: list[str]) -> int:
        """How many leading pages of a hash chain this replica holds, in either tier."""
        count = 0
        while count < len(page_hashes) and self.holds(page_hashes[count]):
            count += 1
        return count

    def device_page(self, page_hash: str) -> int | None:
        return self._cached.get(page_hash)

    def take_transfers(self) -> list[PageTransfer]:
        transfers, self.transfers = self.transfers, []
        return transfers

    # -- sequence lifecycle ---------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> None:
        """Takes the cached pages of the longest cached prefix of a new sequence.

        At least one token is always left to compute, so the step produces logits.
        """
        assert not seq.page_ids, "match_prefix is for sequences without pages"
        if not self.enable_prefix_caching:
            return
        matchable = (seq.num_tokens - 1) // BLOCK_SIZE
        for page_hash in seq.page_hashes(self.salt)[:matchable]:
            page = self._cached.get(page_hash)
            if page is not None:
                self._acquire(page)
            elif not self.num_available_pages or (page := self._from_host(page_hash)) is None:
                break
            seq.page_ids.append(page)
        seq.num_computed_tokens = len(seq.page_ids) * BLOCK_SIZE
        seq.num_registered_pages = len(seq.page_ids)
        self._check()

    def share_prompt(self, seq: Sequence, source: Sequence) -> None:
        """Gives a new parallel sample (n > 1) the full prompt pages its sibling has computed:
        one copy of the prompt's K/V for all samples, with or without prefix caching. The
        partial last page is not shared (each sample writes its own tokens after it), so
        each sample computes at most one page of the prompt itself."""
        assert not seq.page_ids, "share_prompt is for sequences without pages"
        shared = min((seq.num_tokens - 1) // BLOCK_SIZE, seq.num_prompt_tokens // BLOCK_SIZE,
                     source.num_computed_tokens // BLOCK_SIZE, len(source.page_ids))
        for page in source.page_ids[:shared]:
            self._acquire(page)
            seq.page_ids.append(page)
        seq.num_computed_tokens = shared * BLOCK_SIZE
        seq.num_registered_pages = shared  # the sibling published them, if caching is on
        self._check()

    def reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Gives seq the pages for its next num_new_tokens; False (and nothing taken) if short."""
        needed = pages_for(seq.num_computed_tokens + num_new_tokens) - len(seq.page_ids)
        if needed > self.num_available_pages:
            return False
        for _ in range(needed):
            seq.page_ids.append(self._take_fresh_page())
        self._check()
        return True

    def register_full_pages(self, seq: Sequence) -> None:
        """Publishes the pages that became full and computed in the last step (a token
        still on the device cannot be hashed: its page waits for the next call)."""
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // BLOCK_SIZE
        if not self.enable_prefix_caching or full <= seq.num_registered_pages:
            return
        hashes = seq.page_hashes(self.salt)
        stored = []
        for index in range(seq.num_registered_pages, full):
            page, page_hash = seq.page_ids[index], hashes[index]
            # If another sequence published the same prefix first, keep theirs: ours stays
            # unhashed and returns to the free list when released.
            if page_hash not in self._cached and self._page_hash[page] is None:
                self._cached[page_hash] = page
                self._page_hash[page] = page_hash
                stored.append(page_hash)
        seq.num_registered_pages = full
        self._emit("stored", stored)

    def free(self, seq: Sequence) -> None:
        """Drops seq's references; hashed pages stay cached (evictable), the rest are freed."""
        # Release the tail first so that, at equal age, a prefix outlives its continuation.
        for page in reversed(seq.page_ids):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                if self._page_hash[page] is not None:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        seq.page_ids = []
        self._check()

    # -- internals ------------------------------------------------------------------------------
    def _from_host(self, page_hash: str) -> int | None:
        """A fresh device page (referenced once) that the next step fills from the host tier's
        copy of page_hash, or None if the host tier does not hold it."""
        if self.host is None or self.host.lookup(page_hash) is None:  # (now most recent)
            return None
        page = self._take_fresh_page()  # may copy its victim out to the host tier
        slot = self.host.lookup(page_hash)
        if slot is None:  # the victim's copy took this page's slot (a tier of one page)
            self._ref_counts[page] = 0
            self._free.append(page)
            return None
        self.transfers.append(PageTransfer(to_host=False, page=page, slot=slot))
        self._cached[page_hash] = page
        self._page_hash[page] = page_hash
        self.num_pages_from_host += 1
        self._emit("stored", [page_hash])
        return page

    def _acquire(self, page: int) -> None:
        if self._ref_counts[page] == 0:
            del self._evictable[page]
        self._ref_counts[page] += 1

    def _take_fresh_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            evicted = self._page_hash[page]
            del self._cached[evicted]
            self._page_hash[page] = None
            self._emit("removed", [evicted])
            if self.host is not None and (slot := self.host.store(evicted)) is not None:
                self.transfers.append(PageTransfer(to_host=True, page=page, slot=slot))
        self._ref_counts[page] = 1
        return page

    def _emit(self, kind: Literal["stored", "removed"], hashes: list[str]) -> None:
        if hashes and self.listener is not None:
            self.listener(PageEvent(kind, tuple(hashes)))

    def _check(self) -> None:
        if self.debug_checks:
            self.check_invariants()

    def check_invariants(self, live_sequences: list[Sequence] | None = None) -> None:
        """Raises AssertionError if the pool's bookkeeping is inconsistent."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & evictable, "a page is both free and cached"
        for page, refs in enumerate(self._ref_counts):
            assert refs >= 0, f"page {page} has refcount {refs}"
            if refs > 0:
                assert page not in free and page not in evictable, f"page {page} in use and free"
            else:
                assert page in free or page in evictable, f"page {page} is lost"
        for page_hash, page in self._cached.items():
            assert self._page_hash[page] == page_hash, f"hash map and page {page} disagree"
        assert all(self._page_hash[p] is not None for p in evictable), "unhashed evictable page"
        if self.host is not None:
            self.host.check_invariants()
        if live_sequences is not None:
            expected = [0] * self.num_pages
            for seq in live_sequences:
                for page in seq.page_ids:
                    expected[page] += 1
            assert expected == self._ref_counts, "refcounts differ from the live sequences' pages"

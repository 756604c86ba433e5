"""The running sequences' page lists as one persistent host table, a row per sequence.

A step's block table is one gather of its sequences' rows. A row is written only where its
sequence gained pages since the row was last used (a decode step gains one every BLOCK_SIZE
tokens), so building the table costs O(batch), not a tensor per sequence of all its pages
(O(pages) each) every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import BLOCK_SIZE
from worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class _Row:
    index: int
    # The page list the row mirrors. The block manager appends to a sequence's list and
    # replaces it (never edits it) when the pages are freed, so a different list means the
    # row must be written again from its first page.
    pages: list[int]
    num_written: int = 0


class BlockTables:
    def __init__(self, num_rows: int, max_pages: int):
        self.table = torch.zeros(num_rows, max_pages, dtype=torch.int32)
        self._rows: dict[Sequence, _Row] = {}
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def gather(self, sequences: list[Sequence], width: int) -> torch.Tensor:
        """int32 [len(sequences), width]: row b holds sequences[b]'s page ids; columns past a
        sequence's pages hold stale ids (nothing reads past a sequence's length)."""
        indices = [self._sync(seq).index for seq in sequences]
        return self.table[torch.tensor(indices), :width]

    def _sync(self, seq: Sequence) -> _Row:
        row = self._rows.get(seq)
        if row is None or row.pages is not seq.page_ids:
            index = row.index if row is not None else self._take_row()
            row = self._rows[seq] = _Row(index, seq.page_ids)
        pages = seq.page_ids
        if len(pages) > row.num_written:
            self.table[row.index, row.num_written:len(pages)] = torch.tensor(
                pages[row.num_written:], dtype=torch.int32)
            row.num_written = len(pages)
        return row

    def _take_row(self) -> int:
        if not self._free_rows:
            # Rows of sequences that left the running set (finished, or preempted and to be
            # written afresh) go back; a step's sequences are all running.
            for seq in [s for s in self._rows if s.status is not SequenceStatus.RUNNING]:
                self._free_rows.append(self._rows.pop(seq).index)
        if not self._free_rows:  # more running sequences than rows: grow
            grown = self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
            self._free_rows = list(range(2 * grown - 1, grown - 1, -1))
        return self._free_rows.pop()


def slot_mapping(block_table: torch.Tensor, rows: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """int64 cache slot of each token: in page block_table[row, position // BLOCK_SIZE], at
    offset position % BLOCK_SIZE."""
    pages = block_table[rows, positions // BLOCK_SIZE].long()
    return pages * BLOCK_SIZE + positions % BLOCK_SIZE

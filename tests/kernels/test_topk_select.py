"""The Triton selection-rule kernel against `reference.topk_with_local_block`."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import reference, topk_select


@pytest.mark.parametrize("topk", [1, 3, 16])
@pytest.mark.parametrize("num_pages", [1, 5, 40])
@pytest.mark.parametrize("narrow_pages", [None, 16], ids=["one-width", "narrow-rows-of-wide-table"])
def test_topk_select_matches_reference(topk, num_pages, narrow_pages, monkeypatch):
    """On CPU through Triton's interpreter, on a GPU natively. With a narrow width below the
    table's, rows whose historical blocks fit in it take the narrow path, the others the full
    one (40 pages: rows on either side of 16)."""
    if narrow_pages is not None:
        monkeypatch.setattr(topk_select, "NARROW_PAGES", narrow_pages)
    g = torch.Generator().manual_seed(topk * 100 + num_pages)
    rows, groups = 12, 2
    scores = torch.randn(rows, groups, num_pages, generator=g)
    # Positions from the first block to the last. Only blocks before a row's own compete: the
    # scan leaves any value in the others (NaN here must not be read).
    positions = torch.randint(0, num_pages * 128, (rows,), generator=g)
    positions[0], positions[1] = 0, num_pages * 128 - 1
    historical = torch.arange(num_pages)[None, :] < (positions // 128)[:, None]
    scores = scores.masked_fill(~historical[:, None, :], math.nan)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = topk_select.topk_with_local_block(scores.to(device), positions.to(device), topk).cpu()
    ref = reference.topk_with_local_block(scores, positions, topk)
    # Historical picks may come in another order; the sets and the layout must be equal.
    assert torch.equal(ours.sort(-1).values, ref.sort(-1).values), (ours, ref)
    local = positions // 128
    for row in range(rows):
        valid = min(int(local[row]), topk - 1) + 1
        assert (ours[row, :, valid - 1] == local[row]).all()
        assert (ours[row, :, valid:] == -1).all()

"""The Triton log-sum-exp merge of partial attention outputs against a direct torch merge."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import lse_merge


@pytest.mark.parametrize("rows", [1, 41], ids=["decode-heads-spread", "prefill-slot-by-slot"])
@pytest.mark.parametrize("with_blocks", [False, True])
def test_merge_partials_matches_torch(rows, with_blocks):
    """Both launch regimes: few (row, group) pairs spread heads over programs with every slot
    at once; many take all heads and fold the slots one by one, a few rows per program (41
    rows: the last program has rows past the end)."""
    g = torch.Generator().manual_seed(rows)
    groups, group, slots, dim = 2, 8, 16, 128
    partial_out = torch.randn(rows, groups, slots, group, dim, generator=g)
    partial_lse = torch.randn(rows, groups, slots, group, generator=g) * 4
    partial_lse[0, 0, :3] = -math.inf  # slots that saw no key
    partial_lse[0, 1] = -math.inf  # a (row, group) that saw nothing at all
    blocks = torch.randint(-1, 5, (rows, groups, slots), generator=g, dtype=torch.int32)
    blocks[..., 0] = 1  # every row keeps one slot
    out = torch.full((rows, groups * group, dim), math.nan)
    lse = torch.full((rows, groups * group), math.nan)
    lse_merge.merge_partials(partial_out, partial_lse, out, lse, groups, slots,
                             blocks if with_blocks else None)

    exists = (blocks >= 0)[..., None] if with_blocks else torch.ones(1, dtype=torch.bool)
    masked = partial_lse.masked_fill(~exists, -math.inf)  # [rows, groups, slots, group]
    want_lse = masked.logsumexp(2)
    weight = torch.nan_to_num((masked - want_lse[:, :, None]).exp())
    want = (weight[..., None] * partial_out).sum(2)
    want_lse = want_lse.reshape(rows, groups * group)
    want = want.reshape(rows, groups * group, dim)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    assert torch.allclose(lse, want_lse, atol=1e-5)
    assert not out.isnan().any()
    assert torch.allclose(out, want, atol=1e-5)
    assert (out[0, group:2 * group] == 0).all()  # nothing seen: zeros, lse -inf

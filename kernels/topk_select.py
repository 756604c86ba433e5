"""Triton: the selection rule (`reference.topk_with_local_block`) as one kernel.

The torch version is ~10 small kernels (mask, topk, where, scatter, ...); in a decode step they
cost more than the index scan itself once the scan reads fp8 keys. Here one program per
(query row, KV group) keeps the row's historical block scores in registers, takes the best
topk - 1 by repeated max (exp-free, ties to the lower block id), then places the local block
in the last valid slot and -1 after it, as the spec's row layout says.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import BLOCK_SIZE
from kernels.triton_layout import dependent_launch, release_next_kernel, wait_for_previous_kernel

# Block scores per thread, and at most 8 warps: the repeated max is a chain of reductions,
# each one's cross-warp step costs a shared-memory round trip, but a warp with many scores
# walks them serially (H100 timings: bench/results/kernels_h100.md, 'topk_select').
SCORES_PER_THREAD = 8
MAX_WARPS = 8
# A CUDA graph's block table is as wide as the longest context it serves (8,192 pages at 1M),
# but a row competes only among its own historical pages: rows that fit in this many take the
# narrow path, its reductions over these lanes alone.
NARROW_PAGES = 1024


@triton.jit
def _topk_local_block_kernel(
    scores, positions, selected, stride_st, stride_sg, num_groups,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, BLOCK_P: tl.constexpr, NARROW_P: tl.constexpr,
    PAGE: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0)
    group = tl.program_id(1)
    wait_for_previous_kernel(USE_PDL)  # the scan's scores and positions
    release_next_kernel(USE_PDL)  # the attention's prologue may overlap this small kernel
    local = (tl.load(positions + row) // PAGE).to(tl.int32)
    row_scores = scores + row * stride_st + group * stride_sg
    if NARROW_P < BLOCK_P:  # a wide table
        if local <= NARROW_P:
            chosen = _best_historical_blocks(row_scores, local, TOPK, TOPK_P2, NARROW_P)
        else:
            chosen = _best_historical_blocks(row_scores, local, TOPK, TOPK_P2, BLOCK_P)
    else:
        chosen = _best_historical_blocks(row_scores, local, TOPK, TOPK_P2, BLOCK_P)
    slots = tl.arange(0, TOPK_P2)
    chosen = tl.where(slots == tl.minimum(local, TOPK - 1), local, chosen)
    tl.store(selected + (row * num_groups + group) * TOPK + slots, chosen, mask=slots < TOPK)


@triton.jit
def _best_historical_blocks(row_scores, local, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
                            WIDTH: tl.constexpr):
    """The best topk - 1 of the row's blocks before its own (`local`, at most WIDTH), best
    first, ties to the lower block id; -1 in the slots past them."""
    pages = tl.arange(0, WIDTH)
    # Only historical blocks compete; every one of them was scored (all of it is visible).
    s = tl.load(row_scores + pages, mask=pages < local, other=float("-inf"))
    slots = tl.arange(0, TOPK_P2)
    chosen = tl.full([TOPK_P2], -1, tl.int32)
    for i in tl.static_range(TOPK - 1):
        best = tl.argmax(s, axis=0).to(tl.int32)
        chosen = tl.where((slots == i) & (i < local), best, chosen)
        s = tl.where(pages == best, float("-inf"), s)
    return chosen


def topk_with_local_block(block_scores: torch.Tensor, positions: torch.Tensor,
                          topk: int) -> torch.Tensor:
    """Same contract as `reference.topk_with_local_block`: int32 [t, Hkv, topk]."""
    num_rows, num_groups, num_pages = block_scores.shape
    selected = torch.empty(num_rows, num_groups, topk, dtype=torch.int32,
                           device=block_scores.device)
    if num_rows == 0:
        return selected
    block_p = max(16, triton.next_power_of_2(num_pages))
    _topk_local_block_kernel[(num_rows, num_groups)](
        block_scores, positions, selected, block_scores.stride(0), block_scores.stride(1),
        num_groups, TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), BLOCK_P=block_p,
        NARROW_P=min(block_p, NARROW_PAGES), PAGE=BLOCK_SIZE,
        USE_PDL=dependent_launch(block_scores.device),
        num_warps=min(MAX_WARPS, max(1, block_p // (32 * SCORES_PER_THREAD))),
        launch_pdl=dependent_launch(block_scores.device))
    return selected

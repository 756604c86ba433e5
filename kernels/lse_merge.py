"""Triton: exact merge of per-slot partial attention outputs by log-sum-exp.

Both sparse-attention kernels may produce, for one (query row, KV group), several partial
results over disjoint key sets: the query-major kernel one per split of the selected blocks,
the KV-major kernel one per selected block. Partials are laid out
[row, group, slot, head, dim] (log-sum-exps [row, group, slot, head]); one program merges a
row's group: out = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i lse_i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    partial_out, partial_lse, blocks, out, lse, stride_ot, stride_oh, stride_lt, num_groups,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
    HAS_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    h = tl.arange(0, BLOCK_G)
    head_ok = h < GROUP
    dims = tl.arange(0, HEAD_DIM)
    total_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    base = (row * num_groups + group) * SLOTS
    for slot in range(SLOTS):
        # Slots of unselected (-1) blocks were never written: skip them by the selection.
        use = head_ok
        if HAS_BLOCKS:
            use = use & (tl.load(blocks + base + slot) >= 0)
        part_lse = tl.load(partial_lse + (base + slot) * GROUP + h, mask=use, other=float("-inf"))
        part_out = tl.load(partial_out + ((base + slot) * GROUP + h)[:, None] * HEAD_DIM
                           + dims[None, :], mask=use[:, None], other=0.0).to(tl.float32)
        new_max = tl.maximum(total_max, part_lse)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(total_max - ref)
        weight = tl.exp(part_lse - ref)
        total_sum = total_sum * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * part_out
        total_max = new_max
    seen = total_sum > 0
    result = acc / tl.where(seen, total_sum, 1.0)[:, None]
    row_lse = tl.where(seen, total_max + tl.log(tl.where(seen, total_sum, 1.0)), float("-inf"))
    heads = group * GROUP + h
    tl.store(out + row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             result.to(out.dtype.element_ty), mask=head_ok[:, None])
    tl.store(lse + row * stride_lt + heads, row_lse, mask=head_ok)


def merge_partials(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, num_groups: int, slots: int,
                   blocks: torch.Tensor | None = None) -> None:
    """Writes out [T, Hq, D] and lse [T, Hq] from partials of `slots` slots per (row, group).

    blocks (contiguous [T, Hkv, slots]) marks which slots exist; without it every slot was
    written (a slot that saw no key carries lse -inf).
    """
    total_q, num_heads, head_dim = out.shape
    if total_q == 0:
        return
    group = num_heads // num_groups
    _merge_kernel[(total_q, num_groups)](
        partial_out, partial_lse, blocks if blocks is not None else partial_lse, out, lse,
        out.stride(0), out.stride(1), lse.stride(0), num_groups,
        GROUP=group, BLOCK_G=triton.next_power_of_2(group), HEAD_DIM=head_dim, SLOTS=slots,
        HAS_BLOCKS=blocks is not None)

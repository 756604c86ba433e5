"""Triton: exact merge of per-slot partial attention outputs by log-sum-exp.

Both sparse-attention kernels may produce, for one (query row, KV group), several partial
results over disjoint key sets: the query-major kernel one per split of the selected blocks,
the KV-major kernel one per selected block. Partials are laid out
[row, group, slot, head, dim] (log-sum-exps [row, group, slot, head]); one program merges a
few heads of a row's group: out = sum_i exp(lse_i - lse) * out_i, lse = logsumexp_i lse_i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_layout import dependent_launch, wait_for_previous_kernel


@triton.jit
def _merge_kernel(
    partial_out, partial_lse, blocks, out, lse, stride_ot, stride_oh, stride_lt, num_groups,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_BLOCKS: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    slots = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    base = (row * num_groups + group) * SLOTS
    wait_for_previous_kernel(USE_PDL)  # the partials
    # Every slot of BLOCK_H heads is loaded at once (one round trip, not a loop of dependent
    # ones). Slots of unselected (-1) blocks were never written: the selection masks them.
    use = (slots < SLOTS)[:, None] & (h < GROUP)[None, :]
    if HAS_BLOCKS:
        chosen = tl.load(blocks + base + slots, mask=slots < SLOTS, other=-1) >= 0
        use = use & chosen[:, None]
    cell = (base + slots)[:, None] * GROUP + h[None, :]  # [BLOCK_S, BLOCK_H]
    part_lse = tl.load(partial_lse + cell, mask=use, other=float("-inf"))
    part_out = tl.load(partial_out + cell[:, :, None] * HEAD_DIM + dims[None, None, :],
                       mask=use[:, :, None], other=0.0).to(tl.float32)
    top = tl.max(part_lse, axis=0)
    ref = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(part_lse - ref[None, :])
    total = tl.sum(weight, axis=0)
    acc = tl.sum(weight[:, :, None] * part_out, axis=0)
    seen = total > 0
    result = acc / tl.where(seen, total, 1.0)[:, None]
    row_lse = tl.where(seen, ref + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    heads = group * GROUP + h
    tl.store(out + row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             result.to(out.dtype.element_ty), mask=(h < GROUP)[:, None])
    tl.store(lse + row * stride_lt + heads, row_lse, mask=h < GROUP)


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
    block_s = triton.next_power_of_2(slots)
    # ~4K partial values per program: all of its slots in registers at once.
    block_h = max(1, min(triton.next_power_of_2(group), 4096 // (block_s * head_dim)))
    _merge_kernel[(total_q, num_groups, triton.cdiv(group, block_h))](
        partial_out, partial_lse, blocks if blocks is not None else partial_lse, out, lse,
        out.stride(0), out.stride(1), lse.stride(0), num_groups,
        GROUP=group, BLOCK_H=block_h, HEAD_DIM=head_dim, SLOTS=slots, BLOCK_S=block_s,
        HAS_BLOCKS=blocks is not None, USE_PDL=dependent_launch(out.device),
        launch_pdl=dependent_launch(out.device))

"""Triton: exact merge of per-slot partial attention outputs by log-sum-exp.

Both sparse-attention kernels may produce, for one (query row, KV group), several partial
results over disjoint key sets: the query-major kernel one per split of the selected blocks,
the KV-major kernel one per selected block. Partials are laid out
[row, group, slot, head, dim] (log-sum-exps [row, group, slot, head]); one program merges the
group of a few rows (or, in small decode batches, a few heads of one row): out =
sum_i exp(lse_i - lse) * out_i, lse = logsumexp_i lse_i.

Decode's merge may also hand out quantized to e4m3 as o_proj's FP8 GEMM takes it, a head per
scale group (`reference.ActivationLayout`): the GEMM then launches no quantization kernel of its
own, which at decode batches costs it a tenth of its time (bench/results/fp8_picks_<gpu>.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quantize import E4M3_MIN_NORMAL, quantize_groups
from kernels.reference import AMAX_FLOOR, E4M3_MAX, QuantizedRows
from kernels.triton_layout import (
    AttentionShape,
    GatedOutput,
    dependent_launch,
    multiprocessors,
    stands_aside,
    wait_for_previous_kernel,
)

PROGRAMS_PER_SM = 4  # fewer (row, group) pairs than this per SM: spread heads over programs
# A decode program loads this many partial values at once, with one warp: small programs, many
# of them, keep the most loads in flight for a merge of a few rows (H200: 1.5-3.2x faster than
# 4096 values on four warps; bench/results/fp8_chains_h200.md, 'The decode merge's tiles').
DECODE_TILE_VALUES = 1024
DECODE_WARPS = 1
# Rows a prefill program merges one after the other: a gated merge that stands aside still
# launches its grid (`GatedOutput`), whose empty programs cost less the more rows each takes;
# merging rows in turn costs nothing when it runs (kernels_h100.md, 'lse_merge').
PREFILL_ROWS_PER_PROGRAM = 4


@triton.jit
def _merge_kernel(
    partial_out, partial_lse, blocks, out, scales, lse, gate_flag, stride_ot, stride_oh,
    stride_st, stride_sh, stride_lt, total_rows, num_groups, GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
    SLOT_CHUNK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, HAS_BLOCKS: tl.constexpr,
    QUANTIZE: tl.constexpr, ROUND_TO: tl.constexpr, E4M3_MAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr, E4M3_MIN_NORMAL: tl.constexpr, USE_PDL: tl.constexpr,
    GATE: tl.constexpr,
):
    group = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = h < GROUP
    heads = group * GROUP + h
    dims = tl.arange(0, HEAD_DIM)
    wait_for_previous_kernel(USE_PDL)  # the partials
    if stands_aside(gate_flag, GATE):  # GatedOutput: the other kernel writes
        return
    for r in tl.static_range(ROWS_PER_PROGRAM):
        row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + r
        if row < total_rows:
            result, row_lse = _merge_row(partial_out, partial_lse, blocks, num_groups, row,
                                         group, h, head_ok, GROUP, BLOCK_H, HEAD_DIM, SLOTS,
                                         SLOT_CHUNK, HAS_BLOCKS)
            cells = out + row * stride_ot + heads[:, None] * stride_oh + dims[None, :]
            if QUANTIZE:
                # Rounded to the queries' dtype first: the bytes of the output, then quantized.
                quantized, scale = quantize_groups(result.to(ROUND_TO).to(tl.float32),
                                                   E4M3_MAX, AMAX_FLOOR, E4M3_MIN_NORMAL)
                tl.store(cells, quantized, mask=head_ok[:, None])
                tl.store(scales + row * stride_st + heads * stride_sh, scale, mask=head_ok)
            else:
                tl.store(cells, result.to(out.dtype.element_ty), mask=head_ok[:, None])
            tl.store(lse + row * stride_lt + heads, row_lse, mask=head_ok)


@triton.jit
def _merge_row(partial_out, partial_lse, blocks, num_groups, row, group, h, head_ok,
               GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
               SLOTS: tl.constexpr, SLOT_CHUNK: tl.constexpr, HAS_BLOCKS: tl.constexpr):
    """One (row, group)'s slots merged for heads h of the group: (out [BLOCK_H, HEAD_DIM] in
    fp32, lse [BLOCK_H])."""
    dims = tl.arange(0, HEAD_DIM)
    base = (row * num_groups + group) * SLOTS
    total_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    # SLOT_CHUNK slots per iteration, loaded at once (few dependent round trips); chunks are
    # folded by the same running log-sum-exp as single slots would be.
    for first in tl.static_range(0, SLOTS, SLOT_CHUNK):
        slots = first + tl.arange(0, SLOT_CHUNK)
        use = (slots < SLOTS)[:, None] & head_ok[None, :]
        if HAS_BLOCKS:  # slots of unselected (-1) blocks were never written
            chosen = tl.load(blocks + base + slots, mask=slots < SLOTS, other=-1) >= 0
            use = use & chosen[:, None]
        cell = (base + slots)[:, None] * GROUP + h[None, :]  # [SLOT_CHUNK, BLOCK_H]
        part_lse = tl.load(partial_lse + cell, mask=use, other=float("-inf"))
        part_out = tl.load(partial_out + cell[:, :, None] * HEAD_DIM + dims[None, None, :],
                           mask=use[:, :, None], other=0.0).to(tl.float32)
        new_max = tl.maximum(total_max, tl.max(part_lse, axis=0))
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(total_max - ref)
        weight = tl.exp(part_lse - ref[None, :])
        total_sum = total_sum * alpha + tl.sum(weight, axis=0)
        acc = acc * alpha[:, None] + tl.sum(weight[:, :, None] * part_out, axis=0)
        total_max = new_max
    seen = total_sum > 0
    result = acc / tl.where(seen, total_sum, 1.0)[:, None]
    row_lse = tl.where(seen, total_max + tl.log(tl.where(seen, total_sum, 1.0)), float("-inf"))
    return result, row_lse


def split_outputs(shape: AttentionShape, out: torch.Tensor | QuantizedRows, lse: torch.Tensor,
                  splits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where split-K programs write before `merge_partials`: out [T, Hq, D] and lse themselves
    for one split, else partials [T, Hkv, splits, G, D] in dtype and float32 LSEs."""
    if splits == 1:
        return out, lse
    size = (shape.total_q, shape.num_groups, splits, shape.group)
    return (torch.empty(*size, shape.head_dim, dtype=dtype, device=lse.device),
            torch.empty(size, dtype=torch.float32, device=lse.device))


_ROUND_TO = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def merge_partials(partial_out: torch.Tensor, partial_lse: torch.Tensor,
                   out: torch.Tensor | QuantizedRows, lse: torch.Tensor, num_groups: int,
                   slots: int, blocks: torch.Tensor | None = None, chained: bool = False,
                   gated: GatedOutput | None = None) -> None:
    """Writes out [T, Hq, D] and lse [T, Hq] from partials of `slots` slots per (row, group).

    out may be `QuantizedRows` of [T, Hq * D] in scale groups as wide as a head: the merged
    heads quantized as `reference.quantize_activations` would them (from `AttentionShape.outputs`
    with the layout). blocks (contiguous [T, Hkv, slots]) marks which slots exist; without it
    every slot was written (a slot that saw no key carries lse -inf). chained: the kernel before
    released this one early (programmatic dependent launch); after any other kernel a dependent
    launch only holds SMs while it waits (KV-major prefill: +0.3 ms at 16K rows on an H100).
    gated: merge only if its flag says so (its buffers are out and lse).
    """
    (total_q, num_heads), head_dim = lse.shape, partial_out.shape[-1]
    if total_q == 0:
        return
    quantize = isinstance(out, QuantizedRows)
    if quantize:
        if out.layout.group != head_dim:
            raise ValueError(f"the merge quantizes a head ({head_dim} values) per scale group, "
                             f"not groups of {out.layout.group}")
        values, scales, round_to = out.values.view(-1, num_heads, head_dim), out.scales, out.dtype
    else:
        values, scales, round_to = out, lse, out.dtype  # scales: any pointer, never written
    group = num_heads // num_groups
    block_s = triton.next_power_of_2(slots)
    pdl = chained and dependent_launch(lse.device)
    all_heads = triton.next_power_of_2(group)
    if total_q * num_groups >= PROGRAMS_PER_SM * multiprocessors(lse.device):
        # Enough (row, group) programs to hide latency: all heads, slot by slot (faster than
        # loading several slots at once: kernels_h100.md).
        block_h, slot_chunk = all_heads, 1
        rows_per_program, warps = PREFILL_ROWS_PER_PROGRAM, 4
    else:  # decode: heads spread over programs, every slot of a head loaded at once
        block_h = max(1, min(all_heads, DECODE_TILE_VALUES // (block_s * head_dim)))
        slot_chunk = block_s
        rows_per_program, warps = 1, DECODE_WARPS
    gate_flag, gate = GatedOutput.launch_args(gated, partial_lse)
    _merge_kernel[(triton.cdiv(total_q, rows_per_program), num_groups,
                   triton.cdiv(group, block_h))](
        partial_out, partial_lse, blocks if blocks is not None else partial_lse, values, scales,
        lse, gate_flag, values.stride(0), values.stride(1), scales.stride(0),
        scales.stride(1), lse.stride(0), total_q, num_groups, GROUP=group, BLOCK_H=block_h,
        HEAD_DIM=head_dim, SLOTS=slots, SLOT_CHUNK=slot_chunk,
        ROWS_PER_PROGRAM=rows_per_program, HAS_BLOCKS=blocks is not None, QUANTIZE=quantize,
        ROUND_TO=_ROUND_TO[round_to], E4M3_MAX=E4M3_MAX, AMAX_FLOOR=AMAX_FLOOR,
        E4M3_MIN_NORMAL=E4M3_MIN_NORMAL, USE_PDL=pdl, GATE=gate, num_warps=warps,
        launch_pdl=pdl)

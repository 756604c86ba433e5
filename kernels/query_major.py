"""Triton: query-major sparse attention (paged decode, and prefill's baseline / short chunks).

One program per (query row, KV group, split of the row's selected blocks). The group's G query
heads are packed into the MMA's M dimension, so each selected page is loaded once for all of
them; an online softmax runs over the pages of the split. With several splits (small batches:
split-K across the top-k blocks so the GPU fills), each split writes a partial output and its
log-sum-exp and the shared LSE-merge kernel combines them exactly. Each program finds its
row's sequence by a binary search over cu_seqlens_q, so no per-step metadata is built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quantize import quantize_rows
from kernels.lse_merge import merge_partials, split_outputs
from kernels.reference import BLOCK_SIZE, ActivationLayout
from kernels.triton_layout import (
    LOG2E,
    AttentionShape,
    GatedOutput,
    dependent_launch,
    dot_precision,
    finish_softmax,
    multiprocessors,
    online_softmax_step,
    page_rows,
    release_next_kernel,
    search_steps,
    segment_of,
    stands_aside,
    wait_for_previous_kernel,
)

# Split-K target for small batches: programs per SM over the whole grid.
PROGRAMS_PER_SM = 4
NUM_STAGES = 2


@triton.jit
def _query_major_kernel(
    q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, blocks, out, lse, gate_flag,
    stride_qt, stride_qh, stride_bt, stride_blt, stride_blg,
    num_seqs, num_groups, num_splits, scale_log2, blocks_per_split,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, TOPK: tl.constexpr,
    PAGE: tl.constexpr, PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr, SEARCH_STEPS: tl.constexpr, USE_PDL: tl.constexpr,
    GATE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    split = tl.program_id(2)
    # Before any load: any input may come from the kernel just before (the selection, the
    # cache write, the queries), and the outputs may reuse memory that kernel reads.
    wait_for_previous_kernel(USE_PDL)
    if stands_aside(gate_flag, GATE):  # GatedOutput: the other kernel writes
        return
    seq = segment_of(cu_seqlens_q, row, num_seqs, SEARCH_STEPS)
    pos = tl.load(seq_lens + seq) - tl.load(cu_seqlens_q + seq + 1) + row

    h = tl.arange(0, BLOCK_G)
    heads = group * GROUP + h
    head_ok = h < GROUP
    dims = tl.arange(0, HEAD_DIM)
    query = tl.load(q + row * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                    mask=head_ok[:, None], other=0.0)
    tokens = tl.arange(0, PAGE)
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    first = split * blocks_per_split
    # A -1 (padding) slot copies the sequence's first page and masks all of its scores: no
    # branch, so the loop stays software-pipelined.
    for slot in tl.range(first, tl.minimum(first + blocks_per_split, TOPK), num_stages=NUM_STAGES):
        block = tl.load(blocks + row * stride_blt + group * stride_blg + slot)
        chosen = block >= 0
        physical = tl.load(block_table + seq * stride_bt + tl.maximum(block, 0))
        k = k_pages.load([physical * PAGE, group * HEAD_DIM])  # TMA copies (`page_rows`)
        v = v_pages.load([physical * PAGE, group * HEAD_DIM])
        s = tl.dot(query, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(chosen & ((block * PAGE + tokens)[None, :] <= pos), s, float("-inf"))
        acc, running_max, running_sum = online_softmax_step(s, v, acc, running_max, running_sum,
                                                            True, PRECISION)

    release_next_kernel(USE_PDL)
    result, row_lse = finish_softmax(acc, running_max, running_sum)
    # Layout [row, group, split, head, dim]: with one split it is the final [row, Hq, D].
    slot = ((row * num_groups + group) * num_splits + split) * GROUP + h
    tl.store(out + slot[:, None] * HEAD_DIM + dims[None, :], result.to(out.dtype.element_ty),
             mask=head_ok[:, None])
    tl.store(lse + slot, row_lse, mask=head_ok)


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     gated: GatedOutput | None = None,
                     quantized: ActivationLayout | None = None):
    """gated: write there, only if its flag says so. quantized: out [T, Hq * D] as o_proj's FP8
    GEMM takes it (`QuantizedRows`), by the merge where the rows are split and a head is one
    scale group, else by a quantization kernel after."""
    shape = AttentionShape.of(q, k_cache, blocks, softmax_scale)
    total_q, head_dim = shape.total_q, shape.head_dim
    num_groups, group, topk = shape.num_groups, shape.group, shape.topk
    splits = decode_splits(total_q, num_groups, topk, q.device)
    blocks_per_split = triton.cdiv(topk, splits)
    merge_quantizes = (quantized is not None and splits > 1 and quantized.group == head_dim)
    # One split writes the final output directly; several write float32 partials to merge.
    out, row_lse = shape.outputs(q, gated, quantized if merge_quantizes else None)
    partial_out, partial_lse = split_outputs(shape, out, row_lse, splits, torch.float32)
    if total_q:
        num_seqs = seq_lens.shape[0]
        gate_flag, gate = GatedOutput.launch_args(gated, cu_seqlens_q)
        _query_major_kernel[(total_q, num_groups, splits)](
            q, page_rows(k_cache), page_rows(v_cache), block_table, seq_lens, cu_seqlens_q,
            blocks, partial_out, partial_lse, gate_flag, q.stride(0), q.stride(1),
            block_table.stride(0), blocks.stride(0),
            blocks.stride(1), num_seqs, num_groups, splits, shape.scale * LOG2E,
            blocks_per_split, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim, TOPK=topk, PAGE=BLOCK_SIZE, PRECISION=dot_precision(q.dtype),
            NUM_STAGES=NUM_STAGES, SEARCH_STEPS=search_steps(num_seqs),
            USE_PDL=dependent_launch(q.device), GATE=gate,
            launch_pdl=dependent_launch(q.device))
    if splits > 1:
        merge_partials(partial_out, partial_lse, out, row_lse, num_groups, splits,
                       chained=True, gated=gated)
    if quantized is not None and not merge_quantizes:
        out = quantize_rows(out.view(total_q, -1), quantized)
    return (out, row_lse) if return_lse else out


def decode_splits(total_q: int, num_groups: int, topk: int, device: torch.device) -> int:
    """How many splits of its selected blocks each (row, KV group) runs in: enough programs to
    fill the GPU, every split at least one block and none empty."""
    splits = max(1, min(topk, PROGRAMS_PER_SM * multiprocessors(device)
                        // max(1, total_q * num_groups)))
    return triton.cdiv(topk, triton.cdiv(topk, splits))

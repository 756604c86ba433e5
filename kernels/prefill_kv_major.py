"""Triton: KV-block-major sparse prefill ("KV outer, gather Q").

Query-major attention reloads a popular block once for every query that chose it. Here the
selection is inverted first: for each (sequence, KV group, block) the list of (query row, slot)
entries that chose it, a CSR built on the GPU by a counting sort (three small launches, no
host sync). One
program then loads its K/V page from HBM once and attends all of its queries and the group's G
query heads at once (rows x heads packed into the MMA's M dimension), writing a partial output
and log-sum-exp per (row, group, slot). Blocks chosen by many queries are cut into several work
items (load balance). The shared LSE-merge kernel (`lse_merge.py`) then combines each row's
top-k partials exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lse_merge import merge_partials
from kernels.reference import BLOCK_SIZE
from kernels.triton_layout import (
    LOG2E,
    AttentionShape,
    GatedOutput,
    dot_precision,
    finish_softmax,
    page_rows,
    search_steps,
    segment_of,
    stands_aside,
)

_PACKED_ROWS = 128  # M of one program: query rows x query heads of the group
# From an H100 sweep of (packed rows 64/128/256) x (4/8 warps), Hq16/Hkv2: 128 rows with
# 4 warps (kernels_h100.md, 'prefill_kv_major').
NUM_WARPS = 4
# Query rows per launch, bounding the partials (rows x Hq x topk x D) to ~2 GiB: a 128K
# prompt is then a few launches, each still loading a block once for all of its rows.
_PARTIAL_BYTES = 2 << 30


@dataclass
class BlockWork:
    """The selection inverted, built on the GPU without a host sync: for every (sequence,
    group, logical block) segment, the (query row, slot) entries that chose it; work items are
    pieces of at most `rows` entries of one segment (load balance for popular blocks)."""

    segment_start: torch.Tensor  # int32 [segments]: first entry in entry_row / entry_slot
    segment_count: torch.Tensor  # int32 [segments]: entries that chose the segment's block
    items_cu: torch.Tensor  # int32 [segments + 1]: first work item of each segment
    entry_row: torch.Tensor  # int32 [t * Hkv * topk]: query row, grouped by segment
    entry_slot: torch.Tensor  # int32 [t * Hkv * topk]: the row's selection slot of that block
    max_pages: int  # segment = (seq * Hkv + group) * max_pages + block
    num_items: int  # an upper bound on the items (the grid); spare items do nothing

    @property
    def num_segments(self) -> int:
        return self.segment_count.shape[0]

    @classmethod
    def build(cls, blocks: torch.Tensor, cu_seqlens_q: torch.Tensor, first_row: int,
              max_pages: int, rows: int, gated: GatedOutput | None = None) -> "BlockWork":
        """blocks [t, Hkv, topk]: those of packed query rows first_row.. (every sequence's
        blocks are segments, so the grid is known without reading the selection).

        A counting sort: each entry takes a rank in its segment by an atomic increment, a scan
        turns the counts into segment starts and work items, and each entry lands at its
        segment's start plus its rank. Ranks follow the atomics' order, so rows within a block
        are not sorted; no result depends on it (a row's partial is its own)."""
        total_q, num_groups, topk = blocks.shape
        batch = cu_seqlens_q.shape[0] - 1
        device = blocks.device
        segments = batch * num_groups * max_pages
        entries = total_q * num_groups * topk
        counts = torch.zeros(segments, dtype=torch.int32, device=device)
        rank = torch.empty(entries, dtype=torch.int32, device=device)
        work = cls(segment_start=torch.empty(segments, dtype=torch.int32, device=device),
                   segment_count=counts,
                   items_cu=torch.empty(segments + 1, dtype=torch.int32, device=device),
                   entry_row=torch.empty(entries, dtype=torch.int32, device=device),
                   entry_slot=torch.empty(entries, dtype=torch.int32, device=device),
                   max_pages=max_pages, num_items=entries // rows + min(segments, entries))
        if total_q == 0:
            return work
        gate_flag, gate = GatedOutput.launch_args(gated, cu_seqlens_q)
        row_args = dict(GROUPS_P2=triton.next_power_of_2(num_groups), TOPK=topk,
                        TOPK_P2=triton.next_power_of_2(topk), SEARCH_STEPS=search_steps(batch),
                        ROWS_PER_PROGRAM=SORT_ROWS_PER_PROGRAM, GATE=gate)
        sort_grid = (triton.cdiv(total_q, SORT_ROWS_PER_PROGRAM),)
        _rank_entries_kernel[sort_grid](
            blocks, cu_seqlens_q, counts, rank, gate_flag, blocks.stride(0), blocks.stride(1),
            first_row, total_q, batch, num_groups, max_pages, **row_args)
        _segment_scan_kernel[(1,)](counts, work.segment_start, work.items_cu, gate_flag,
                                   segments, ROWS=rows, BLOCK=SCAN_BLOCK, GATE=gate)
        _place_entries_kernel[sort_grid](
            blocks, cu_seqlens_q, rank, work.segment_start, work.entry_row, work.entry_slot,
            gate_flag, blocks.stride(0), blocks.stride(1), first_row, total_q, batch,
            num_groups, max_pages, **row_args)
        return work


SCAN_BLOCK = 4096  # segments per step of the one-program scan
# Query rows per program of the counting sort's two per-row passes: a gated fallback that
# stands aside still launches their grids (`GatedOutput`), whose empty programs cost less the
# more rows each takes; no change when they run (kernels_h100.md).
SORT_ROWS_PER_PROGRAM = 8


@triton.jit
def _entry_segments(blocks, cu_seqlens_q, row, stride_blt, stride_blg, first_row, total_rows,
                    num_seqs, num_groups, max_pages, GROUPS_P2: tl.constexpr,
                    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """(segment of each of a row's (group, slot) entries, which are real, their flat entry
    index): shared by the two per-row passes of the counting sort. A row past the last one
    has no real entries."""
    seq = segment_of(cu_seqlens_q, first_row + row, num_seqs, SEARCH_STEPS)
    groups = tl.arange(0, GROUPS_P2)[:, None]
    slots = tl.arange(0, TOPK_P2)[None, :]
    real = (groups < num_groups) & (slots < TOPK) & (row < total_rows)
    block = tl.load(blocks + row.to(tl.int64) * stride_blt + groups * stride_blg + slots,
                    mask=real, other=-1)
    real = real & (block >= 0)
    segment = (seq * num_groups + groups) * max_pages + block
    entry = (row.to(tl.int64) * num_groups + groups) * TOPK + slots
    return segment, real, entry


@triton.jit
def _rank_entries_kernel(blocks, cu_seqlens_q, counts, rank, gate_flag, stride_blt, stride_blg,
                         first_row, total_rows, num_seqs, num_groups, max_pages,
                         GROUPS_P2: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
                         SEARCH_STEPS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                         GATE: tl.constexpr):
    if stands_aside(gate_flag, GATE):  # GatedOutput: the other kernel writes
        return
    for r in tl.static_range(ROWS_PER_PROGRAM):
        row = tl.program_id(0) * ROWS_PER_PROGRAM + r
        segment, real, entry = _entry_segments(
            blocks, cu_seqlens_q, row, stride_blt, stride_blg, first_row, total_rows, num_seqs,
            num_groups, max_pages, GROUPS_P2, TOPK, TOPK_P2, SEARCH_STEPS)
        taken = tl.atomic_add(counts + segment, 1, mask=real, sem="relaxed")
        tl.store(rank + entry, taken, mask=real)


@triton.jit
def _segment_scan_kernel(counts, segment_start, items_cu, gate_flag, num_segments,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr, GATE: tl.constexpr):
    """Exclusive prefix sum of the counts (segment starts) and inclusive one of the work items
    they cut into (pieces of ROWS entries), in one program: a few thousand segments per
    sequence and group, a handful of steps."""
    if stands_aside(gate_flag, GATE):  # GatedOutput: the other kernel writes
        return
    offsets = tl.arange(0, BLOCK)
    entries_before = 0
    items_before = 0
    tl.store(items_cu, 0)
    for first in range(0, num_segments, BLOCK):
        index = first + offsets
        count = tl.load(counts + index, mask=index < num_segments, other=0)
        pieces = (count + ROWS - 1) // ROWS
        tl.store(segment_start + index, entries_before + tl.cumsum(count, axis=0) - count,
                 mask=index < num_segments)
        tl.store(items_cu + index + 1, items_before + tl.cumsum(pieces, axis=0),
                 mask=index < num_segments)
        entries_before += tl.sum(count, axis=0)
        items_before += tl.sum(pieces, axis=0)


@triton.jit
def _place_entries_kernel(blocks, cu_seqlens_q, rank, segment_start, entry_row, entry_slot,
                          gate_flag, stride_blt, stride_blg, first_row, total_rows, num_seqs,
                          num_groups, max_pages, GROUPS_P2: tl.constexpr, TOPK: tl.constexpr,
                          TOPK_P2: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          ROWS_PER_PROGRAM: tl.constexpr, GATE: tl.constexpr):
    if stands_aside(gate_flag, GATE):  # GatedOutput: the other kernel writes
        return
    for r in tl.static_range(ROWS_PER_PROGRAM):
        row = tl.program_id(0) * ROWS_PER_PROGRAM + r
        segment, real, entry = _entry_segments(
            blocks, cu_seqlens_q, row, stride_blt, stride_blg, first_row, total_rows, num_seqs,
            num_groups, max_pages, GROUPS_P2, TOPK, TOPK_P2, SEARCH_STEPS)
        place = tl.load(segment_start + segment, mask=real, other=0) \
            + tl.load(rank + entry, mask=real, other=0)
        tl.store(entry_row + place, tl.zeros_like(segment) + row, mask=real)
        tl.store(entry_slot + place, (entry % TOPK).to(tl.int32), mask=real)


@triton.jit
def _kv_block_partials_kernel(
    q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, items_cu, segment_start,
    segment_count, entry_row, entry_slot, partial_out, partial_lse, gate_flag,
    stride_qt, stride_qh, stride_bt,
    first_row, num_groups, num_segments, max_pages, scale_log2,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, GATE: tl.constexpr,
):
    if stands_aside(gate_flag, GATE):  # GatedOutput: the other kernel writes
        return
    item = tl.program_id(0)
    segment = segment_of(items_cu, item, num_segments, SEARCH_STEPS)
    piece = item - tl.load(items_cu + segment)
    count = tl.minimum(tl.load(segment_count + segment) - piece * ROWS, ROWS)
    if count <= 0:  # a spare item of the grid's upper bound
        return
    start = tl.load(segment_start + segment) + piece * ROWS
    block = segment % max_pages
    group = (segment // max_pages) % num_groups
    seq = segment // (max_pages * num_groups)
    # Local row r of this launch sits at position first_pos + r of its sequence.
    first_pos = tl.load(seq_lens + seq) - tl.load(cu_seqlens_q + seq + 1) + first_row

    # The one HBM read of this K/V page for all the queries that chose it.
    physical = tl.load(block_table + seq * stride_bt + block)
    tokens = tl.arange(0, PAGE)
    dims = tl.arange(0, HEAD_DIM)
    k = k_pages.load([physical * PAGE, group * HEAD_DIM])  # TMA copies (`page_rows`)
    v = v_pages.load([physical * PAGE, group * HEAD_DIM])

    m = tl.arange(0, BLOCK_M)
    entry = m // GROUP
    head = m % GROUP
    valid = (entry < count) & (m < ROWS * GROUP)
    row = tl.load(entry_row + start + entry, mask=valid, other=0).to(tl.int64)
    slot = tl.load(entry_slot + start + entry, mask=valid, other=0).to(tl.int64)
    pos = first_pos + row
    query = tl.load(q + row[:, None] * stride_qt + (group * GROUP + head)[:, None] * stride_qh
                    + dims[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(query, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, PAGE]
    s = tl.where((block * PAGE + tokens)[None, :] <= pos[:, None], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    ref = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.exp2(s - ref[:, None])
    out, lse = finish_softmax(tl.dot(p.to(v.dtype), v, input_precision=PRECISION), ref,
                              tl.sum(p, axis=1))
    # Partials are laid out [row, group, slot, head, dim]: the merge reads a row contiguously.
    partial = ((row * num_groups + group) * TOPK + slot) * GROUP + head
    tl.store(partial_out + partial[:, None] * HEAD_DIM + dims[None, :],
             out.to(partial_out.dtype.element_ty), mask=valid[:, None])
    tl.store(partial_lse + partial, lse, mask=valid)


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     gated: GatedOutput | None = None):
    """gated: write there, only if its flag says so."""
    shape = AttentionShape.of(q, k_cache, blocks, softmax_scale)
    out, lse = shape.outputs(q, gated)
    blocks = blocks.contiguous()
    chunk = max(1, _PARTIAL_BYTES // (shape.num_heads * shape.topk * shape.head_dim
                                      * q.element_size()))
    for first in range(0, shape.total_q, chunk):
        last = min(first + chunk, shape.total_q)
        _attend_rows(q[first:last], k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                     first, blocks[first:last], out[first:last], lse[first:last], shape.scale,
                     gated)
    return (out, lse) if return_lse else out


def _attend_rows(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, first_row, blocks,
                 out, lse, scale, gated: GatedOutput | None) -> None:
    """Partials then merge for packed query rows first_row.. (row ids local to the slice)."""
    shape = AttentionShape.of(q, k_cache, blocks, scale)
    total_q, head_dim = shape.total_q, shape.head_dim
    num_groups, group, topk = shape.num_groups, shape.group, shape.topk
    rows = max(1, _PACKED_ROWS // group)
    work = BlockWork.build(blocks, cu_seqlens_q, first_row, block_table.shape[1], rows, gated)
    # Partials in the inputs' precision: bf16 halves the round trip that bounds this kernel
    # (their rounding stays within the bf16 tolerance); float32 inputs keep exact partials.
    partial_out = torch.empty(total_q * num_groups * topk * group, head_dim, dtype=q.dtype,
                              device=q.device)
    partial_lse = torch.empty(total_q * num_groups * topk * group, dtype=torch.float32,
                              device=q.device)
    if work.num_items:
        gate_flag, gate = GatedOutput.launch_args(gated, cu_seqlens_q)
        _kv_block_partials_kernel[(work.num_items,)](
            q, page_rows(k_cache), page_rows(v_cache), block_table, seq_lens, cu_seqlens_q,
            work.items_cu, work.segment_start, work.segment_count, work.entry_row,
            work.entry_slot, partial_out, partial_lse, gate_flag, q.stride(0), q.stride(1),
            block_table.stride(0), first_row, num_groups,
            work.num_segments, work.max_pages, scale * LOG2E,
            GROUP=group, ROWS=rows, BLOCK_M=max(16, triton.next_power_of_2(rows * group)),
            HEAD_DIM=head_dim, TOPK=topk, PAGE=BLOCK_SIZE, PRECISION=dot_precision(q.dtype),
            SEARCH_STEPS=search_steps(work.num_segments), GATE=gate, num_warps=NUM_WARPS)
    merge_partials(partial_out, partial_lse, out, lse, num_groups, topk, blocks, gated=gated)

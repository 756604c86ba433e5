"""Triton: KV-block-major sparse prefill ("KV outer, gather Q").

Query-major attention reloads a popular block once for every query that chose it. Here the
selection is inverted first: for each (sequence, KV group, block) the list of (query row, slot)
entries that chose it, a CSR built on the GPU by one sort and a count, with no host sync. One
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
    dot_precision,
    finish_softmax,
    query_positions,
    row_sequences,
    search_steps,
    segment_of,
)

_PACKED_ROWS = 128  # M of one program: query rows x query heads of the group
# From an H100 sweep of (packed rows 64/128/256) x (4/8 warps), Hq16/Hkv2: 128 rows with
# 4 warps was best, 2.95 ms against 3.96 ms with 8 warps on a 16K chunk after a 68K prefix.
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
    entry_row: torch.Tensor  # int32 [t * Hkv * topk]: query row, sorted by (segment, row)
    entry_slot: torch.Tensor  # int32 [t * Hkv * topk]: the row's selection slot of that block
    max_pages: int  # segment = (seq * Hkv + group) * max_pages + block
    num_items: int  # an upper bound on the items (the grid); spare items do nothing

    @property
    def num_segments(self) -> int:
        return self.segment_count.shape[0]

    @classmethod
    def build(cls, blocks: torch.Tensor, row_seq: torch.Tensor, batch: int, max_pages: int,
              rows: int) -> "BlockWork":
        """blocks [t, Hkv, topk] of some query rows, row_seq [t] their sequences among the
        batch's (every sequence's blocks are segments, so the grid is known without reading
        the selection)."""
        total_q, num_groups, topk = blocks.shape
        device = blocks.device
        segments = batch * num_groups * max_pages
        group = torch.arange(num_groups, device=device)[None, :, None]
        key = (row_seq.long()[:, None, None] * num_groups + group) * max_pages + blocks.long()
        key = torch.where(blocks >= 0, key, segments).reshape(-1)  # unselected: after all
        order = torch.argsort(key, stable=True)  # stable: rows stay ascending within a block
        counts = torch.zeros(segments + 1, dtype=torch.int64, device=device)
        counts.index_add_(0, key, torch.ones_like(key))
        counts = counts[:segments]
        pieces = (counts + rows - 1) // rows
        items_cu = torch.zeros(segments + 1, dtype=torch.int32, device=device)
        items_cu[1:] = torch.cumsum(pieces, 0)
        entries = total_q * num_groups * topk
        return cls(
            segment_start=(torch.cumsum(counts, 0) - counts).to(torch.int32),
            segment_count=counts.to(torch.int32),
            items_cu=items_cu,
            entry_row=(order // (num_groups * topk)).to(torch.int32),
            entry_slot=(order % topk).to(torch.int32),
            max_pages=max_pages,
            num_items=entries // rows + min(segments, entries),
        )


@triton.jit
def _kv_block_partials_kernel(
    q, k_cache, v_cache, block_table, row_pos, items_cu, segment_start, segment_count,
    entry_row, entry_slot, partial_out, partial_lse,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_bt,
    num_groups, num_segments, max_pages, scale_log2,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
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

    # The one HBM read of this K/V page for all the queries that chose it.
    physical = tl.load(block_table + seq * stride_bt + block).to(tl.int64)
    tokens = tl.arange(0, PAGE)
    dims = tl.arange(0, HEAD_DIM)
    offsets = physical * stride_kp + tokens[:, None] * stride_kt + group * stride_kh + dims[None, :]
    k = tl.load(k_cache + offsets)
    v = tl.load(v_cache + offsets)

    m = tl.arange(0, BLOCK_M)
    entry = m // GROUP
    head = m % GROUP
    valid = (entry < count) & (m < ROWS * GROUP)
    row = tl.load(entry_row + start + entry, mask=valid, other=0).to(tl.int64)
    slot = tl.load(entry_slot + start + entry, mask=valid, other=0).to(tl.int64)
    pos = tl.load(row_pos + row, mask=valid, other=0)
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
                     softmax_scale: float | None = None, return_lse: bool = False):
    shape = AttentionShape.of(q, k_cache, blocks, softmax_scale)
    out = torch.empty_like(q)
    lse = torch.empty(shape.total_q, shape.num_heads, dtype=torch.float32, device=q.device)
    blocks = blocks.contiguous()
    row_seq = row_sequences(cu_seqlens_q, shape.total_q)
    row_pos = query_positions(seq_lens, cu_seqlens_q, shape.total_q)
    chunk = max(1, _PARTIAL_BYTES // (shape.num_heads * shape.topk * shape.head_dim
                                      * q.element_size()))
    for first in range(0, shape.total_q, chunk):
        last = min(first + chunk, shape.total_q)
        _attend_rows(q[first:last], k_cache, v_cache, block_table, row_seq[first:last],
                     row_pos[first:last], blocks[first:last], out[first:last], lse[first:last],
                     shape.scale)
    return (out, lse) if return_lse else out


def _attend_rows(q, k_cache, v_cache, block_table, row_seq, row_pos, blocks, out, lse,
                 scale) -> None:
    """Partials then merge for a contiguous slice of query rows (row ids local to the slice)."""
    shape = AttentionShape.of(q, k_cache, blocks, scale)
    total_q, head_dim = shape.total_q, shape.head_dim
    num_groups, group, topk = shape.num_groups, shape.group, shape.topk
    rows = max(1, _PACKED_ROWS // group)
    work = BlockWork.build(blocks, row_seq, *block_table.shape, rows)
    # Partials in the inputs' precision: bf16 halves the round trip that bounds this kernel
    # (their rounding stays within the bf16 tolerance); float32 inputs keep exact partials.
    partial_out = torch.empty(total_q * num_groups * topk * group, head_dim, dtype=q.dtype,
                              device=q.device)
    partial_lse = torch.empty(total_q * num_groups * topk * group, dtype=torch.float32,
                              device=q.device)
    if work.num_items:
        _kv_block_partials_kernel[(work.num_items,)](
            q, k_cache, v_cache, block_table, row_pos, work.items_cu, work.segment_start,
            work.segment_count, work.entry_row, work.entry_slot, partial_out, partial_lse,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_table.stride(0), num_groups, work.num_segments, work.max_pages, scale * LOG2E,
            GROUP=group, ROWS=rows, BLOCK_M=max(16, triton.next_power_of_2(rows * group)),
            HEAD_DIM=head_dim, TOPK=topk, PAGE=BLOCK_SIZE, PRECISION=dot_precision(q.dtype),
            SEARCH_STEPS=search_steps(work.num_segments), num_warps=NUM_WARPS)
    merge_partials(partial_out, partial_lse, out, lse, num_groups, topk, blocks)

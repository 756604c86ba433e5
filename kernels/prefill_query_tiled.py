"""Triton: query-tiled sparse prefill (online softmax over the union of a tile's blocks).

Neighbouring queries choose mostly the same blocks (their own and the few that matter to the
passage), so a tile of consecutive query rows of one sequence, packed with the G query heads of
a KV group into the MMA's M dimension, walks the sorted union of the blocks its rows chose: each
union block's K/V page is loaded once per tile, every row attends to it only if it chose it
(so the result is exactly per-row MSA), and an online softmax carries the running output on
chip. Unlike the KV-major kernel nothing round-trips through HBM: no per-(row, slot) partials,
no merge. The unions are built on the GPU by one small kernel, which flags the blocks only some
of the tile's rows chose: only those pay for the per-row check.

Multi-token decode (q_len 2..16: speculative tokens) is the same walk with a tile per request:
each page any of its tokens chose is loaded once for all of them and all G heads. Those grids
are small, so a tile's union is split across programs (split-K) whose partial outputs the
shared LSE-merge kernel combines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lse_merge import merge_partials, split_outputs
from kernels.reference import BLOCK_SIZE
from kernels.triton_layout import (
    LOG2E,
    AttentionShape,
    GatedOutput,
    QueryTiles,
    dot_precision,
    finish_softmax,
    multiprocessors,
    online_softmax_step,
    page_rows,
    rows_of_tile,
    search_steps,
    stands_aside,
    tile_offsets,
)

# Launch shape from H100 sweeps, Hq16/Hkv2, prompts with coherent selections: M 128 with 8
# warps, 2 stages (bench/results/kernels_h100.md, 'prefill_query_tiled').
_PACKED_ROWS = 128  # M of one program: query rows x query heads of the group
NUM_WARPS = 8
NUM_STAGES = 2
# Split-K for grids of few (tile, group) pairs: programs per SM over the whole grid (spare
# tiles included), and the fewest pages a split walks (its partial output round-trips through
# HBM). H100 sweep of 1/2/4/8 x 2/4/8: 2 programs per SM is the best or within 4% at every
# shape; pages per split change nothing measurable. Dense decode (the engine's dense layers and
# baseline) gains most (kernels_h100.md).
PROGRAMS_PER_SM = 2
MIN_PAGES_PER_SPLIT = 4
# A union entry is its block id, plus _SOME_ROWS when only some of the tile's rows chose it:
# only those entries pay for the per-row check, which skips rows through the softmax reference
# point: the fastest of the variants measured (kernels_h100.md).
_SOME_ROWS = tl.constexpr(1 << 24)
_BLOCK_ID = tl.constexpr((1 << 24) - 1)
_PAD = tl.constexpr((1 << 31) - 1)  # sorts after every block id


@triton.jit
def _tile_unions_kernel(
    blocks, cu_seqlens_q, first_tile, tile_seq, tile_start, tile_end, union_count, union_block,
    union_total, stride_blt, stride_blg, num_seqs, num_groups, capacity,
    ROWS: tl.constexpr, ROWS_P2: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    """One (query tile, KV group): the tile's rows, then the sorted union of their blocks: the
    rows' picks sorted in registers, each first of a run of equal ids kept at its prefix-sum
    slot and flagged unless every row chose it (one launch, no host sync, work independent of
    the context length)."""
    tile = tl.program_id(0)
    group = tl.program_id(1)
    seq, row_begin, row_end = rows_of_tile(first_tile, cu_seqlens_q, tile, num_seqs, ROWS,
                                           SEARCH_STEPS)
    spare = row_begin >= row_end  # past the last tile: the grid is an upper bound
    if group == 0:
        tl.store(tile_seq + tile, seq)
        tl.store(tile_start + tile, row_begin)
        tl.store(tile_end + tile, row_end)

    r = tl.arange(0, ROWS_P2)
    slots = tl.arange(0, TOPK_P2)
    rows = (row_begin + r).to(tl.int64)
    take = ((r < ROWS) & (rows < row_end))[:, None] & (slots < TOPK)[None, :]
    chosen = tl.load(blocks + rows[:, None] * stride_blt + group * stride_blg + slots[None, :],
                     mask=take, other=-1)
    # Padding (-1 slots, rows past the tile) sorts after every block id, out of the union.
    ids = tl.sort(tl.reshape(tl.where(chosen >= 0, chosen, _PAD), [ROWS_P2 * TOPK_P2]))
    n = tl.arange(0, ROWS_P2 * TOPK_P2)
    real = (ids != _PAD) & ~spare
    new_id = real & ((n == 0) | (ids != tl.gather(ids, tl.maximum(n - 1, 0), 0)))
    slot_of = tl.cumsum(new_id.to(tl.int32), axis=0) - 1
    # A row picks a block at most once, so the picks in a union slot count the rows that chose
    # it; padding goes to the last bin, which a union with padding never reaches.
    last_bin = ROWS_P2 * TOPK_P2 - 1
    rows_that_chose = tl.histogram(tl.where(real, slot_of, last_bin), ROWS_P2 * TOPK_P2)
    every_row = tl.gather(rows_that_chose, slot_of, 0) == row_end - row_begin
    unit = tile * num_groups + group
    tl.store(union_block + unit.to(tl.int64) * capacity + slot_of,
             tl.where(every_row, ids, ids + _SOME_ROWS), mask=new_id)
    size = tl.sum(new_id.to(tl.int32), axis=0)
    tl.store(union_count + unit, size)
    tl.atomic_add(union_total, size, sem="relaxed")


@triton.jit
def _alike_kernel(union_total, first_tile, num_seqs, num_groups, topk, max_union, alike):
    tiles = tl.load(first_tile + num_seqs)
    mean = tl.load(union_total).to(tl.float32) / tl.maximum(tiles * num_groups * topk, 1)
    tl.store(alike, (mean <= max_union).to(tl.int32))


@dataclass
class TileUnions:
    """For each (query tile, KV group): the logical blocks any of its rows chose, ascending,
    each plus _SOME_ROWS when not every row of the tile chose it (`block_ids` strips it)."""

    tiles: QueryTiles
    first_tile: torch.Tensor  # int32 [batch + 1]: each sequence's first tile, then the count
    rows: int  # query rows per tile
    count: torch.Tensor  # int32 [num_tiles * Hkv]: blocks in each union
    block: torch.Tensor  # int32 [num_tiles * Hkv, capacity]: the first `count` are the union
    total: torch.Tensor  # int32 [1]: the sum of `count`

    @classmethod
    def for_attention(cls, blocks: torch.Tensor, cu_seqlens_q: torch.Tensor, group: int,
                      max_pages: int) -> "TileUnions":
        rows = QueryTiles.rows_for(blocks.shape[0], cu_seqlens_q.shape[0] - 1,
                                   rows_per_tile(group))
        return cls.build(blocks, cu_seqlens_q, rows, max_pages)

    @classmethod
    def build(cls, blocks: torch.Tensor, cu_seqlens_q: torch.Tensor, rows: int,
              max_pages: int) -> "TileUnions":
        total_q, num_groups, topk = blocks.shape
        batch = cu_seqlens_q.shape[0] - 1
        device = blocks.device
        num_tiles = triton.cdiv(total_q, rows) + batch  # upper bound: spare tiles are empty
        tiles = QueryTiles(*(torch.empty(num_tiles, dtype=torch.int32, device=device)
                             for _ in range(3)))
        if max_pages > _BLOCK_ID.value:
            raise ValueError(f"query-tiled attention takes at most {_BLOCK_ID.value} pages a "
                             f"sequence, got a block table of {max_pages}")
        capacity = min(max_pages, rows * topk)
        count = torch.empty(num_tiles * num_groups, dtype=torch.int32, device=device)
        block = torch.empty(num_tiles * num_groups, capacity, dtype=torch.int32, device=device)
        total = torch.zeros(1, dtype=torch.int32, device=device)
        first_tile = tile_offsets(cu_seqlens_q, rows)
        if total_q:
            _tile_unions_kernel[(num_tiles, num_groups)](
                blocks, cu_seqlens_q, first_tile, tiles.seq, tiles.start, tiles.end, count,
                block, total, blocks.stride(0), blocks.stride(1), batch, num_groups, capacity,
                ROWS=rows, ROWS_P2=triton.next_power_of_2(rows), TOPK=topk,
                TOPK_P2=triton.next_power_of_2(topk), SEARCH_STEPS=search_steps(batch))
        return cls(tiles, first_tile, rows, count, block, total)

    def block_ids(self) -> torch.Tensor:
        """`block` without the some-rows flag."""
        return self.block & _BLOCK_ID.value

    def alike(self, topk: int, max_union: float) -> torch.Tensor:
        """int32 [1] on the device: 1 when the tiles' mean union is at most max_union x topk
        (the tile's rows chose alike), else 0. No host sync: a `GatedOutput` flag."""
        num_groups = self.count.shape[0] // max(1, self.tiles.num_tiles)
        alike = torch.empty(1, dtype=torch.int32, device=self.count.device)
        _alike_kernel[(1,)](self.total, self.first_tile, self.first_tile.shape[0] - 1,
                            num_groups, topk, max_union, alike)
        return alike


def rows_per_tile(group: int) -> int:
    """Query rows that, with the group's query heads, fill the MMA's M."""
    return max(1, _PACKED_ROWS // group)


@triton.jit
def _attend_page(entry, union_block, block_table, k_pages, v_pages, seq, group, query, pos,
                 chosen_by_row, acc, running_max, running_sum, scale_log2, stride_bt,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAGE: tl.constexpr, PRECISION: tl.constexpr, ALL_VISIBLE: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """Folds one union page into the tile's running softmax. CAUSAL only for the (at most two)
    pages that hold the tile's own positions; every earlier page is wholly visible."""
    if ALL_VISIBLE:
        block = entry
    else:
        word = tl.load(union_block + entry)
        block = word & _BLOCK_ID
    tokens = tl.arange(0, PAGE)
    physical = tl.load(block_table + seq * stride_bt + block)
    # TMA copies (`page_rows`), overlapped with the MMAs by the loop's stages.
    k = k_pages.load([physical * PAGE, group * HEAD_DIM])
    v = v_pages.load([physical * PAGE, group * HEAD_DIM])
    s = tl.dot(query, tl.trans(k), input_precision=PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where((block * PAGE + tokens)[None, :] <= pos[:, None], s, float("-inf"))
    attends = tl.full([BLOCK_M], 1, tl.int1)
    if not ALL_VISIBLE:
        if word > _BLOCK_ID:  # only some rows chose the block: the others skip it
            attends = tl.max((chosen_by_row == block).to(tl.int32), axis=1) > 0
    return online_softmax_step(s, v, acc, running_max, running_sum, attends, PRECISION)


@triton.jit
def _query_tiled_kernel(
    q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, blocks, tile_seq, tile_start,
    tile_end, union_count, union_block, out, lse, gate_flag,
    stride_qt, stride_qh, stride_bt, stride_blt, stride_blg,
    num_groups, union_capacity, num_splits, scale_log2,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr, ALL_VISIBLE: tl.constexpr, GATE: tl.constexpr,
):
    if stands_aside(gate_flag, GATE):  # GatedOutput: the other kernel writes
        return
    tile = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    row_begin = tl.load(tile_start + tile)
    row_end = tl.load(tile_end + tile)
    if row_begin >= row_end:  # a spare tile of the grid's upper bound
        return
    seq = tl.load(tile_seq + tile)
    first_pos = tl.load(seq_lens + seq) - tl.load(cu_seqlens_q + seq + 1)  # + row = position

    m = tl.arange(0, BLOCK_M)
    rows = (row_begin + m // GROUP).to(tl.int64)
    heads = group * GROUP + m % GROUP
    valid = (m < ROWS * GROUP) & (rows < row_end)
    pos = first_pos + rows
    dims = tl.arange(0, HEAD_DIM)
    query = tl.load(q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                    mask=valid[:, None], other=0.0)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Pages from the tile's first position on need the causal mask; ascending order puts them
    # last (at most two: a tile spans at most 128 rows).
    own_page = (first_pos + row_begin) // PAGE
    if ALL_VISIBLE:  # dense attention: every page up to the tile's last query
        chosen_by_row = 0
        first = 0
        last = (first_pos + row_end - 1) // PAGE + 1
        causal_from = own_page
    else:
        slots = tl.arange(0, TOPK_P2)
        # Each packed row's own selection, to mask the union blocks it did not choose.
        chosen_by_row = tl.load(blocks + rows[:, None] * stride_blt + group * stride_blg
                                + slots[None, :], mask=valid[:, None] & (slots < TOPK)[None, :],
                                other=-1)
        unit = tile * num_groups + group
        first = unit.to(tl.int64) * union_capacity
        last = first + tl.load(union_count + unit)
        near = tl.arange(0, 2)
        tail = tl.load(union_block + last - 2 + near, mask=last - 2 + near >= first, other=0)
        tail = tl.where(last - 2 + near >= first, tail & _BLOCK_ID, -1)
        causal_from = last - tl.sum((tail >= own_page).to(tl.int32), axis=0)
    # This split's share of the pages, in equal parts of the tile's own count.
    per_split = tl.cdiv(last - first, num_splits)
    first = first + split * per_split
    last = tl.minimum(first + per_split, last)
    causal_from = tl.maximum(causal_from, first)
    for entry in tl.range(first, tl.minimum(causal_from, last), num_stages=NUM_STAGES):
        acc, running_max, running_sum = _attend_page(
            entry, union_block, block_table, k_pages, v_pages, seq, group, query, pos,
            chosen_by_row, acc, running_max, running_sum, scale_log2, stride_bt, BLOCK_M,
            HEAD_DIM, PAGE, PRECISION, ALL_VISIBLE, False)
    for entry in tl.range(causal_from, last):
        acc, running_max, running_sum = _attend_page(
            entry, union_block, block_table, k_pages, v_pages, seq, group, query, pos,
            chosen_by_row, acc, running_max, running_sum, scale_log2, stride_bt, BLOCK_M,
            HEAD_DIM, PAGE, PRECISION, ALL_VISIBLE, True)

    result, row_lse = finish_softmax(acc, running_max, running_sum)
    # Layout [row, group, split, head, dim]: with one split it is the final [row, Hq, D].
    target = ((rows * num_groups + group) * num_splits + split) * GROUP + m % GROUP
    tl.store(out + target[:, None] * HEAD_DIM + dims[None, :],
             result.to(out.dtype.element_ty), mask=valid[:, None])
    tl.store(lse + target, row_lse, mask=valid)


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     unions: TileUnions | None = None, gated: GatedOutput | None = None):
    """unions: `TileUnions.for_attention` of the same arguments, when the caller built them
    already (to look at their size first); gated: write there, only if its flag says so."""
    shape = AttentionShape.of(q, k_cache, blocks, softmax_scale)
    if shape.total_q == 0:
        return _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape, None,
                       None, return_lse, gated)
    if unions is None:
        unions = TileUnions.for_attention(blocks, cu_seqlens_q, shape.group,
                                          block_table.shape[1])
    return _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape, blocks,
                   unions, return_lse, gated)


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    softmax_scale: float | None = None, return_lse: bool = False):
    """Causal attention over every visible key of the paged cache, the same kernel walking
    all of a tile's pages: chunks after a cached prefix, decodes and mixed steps in one launch,
    with no gathered copy of the K/V and no host sync."""
    placeholder = torch.empty(0, 1, 1, dtype=torch.int32, device=q.device)
    shape = AttentionShape.of(q, k_cache, placeholder, softmax_scale)
    return _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape, None, None,
                   return_lse, None)


def _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape: AttentionShape,
            blocks: torch.Tensor | None, unions: TileUnions | None, return_lse: bool,
            gated: GatedOutput | None):
    """blocks and unions None: dense (every visible page)."""
    out, lse = shape.outputs(q, gated)
    if shape.total_q == 0:
        return (out, lse) if return_lse else out
    if unions is None:
        # Decode-like steps get tiles of their q_len, so M is not padded to 128 rows.
        rows = QueryTiles.rows_for(shape.total_q, seq_lens.shape[0], rows_per_tile(shape.group))
        tiles = QueryTiles.build(cu_seqlens_q, shape.total_q, rows)
        blocks = union_count = union_block = cu_seqlens_q  # unread when dense
        union_capacity = 0
    else:
        rows, tiles = unions.rows, unions.tiles
        union_count, union_block = unions.count, unions.block
        union_capacity = unions.block.shape[1]
    units = tiles.num_tiles * shape.num_groups
    most_pages = union_capacity if unions is not None else block_table.shape[1]
    splits = max(1, min(PROGRAMS_PER_SM * multiprocessors(q.device) // units,
                        most_pages // MIN_PAGES_PER_SPLIT))
    # Partials in the inputs' precision, as the KV-major kernel's.
    partial_out, partial_lse = split_outputs(shape, out, lse, splits, q.dtype)
    gate_flag, gate = GatedOutput.launch_args(gated, cu_seqlens_q)
    _query_tiled_kernel[(tiles.num_tiles, shape.num_groups, splits)](
        q, page_rows(k_cache), page_rows(v_cache), block_table, seq_lens, cu_seqlens_q, blocks,
        tiles.seq, tiles.start, tiles.end, union_count, union_block, partial_out, partial_lse,
        gate_flag, q.stride(0), q.stride(1), block_table.stride(0),
        blocks.stride(0) if unions else 0, blocks.stride(1) if unions else 0, shape.num_groups,
        union_capacity, splits, shape.scale * LOG2E,
        GROUP=shape.group, ROWS=rows, BLOCK_M=max(16, triton.next_power_of_2(rows * shape.group)),
        HEAD_DIM=shape.head_dim, TOPK=shape.topk, TOPK_P2=triton.next_power_of_2(shape.topk),
        PAGE=BLOCK_SIZE, PRECISION=dot_precision(q.dtype), NUM_STAGES=NUM_STAGES,
        ALL_VISIBLE=unions is None, GATE=gate, num_warps=NUM_WARPS)
    if splits > 1:
        merge_partials(partial_out, partial_lse, out, lse, shape.num_groups, splits,
                       gated=gated)
    return (out, lse) if return_lse else out

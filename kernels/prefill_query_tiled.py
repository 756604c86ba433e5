"""Triton: query-tiled sparse prefill (online softmax over the union of a tile's blocks).

Neighbouring queries choose mostly the same blocks (their own and the few that matter to the
passage), so a tile of consecutive query rows of one sequence, packed with the G query heads of
a KV group into the MMA's M dimension, walks the sorted union of the blocks its rows chose: each
union block's K/V page is loaded once per tile, every row attends to it only if it chose it
(a per-row mask, so the result is exactly per-row MSA), and an online softmax carries the
running output on chip. Unlike the KV-major kernel nothing round-trips through HBM: no
per-(row, slot) partials, no merge. The unions are built on the GPU by one scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.reference import BLOCK_SIZE
from kernels.triton_layout import (
    LOG2E,
    AttentionShape,
    QueryTiles,
    dot_precision,
    finish_softmax,
    online_softmax_step,
    row_sequences,
)

# Launch shape from an H100 sweep of M (64/128/256) x warps (4/8) x stages (2/3), Hq16/Hkv2,
# a 32K prompt with coherent selections: M 128, 8 warps, 3 stages, 2.48 ms (M 64 / 4 warps:
# 2.92; M 256 / 8 warps: 3.51).
_PACKED_ROWS = 128  # M of one program: query rows x query heads of the group
NUM_WARPS = 8
NUM_STAGES = 3


@dataclass
class TileUnions:
    """For each (query tile, KV group): which logical blocks any of its rows chose."""

    tiles: QueryTiles
    rows: int  # query rows per tile
    chosen: torch.Tensor  # bool [num_tiles * Hkv, max_pages]
    count: torch.Tensor  # int64 [num_tiles * Hkv]: blocks in each union

    @classmethod
    def for_attention(cls, blocks: torch.Tensor, cu_seqlens_q: torch.Tensor, group: int,
                      max_pages: int) -> "TileUnions":
        return cls.build(blocks, cu_seqlens_q, rows_per_tile(group), max_pages)

    @classmethod
    def build(cls, blocks: torch.Tensor, cu_seqlens_q: torch.Tensor, rows: int,
              max_pages: int) -> "TileUnions":
        """One scatter into a (unit, page) bitmap."""
        total_q, num_groups, _ = blocks.shape
        tiles = QueryTiles.build(cu_seqlens_q, total_q, rows)
        # The tile of every row: tiles of one sequence are consecutive and `rows` long.
        cu = cu_seqlens_q.long()
        tiles_per_seq = (cu[1:] - cu[:-1] + rows - 1) // rows
        first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
        row_seq = row_sequences(cu_seqlens_q, total_q).long()
        row_tile = first_tile[row_seq] + (torch.arange(total_q, device=cu.device)
                                          - cu[row_seq]) // rows
        unit = row_tile[:, None] * num_groups + torch.arange(num_groups, device=cu.device)
        # Unused slots (-1) land in a spare last column, dropped after the scatter.
        chosen = torch.zeros(tiles.num_tiles * num_groups, max_pages + 1, dtype=torch.bool,
                             device=blocks.device)
        page = torch.where(blocks >= 0, blocks.long(), max_pages)
        chosen[unit[:, :, None].expand_as(page), page] = True
        chosen = chosen[:, :max_pages]
        return cls(tiles, rows, chosen, chosen.sum(-1))

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(start int32 [units], block int32 [>= entries]): each union's blocks, ascending,
        compacted by a prefix sum over the bitmap (no host sync, unlike nonzero)."""
        flat = self.chosen.reshape(-1)
        position = torch.cumsum(flat, 0, dtype=torch.int32) - 1
        pages = self.chosen.shape[1]
        spare = flat.numel()  # where the unchosen (unit, page) pairs write, then ignored
        block = torch.empty(spare + 1, dtype=torch.int32, device=flat.device)
        page_of = torch.arange(spare, device=flat.device, dtype=torch.int32) % pages
        block.scatter_(0, torch.where(flat, position, spare).long(), page_of)
        start = torch.cumsum(self.count, 0) - self.count
        return start.to(torch.int32), block


def rows_per_tile(group: int) -> int:
    """Query rows that, with the group's query heads, fill the MMA's M."""
    return max(1, _PACKED_ROWS // group)


UNION_SAMPLE_PAIRS = 1024


def estimated_union_per_selection(blocks: torch.Tensor, group: int) -> float:
    """Roughly the mean union size of the tiles, in units of topk, from how many of each row's
    blocks its predecessor did not choose: 1 when neighbours agree, up to the rows per tile
    when they never do. A handful of launches over a sample of at most ~1K row pairs and one
    sync, so a dispatcher can afford to ask before paying for the unions."""
    rows = rows_per_tile(group)
    stride = max(1, (blocks.shape[0] - 1) // UNION_SAMPLE_PAIRS)
    current, previous = blocks[1::stride], blocks[:-1:stride]
    new = (current >= 0) & ~(current[..., :, None] == previous[..., None, :]).any(-1)
    churn = new.sum(-1).float().mean().item() if current.numel() else 0.0
    return 1.0 + (rows - 1) * churn / blocks.shape[2]


@triton.jit
def _attend_page(entry, union_block, block_table, k_cache, v_cache, seq, group, query, pos,
                 chosen_by_row, acc, running_max, running_sum, scale_log2, stride_kp, stride_kt,
                 stride_kh, stride_bt, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                 PRECISION: tl.constexpr, ALL_VISIBLE: tl.constexpr, CAUSAL: tl.constexpr):
    """Folds one union page into the tile's running softmax. CAUSAL only for the (at most two)
    pages that hold the tile's own positions; every earlier page is wholly visible."""
    if ALL_VISIBLE:
        block = entry
    else:
        block = tl.load(union_block + entry)
    tokens = tl.arange(0, PAGE)
    dims = tl.arange(0, HEAD_DIM)
    physical = tl.load(block_table + seq * stride_bt + block).to(tl.int64)
    offsets = physical * stride_kp + tokens[:, None] * stride_kt + group * stride_kh \
        + dims[None, :]
    k = tl.load(k_cache + offsets)
    v = tl.load(v_cache + offsets)
    s = tl.dot(query, tl.trans(k), input_precision=PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where((block * PAGE + tokens)[None, :] <= pos[:, None], s, float("-inf"))
    if not ALL_VISIBLE:  # rows attend only to the blocks they chose
        row_chose = tl.max((chosen_by_row == block).to(tl.int32), axis=1) > 0
        s = tl.where(row_chose[:, None], s, float("-inf"))
    return online_softmax_step(s, v, acc, running_max, running_sum, PRECISION)


@triton.jit
def _query_tiled_kernel(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, blocks, tile_seq, tile_start,
    tile_end, union_start, union_count, union_block, out, lse,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_bt, stride_blt, stride_blg,
    num_groups, scale_log2,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr, ALL_VISIBLE: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
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
        split = own_page
    else:
        slots = tl.arange(0, TOPK_P2)
        # Each packed row's own selection, to mask the union blocks it did not choose.
        chosen_by_row = tl.load(blocks + rows[:, None] * stride_blt + group * stride_blg
                                + slots[None, :], mask=valid[:, None] & (slots < TOPK)[None, :],
                                other=-1)
        unit = tile * num_groups + group
        first = tl.load(union_start + unit)
        last = first + tl.load(union_count + unit)
        near = tl.arange(0, 2)
        tail = tl.load(union_block + last - 2 + near, mask=last - 2 + near >= first, other=-1)
        split = last - tl.sum((tail >= own_page).to(tl.int32), axis=0)
    for entry in tl.range(first, split, num_stages=NUM_STAGES):
        acc, running_max, running_sum = _attend_page(
            entry, union_block, block_table, k_cache, v_cache, seq, group, query, pos,
            chosen_by_row, acc, running_max, running_sum, scale_log2, stride_kp, stride_kt,
            stride_kh, stride_bt, HEAD_DIM, PAGE, PRECISION, ALL_VISIBLE, False)
    for entry in tl.range(split, last):
        acc, running_max, running_sum = _attend_page(
            entry, union_block, block_table, k_cache, v_cache, seq, group, query, pos,
            chosen_by_row, acc, running_max, running_sum, scale_log2, stride_kp, stride_kt,
            stride_kh, stride_bt, HEAD_DIM, PAGE, PRECISION, ALL_VISIBLE, True)

    result, row_lse = finish_softmax(acc, running_max, running_sum)
    target = rows * (num_groups * GROUP) + heads
    tl.store(out + target[:, None] * HEAD_DIM + dims[None, :],
             result.to(out.dtype.element_ty), mask=valid[:, None])
    tl.store(lse + target, row_lse, mask=valid)


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False):
    shape = AttentionShape.of(q, k_cache, blocks, softmax_scale)
    if shape.total_q == 0:
        return _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape, None,
                       None, return_lse)
    unions = TileUnions.for_attention(blocks, cu_seqlens_q, shape.group, block_table.shape[1])
    return _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape, blocks,
                   unions, return_lse)


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    softmax_scale: float | None = None, return_lse: bool = False):
    """Causal attention over every visible key of the paged cache, the same kernel walking
    all of a tile's pages: chunks after a cached prefix, decodes and mixed steps in one launch,
    with no gathered copy of the K/V and no host sync."""
    placeholder = torch.empty(0, 1, 1, dtype=torch.int32, device=q.device)
    shape = AttentionShape.of(q, k_cache, placeholder, softmax_scale)
    return _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape, None, None,
                   return_lse)


def _launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, shape: AttentionShape,
            blocks: torch.Tensor | None, unions: TileUnions | None, return_lse: bool):
    """blocks and unions None: dense (every visible page)."""
    out = torch.empty(shape.total_q, shape.num_heads, shape.head_dim, dtype=q.dtype,
                      device=q.device)
    lse = torch.empty(shape.total_q, shape.num_heads, dtype=torch.float32, device=q.device)
    if shape.total_q == 0:
        return (out, lse) if return_lse else out
    if unions is None:
        # Decode-like steps get tiles of their q_len, so M is not padded to 128 rows.
        rows = QueryTiles.rows_for(shape.total_q, seq_lens.shape[0], rows_per_tile(shape.group))
        tiles = QueryTiles.build(cu_seqlens_q, shape.total_q, rows)
        blocks = union_start = union_count = union_block = cu_seqlens_q  # unread when dense
    else:
        rows, tiles = unions.rows, unions.tiles
        union_start, union_block = unions.entries()
        union_count = unions.count.to(torch.int32)
    _query_tiled_kernel[(tiles.num_tiles, shape.num_groups)](
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, blocks, tiles.seq,
        tiles.start, tiles.end, union_start, union_count, union_block, out, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), blocks.stride(0) if unions else 0,
        blocks.stride(1) if unions else 0, shape.num_groups, shape.scale * LOG2E,
        GROUP=shape.group, ROWS=rows, BLOCK_M=max(16, triton.next_power_of_2(rows * shape.group)),
        HEAD_DIM=shape.head_dim, TOPK=shape.topk, TOPK_P2=triton.next_power_of_2(shape.topk),
        PAGE=BLOCK_SIZE, PRECISION=dot_precision(q.dtype), NUM_STAGES=NUM_STAGES,
        ALL_VISIBLE=unions is None, num_warps=NUM_WARPS)
    return (out, lse) if return_lse else out

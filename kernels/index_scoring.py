"""Triton: index scoring, the first half of `select_blocks` (bandwidth-bound in decode, MMA-bound
in prefill).

One program scores one tile of a sequence's query rows against a range of its index-key pages
(those before the tile's last row's own block: only a row's historical blocks compete).
The rows that share a key head (a tile's tokens x the KV groups of that head) are packed into
the MMA's M dimension, so each index-key page is read from HBM once per query tile; pages are
split across programs, so a single long decode sequence still fills the GPU (split-K). In a
decode step all rows' pages are cut into even ranges, whatever each row's context. Each
program writes the max-pooled score of every (row, group, page) it covers; the exp-free top-k
with the local block forced last then runs as one kernel (`topk_select.py`), the Triton form
of `reference.topk_with_local_block`, the rule every backend shares. A long prefill, whose
tiles' pages are not split, keeps each row's best blocks in registers page by page instead and
writes the selection itself (the same rule: tested against the reference on both paths).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.reference import BLOCK_SIZE
from kernels.topk_select import topk_with_local_block
from kernels.triton_layout import (
    QueryTiles,
    dependent_launch,
    dot_precision,
    multiprocessors,
    release_next_kernel,
    search_steps,
    segments_of,
)

# Launch shapes, from H100 sweeps (bench/results/kernels_h100.md, 'index_scoring', lists what
# was swept and measured against them). Decode (M = the groups of a key head): 4 warps, 2
# stages, 4 programs per SM, plain loads and the native fp8 conversion; all rows' pages are laid
# end to end and cut into one even range per program, so a batch of unlike contexts keeps every
# program busy. Prefill (query tiles, compute-bound): M 128 with 8 warps (M 256 spills), no
# causal mask, the heaviest tiles first.
DECODE_WARPS = 4
PREFILL_WARPS = 8
PREFILL_PACKED_ROWS = 128  # M of a prefill program: query rows x the groups of a key head
NUM_STAGES = 2
PROGRAMS_PER_SM = 4  # split-K target: programs per SM over the whole grid
# Prefill keeps each row's top-k in the scan (no score round trip, no rule kernel) when its
# tiles fill the GPU without split-K; split-K wins below ~1.5 tiles per SM. Not with fp8 keys:
# their widening and the running top-k together spill (H100: kernels_h100.md).
TOPK_IN_SCAN_MIN_TILES_PER_SM = 1.5


@triton.jit
def _page_scores(q, k_idx, physical, key_head, stride_kp, stride_kt, stride_kh, scale,
                 INDEX_DIM: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    """The max-pooled score of one index-key page for each packed row of q [M, INDEX_DIM]."""
    tokens = tl.arange(0, PAGE)
    dims = tl.arange(0, INDEX_DIM)
    k = tl.load(k_idx + physical.to(tl.int64) * stride_kp + tokens[:, None] * stride_kt
                + key_head * stride_kh + dims[None, :])
    # fp8 index keys are widened in registers: the scan's bytes halve, the math stays.
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
    return tl.max(s, axis=1) * scale


@triton.jit
def _widened_queries(q, WIDEN_FP8_TO_FP16: tl.constexpr):
    if WIDEN_FP8_TO_FP16:
        # e4m3 -> fp16 is one native conversion (-> bf16 is several, a slower scan:
        # kernels_h100.md); fp16 holds every e4m3 value and bf16's precision, and index
        # queries saturate at its +-65504 range.
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def _decode_block_scores_kernel(
    q_idx, k_idx, block_table, seq_lens, cu_seqlens_q, scores, positions_out,
    stride_qt, stride_qg, stride_kp, stride_kt, stride_kh, stride_bt, stride_st, stride_sg,
    scale, num_rows, num_seqs,
    GROUPS_PER_KEY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    INDEX_DIM: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN_FP8_TO_FP16: tl.constexpr, USE_PDL: tl.constexpr, NUM_STAGES: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    """Decode: every row's historical pages, laid end to end, are cut into one even range per
    program, so a batch of mixed contexts keeps every SM streaming until the end."""
    key_head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    real = rows < num_rows
    seqs = segments_of(cu_seqlens_q, tl.where(real, rows, 0), num_seqs, SEARCH_STEPS)
    positions = (tl.load(seq_lens + seqs) - tl.load(cu_seqlens_q + seqs + 1) + rows).to(tl.int64)
    # Only a row's historical pages (those before its own) compete for its top-k, and every
    # token of them is visible to it.
    pages = tl.where(real, positions // PAGE, 0)
    ends = tl.cumsum(pages, axis=0)  # one past each row's last page, end to end
    total = tl.sum(pages, axis=0)
    # The selection rule needs every row's position: written once, by the first program.
    tl.store(positions_out + rows, positions,
             mask=real & (key_head == 0) & (tl.program_id(0) == 0))
    first = tl.program_id(0) * total // tl.num_programs(0)
    last = (tl.program_id(0) + 1) * total // tl.num_programs(0)

    m = tl.arange(0, BLOCK_M)
    groups = key_head * GROUPS_PER_KEY + m % GROUPS_PER_KEY
    valid = m < GROUPS_PER_KEY
    dims = tl.arange(0, INDEX_DIM)
    starts = ends - pages
    # One loop over the range, its row looked up per page (a few reductions over the rows),
    # so the loads stay software-pipelined across rows: a loop per row touched, nested in a
    # while, ran its pages unpipelined and slower (kernels_h100.md).
    for item in tl.range(first, last, num_stages=NUM_STAGES):
        this = (starts <= item) & (item < ends)  # the one row that holds this page
        row = tl.sum(tl.where(this, rows, 0), axis=0)
        page = item - tl.sum(tl.where(this, starts, 0), axis=0)
        seq = tl.sum(tl.where(this, seqs, 0), axis=0)
        q = tl.load(q_idx + row * stride_qt + groups[:, None] * stride_qg + dims[None, :],
                    mask=valid[:, None], other=0.0)
        q = _widened_queries(q, WIDEN_FP8_TO_FP16)
        physical = tl.load(block_table + seq * stride_bt + page)
        score = _page_scores(q, k_idx, physical, key_head, stride_kp, stride_kt, stride_kh,
                             scale, INDEX_DIM, PAGE, PRECISION)
        tl.store(scores + row * stride_st + groups * stride_sg + page, score, mask=valid)
    release_next_kernel(USE_PDL)


@triton.jit
def _index_block_scores_kernel(
    q_idx, k_idx, block_table, seq_lens, cu_seqlens_q, tile_seq, tile_start, tile_end, scores,
    positions_out, selected,
    stride_qt, stride_qg, stride_kp, stride_kt, stride_kh, stride_bt, stride_st, stride_sg,
    scale, num_seqs,
    GROUPS_PER_KEY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    INDEX_DIM: tl.constexpr, PAGE: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN_FP8_TO_FP16: tl.constexpr, USE_PDL: tl.constexpr,
    NUM_STAGES: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    FUSED_TOPK: tl.constexpr,
):
    key_head = tl.program_id(1)
    split = tl.program_id(2)
    # Causal prefill: later tiles see more pages, so they start first (a shorter tail).
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.load(tile_seq + tile)
    row_begin = tl.load(tile_start + tile)
    row_end = tl.load(tile_end + tile)
    seq_len = tl.load(seq_lens + seq)
    q_begin = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_begin
    first_pos = seq_len - q_len - q_begin  # + row = the row's position

    # Only a row's historical pages (those before its own) compete for its top-k, and every
    # token of them is visible to it: a tile scores the pages before its last row's own, with
    # no causal mask (none for the spare, empty tiles of the grid's upper bound).
    num_pages = tl.where(row_begin < row_end, (first_pos + row_end - 1) // PAGE, 0)
    # A tile's own pages, not the block table's width (CUDA graphs capture it at the longest
    # context), are split evenly over its programs.
    num_splits = tl.num_programs(2)
    page_begin = split * num_pages // num_splits
    page_end = (split + 1) * num_pages // num_splits

    m = tl.arange(0, BLOCK_M)
    rows = row_begin + m // GROUPS_PER_KEY
    groups = key_head * GROUPS_PER_KEY + m % GROUPS_PER_KEY
    valid = (m < BLOCK_T * GROUPS_PER_KEY) & (rows < row_end)
    if not FUSED_TOPK:
        # The selection rule needs every row's position: written once, by the first split.
        tl.store(positions_out + rows, (first_pos + rows).to(tl.int64),
                 mask=valid & (key_head == 0) & (split == 0) & (m % GROUPS_PER_KEY == 0))
    dims = tl.arange(0, INDEX_DIM)
    q = tl.load(q_idx + rows[:, None] * stride_qt + groups[:, None] * stride_qg + dims[None, :],
                mask=valid[:, None], other=0.0)
    q = _widened_queries(q, WIDEN_FP8_TO_FP16)
    if FUSED_TOPK:  # the selection rule, page by page (a tile's pages are not split)
        own = (first_pos + rows) // PAGE  # each row's own block
        slots = tl.arange(0, TOPK_P2)
        # The best topk - 1 historical blocks so far; slots past those hold +inf, never the
        # worst, so they never take a block.
        best = tl.where(slots < TOPK - 1, float("-inf"), float("inf"))[None, :] \
            + tl.zeros([BLOCK_M, TOPK_P2], tl.float32)
        best_block = tl.full([BLOCK_M, TOPK_P2], -1, tl.int32)
    for page in tl.range(page_begin, page_end, num_stages=NUM_STAGES):
        physical = tl.load(block_table + seq * stride_bt + page)
        score = _page_scores(q, k_idx, physical, key_head, stride_kp, stride_kt, stride_kh,
                             scale, INDEX_DIM, PAGE, PRECISION)
        if FUSED_TOPK:
            # A better historical block replaces the worst kept (the first of equal worsts:
            # the -inf slots fill in order); equal scores keep the earlier, lower block.
            score = tl.where(page < own, score, float("-inf"))
            worst = tl.argmin(best, axis=1)
            replace = (slots[None, :] == worst[:, None]) & (score > tl.min(best, axis=1))[:, None]
            best = tl.where(replace, score[:, None], best)
            best_block = tl.where(replace, page, best_block)
        else:
            # Pages at or after a row's own get scores too (of keys before the tile's last
            # row); the rule never reads them.
            tl.store(scores + rows * stride_st + groups * stride_sg + page, score, mask=valid)
    if FUSED_TOPK:  # the spec's row layout: kept blocks, the own block, then -1
        taken = tl.minimum(own, TOPK - 1)[:, None]
        row_out = tl.where(slots[None, :] < taken, best_block,
                           tl.where(slots[None, :] == taken, own[:, None], -1))
        tl.store(selected + (rows * (tl.num_programs(1) * GROUPS_PER_KEY) + groups)[:, None] * TOPK
                 + slots[None, :], row_out, mask=valid[:, None] & (slots < TOPK)[None, :])
    release_next_kernel(USE_PDL)


def index_block_scores(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(max-pooled index scores float32 [total_q, Hkv, max_pages], each query row's position
    int64 [total_q]). Exact for each row's historical pages, the only ones the selection rule
    reads; the rest hold scores of other pages' keys or nothing (no fill kernel per step)."""
    return _scan(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, topk=None)


def select_blocks(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, topk: int) -> torch.Tensor:
    """Long prefills keep each row's top-k in the scan itself; decode (pages split over
    programs), short chunks and fp8 keys score, then apply the rule in a second kernel."""
    scanned = _scan(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, topk)
    return scanned if isinstance(scanned, torch.Tensor) else topk_with_local_block(*scanned, topk)


def _scan(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, topk: int | None):
    """The scan's launch: (scores, positions), or the selection itself when topk is given and
    the rule can run in the scan (TOPK_IN_SCAN_MIN_TILES_PER_SM)."""
    total_q, num_groups, index_dim = q_idx.shape
    key_heads = k_idx_cache.shape[2]
    groups_per_key = num_groups // key_heads
    max_pages = block_table.shape[1]
    num_seqs = seq_lens.shape[0]
    device = q_idx.device
    # Uniform decode steps (q_len 1..16 everywhere) get tiles of their q_len, anything longer
    # full prefill tiles.
    rows = QueryTiles.rows_for(total_q, num_seqs,
                               max_rows=max(1, PREFILL_PACKED_ROWS // groups_per_key))
    common = dict(GROUPS_PER_KEY=groups_per_key, BLOCK_M=max(16, triton.next_power_of_2(
        rows * groups_per_key)), INDEX_DIM=index_dim, PAGE=BLOCK_SIZE,
        PRECISION=dot_precision(q_idx.dtype),
        WIDEN_FP8_TO_FP16=k_idx_cache.element_size() == 1 and q_idx.dtype == torch.bfloat16,
        USE_PDL=dependent_launch(device), NUM_STAGES=NUM_STAGES)
    strides = (q_idx.stride(0), q_idx.stride(1), k_idx_cache.stride(0), k_idx_cache.stride(1),
               k_idx_cache.stride(2), block_table.stride(0))
    scale = 1.0 / math.sqrt(index_dim)
    programs = PROGRAMS_PER_SM * multiprocessors(device)
    if rows == 1:  # decode: one row per sequence, located in-kernel
        scores, positions = _score_outputs(total_q, num_groups, max_pages, device)
        if total_q:
            _decode_block_scores_kernel[(max(1, programs // key_heads), key_heads)](
                q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, scores, positions,
                *strides, scores.stride(0), scores.stride(1), scale, total_q, num_seqs,
                BLOCK_R=max(16, triton.next_power_of_2(total_q)),
                SEARCH_STEPS=search_steps(num_seqs), num_warps=DECODE_WARPS, **common)
        return scores, positions
    tiles = QueryTiles.build(cu_seqlens_q, total_q, rows)
    fused = (topk is not None and k_idx_cache.element_size() > 1
             and tiles.num_tiles * key_heads >= TOPK_IN_SCAN_MIN_TILES_PER_SM
             * multiprocessors(device))
    if fused:
        selected = torch.empty(total_q, num_groups, topk, dtype=torch.int32, device=device)
        scores = positions = selected  # unwritten
        splits = 1
    else:
        scores, positions = _score_outputs(total_q, num_groups, max_pages, device)
        selected = positions  # unwritten
        # Split by the tiles that hold rows (all of them in a uniform step), not the grid's
        # upper bound: its spare tiles return at once (multi-token decode selection ran faster
        # with fp8 keys, as fast with bf16: kernels_h100.md).
        splits = max(1, min(max_pages, programs // max(1, triton.cdiv(total_q, rows) * key_heads)))
    if total_q:
        _index_block_scores_kernel[(tiles.num_tiles, key_heads, splits)](
            q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, tiles.seq, tiles.start,
            tiles.end, scores, positions, selected, *strides, scores.stride(0),
            scores.stride(1), scale, num_seqs, BLOCK_T=rows, TOPK=topk or 1,
            TOPK_P2=triton.next_power_of_2(topk or 1), FUSED_TOPK=fused,
            num_warps=PREFILL_WARPS if common["BLOCK_M"] >= PREFILL_PACKED_ROWS
            else DECODE_WARPS, **common)
    return selected if fused else (scores, positions)


def _score_outputs(total_q: int, num_groups: int, max_pages: int, device: torch.device):
    """(block scores float32 [total_q, Hkv, max_pages], positions int64 [total_q]): written by
    the scan where the rule reads them, nowhere else (no fill kernel per step)."""
    return (torch.empty(total_q, num_groups, max_pages, dtype=torch.float32, device=device),
            torch.empty(total_q, dtype=torch.int64, device=device))

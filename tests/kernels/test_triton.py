"""The Triton kernels against kernels.reference.

On CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set by `kernels` before the
import) at small shapes; on a CUDA machine the `gpu` tests repeat them at real shapes in bf16,
with NaN-poisoned memory so an unwritten output cannot pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from kernels import index_scoring, prefill_kv_major, prefill_query_tiled, query_major, reference
from kernels.fp8_quantize import quantize_rows
from kernels.reference import ActivationLayout
from tests.kernels.paged_batch import check_selection, make_batch, relative_error

# (seq_lens, q_lens): fresh prefill, prefix + chunk, decode, multi-token decode; pages scattered,
# partial last pages (none of the lengths is a multiple of 128 except 256).
LAYOUTS = {
    "prefill+decode": ([40, 700], [40, 1]),
    "chunk-after-prefix": ([530, 256], [6, 3]),
    "multi-token-decode": ([650, 129], [16, 2]),
    "decode": ([700, 129, 300], [1, 1, 1]),
}
# (Hq, Hkv, index-key heads): group sizes 8, 16 and 1; one shared or per-group index keys.
HEADS = [(16, 2, 1), (16, 1, 1), (4, 4, 4), (8, 1, 1)]


def _batch(layout: str, heads: tuple[int, int, int], seed: int = 0):
    seq_lens, q_lens = LAYOUTS[layout]
    num_heads, num_kv_heads, index_key_heads = heads
    return make_batch(seq_lens, q_lens, num_heads, num_kv_heads, 16, 16, index_key_heads,
                      seed=seed)


ATTENTION_KERNELS = [query_major, prefill_kv_major, prefill_query_tiled]
ATTENTION_KERNEL_IDS = ["query-major", "kv-major", "query-tiled"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-Hik{h[2]}")
def test_select_blocks_triton_matches_reference(layout, heads):
    batch = _batch(layout, heads)
    topk = 3
    ours = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=topk,
                                 backend="triton")
    ref = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=topk,
                                backend="reference")
    assert torch.equal(ours.sort(-1).values, ref.sort(-1).values)
    check_selection(ours, batch, topk)


@pytest.mark.parametrize("heads", [(16, 2, 1), (8, 1, 1)], ids=["tiles-of-64", "tiles-of-128"])
@pytest.mark.parametrize("pages_split", [False, True], ids=["top-k-in-scan", "split-k"])
def test_select_blocks_of_long_chunks(heads, pages_split, monkeypatch):
    """Prefill tiles of 64 and 128 query rows after a prefix, several per sequence: a tile scores
    the pages before its last row's own, unmasked, and each row still gets exactly its own
    historical blocks' top-k, kept in the scan (a tile's pages in one program) or by the rule's
    kernel after a split-K scan (fewer tiles than SMs: here a device of a million SMs)."""
    if pages_split:
        monkeypatch.setattr(index_scoring, "multiprocessors", lambda device: 1 << 20)
    batch = make_batch([900, 300], [300, 260], *heads[:2], 16, 16, heads[2], seed=3)
    ours = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3,
                                 backend="triton")
    ref = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3,
                                backend="reference")
    assert torch.equal(ours.sort(-1).values, ref.sort(-1).values)
    check_selection(ours, batch, 3)


@pytest.mark.parametrize("seq_lens,q_lens", [([1500, 129, 300, 2000], [1, 1, 1, 1]),
                                             ([700, 300, 129], [1, 0, 2])],
                         ids=["mixed-contexts", "idle-sequence"])
def test_decode_scan_scores_every_historical_page_once(seq_lens, q_lens):
    """A decode step's pages, all rows' laid end to end, are cut into even ranges (8 programs
    under the interpreter) that cross from row to row: every historical page of every row
    gets its exact score. An idle sequence (no query row) sends the rows' lookup to the
    search instead of one load each."""
    batch = make_batch(seq_lens, q_lens, 16, 2, 16, 16, 1, seed=5)
    scores, positions = index_scoring.index_block_scores(batch.q_idx, batch.k_idx_cache,
                                                         *batch.layout())
    row = 0
    for seq, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        for pos in range(seq_len - q_len, seq_len):
            assert positions[row] == pos
            pages = batch.block_table[seq, : pos // kernels.BLOCK_SIZE].long()
            keys = batch.k_idx_cache[pages, :, 0]  # [pages, 128, Di]
            expected = (torch.einsum("gd,ptd->gpt", batch.q_idx[row], keys).amax(-1)
                        / batch.q_idx.shape[-1] ** 0.5)
            torch.testing.assert_close(scores[row, :, : len(pages)], expected)
            row += 1
    ours = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3,
                                 backend="triton")
    ref = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3,
                                backend="reference")
    assert torch.equal(ours.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize("layout", ["decode", "multi-token-decode", "chunk-after-prefix"])
def test_select_blocks_with_fp8_index_keys(layout):
    """fp8 e4m3 index keys: the Triton scan selects what the reference selects from the same
    fp8 keys, a correct top-k of the fp8 scores, and nearly what the full-precision keys pick."""
    batch = _batch(layout, (16, 2, 1))
    fp8_keys = kernels.to_index_key_dtype(batch.k_idx_cache, kernels.INDEX_KEY_FP8)
    assert fp8_keys.dtype == torch.float8_e4m3fn
    ours = kernels.select_blocks(batch.q_idx, fp8_keys, *batch.layout(), topk=3,
                                 backend="triton")
    ref = kernels.select_blocks(batch.q_idx, fp8_keys, *batch.layout(), topk=3,
                                backend="reference")
    assert torch.equal(ours.sort(-1).values, ref.sort(-1).values)
    rounded = batch.to(dtype=torch.float32)
    rounded.k_idx_cache = fp8_keys.float()
    check_selection(ours, rounded, 3)
    full = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3,
                                 backend="reference")
    assert (full.sort(-1).values == ours.sort(-1).values).float().mean() > 0.8


def test_fp8_index_keys_saturate_instead_of_overflowing():
    keys = torch.tensor([1e6, -1e6, 3.0, 0.0])
    cast = kernels.to_index_key_dtype(keys, kernels.INDEX_KEY_FP8).float()
    assert cast.tolist() == [448.0, -448.0, 3.0, 0.0]


@pytest.mark.parametrize("impl", ATTENTION_KERNELS, ids=ATTENTION_KERNEL_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-Hik{h[2]}")
def test_sparse_attention_triton_matches_reference(impl, layout, heads):
    batch = _batch(layout, heads, seed=1)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    out, lse = impl.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(),
                                     blocks, return_lse=True)
    ref_out, ref_lse = kernels.sparse_attention(batch.q.double(), batch.k_cache.double(),
                                                batch.v_cache.double(), *batch.layout(), blocks,
                                                return_lse=True, backend="reference")
    assert out.dtype == batch.q.dtype
    assert relative_error(out, ref_out) < 1e-5
    assert torch.allclose(lse, ref_lse.float(), atol=1e-4)


def test_kv_major_splits_a_block_chosen_by_many_queries():
    """A block chosen by more of the 400 query rows than one work item holds is cut into
    several items."""
    batch = make_batch([900], [400], 4, 1, 16, 16, 1, seed=4)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=2)
    work = prefill_kv_major.BlockWork.build(blocks, batch.cu_seqlens_q, 0,
                                            batch.block_table.shape[1], rows=16)
    busiest = int(work.segment_count.argmax())
    chosen_by = int(work.segment_count[busiest])
    assert chosen_by > 16  # cut into items of 16 entries
    assert int(work.items_cu[busiest + 1] - work.items_cu[busiest]) == -(-chosen_by // 16)
    assert int(work.segment_count.sum()) == int((blocks >= 0).sum())
    assert work.num_items >= int(work.items_cu[-1])
    out = prefill_kv_major.sparse_attention(batch.q, batch.k_cache, batch.v_cache,
                                            *batch.layout(), blocks)
    ref = kernels.sparse_attention(batch.q.double(), batch.k_cache.double(),
                                   batch.v_cache.double(), *batch.layout(), blocks,
                                   backend="reference")
    assert relative_error(out, ref) < 1e-5


def test_kv_major_work_lists_every_choice_once_under_its_block():
    """The counting sort's CSR, read back, is the selection: each (row, group, slot) that
    chose a block sits once in that (sequence, group, block) segment; rows after first_row."""
    batch = _batch("prefill+decode", (16, 2, 1), seed=5)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    first_row, max_pages = 7, batch.block_table.shape[1]
    part = blocks[first_row:].contiguous()
    work = prefill_kv_major.BlockWork.build(part, batch.cu_seqlens_q, first_row, max_pages,
                                            rows=16)
    rebuilt = torch.full_like(part, -1)
    for segment in range(work.num_segments):
        start, count = int(work.segment_start[segment]), int(work.segment_count[segment])
        group = segment // max_pages % part.shape[1]
        for entry in range(start, start + count):
            row, slot = int(work.entry_row[entry]), int(work.entry_slot[entry])
            assert rebuilt[row, group, slot] == -1  # listed once
            rebuilt[row, group, slot] = segment % max_pages
            seq = segment // (max_pages * part.shape[1])
            assert batch.cu_seqlens_q[seq] <= first_row + row < batch.cu_seqlens_q[seq + 1]
    assert torch.equal(rebuilt, part)


def test_kv_major_in_several_launches_matches_reference(monkeypatch):
    """Long chunks are attended a slice of rows per launch (bounded partials)."""
    batch = _batch("prefill+decode", (16, 2, 1), seed=7)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    row_bytes = 16 * 3 * 16 * batch.q.element_size()  # Hq x topk x D
    monkeypatch.setattr(prefill_kv_major, "_PARTIAL_BYTES", 13 * row_bytes)  # 13 rows a launch
    out = prefill_kv_major.sparse_attention(batch.q, batch.k_cache, batch.v_cache,
                                            *batch.layout(), blocks)
    ref = kernels.sparse_attention(batch.q.double(), batch.k_cache.double(),
                                   batch.v_cache.double(), *batch.layout(), blocks,
                                   backend="reference")
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-Hik{h[2]}")
def test_query_tiled_dense_attention_matches_reference(layout, heads):
    batch = _batch(layout, heads, seed=3)
    out, lse = prefill_query_tiled.dense_attention(batch.q, batch.k_cache, batch.v_cache,
                                                   *batch.layout(), return_lse=True)
    ref_out, ref_lse = kernels.dense_attention(batch.q.double(), batch.k_cache.double(),
                                               batch.v_cache.double(), *batch.layout(),
                                               return_lse=True, backend="reference")
    assert relative_error(out, ref_out) < 1e-5
    assert torch.allclose(lse, ref_lse.float(), atol=1e-4)


@pytest.mark.parametrize("layout", ["multi-token-decode", "decode", "chunk-after-prefix"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_query_tiled_split_k_matches_reference(monkeypatch, layout, dense):
    """Small grids split each tile's pages over programs and merge the partials; here as many
    splits as a tile could have pages, so some splits walk none."""
    monkeypatch.setattr(prefill_query_tiled, "multiprocessors", lambda device: 1 << 20)
    monkeypatch.setattr(prefill_query_tiled, "MIN_PAGES_PER_SPLIT", 1)
    batch = _batch(layout, (16, 2, 1), seed=4)
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout())
    doubled = (batch.q.double(), batch.k_cache.double(), batch.v_cache.double(), *batch.layout())
    if dense:
        out, lse = prefill_query_tiled.dense_attention(*args, return_lse=True)
        ref_out, ref_lse = kernels.dense_attention(*doubled, return_lse=True,
                                                   backend="reference")
    else:
        blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
        out, lse = prefill_query_tiled.sparse_attention(*args, blocks, return_lse=True)
        ref_out, ref_lse = kernels.sparse_attention(*doubled, blocks, return_lse=True,
                                                    backend="reference")
    assert relative_error(out, ref_out) < 1e-5
    assert torch.allclose(lse, ref_lse.float(), atol=1e-4)


# Short tiles after a prefix, and one 40-row prompt (its 640 picks sorted in one program).
@pytest.mark.parametrize("layout,rows", [("chunk-after-prefix", 4), ("prefill+decode", 40)])
def test_query_tiled_unions_cover_every_rows_choice(layout, rows):
    """A tile's union holds each block any of its rows chose, once, in ascending order, flagged
    when only some of the rows chose it."""
    batch = _batch(layout, (8, 2, 1), seed=6)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    unions = prefill_query_tiled.TileUnions.build(blocks, batch.cu_seqlens_q, rows=rows,
                                                  max_pages=batch.block_table.shape[1])
    tiles = unions.tiles
    covered = torch.zeros(blocks.shape[0], dtype=torch.int32)
    for tile in range(tiles.num_tiles):
        rows_of_tile = slice(int(tiles.start[tile]), int(tiles.end[tile]))
        covered[rows_of_tile] += 1
        for group in range(blocks.shape[1]):
            unit = tile * blocks.shape[1] + group
            entries = unions.block[unit, :int(unions.count[unit])]
            union = unions.block_ids()[unit, :int(unions.count[unit])].tolist()
            chosen = blocks[rows_of_tile, group]
            assert union == sorted(set(chosen[chosen >= 0].tolist()))
            # Flagged exactly when some row of the tile did not choose the block.
            every_row = [bool((chosen == block).any(-1).all()) for block in union]
            assert (entries == unions.block_ids()[unit, :len(union)]).tolist() == every_row
    assert (covered == 1).all()  # the tiles cover every row once


@pytest.mark.parametrize("layout,heads,min_rows,expected", [
    # 41 rows over 2 sequences: G = 8 takes KV-major from 32 rows, G = 16 from 40 or 48.
    ("prefill+decode", (16, 2, 1), {8: 32, 16: 48}, prefill_kv_major),
    ("prefill+decode", (16, 1, 1), {8: 32, 16: 40}, prefill_kv_major),
    ("prefill+decode", (16, 1, 1), {8: 32, 16: 48}, query_major),  # below G = 16's crossover
    ("prefill+decode", (32, 1, 1), {8: 32, 16: 40}, query_major),  # G = 32: not measured
    ("multi-token-decode", (16, 2, 1), {8: 32}, prefill_query_tiled),  # a tile a request
    ("decode", (16, 2, 1), {8: 32}, query_major),
], ids=["kv-major-G8", "kv-major-G16", "query-major-G16-few-rows", "query-major-G32",
        "multi-token-query-tiled", "decode-query-major"])
def test_dispatch_picks_kernel_by_shape(monkeypatch, layout, heads, min_rows, expected):
    from kernels import triton_backend

    monkeypatch.setattr(triton_backend, "KV_MAJOR_MIN_ROWS", min_rows)
    monkeypatch.setattr(triton_backend, "KV_MAJOR_MIN_ROWS_PER_SEQ", 16)
    batch = _batch(layout, heads, seed=9)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    calls = []
    for module in ATTENTION_KERNELS:
        real = module.sparse_attention
        monkeypatch.setattr(module, "sparse_attention",
                            lambda *a, _m=module, _r=real, **k: calls.append(_m) or _r(*a, **k))
    out = triton_backend.sparse_attention(batch.q, batch.k_cache, batch.v_cache,
                                          *batch.layout(), blocks)
    assert calls == [expected]
    ref = kernels.sparse_attention(batch.q.double(), batch.k_cache.double(),
                                   batch.v_cache.double(), *batch.layout(), blocks,
                                   backend="reference")
    assert relative_error(out, ref) < 1e-5


def test_dispatch_runs_query_tiled_only_for_alike_selections(monkeypatch):
    """Long chunks launch the query-tiled kernel and the fallback into the same buffers; the
    unions' device flag lets only the query-tiled one write when neighbouring rows chose alike."""
    from kernels import triton_backend

    batch = make_batch([4000], [640], 4, 2, 16, 16, 1, seed=8)  # 32 pages to choose from
    monkeypatch.setattr(triton_backend, "QUERY_TILED_MIN_ROWS", 512)
    scattered = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    # Alike: every row keeps the selection of the last row of its 128-row block, when visible.
    alike = scattered[torch.arange(640) // 128 * 128 + 127].clone()
    own = (torch.arange(640) + 3360) // 128
    alike[:, :, -1] = own[:, None]  # the own block last, as the selection rule places it
    alike[:, :, :-1][alike[:, :, :-1] >= own[:, None, None]] = -1
    for blocks, expect_alike in ((alike, 1), (scattered, 0)):
        unions = prefill_query_tiled.TileUnions.for_attention(
            blocks, batch.cu_seqlens_q, group=2, max_pages=batch.block_table.shape[1])
        flag = unions.alike(topk=3, max_union=triton_backend.QUERY_TILED_MAX_UNION)
        assert int(flag) == expect_alike
        out = triton_backend.sparse_attention(batch.q, batch.k_cache, batch.v_cache,
                                              *batch.layout(), blocks)
        ref = kernels.sparse_attention(batch.q.double(), batch.k_cache.double(),
                                       batch.v_cache.double(), *batch.layout(), blocks,
                                       backend="reference")
        assert relative_error(out, ref) < 1e-5


# A prompt and a decode; one decode row alone (query-major splits it: the merge is gated too).
@pytest.mark.parametrize("seq_lens,q_lens", [([40, 700], [40, 1]), ([700], [1])])
@pytest.mark.parametrize("impl", ATTENTION_KERNELS, ids=ATTENTION_KERNEL_IDS)
def test_gated_kernel_writes_only_when_its_flag_says_so(impl, seq_lens, q_lens):
    """A gated launch leaves the shared buffers untouched (NaN here) when the flag belongs to
    the other kernel, and writes the ungated result when it is its own."""
    from kernels.triton_layout import GatedOutput

    batch = make_batch(seq_lens, q_lens, 16, 2, 16, 16, 1, seed=10)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout(), blocks)
    expect_out, expect_lse = impl.sparse_attention(*args, return_lse=True)
    flag = torch.ones(1, dtype=torch.int32)
    for runs_when, writes in ((0, False), (1, True)):
        out = torch.full_like(expect_out, float("nan"))
        lse = torch.full_like(expect_lse, float("nan"))
        impl.sparse_attention(*args, gated=GatedOutput(out, lse, flag, runs_when))
        if writes:
            assert torch.equal(out, expect_out) and torch.equal(lse, expect_lse)
        else:
            assert out.isnan().all() and lse.isnan().all()


def test_kv_major_in_row_chunks(monkeypatch):
    """A long prefill is processed in row chunks that bound the partials' memory."""
    batch = _batch("multi-token-decode", (8, 2, 1), seed=5)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    monkeypatch.setattr(prefill_kv_major, "_PARTIAL_BYTES", 7 * 8 * 3 * 16 * 4)  # 7 rows/chunk
    out = prefill_kv_major.sparse_attention(batch.q, batch.k_cache, batch.v_cache,
                                            *batch.layout(), blocks)
    ref = kernels.sparse_attention(batch.q.double(), batch.k_cache.double(),
                                   batch.v_cache.double(), *batch.layout(), blocks,
                                   backend="reference")
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("impl", ATTENTION_KERNELS, ids=ATTENTION_KERNEL_IDS)
def test_triton_attention_with_all_blocks_equals_dense(impl):
    batch = _batch("chunk-after-prefix", (8, 2, 1), seed=2)
    topk = 8  # >= every sequence's page count: MSA is dense attention
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=topk,
                                   backend="triton")
    sparse = impl.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(), blocks)
    dense = kernels.dense_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout())
    assert relative_error(sparse, dense.double()) < 1e-5


@pytest.mark.parametrize("layout", ["decode", "prefill+decode", "multi-token-decode"])
@pytest.mark.parametrize("group", [16, 32], ids=["a-head-a-group", "two-heads-a-group"])
@pytest.mark.parametrize("token_major", [False, True], ids=["rows-scales", "token-major-scales"])
def test_sparse_attention_hands_o_proj_its_output_quantized(layout, group, token_major,
                                                            monkeypatch):
    """quantized=layout: out [T, Hq * D] quantized as o_proj's FP8 GEMM takes it, the same bytes
    as the output, then the quantization kernel. Decode's merge of split rows quantizes a head
    per scale group as it writes; other steps (one split, the query-tiled kernel) and wider
    groups quantize after. Rows past T (cuBLASLt's padding to 4) stay unwritten."""
    batch = _batch(layout, (8, 1, 1), seed=3).to(dtype=torch.bfloat16)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout(), blocks)
    out = kernels.sparse_attention(*args, backend="triton").flatten(1)
    rows = out.shape[0]
    quantized_as = ActivationLayout(group, token_major, rows + -rows % 4)
    quantized_after = []
    monkeypatch.setattr(query_major, "quantize_rows",
                        lambda x, how: quantized_after.append(x) or quantize_rows(x, how))
    got = kernels.sparse_attention(*args, quantized=quantized_as)
    want = quantize_rows(out, quantized_as)
    assert (got.layout, got.count, got.dtype) == (quantized_as, rows, torch.bfloat16)
    assert torch.equal(got.values[:rows].view(torch.uint8), want.values[:rows].view(torch.uint8))
    assert torch.equal(got.scales[:rows], want.scales[:rows])
    merged_in_splits = query_major.decode_splits(rows, 1, 3, batch.q.device) > 1
    merge_quantizes = layout != "multi-token-decode" and merged_in_splits and group == 16
    assert merge_quantizes == (layout == "decode" and group == 16)  # the cases cover each path
    assert bool(quantized_after) == (layout != "multi-token-decode" and not merge_quantizes)
    for wrong in ({"return_lse": True}, {"backend": "reference"}):
        with pytest.raises(ValueError, match="Triton backend, without the lse"):
            kernels.sparse_attention(*args, quantized=quantized_as, **wrong)


# -- real shapes on a GPU (the device machine; skipped in CI) -------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU; CPU runs the interpreter tests above")


def _poison_allocator() -> None:
    """Fills the caching allocator's free memory with NaN so unwritten outputs show up."""
    free, _ = torch.cuda.mem_get_info()
    filler = torch.full((int(free * 0.5) // 4,), float("nan"), device="cuda")
    del filler


@requires_cuda
@pytest.mark.gpu
def test_long_chunk_dispatch_equals_the_kernel_its_flag_picks():
    """The two kernels of a long chunk run on two streams into the same poisoned buffers; the
    result is the picked kernel's alone, bit for bit: query-tiled for selections shared per
    128-query block, the KV-major fallback for unrelated ones."""
    from kernels import triton_backend

    length = 9216  # a fresh prompt of 72 blocks, above QUERY_TILED_MIN_ROWS
    batch = make_batch([length], [length], 16, 2, 128, 128, 1, seed=11).to(
        device="cuda", dtype=torch.bfloat16)
    unrelated = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=16)
    # Every row takes the selection of its block's last row: blocks it may see, its own too.
    shared = unrelated[torch.arange(length, device="cuda") // 128 * 128 + 127].contiguous()
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout())
    for blocks, picked, alike in ((shared, prefill_query_tiled, 1),
                                  (unrelated, prefill_kv_major, 0)):
        unions = prefill_query_tiled.TileUnions.for_attention(
            blocks, batch.cu_seqlens_q, group=8, max_pages=batch.block_table.shape[1])
        assert int(unions.alike(16, triton_backend.QUERY_TILED_MAX_UNION)) == alike
        alone = picked.sparse_attention(*args, blocks)
        _poison_allocator()
        dispatched = triton_backend.sparse_attention(*args, blocks)
        assert torch.equal(dispatched, alone), picked.__name__


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 2, 1), (64, 4, 1), (16, 2, 2)],
                         ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-Hik{h[2]}")
@pytest.mark.parametrize("shape", [([20_000, 9_000], [1, 700]), ([33_000] * 4, [16] * 4),
                                   ([5_000, 70_000], [4_000, 1]),
                                   ([100_000, 3_000, 40_000, 129, 9_000], [1] * 5)],
                         ids=["decode+chunk", "multi-token-decode", "long-chunk", "mixed-decode"])
def test_kernels_at_real_shapes_bf16(heads, shape, monkeypatch):
    from kernels import triton_backend

    seq_lens, q_lens = shape
    num_heads, num_kv_heads, index_key_heads = heads
    batch = make_batch(seq_lens, q_lens, num_heads, num_kv_heads, 128, 128, index_key_heads,
                       seed=7).to(device="cuda", dtype=torch.bfloat16)
    _poison_allocator()
    ours = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=16,
                                 backend="triton")
    ref = kernels.select_blocks(batch.q_idx.float(), batch.k_idx_cache.float(), *batch.layout(),
                                topk=16, backend="reference")
    # bf16 scores may reorder near-ties: compare the kept sets, allowing a few swaps.
    agree = (ours.sort(-1).values == ref.sort(-1).values).float().mean().item()
    assert agree > 0.97
    expected = kernels.sparse_attention(batch.q.float(), batch.k_cache.float(),
                                        batch.v_cache.float(), *batch.layout(), ref,
                                        backend="reference")
    for impl in ATTENTION_KERNELS:
        _poison_allocator()
        out = impl.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(), ref)
        assert not out.isnan().any(), impl.__name__
        assert relative_error(out.float(), expected.double()) < 1e-2, impl.__name__
    # The long-chunk dispatch at these shapes: both kernels launched into poisoned memory, the
    # one the device flag picks writes every row, the other stands aside.
    monkeypatch.setattr(triton_backend, "QUERY_TILED_MIN_ROWS", 1)
    _poison_allocator()
    out = triton_backend.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(),
                                          ref)
    assert not out.isnan().any()
    assert relative_error(out.float(), expected.double()) < 1e-2
    if max(q_lens) <= 1000:  # the reference's dense scores of a long chunk would not fit
        _poison_allocator()
        dense = prefill_query_tiled.dense_attention(batch.q, batch.k_cache, batch.v_cache,
                                                    *batch.layout())
        expected_dense = kernels.dense_attention(batch.q.float(), batch.k_cache.float(),
                                                 batch.v_cache.float(), *batch.layout(),
                                                 backend="reference")
        assert not dense.isnan().any()
        assert relative_error(dense.float(), expected_dense.double()) < 1e-2
    # fp8 index keys: the scan agrees with the reference on the same fp8 keys.
    fp8_keys = kernels.to_index_key_dtype(batch.k_idx_cache, kernels.INDEX_KEY_FP8)
    _poison_allocator()
    ours_fp8 = kernels.select_blocks(batch.q_idx, fp8_keys, *batch.layout(), topk=16,
                                     backend="triton")
    ref_fp8 = kernels.select_blocks(batch.q_idx.float(), fp8_keys, *batch.layout(), topk=16,
                                    backend="reference")
    assert (ours_fp8.sort(-1).values == ref_fp8.sort(-1).values).float().mean().item() > 0.97


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(64, 4), (32, 2), (16, 1)],
                         ids=["TP1", "TP2-shard", "TP4-shard"])
@pytest.mark.parametrize("rows", [1, 64, 130])
def test_attention_quantized_for_o_proj_at_m3_width_on_the_gpu(heads, rows):
    """Decode at M3's width in bf16, attention handing o_proj its output quantized (by the merge
    where this GPU splits the rows, else after): in the layout `activation_layout` picks for
    o_proj's 128 x 128-block weight at that batch, and in the Triton GEMM's, the same bytes
    as the output, then the quantization kernel, into poisoned memory; o_proj the same
    product."""
    from kernels import fp8_gemm

    num_heads, num_kv_heads = heads
    batch = make_batch([2200] * rows, [1] * rows, num_heads, num_kv_heads, 128, 128, 1,
                       seed=rows).to(device="cuda", dtype=torch.bfloat16)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=16)
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout(), blocks)
    out = kernels.sparse_attention(*args).flatten(1)
    g = torch.Generator(device="cuda").manual_seed(rows)
    weight = torch.randn(6144, out.shape[1], device="cuda", dtype=torch.bfloat16, generator=g)
    weight, scales = reference.quantize_fp8(weight / out.shape[1] ** 0.5, 128, 128)
    scales = dataclasses.replace(scales, per_row=reference.per_row_scales(scales, 6144).scale)
    served = fp8_gemm.activation_layout(out, weight, scales)
    for quantized_as in (served, ActivationLayout(128, False, rows)):
        _poison_allocator()
        got = kernels.sparse_attention(*args, quantized=quantized_as)
        want = quantize_rows(out, quantized_as)
        assert torch.equal(got.values[:rows].view(torch.uint8),
                           want.values[:rows].view(torch.uint8)), quantized_as
        assert torch.equal(got.scales[:rows], want.scales[:rows]), quantized_as
    product = kernels.fp8_linear(kernels.sparse_attention(*args, quantized=served), weight,
                                 scales)
    assert torch.equal(product, kernels.fp8_linear(out, weight, scales))

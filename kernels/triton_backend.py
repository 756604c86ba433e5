"""The Triton backend of the `kernels` functions (CUDA; CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import prefill_kv_major, prefill_query_tiled, query_major, reference
from kernels.fp8_gemm import activation_layout, fp8_linear
from kernels.fp8_quantize import quantize_rows
from kernels.index_scoring import select_blocks
from kernels.moe_grouped_gemm import routed_experts
from kernels.reference import ActivationLayout
from kernels.rms_norm_quantize import gemma_rms_norm_quantized
from kernels.swiglu_quantize import swiglu_oai_quantized
from kernels.triton_layout import AttentionShape, GatedOutput

__all__ = ["select_blocks", "sparse_attention", "dense_attention", "routed_experts",
           "fp8_linear", "activation_layout", "gemma_rms_norm_quantized",
           "swiglu_oai_quantized"]


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    softmax_scale: float | None = None, return_lse: bool = False):
    """Dense layers, short contexts and the dense baseline on CUDA. Fresh prompts (every query
    row of every sequence new) run PyTorch's flash SDPA per sequence over a gathered copy of
    the paged K/V; any other step (chunks after a cached prefix, decodes, mixed) runs the
    paged query-tiled kernel over all visible pages in one launch, where SDPA would need a
    bottom-right causal mask (its slower backends) and a loop over sequences."""
    if q.device.type != "cuda":
        return reference.dense_attention(q, k_cache, v_cache, block_table, seq_lens,
                                         cu_seqlens_q, softmax_scale, return_lse)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    fresh_prompts = all(cu[b + 1] - cu[b] == n for b, n in enumerate(lens))
    if return_lse or not fresh_prompts:
        return prefill_query_tiled.dense_attention(q, k_cache, v_cache, block_table, seq_lens,
                                                   cu_seqlens_q, softmax_scale, return_lse)
    out = torch.empty_like(q)
    for b, seq_len in enumerate(lens):
        pages = block_table[b, : -(-seq_len // reference.BLOCK_SIZE)].long()
        keys, values = (cache[pages].flatten(0, 1)[:seq_len].transpose(0, 1)[None]
                        for cache in (k_cache, v_cache))  # [1, Hkv, S, D]
        queries = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]  # [1, Hq, S, D]
        result = F.scaled_dot_product_attention(queries, keys, values, scale=softmax_scale,
                                                is_causal=True, enable_gqa=True)
        out[cu[b]:cu[b + 1]] = result[0].transpose(0, 1)
    return out


# Where the KV-major kernel (its CSR built by a counting sort) beats query-major: from a number
# of rows of chunk that grows with the group G (query heads a KV head), since a row's partials
# are G x topk x D. Measured on an H100 with random selections in CUDA graphs (a chunk this
# short is too quick for eager timings, which would measure the host's launches):
# bench/results/kernels_h100.md, 'triton_backend'. Wider groups were not measured and stay on
# query-major. Fewer rows a sequence are decodes (multi-token: below).
KV_MAJOR_MIN_ROWS = {8: 256, 16: 1024}  # the widest group -> the fewest rows of chunk
KV_MAJOR_MIN_ROWS_PER_SEQ = 64
# The query-tiled kernel pays per block in its tiles' unions, so it wins when neighbouring
# queries chose alike and loses when they did not (kernels_h100.md). Below 8K rows the fallback
# is quick enough that building the unions and launching both kernels would cost more than the
# tiled kernel can save there.
QUERY_TILED_MIN_ROWS = 8192
QUERY_TILED_MAX_UNION = 2.0  # mean union per tile, in units of topk
# Multi-token decode (2..16 rows a sequence, e.g. speculative tokens): the query-tiled kernel
# with a tile per request and split-K loads each page any of its tokens chose once for all of
# them, where query-major loads it once per token that chose it: faster when the tokens chose
# alike (a trained model's), a little slower on unrelated random picks (kernels_h100.md).
MULTI_TOKEN_MAX_ROWS = 16


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     quantized: ActivationLayout | None = None):
    """quantized: out [T, Hq * D] quantized as that layout says (`QuantizedRows`, no lse):
    decode's merge quantizes it as it writes; other steps quantize their output after."""
    args = (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, blocks, softmax_scale)
    group = q.shape[1] // k_cache.shape[2]
    kv_major = _takes_kv_major(q.shape[0], seq_lens.shape[0], group)
    rows_per_seq = -(-q.shape[0] // max(1, seq_lens.shape[0]))
    if not kv_major and 2 <= rows_per_seq <= MULTI_TOKEN_MAX_ROWS:
        result = prefill_query_tiled.sparse_attention(*args, return_lse)
    elif q.shape[0] < QUERY_TILED_MIN_ROWS and not kv_major:
        return query_major.sparse_attention(*args, return_lse, quantized=quantized)
    elif q.shape[0] < QUERY_TILED_MIN_ROWS:
        result = prefill_kv_major.sparse_attention(*args, return_lse)
    else:
        result = _long_chunk(args, group, kv_major, block_table, return_lse)
    return result if quantized is None else quantize_rows(result.flatten(1), quantized)


def _long_chunk(args: tuple, group: int, kv_major: bool, block_table: torch.Tensor,
                return_lse: bool):
    """A long prefill chunk: the query-tiled kernel if its tiles' rows chose alike, else the
    fallback (KV-major or query-major). Both kernels are launched into the same buffers and a
    flag on the device lets one of them write, so the look costs no host sync (the other
    kernel's programs return after one load). The two run on two streams: the fallback's empty
    programs, when it stands aside, then fill SMs beside the query-tiled kernel's instead of
    after them (kernels_h100.md)."""
    q, k_cache, _, _, _, cu_seqlens_q, blocks, softmax_scale = args
    fallback = prefill_kv_major if kv_major else query_major
    unions = prefill_query_tiled.TileUnions.for_attention(blocks, cu_seqlens_q, group,
                                                          block_table.shape[1])
    alike = unions.alike(blocks.shape[2], QUERY_TILED_MAX_UNION)
    out, lse = AttentionShape.of(q, k_cache, blocks, softmax_scale).outputs(q)
    side = _side_stream(q.device)
    if side is not None:
        main = torch.cuda.current_stream(q.device)
        side.wait_stream(main)
    with torch.cuda.stream(side):  # no-op without a side stream
        prefill_query_tiled.sparse_attention(*args, unions=unions,
                                             gated=GatedOutput(out, lse, alike, runs_when=1))
    fallback.sparse_attention(*args, gated=GatedOutput(out, lse, alike, runs_when=0))
    if side is not None:
        # Every later kernel on this stream, and so any reuse of the memory both read, waits.
        main.wait_stream(side)
    return (out, lse) if return_lse else out


def _takes_kv_major(total_q: int, num_seqs: int, group: int) -> bool:
    min_rows = next((rows for widest, rows in sorted(KV_MAJOR_MIN_ROWS.items())
                     if group <= widest), None)
    return (min_rows is not None
            and total_q >= max(min_rows, KV_MAJOR_MIN_ROWS_PER_SEQ * num_seqs))


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A second stream for the gated pair of long-chunk kernels; None off CUDA (the
    interpreter runs kernels one by one)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None

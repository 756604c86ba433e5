"""MiniMax Sparse Attention in PyTorch: the executable form of the MSA contract (and, at the
end, the routed experts of M3's MoE layers, which the grouped-GEMM kernel must equal).

This module is the single source of truth for the math (`shared/msa_spec.md`). Every faster
backend is tested against it, and on CPU it *is* the implementation, so it is vectorized over
tokens and heads; the only Python loop is over work units: memory-bounded query chunks of a
prefill, or a step's decode rows batched across sequences of similar length.

Layouts (page = MSA block = 128 tokens):
    k_cache, v_cache   [num_pages, 128, Hkv, D]
    k_idx_cache        [num_pages, 128, H_ik, Di], H_ik in {1, Hkv}
    block_table        int32 [B, max_pages]   logical page -> physical page
    seq_lens           int32 [B]              tokens in cache, this step's queries included
    cu_seqlens_q       int32 [B + 1]          packed query tokens of this step
Query i of sequence b sits at position seq_lens[b] - q_len[b] + i.

Arguments are assumed valid here; `kernels.__init__` validates them at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK_SIZE = 128

# Upper bound on the elements of one [heads, queries, keys] score or mask tensor: queries are
# processed in chunks small enough to stay in cache, and a long prefill over a long context never
# materializes a quadratic tensor.
_MAX_SCORE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _WorkUnit:
    """Query rows computed together: n sequences x t rows each, keys padded to the longest.

    A prefill chunk is one sequence with many rows; decode rows (one per sequence) of similar
    length are batched, so a decode step costs a few tensor ops rather than a loop per sequence.
    """

    seqs: torch.Tensor  # int64 [n]: rows of block_table / seq_lens
    rows: torch.Tensor  # int64 [n * t]: packed query rows, sequence-major
    positions: torch.Tensor  # int64 [n, t]
    seq_lens: torch.Tensor  # int64 [n]: tokens each sequence has in the cache
    key_end: int  # keys [0, key_end) cover every row's causal window
    prefill_of: int | None  # the sequence a prefill chunk belongs to; None for decode rows

    @property
    def num_pages(self) -> int:
        return -(-self.key_end // BLOCK_SIZE)

    def gather(self, cache: torch.Tensor, block_table: torch.Tensor, dtype: torch.dtype,
               zero_past_end: bool = True) -> torch.Tensor:
        """Each sequence's pages of a paged cache in logical order, [n, pages * 128, H, D]:
        every key up to the sequence's end, so a prefill's chunks can share one gather. With
        `zero_past_end`, slots past a sequence's end are zeroed: stale contents of a reused page
        (even NaN) must not meet the zero softmax weight of a masked key."""
        own_pages = -(-self.seq_lens // BLOCK_SIZE)
        pages = block_table[self.seqs, : int(own_pages.max())].long()
        columns = torch.arange(pages.shape[1], device=cache.device)
        pages = torch.where(columns[None, :] < own_pages[:, None], pages, 0)
        # index_select copies whole pages (memcpy-sized rows): ~2x faster than fancy indexing.
        tokens = torch.index_select(cache, 0, pages.flatten()).to(dtype)
        tokens = tokens.view(len(self.seqs), -1, *cache.shape[2:])
        if not zero_past_end:
            return tokens
        slots = torch.arange(tokens.shape[1], device=cache.device)
        past_end = slots[None, :] >= self.seq_lens[:, None]
        return tokens.masked_fill_(past_end[:, :, None, None], 0)


def _with_keys(units: Iterator[_WorkUnit], caches: tuple[torch.Tensor, ...],
               block_table: torch.Tensor, dtype: torch.dtype, zero_past_end: bool = True,
               ) -> Iterator[tuple[_WorkUnit, list[torch.Tensor]]]:
    """Each unit with the whole pages of every cache its rows may see, [n, pages * 128, H, D].
    The chunks of one prefill slice a single gather of their sequence: a long prompt's context
    is copied out of the pages once per call, not once per chunk."""
    held_for, held = None, []
    for unit in units:
        if unit.prefill_of is None or unit.prefill_of != held_for:
            held_for = unit.prefill_of
            held = [unit.gather(cache, block_table, dtype, zero_past_end) for cache in caches]
        yield unit, [keys[:, : unit.num_pages * BLOCK_SIZE] for keys in held]


def _work_units(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, elements_per_key: int,
                device: torch.device) -> Iterator[_WorkUnit]:
    """Units whose [rows x keys x elements_per_key] tensors stay under _MAX_SCORE_ELEMENTS."""
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    decode = []
    for b, seq_len in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 1:
            decode.append(b)
        elif q_len > 1:
            step = max(1, _MAX_SCORE_ELEMENTS // (elements_per_key * seq_len))
            for start in range(cu[b], cu[b + 1], step):
                end = min(start + step, cu[b + 1])
                first = seq_len - q_len + (start - cu[b])
                yield _unit([b], list(range(start, end)), [list(range(first, first + end - start))],
                            [seq_len], device, prefill_of=b)
    # Decode rows batch by similar length: keys are padded to a unit's longest sequence, so a
    # unit ends once a sequence is 25% longer than its first (padding waste stays under 25%).
    decode.sort(key=lambda b: lens[b])
    while decode:
        shortest = lens[decode[0]]
        count = 1
        while (count < len(decode) and lens[decode[count]] <= 1.25 * shortest
               and (count + 1) * lens[decode[count]] * elements_per_key <= _MAX_SCORE_ELEMENTS):
            count += 1
        batch, decode = decode[:count], decode[count:]
        yield _unit(batch, [cu[b] for b in batch], [[lens[b] - 1] for b in batch],
                    [lens[b] for b in batch], device)


def _unit(seqs: list[int], rows: list[int], positions: list[list[int]], seq_lens: list[int],
          device: torch.device, prefill_of: int | None = None) -> _WorkUnit:
    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return _WorkUnit(tensor(seqs), tensor(rows), tensor(positions), tensor(seq_lens),
                     key_end=max(p[-1] for p in positions) + 1, prefill_of=prefill_of)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 inputs stay float64 so tests can run the reference as an exact oracle.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def topk_with_local_block(block_scores: torch.Tensor, positions: torch.Tensor,
                          topk: int) -> torch.Tensor:
    """The spec's selection rule from block scores [t, Hkv, pages] -> int32 [t, Hkv, topk].

    Only historical blocks (before the query's own) compete; the local block takes the last
    valid slot; -1 pads. Shared by every backend: they differ only in how they score blocks.
    """
    num_rows, num_groups, num_pages = block_scores.shape
    local = (positions // BLOCK_SIZE)[:, None].expand(-1, num_groups)  # [t, Hkv]
    block_ids = torch.arange(num_pages, device=block_scores.device)
    historical = block_ids[None, None, :] < local[..., None]
    block_scores = block_scores.masked_fill(~historical, -math.inf)
    selected = torch.full((num_rows, num_groups, topk), -1, dtype=torch.int32,
                          device=block_scores.device)
    slots = min(topk - 1, num_pages)
    if slots > 0:
        best, best_ids = block_scores.topk(slots, dim=-1)
        # Only -inf (non-historical) blocks lose; they sort last, so valid ids come first.
        selected[..., :slots] = torch.where(best > -math.inf, best_ids, -1).to(torch.int32)
    num_valid = torch.clamp(local, max=topk - 1)  # == historical blocks taken
    selected.scatter_(-1, num_valid[..., None], local[..., None].to(torch.int32))
    return selected


def select_blocks(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  topk: int = 16) -> torch.Tensor:
    """Index branch: the top-k logical blocks of each (query token, KV group).

    Row layout: the chosen historical blocks first (any order), the query's own block in the
    last valid slot, -1 after.
    """
    total_q, num_groups, index_dim = q_idx.shape
    acc = _accumulation_dtype(q_idx)
    selected = torch.full((total_q, num_groups, topk), -1, dtype=torch.int32, device=q_idx.device)
    units = _work_units(seq_lens, cu_seqlens_q, num_groups, q_idx.device)
    # Every unit's scores land in one buffer: on CPU a fresh tensor this large costs about as
    # much in first-touch page faults as the matmul that fills it.
    scores_buffer = q_idx.new_empty(0, dtype=acc)
    # Slots past a sequence's end need no zeroing: they lie in blocks at or after each row's
    # own, whose scores the selection never reads.
    for unit, (keys,) in _with_keys(units, (k_idx_cache,), block_table, acc,
                                    zero_past_end=False):
        n, t = unit.positions.shape
        # Only blocks wholly before a query's own block compete, and every key of those is
        # causally visible: score just those pages, unmasked. The 1/sqrt(Di) scale of the
        # spec's scores is left out: a positive scale keeps their order, and only order counts.
        num_historical = (unit.key_end - 1) // BLOCK_SIZE
        keys = keys[:, : num_historical * BLOCK_SIZE].permute(0, 2, 3, 1)  # [n, H_ik, Di, S]
        # H_ik == 1 broadcasts over the groups in the matmul below.
        queries = q_idx[unit.rows].to(acc).view(n, t, num_groups, index_dim).transpose(1, 2)
        shape = (n, num_groups, t, num_historical * BLOCK_SIZE)  # [n, Hkv, t, S]
        size = math.prod(shape)
        if scores_buffer.numel() < size:
            scores_buffer = q_idx.new_empty(size, dtype=acc)
        scores = torch.matmul(queries, keys, out=scores_buffer[:size].view(shape))
        block_scores = scores.view(n, num_groups, t, num_historical, BLOCK_SIZE).amax(-1)
        block_scores = block_scores.transpose(1, 2).reshape(n * t, num_groups, num_historical)
        selected[unit.rows] = topk_with_local_block(block_scores, unit.positions.flatten(), topk)
    return selected


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
               blocks: torch.Tensor | None, softmax_scale: float | None, return_lse: bool,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of each query head over its group's selected blocks (all if None)."""
    total_q, num_heads, head_dim = q.shape
    num_groups = k_cache.shape[2]
    group_size = num_heads // num_groups
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    acc = _accumulation_dtype(q)
    out = torch.zeros_like(q)
    lse = (torch.full((total_q, num_heads), -math.inf, dtype=torch.float32, device=q.device)
           if return_lse else None)
    # The G heads of a group share its keys and its mask, so SDPA sees one batch entry per
    # (sequence, group) with G heads: the mask is built once per group, K/V are broadcast views.
    units = _work_units(seq_lens, cu_seqlens_q, num_groups, q.device)
    for unit, (k, v) in _with_keys(units, (k_cache, v_cache), block_table, acc):
        n, t = unit.positions.shape
        bias = _attention_bias(unit, blocks, num_groups, acc)  # [n, Hkv, t, S]
        batch = n * num_groups
        k = k.transpose(1, 2).reshape(batch, 1, -1, head_dim)  # [n * Hkv, 1, S, D]
        v = v.transpose(1, 2).reshape(batch, 1, -1, head_dim)
        queries = q[unit.rows].to(acc).view(n, t, num_groups, group_size, head_dim)
        queries = queries.permute(0, 2, 3, 1, 4).reshape(batch, group_size, t, head_dim)
        bias = bias.reshape(batch, 1, t, -1)
        unit_out = torch.nn.functional.scaled_dot_product_attention(
            queries, k.expand(-1, group_size, -1, -1), v.expand(-1, group_size, -1, -1),
            attn_mask=bias, scale=scale)
        # A row that sees nothing (only possible with malformed selections) yields 0.
        unit_out = unit_out.nan_to_num(0.0).view(n, num_groups, group_size, t, head_dim)
        out[unit.rows] = unit_out.permute(0, 3, 1, 2, 4).reshape(n * t, num_heads,
                                                                 head_dim).to(q.dtype)
        if lse is not None:
            scores = (queries @ k.transpose(-1, -2)) * scale
            row_lse = (scores + bias).logsumexp(dim=-1)  # [n * Hkv, G, t]
            row_lse = row_lse.view(n, num_groups, group_size, t).permute(0, 3, 1, 2)
            lse[unit.rows] = row_lse.reshape(n * t, num_heads).float()
    return out, lse


def _attention_bias(unit: _WorkUnit, blocks: torch.Tensor | None, num_groups: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (0 visible, -inf hidden) of a unit's rows, [n, Hkv, t, pages * 128].

    Built at page granularity (a row's selected pages), then made causal only from the earliest
    local block of the unit's rows: every key before it precedes every row. A float mask spares
    SDPA its own pass converting a boolean one."""
    n, t = unit.positions.shape
    num_pages = unit.num_pages
    device = unit.positions.device
    if blocks is None:
        bias = torch.zeros((n, num_groups, t, num_pages * BLOCK_SIZE), dtype=dtype,
                           device=device)
    else:
        chosen = blocks[unit.rows].long().view(n, t, num_groups, -1).transpose(1, 2)
        chosen = torch.where((chosen < 0) | (chosen >= num_pages), num_pages, chosen)
        page_bias = torch.full((n, num_groups, t, num_pages + 1), -math.inf, dtype=dtype,
                               device=device)
        page_bias.scatter_(-1, chosen, 0.0)
        # contiguous: the causal fill below must not write through a broadcast view.
        bias = page_bias[..., :num_pages, None].expand(-1, -1, -1, -1, BLOCK_SIZE).contiguous()
        bias = bias.view(n, num_groups, t, num_pages * BLOCK_SIZE)
    first_local = int(unit.positions.min()) // BLOCK_SIZE * BLOCK_SIZE
    key_pos = torch.arange(first_local, num_pages * BLOCK_SIZE, device=device)
    future = key_pos > unit.positions[:, None, :, None]  # [n, 1, t, keys from first_local]
    bias[..., first_local:].masked_fill_(future, -math.inf)
    return bias


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False):
    """Main branch: exact softmax attention over the tokens of each group's selected blocks."""
    out, lse = _attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, blocks,
                          softmax_scale, return_lse)
    return (out, lse) if return_lse else out


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    softmax_scale: float | None = None, return_lse: bool = False):
    """Dense causal attention over the same paged layout (dense layers, fallback, tests)."""
    out, lse = _attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, None,
                          softmax_scale, return_lse)
    return (out, lse) if return_lse else out


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   route_weights: torch.Tensor, chosen: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor],
                   w13_scales: BlockScales | None = None,
                   w2_scales: BlockScales | None = None) -> torch.Tensor:
    """A mixture-of-experts layer's routed experts: out [T, H] = sum over each token's choices
    of route_weight * (activation(x @ w13[e].T) @ w2[e].T).

    x [T, H]; w13 [E, 2I, H] (both input projections stacked, as `activation` splits them);
    w2 [E, H, I]; route_weights [T, top_k] (fp32); chosen int [T, top_k] expert ids in [0, E],
    where E marks a choice of an expert held elsewhere (expert parallelism): it adds nothing.
    Each expert that was chosen runs once on its tokens, so CPU steps cost the chosen experts
    only. FP8 experts (`*_scales` given) multiply as `fp8_linear` does: weight-only or W8A8 as
    `fp8_weight_only` says for their scale groups.
    """
    top_k = chosen.shape[1]
    flat = chosen.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()[: w13.shape[0]]
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            picks = order[start:start + count]
            rows = picks // top_k
            hidden = activation(_expert_linear(x[rows], w13, w13_scales, expert))
            scaled = (_expert_linear(hidden, w2, w2_scales, expert)
                      * route_weights.flatten()[picks, None])
            out.index_add_(0, rows, scaled.to(x.dtype))
            start += count
    return out


def _expert_linear(x: torch.Tensor, weights: torch.Tensor, scales: BlockScales | None,
                   expert: int) -> torch.Tensor:
    if scales is None:
        return F.linear(x, weights[expert])
    return fp8_linear(x, weights[expert], scales.expert(expert))


# -- FP8 weights ----------------------------------------------------------------------------------
# Checkpoints store e4m3 weights with one scale per block of the weight matrix (DeepSeek-style
# [128, 128] blocks with fp32 scales, or MXFP8's [1, 32] groups with power-of-two e8m0 scales).
# Block-scaled GEMMs run as such checkpoints declare (`activation_scheme: dynamic`,
# transformers' default): each token's activations are quantized to e4m3 in groups as wide as a
# weight block along K, and the product of two e4m3 tiles is scaled by both scales (W8A8).
# MXFP8 weights are served as W8A8 too, regrouped at load into 1 x 128 blocks
# (`regroup_mxfp8`); kept as stored (`mxfp8_mode: weight_only`), their 32-wide groups are too
# narrow for e4m3 products, so they keep the activations as they are and scale the weight
# (weight-only), as `fp8_weight_only` says. A weight is multiplied as stored:
# by the tensor cores (Triton), or dequantized one at a time here, so no full-precision copy of
# the model ever exists.

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E8M0_BIAS = 127
AMAX_FLOOR = 1e-10  # an all-zero group still gets a finite scale


@dataclass(frozen=True)
class BlockScales:
    """How an e4m3 weight [..., N, K] dequantizes: w[..., n, k] * scale[..., n // block_n,
    k // block_k]. `scale` is fp32, or uint8 e8m0 exponents (the value 2 ** (e - 127)).
    `per_row`, where a loader adds it, holds the same scales in a second layout some GEMMs read
    faster: repeated for each weight row, K-block-major (`per_row_scales`); the math is
    `scale`'s."""

    scale: torch.Tensor
    block_n: int
    block_k: int
    per_row: torch.Tensor | None = None

    @property
    def e8m0(self) -> bool:
        return self.scale.dtype == torch.uint8

    def expert(self, index: int) -> "BlockScales":
        return BlockScales(self.scale[index], self.block_n, self.block_k)

    def values(self) -> torch.Tensor:
        if self.e8m0:
            return torch.exp2(self.scale.float() - E8M0_BIAS)
        return self.scale.float()


def dequantize_fp8(weight: torch.Tensor, scales: BlockScales) -> torch.Tensor:
    """The fp32 weight an e4m3 weight and its block scales stand for."""
    n, k = weight.shape[-2:]
    per_element = (scales.values().repeat_interleave(scales.block_n, dim=-2)[..., :n, :]
                   .repeat_interleave(scales.block_k, dim=-1)[..., :k])
    return weight.float() * per_element


def quantize_fp8(weight: torch.Tensor, block_n: int, block_k: int,
                 e8m0: bool = False) -> tuple[torch.Tensor, BlockScales]:
    """(e4m3 weight, scales) for a weight [..., N, K]: each block's largest magnitude maps to
    e4m3's largest value (rounded up to a power of two for e8m0 scales). How make-tiny-model
    writes FP8 checkpoints and how tests quantize; the serving path never quantizes."""
    *lead, n, k = weight.shape
    rows, cols = -(-n // block_n), -(-k // block_k)
    padded = F.pad(weight.float(), (0, cols * block_k - k, 0, rows * block_n - n))
    blocks = padded.view(*lead, rows, block_n, cols, block_k)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    if e8m0:
        exponent = torch.ceil(torch.log2(scale)).clamp(-E8M0_BIAS, E8M0_BIAS)
        scale, stored = torch.exp2(exponent), (exponent + E8M0_BIAS).to(torch.uint8)
    else:
        stored = scale
    quantized = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    quantized = quantized.view(*lead, rows * block_n, cols * block_k)[..., :n, :k]
    return quantized.to(E4M3).contiguous(), BlockScales(stored.contiguous(), block_n, block_k)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32 (the RMSNorms differ only in how they scale it)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's (MiniMax-M3's) RMSNorm: scales by `1 + weight` (weights are stored zero-centred),
    in fp32, out in x's dtype. The first half of `kernels.rms_norm_quantize`, whose second half
    is `quantize_activations` of this output."""
    return (rms_normalize(x, eps) * (1.0 + weight.float())).to(x.dtype)


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """MiniMax-M3's SwiGLU-OAI: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), with
    g = gate clamped above at limit; in fp32, out in gate's dtype. The first half of
    `kernels.swiglu_quantize`, whose second half is `quantize_activations` of this output."""
    g = gate.float().clamp(max=limit)
    u = up.float().clamp(min=-limit, max=limit)
    return ((u + 1.0) * g * torch.sigmoid(g * alpha)).to(gate.dtype)


# MXFP8 weights regrouped for W8A8 (`regroup_mxfp8`): each row's 32-wide groups within a 128-wide
# K block take the largest of their power-of-two scales, and the e4m3 values of a group with a
# smaller scale are multiplied by the ratio, a power of two. That is exact while a value stays a
# normal e4m3 number: only values below 2 ** -6 of their new scale (under 2 ** -13.8 of the
# block's largest magnitude) lose bits, each at most 2 ** -10 of that scale, far below e4m3's own
# rounding. A 128-wide K tile is then one e4m3 x e4m3 tensor-core product with one scale per row
# and column.
REGROUPED_BLOCK_K = 128


def regroups_to_w8a8(scales: BlockScales) -> bool:
    """Whether `regroup_mxfp8` takes weights with these scales: e8m0 groups along K narrower
    than a regrouped block and dividing it (MXFP8's [1, 32])."""
    return (scales.e8m0 and scales.block_n == 1 and scales.block_k < REGROUPED_BLOCK_K
            and REGROUPED_BLOCK_K % scales.block_k == 0)


def regroup_mxfp8(weight: torch.Tensor, scales: BlockScales) -> tuple[torch.Tensor, BlockScales]:
    """(e4m3 weight, fp32 [1, 128] block scales) standing for the e4m3 `weight` [..., N, K] with
    narrow e8m0 groups (`regroups_to_w8a8`), as described above. A last K block shorter than
    128 regroups the groups it has. The scales are stored K-block-major, as the GEMMs read them
    (one per weight row for a K tile, adjacent) and cuBLASLt's 1 x 128 scaling takes them."""
    *lead, n, k = weight.shape
    group, blocks = scales.block_k, -(-k // REGROUPED_BLOCK_K)
    per_block = REGROUPED_BLOCK_K // group
    # Padding groups get exponent 0 (2 ** -127): never a block's largest where it has a real one.
    exponents = F.pad(scales.scale.int(), (0, blocks * per_block - scales.scale.shape[-1]))
    exponents = exponents.view(*lead, n, blocks, per_block)
    top = exponents.amax(dim=-1, keepdim=True)
    ratio = torch.exp2((exponents - top).float()).repeat_interleave(group, dim=-1)
    regrouped = (weight.float() * ratio.flatten(-2)[..., :k]).to(E4M3)
    block_scales = torch.exp2(top.squeeze(-1).float() - E8M0_BIAS)
    return regrouped, BlockScales(k_block_major(block_scales), 1, REGROUPED_BLOCK_K)


def per_row_scales(scales: BlockScales, rows: int) -> BlockScales:
    """The same weights' scales with blocks one weight row tall: each block's scale repeated
    for its rows ([..., N, K / block_k], block_n 1), stored K-block-major as `regroup_mxfp8`'s:
    one scale per weight row and K block."""
    repeated = scales.scale.repeat_interleave(scales.block_n, dim=-2)[..., :rows, :]
    return BlockScales(k_block_major(repeated), 1, scales.block_k)


def k_block_major(row_scales: torch.Tensor) -> torch.Tensor:
    """Scales [..., N, K blocks] with the N of one K block adjacent in memory: the scales a GEMM
    program reads for one K tile (one per weight row), and cuBLASLt's 1 x 128 weight scaling's
    layout."""
    return row_scales.transpose(-1, -2).contiguous().transpose(-1, -2)


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scales [..., ceil(K / group)]) for x [..., K]: each token's groups of
    `group` along K scaled so that the largest magnitude maps to e4m3's largest value."""
    k = x.shape[-1]
    groups = -(-k // group)
    padded = F.pad(x.float(), (0, groups * group - k)).unflatten(-1, (groups, group))
    scale = padded.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / E4M3_MAX
    quantized = (padded / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return quantized.flatten(-2)[..., :k], scale


@dataclass(frozen=True)
class ActivationLayout:
    """How a W8A8 GEMM takes its activations quantized (`quantize_activations`' math): groups of
    `group` along K; scales token-major (strides (1, rows): cuBLASLt's) or row-major (the Triton
    GEMM's); `rows` rows written, a whole multiple for cuBLASLt (those past x's are left
    unwritten: a product row depends on its own row of x alone, and the GEMM cuts them off)."""

    group: int
    token_major: bool
    rows: int


@dataclass(frozen=True)
class QuantizedRows:
    """Activations x [M, K] quantized as `layout` says, ready for a W8A8 GEMM: what a kernel that
    produces x (a norm, attention's merge, SwiGLU) hands the projection after it, so x is never
    quantized on its own."""

    values: torch.Tensor  # e4m3 [layout.rows, K]
    scales: torch.Tensor  # fp32 [layout.rows, ceil(K / layout.group)]
    layout: ActivationLayout
    count: int  # M: x's rows
    dtype: torch.dtype  # x's dtype, the GEMM's output dtype


def dequantize_activations(quantized: torch.Tensor, scales: torch.Tensor,
                           group: int) -> torch.Tensor:
    """The fp32 activations `quantize_activations`' output stands for."""
    return quantized.float() * scales.repeat_interleave(group, dim=-1)[..., :quantized.shape[-1]]


# Which FP8 GEMMs keep x in its own dtype (weight-only) rather than quantizing it to e4m3
# (W8A8): those whose weight scales come in narrow groups along K (MXFP8's 32), which cut W8A8's
# e4m3 products to K tiles too short for the tensor cores. Block-scaled weights take W8A8 at
# every batch, decode rows included: with the activations' quantization kernel no longer
# dominating small GEMMs it measured faster than weight-only at one to 16 rows too
# (bench/results/fp8_modes_h200.md), and a token's math then does not depend on how many rows
# share its step.
WEIGHT_ONLY_MAX_SCALE_K = 32


def fp8_weight_only(scale_block_k: int) -> bool:
    return scale_block_k <= WEIGHT_ONLY_MAX_SCALE_K


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: BlockScales) -> torch.Tensor:
    """x [..., K] @ W^T for an e4m3 weight W [N, K] with block scales, out in x's dtype:
    weight-only or W8A8 as `fp8_weight_only` says for the weight's scale groups."""
    if fp8_weight_only(scales.block_k):
        return fp8_weight_only_linear(x, weight, scales)
    return fp8_w8a8_linear(x, weight, scales)


def fp8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor,
                           scales: BlockScales) -> torch.Tensor:
    """x @ W^T with x as it is and the weight's scales applied to it."""
    return F.linear(x.float(), dequantize_fp8(weight, scales)).to(x.dtype)


def fp8_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, scales: BlockScales) -> torch.Tensor:
    """x @ W^T with x quantized per token in groups of the weight's block width
    (`quantize_activations`), as FP8 checkpoints' dynamic activation scheme runs."""
    act = dequantize_activations(*quantize_activations(x, scales.block_k), scales.block_k)
    return F.linear(act, dequantize_fp8(weight, scales)).to(x.dtype)

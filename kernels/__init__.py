"""MSA kernels: validation at the boundary, then dispatch to a backend.

Public functions (fixed by shared/msa_spec.md): `select_blocks`, `sparse_attention`,
`dense_attention`; `routed_experts`, a MoE layer's experts as grouped GEMMs; `fp8_linear`, a
projection by an e4m3 weight with block scales (`BlockScales`). For the kernel that feeds an FP8
projection, `fp8_activation_layout` says how the GEMM takes x quantized (`QuantizedRows`), so
that kernel quantizes it as it writes it: `gemma_rms_norm_quantized` for q/k/v, the dense MLP
and the shared expert (the MoE's norm writing x as it is too, for the router and the routed
experts), `sparse_attention(quantized=...)` for o_proj, `swiglu_oai_quantized` for the MLPs'
down projections. The backend is chosen by device (Triton on
CUDA; on CPU `cpu_backend`, the reference but for KV-block-major prefill attention) or forced
with `backend="reference" | "triton" | "cpu"`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from kernels import cpu_backend, reference
from kernels.reference import BLOCK_SIZE, E4M3, ActivationLayout, BlockScales, QuantizedRows

__all__ = ["BLOCK_SIZE", "INDEX_KEY_FP8", "BlockScales", "select_blocks", "sparse_attention",
           "dense_attention", "routed_experts", "fp8_linear", "fp8_activation_layout",
           "gemma_rms_norm_quantized", "swiglu_oai_quantized", "ActivationLayout",
           "QuantizedRows", "to_index_key_dtype"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Index keys may also be stored as fp8 e4m3 (half the bytes of the decode scan). Only the order
# of scores matters to the selection, so no scale is needed: see `to_index_key_dtype`.
INDEX_KEY_FP8 = torch.float8_e4m3fn
_BACKENDS = ("reference", "triton", "cpu")


def _triton_module():
    # Imported lazily: triton is optional on machines that only run the reference. Without a
    # GPU the kernels run under Triton's interpreter, which triton reads when first imported.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from kernels import triton_backend
    except ImportError as exc:
        raise ValueError(f"backend='triton' is unavailable here: {exc}") from exc
    return triton_backend


def _resolve_backend(backend: str | None, device: torch.device):
    if backend is None:
        if device.type == "cuda":
            try:
                return _triton_module()
            except ValueError:
                return reference
        return cpu_backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        return _triton_module()
    return reference if backend == "reference" else cpu_backend


def _check(cond: bool, message: Callable[[], str]) -> None:
    # The message is built only on failure: formatting every check's message on every call
    # would be paid on every layer of every step (kernels_h100.md measured it).
    if not cond:
        raise ValueError(message())


def _check_float(name: str, t: torch.Tensor, backend: str | None) -> None:
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    _check(t.dtype in allowed, lambda: f"{name} must be one of {allowed}, got {t.dtype}")


def _check_int32(name: str, t: torch.Tensor, dim: int) -> None:
    _check(t.dtype == torch.int32, lambda: f"{name} must be int32, got {t.dtype}")
    _check(t.dim() == dim, lambda: f"{name} must have {dim} dims, got shape {tuple(t.shape)}")


def _check_paged_cache(name: str, cache: torch.Tensor, backend: str | None) -> None:
    if not (name == "k_idx_cache" and cache.dtype == INDEX_KEY_FP8):
        _check_float(name, cache, backend)
    _check(cache.dim() == 4 and cache.shape[1] == BLOCK_SIZE,
           lambda: f"{name} must be [num_pages, {BLOCK_SIZE}, heads, dim], "
                   f"got {tuple(cache.shape)}")


def _validate_layout(queries: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     check_indices: bool) -> torch.Tensor | None:
    """Checks the packed/paged metadata.

    Shapes, dtypes and devices are checked always (host-side, free). The index checks read the
    tensors, which on a GPU costs device syncs and prevents CUDA-graph capture: trusted callers
    (the engine's own ModelRunner on CUDA) pass check_indices=False. Returns each query row's
    page count [total_q] when the indices were checked.
    """
    device = queries.device
    for name, t in (("cache", cache), ("block_table", block_table), ("seq_lens", seq_lens),
                    ("cu_seqlens_q", cu_seqlens_q)):
        _check(t.device == device,
               lambda name=name, t=t: f"{name} is on {t.device} but the queries are on {device}")
    _check_int32("block_table", block_table, 2)
    _check_int32("seq_lens", seq_lens, 1)
    _check_int32("cu_seqlens_q", cu_seqlens_q, 1)
    batch = seq_lens.shape[0]
    _check(block_table.shape[0] == batch,
           lambda: f"block_table has {block_table.shape[0]} rows but seq_lens has {batch} "
                   "sequences")
    _check(cu_seqlens_q.shape[0] == batch + 1,
           lambda: f"cu_seqlens_q must have batch + 1 = {batch + 1} entries, "
                   f"got {cu_seqlens_q.shape[0]}")
    if not check_indices:
        return None

    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]
    lens = seq_lens.long()
    _check(int(cu[0]) == 0, lambda: "cu_seqlens_q must start at 0")
    _check(bool((q_lens >= 0).all()), lambda: "cu_seqlens_q must be non-decreasing")
    _check(int(cu[-1]) == queries.shape[0],
           lambda: f"cu_seqlens_q ends at {int(cu[-1])} but there are {queries.shape[0]} "
                   "query rows")
    _check(bool((q_lens <= lens).all()),
           lambda: "every sequence needs seq_lens >= its query count (seq_lens includes this "
                   "step's queries)")
    num_pages = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    _check(bool((num_pages <= block_table.shape[1]).all()),
           lambda: f"block_table has {block_table.shape[1]} columns, too few for seq_lens up to "
           f"{int(lens.max()) if batch else 0}")
    used = torch.arange(block_table.shape[1], device=device)[None, :] < num_pages[:, None]
    pages = block_table.long()[used]
    _check(bool(((pages >= 0) & (pages < cache.shape[0])).all()),
           lambda: f"block_table holds page ids outside [0, {cache.shape[0]}) for pages in use")
    return torch.repeat_interleave(num_pages, q_lens)


def to_index_key_dtype(k_idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Casts index keys for the cache; to fp8 e4m3 it saturates at +-448 instead of overflowing
    to NaN. A common scale would not change which blocks win, so none is applied."""
    if dtype == INDEX_KEY_FP8:
        limit = torch.finfo(INDEX_KEY_FP8).max
        return k_idx.clamp(-limit, limit).to(dtype)
    return k_idx.to(dtype)


def select_blocks(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, topk: int = 16,
                  backend: str | None = None, check_indices: bool = True) -> torch.Tensor:
    """Top-k logical blocks per (query token, KV group): int32 [total_q, Hkv, topk]."""
    _check_float("q_idx", q_idx, backend)
    _check(q_idx.dim() == 3, lambda: f"q_idx must be [total_q, Hkv, Di], got {tuple(q_idx.shape)}")
    _check_paged_cache("k_idx_cache", k_idx_cache, backend)
    num_groups, index_dim = q_idx.shape[1], q_idx.shape[2]
    _check(k_idx_cache.shape[2] in (1, num_groups),
           lambda: f"k_idx_cache must have 1 or Hkv={num_groups} index-key heads, "
                   f"got {k_idx_cache.shape[2]}")
    _check(k_idx_cache.shape[3] == index_dim,
           lambda: f"index head dims differ: q_idx {index_dim}, k_idx_cache {k_idx_cache.shape[3]}")
    _check(isinstance(topk, int) and topk >= 1,
           lambda: f"topk must be a positive int, got {topk!r}")
    _validate_layout(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, check_indices)
    impl = _resolve_backend(backend, q_idx.device)
    return impl.select_blocks(q_idx, k_idx_cache, block_table, seq_lens, cu_seqlens_q, topk)


def _validate_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, backend,
                        check_indices):
    _check_float("q", q, backend)
    _check(q.dim() == 3, lambda: f"q must be [total_q, Hq, D], got {tuple(q.shape)}")
    _check_paged_cache("k_cache", k_cache, backend)
    _check_paged_cache("v_cache", v_cache, backend)
    _check(k_cache.shape == v_cache.shape,
           lambda: f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check(k_cache.dtype == v_cache.dtype, lambda: "k_cache and v_cache dtypes differ")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_groups = k_cache.shape[2]
    _check(num_heads % num_groups == 0,
           lambda: f"query heads ({num_heads}) must be a multiple of KV heads ({num_groups})")
    _check(k_cache.shape[3] == head_dim,
           lambda: f"head dims differ: q {head_dim}, k_cache {k_cache.shape[3]}")
    _check(v_cache.device == q.device, lambda: f"v_cache is on {v_cache.device}, q on {q.device}")
    return _validate_layout(q, k_cache, block_table, seq_lens, cu_seqlens_q, check_indices)


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     backend: str | None = None, check_indices: bool = True,
                     quantized: ActivationLayout | None = None):
    """Exact attention over the selected blocks: out [total_q, Hq, D] (, lse [total_q, Hq]).

    quantized: out as [total_q, Hq * D] quantized for the FP8 o_proj after it, in the layout
    `fp8_activation_layout` gave for it (Triton backend): `QuantizedRows`, no lse. Decode's
    merge of split attention writes it so, sparing the GEMM a quantization kernel."""
    _check(quantized is None or (backend in (None, "triton") and not return_lse),
           lambda: "quantized output comes from the Triton backend, without the lse")
    pages_per_query = _validate_attention(q, k_cache, v_cache, block_table, seq_lens,
                                          cu_seqlens_q, backend, check_indices)
    _check_int32("blocks", blocks, 3)
    _check(blocks.shape[:2] == (q.shape[0], k_cache.shape[2]),
           lambda: f"blocks must be [total_q, Hkv, topk] = [{q.shape[0]}, {k_cache.shape[2]}, "
                   "topk], "
           f"got {tuple(blocks.shape)}")
    _check(blocks.device == q.device, lambda: f"blocks is on {blocks.device}, q on {q.device}")
    if pages_per_query is not None:
        in_range = (blocks >= -1) & (blocks.long() < pages_per_query[:, None, None])
        _check(bool(in_range.all()),
               lambda: "blocks holds ids outside [-1, pages of the query's sequence)")
    if quantized is None:
        impl = _resolve_backend(backend, q.device)
        return impl.sparse_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                     blocks, softmax_scale, return_lse)
    _check(quantized.rows >= q.shape[0],
           lambda: f"the layout writes {quantized.rows} rows, fewer than q's {q.shape[0]}")
    return _triton_module().sparse_attention(q, k_cache, v_cache, block_table, seq_lens,
                                             cu_seqlens_q, blocks, softmax_scale,
                                             quantized=quantized)


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    softmax_scale: float | None = None, return_lse: bool = False,
                    backend: str | None = None, check_indices: bool = True):
    """Dense causal attention over the paged layout: out [total_q, Hq, D] (, lse)."""
    _validate_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, backend,
                        check_indices)
    impl = _resolve_backend(backend, q.device)
    return impl.dense_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                softmax_scale, return_lse)


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   route_weights: torch.Tensor, chosen: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor],
                   w13_scales: BlockScales | None = None, w2_scales: BlockScales | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """A MoE layer's routed experts, weighted and summed per token: out [T, H] (see
    `reference.routed_experts`); FP8 experts come with their `BlockScales`. Shapes are checked
    here; expert ids are trusted (the router makes them), so the check costs no device sync
    and a CUDA graph can capture the call."""
    _check_float("x", x, backend)
    _check(x.dim() == 2, lambda: f"x must be [T, H], got {tuple(x.shape)}")
    _check(w13.dim() == 3 and w2.dim() == 3 and w13.shape[0] == w2.shape[0],
           lambda: f"w13 [E, 2I, H] and w2 [E, H, I] disagree: {tuple(w13.shape)}, "
                   f"{tuple(w2.shape)}")
    _check(w13.shape[2] == x.shape[1] and w2.shape[1] == x.shape[1]
           and w13.shape[1] == 2 * w2.shape[2],
           lambda: f"expert weights w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} do not fit "
                   f"x {tuple(x.shape)}")
    _check(chosen.shape == route_weights.shape and chosen.dim() == 2
           and chosen.shape[0] == x.shape[0],
           lambda: f"chosen {tuple(chosen.shape)} and route_weights "
                   f"{tuple(route_weights.shape)} must both be [T={x.shape[0]}, top_k]")
    impl = _resolve_backend(backend, x.device)
    for name, weight, scales in (("w13", w13, w13_scales), ("w2", w2, w2_scales)):
        _check_weight(name, weight, scales, impl)
    return impl.routed_experts(x, w13, w2, route_weights, chosen, activation, w13_scales,
                               w2_scales)


def fp8_linear(x: torch.Tensor | QuantizedRows, weight: torch.Tensor, scales: BlockScales,
               backend: str | None = None) -> torch.Tensor:
    """x [..., K] @ W^T for an e4m3 weight W [N, K] with block scales: out [..., N] in x's
    dtype (see `reference.fp8_linear`). x may come quantized already (Triton backend), as
    `fp8_activation_layout` said for this weight: out [M, N]."""
    if isinstance(x, QuantizedRows):
        _check(weight.dim() == 2 and x.values.shape[1] == weight.shape[1],
               lambda: f"weight must be [N, K={x.values.shape[1]}], got {tuple(weight.shape)}")
        impl = _triton_module()
        _check_weight("weight", weight, scales, impl)
        # Both GEMMs take x in groups as wide as the weight's blocks (cuBLASLt's are 128).
        _check(x.layout.group == scales.block_k,
               lambda: f"x was quantized in groups of {x.layout.group}, not as this weight's "
                       "GEMM takes it: ask fp8_activation_layout")
        return impl.fp8_linear(x, weight, scales)
    _check_float("x", x, backend)
    _check(weight.dim() == 2 and x.shape[-1] == weight.shape[1],
           lambda: f"weight must be [N, K={x.shape[-1]}], got {tuple(weight.shape)}")
    impl = _resolve_backend(backend, x.device)
    _check_weight("weight", weight, scales, impl)
    return impl.fp8_linear(x, weight, scales)


def fp8_activation_layout(x: torch.Tensor, weight: torch.Tensor,
                          scales: BlockScales) -> ActivationLayout | None:
    """How `fp8_linear` would quantize x [M, K] for this weight, so the kernel producing x can
    quantize it as it goes (`gemma_rms_norm_quantized`); None where x goes in as it is (the
    reference and CPU backends, weight-only and dequantized GEMMs)."""
    if x.device.type != "cuda":
        return None
    impl = _resolve_backend(None, x.device)
    return None if impl is reference else impl.activation_layout(x, weight, scales)


def gemma_rms_norm_quantized(x: torch.Tensor, weight: torch.Tensor, eps: float,
                             layout: ActivationLayout,
                             plain: torch.Tensor | None = None) -> QuantizedRows:
    """`reference.gemma_rms_norm` of x [M, K] quantized as `layout` says (from
    `fp8_activation_layout`), in one Triton kernel: for `fp8_linear`. `plain` ([M, K], x's
    dtype), where given, also receives the normed x unquantized, from the same kernel."""
    _check(x.dim() == 2 and tuple(weight.shape) == (x.shape[1],),
           lambda: f"x must be [M, K] and weight [K], got {tuple(x.shape)}, "
                   f"{tuple(weight.shape)}")
    _check(layout.rows >= x.shape[0],
           lambda: f"the layout writes {layout.rows} rows, fewer than x's {x.shape[0]}")
    _check(plain is None or (plain.shape == x.shape and plain.dtype == x.dtype
                             and plain.stride(-1) == 1),
           lambda: f"plain must be x's shape {tuple(x.shape)} and dtype {x.dtype} with "
                   f"contiguous rows, got {tuple(plain.shape)} {plain.dtype}")
    return _triton_module().gemma_rms_norm_quantized(x, weight, eps, layout, plain)


def swiglu_oai_quantized(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float,
                         layout: ActivationLayout) -> QuantizedRows:
    """`reference.swiglu_oai` of gate and up [M, I] quantized as `layout` says (from
    `fp8_activation_layout` for the down projection after it), in one Triton kernel: for
    `fp8_linear`."""
    _check(gate.dim() == 2 and gate.shape == up.shape,
           lambda: f"gate and up must be [M, I] alike, got {tuple(gate.shape)}, "
                   f"{tuple(up.shape)}")
    _check(layout.rows >= gate.shape[0],
           lambda: f"the layout writes {layout.rows} rows, fewer than gate's {gate.shape[0]}")
    return _triton_module().swiglu_oai_quantized(gate, up, alpha, limit, layout)


def _check_weight(name: str, weight: torch.Tensor, scales: BlockScales | None, impl) -> None:
    """A weight is full precision with no scales, or e4m3 with scales of its blocks' shape."""
    if scales is None:
        _check(weight.dtype != E4M3, lambda: f"{name} is e4m3 but came without its scales")
        return
    _check(weight.dtype == E4M3, lambda: f"{name} must be e4m3 with scales, got {weight.dtype}")
    *lead, n, k = weight.shape
    expected = (*lead, -(-n // scales.block_n), -(-k // scales.block_k))
    _check(tuple(scales.scale.shape) == expected,
           lambda: f"{name} {tuple(weight.shape)} in blocks of [{scales.block_n}, "
                   f"{scales.block_k}] needs scales {expected}, got {tuple(scales.scale.shape)}")
    _check(scales.per_row is None
           or tuple(scales.per_row.shape) == (*lead, n, expected[-1]),
           lambda: f"{name} {tuple(weight.shape)}'s per-row scales must be "
                   f"{(*lead, n, expected[-1])}, got {tuple(scales.per_row.shape)}")
    _check(scales.scale.dtype in (torch.float32, torch.uint8),
           lambda: f"{name}'s scales must be fp32 or uint8 e8m0, got {scales.scale.dtype}")
    _check(impl is reference or scales.block_k % 16 == 0,
           lambda: f"the Triton FP8 GEMMs need scale blocks {scales.block_k} wide in K to be "
                   "a multiple of 16")

"""Modes and tile shapes of the FP8 GEMMs (`kernels/fp8_gemm.py`, the grouped MoE GEMM's FP8
path) at M3's width, against the bf16 GEMMs they replace.

For each projection, layout (128 x 128 fp32 block scales with the per-row copy dense weights are
served with; MXFP8 1 x 32 e8m0 as stored, run weight-only; MXFP8 regrouped into 1 x 128 blocks
as served by default, run W8A8) and batch, and for each projection's TP 2 and TP 4 shard at the
decode batches and 128 rows (128 x 128), every candidate tile of the Triton GEMM
in both modes (W8A8: x quantized to e4m3 first; weight-only: x stays bf16) runs the whole FP8
linear and the table gives the best one, today's pick, the W8A8 pick (the baseline of MXFP8's
weight-only picks), the cuBLAS path (cuBLASLt's block-scaled FP8 GEMM for 128 x 128 blocks,
with our activation quantization; for MXFP8, the weight dequantized to bf16, then cuBLAS) and
bf16 (cuBLAS for dense projections, the grouped GEMM for the experts), all in CUDA-graph
replays, so a better pick shows as a ratio above today's. The activation quantization kernel is
also timed alone (part of every W8A8 time).

A model's step reads every layer's weights from memory (they are many times the L2), so each
dense GEMM is timed over copies of its weight that together fill a few L2s, one copy per call
(`cold_copies`): timed over one weight, the replays would find it in L2.

`--picks-only` times only today's pick, the W8A8 pick and the cuBLAS path (no sweep of tiles)
and writes fp8_picks_<gpu>.md: the figures the goals are about, in a few minutes.

`--modes` times weight-only against W8A8 at 1-16 rows (fp8_modes_<gpu>.md): the measurement
behind `reference.fp8_weight_only`.

`--chains` times the projections whose x a kernel of ours produces (q/k/v, the dense and the
shared expert's gate/up after their norm, o_proj after decode attention's merge, the down
projections after their SwiGLU) with that kernel before them, x quantized in it or in the
GEMM's own kernel (fp8_chains_<gpu>.md), and each GEMM alone.

Usage (CUDA): python -m bench.fp8_tiles [--picks-only | --modes | --chains] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from bench.common import markdown_table, write_results
from kernels.fp8_gemm import (
    GemmTile,
    activation_layout,
    cublas_fp8_linear,
    dequantized_linear,
    fp8_linear,
    runs_dequantized,
    runs_on_cublas,
)
from kernels.fp8_quantize import quantize_activations
from kernels.lse_merge import merge_partials
from kernels.moe_grouped_gemm import ExpertRows, TileShape, grouped_gemm
from kernels.query_major import decode_splits
from kernels.reference import (
    ActivationLayout,
    BlockScales,
    QuantizedRows,
    fp8_weight_only,
    fp8_weight_only_linear,
    per_row_scales,
    quantize_fp8,
    regroup_mxfp8,
)
from kernels.rms_norm_quantize import gemma_rms_norm_quantized
from kernels.swiglu_quantize import swiglu_oai_quantized
from kernels.triton_layout import AttentionShape
from worker.layers.norms import gemma_rms_norm
from worker.models.minimax_m3 import swiglu_oai

HIDDEN, INTER, EXPERTS, TOP_K = 6144, 3072, 128, 4
EPS = 1e-6
CHAIN_NOTES = (
    "'vs bf16' above 1: the FP8 chain is faster (goal at batch 64: the FP8 GEMMs >= 1.6x the "
    "bf16 ones). Each projection is timed after the kernel that produces its x in M3, in one "
    "CUDA graph: for q/k/v, the dense gate/up and the shared expert's gate/up the Gemma "
    "RMSNorm (the MoE's quantizing kernel also writes its bf16 output, which the router and the "
    "routed experts take), for the dense and shared experts' down_proj the SwiGLU-OAI (both "
    "compiled by torch.compile, as served), for o_proj "
    "the log-sum-exp merge of decode's split attention (the splits the "
    "query-major kernel runs at those rows and heads; rows it does not split have no merge and "
    "are left out; random partials). bf16 weights (cuBLAS); FP8 weights with the GEMM quantizing "
    "x in a kernel of its own; FP8 weights with the producer quantizing x as the GEMM takes it "
    "(`activation_layout`: 'GEMM path': kernels/rms_norm_quantize.py, kernels/lse_merge.py, "
    "kernels/swiglu_quantize.py), as served. 'GEMM alone': the bf16 GEMM on the producer's "
    "output and the FP8 GEMM on x quantized, nothing else in the graph. '128x128': the dense "
    "weights' blocks with their "
    "per-row copy; 'MXFP8 regrouped 1x128': MXFP8 as served (MXFP8 kept weight-only takes x "
    "unquantized and is left out). Random weights; CUDA-graph replays, median. Each GEMM reads "
    "its weight from memory, as in a model's step: the timed calls take turns over copies of "
    "the weight that together fill four L2s. 'vs bf16, weights in L2': the GEMMs alone over one "
    "weight, which each replay leaves in L2 for the next (how runs before this one timed every "
    "GEMM; an FP8 copy of every TP 1 projection but the dense gate/up fits in an H200's L2).")
# M3's attention: query and KV heads at TP 1, head width, blocks each query attends.
QUERY_HEADS, KV_HEADS, HEAD_DIM, TOPK = 64, 4, 128, 16
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # M3's swiglu_alpha, swiglu_limit


def projections(tp: int) -> tuple[tuple[str, int, int], ...]:
    """(name, K, N) of the GEMMs a layer runs on one of `tp` ranks: projections of one input
    stacked into one (`StackedLinear`): q, k, v and the indexer's q and k (8192 + 512 + 512 +
    512 rows split, the shared 128-row index key whole); gate over up."""
    shard = "" if tp == 1 else f" (TP {tp} shard)"
    return ((f"q, k, v, index q, k (stacked){shard}", 6144, 9728 // tp + 128),
            (f"o_proj{shard}", 8192 // tp, 6144),
            (f"dense gate, up (stacked){shard}", 6144, 24576 // tp),
            (f"dense down_proj{shard}", 12288 // tp, 6144),
            (f"shared expert gate, up (stacked){shard}", 6144, 6144 // tp),
            (f"shared expert down_proj{shard}", 3072 // tp, 6144))


def _mxfp8_regrouped(weight: torch.Tensor):
    return regroup_mxfp8(*quantize_fp8(weight, 1, 32, e8m0=True))


def _blocks_with_rows(weight: torch.Tensor):
    """128 x 128 blocks as dense weights are served: with a per-row copy of their scales
    (`fp8.spread_block_scales_`; the experts' stacking drops it, as the loader leaves them)."""
    quantized, blocks = quantize_fp8(weight, 128, 128)
    rows = per_row_scales(blocks, weight.shape[-2])
    return quantized, dataclasses.replace(blocks, per_row=rows.scale)


# Layout name -> how a weight [..., N, K] is quantized into it, as served.
LAYOUTS = {"128x128": _blocks_with_rows,
           "MXFP8 1x32": functools.partial(quantize_fp8, block_n=1, block_k=32, e8m0=True),
           "MXFP8 regrouped 1x128": _mxfp8_regrouped}
# The layout the TP shard rows and the mode rows (--modes) use.
BLOCK_LAYOUT = "128x128"
MODE_BATCHES = (1, 2, 4, 8, 16)
# 128-1024 rows: where a GEMM leaves its decode kernel for cuBLAS; one row, where narrow GEMMs
# stay on the Triton kernel.
DECODE_BATCHES, PREFILL_BATCHES = (1, 8, 64), (128, 256, 1024, 4096)
# The TP shards, timed at the decode batches and at 128 rows: there the narrowest keep the
# per-row copy of their scales on cuBLASLt (`fp8_gemm.ROW_SCALES_MAX_OUTPUTS`).
SHARDS, SHARD_BATCHES = (2, 4), (*DECODE_BATCHES, 128)
# (cols, depth, warps, stages, K splits), each in both modes (W8A8 and weight-only).
DECODE_TILES = ([(cols, 128, 4, 6, split) for cols in (64, 128) for split in (1, 2, 4, 8)]
                + [(cols, 128, 4, 4, split) for cols in (32, 64) for split in (2, 4)]
                + [(64, 256, 4, 4, split) for split in (1, 2, 4)]
                + [(64, 128, 4, 3, split) for split in (1, 2, 4, 8)])
PREFILL_TILES = [(128, 128, 8, 3, 1), (128, 128, 4, 4, 1), (256, 128, 8, 3, 1),
                 (64, 128, 4, 4, 1)]
MODES = {True: "W8A8", False: "weight-only"}
# Each dense GEMM's weight copies fill this many L2s (`cold_copies`).
COLD_L2_MULTIPLE = 4
CUBLAS, DEQUANTIZED = "cuBLASLt", "dequantized + cuBLAS"
EXPERT_TILES = [TileShape(rows, cols, 128, 4, stages) for rows in (16, 32, 64)
                for cols in (32, 64, 128) for stages in (3, 4, 6)]
EXPERT_PREFILL_TILES = [TileShape(128, 128, 128, 8, 3), TileShape(128, 128, 64, 8, 3),
                        TileShape(128, 256, 64, 8, 3), TileShape(64, 128, 128, 4, 4),
                        TileShape(128, 64, 128, 4, 4), TileShape(64, 64, 128, 4, 4),
                        TileShape(128, 64, 128, 4, 3)]


def _ms(fn) -> float:
    # do_bench_cudagraph runs on a side stream: the inputs made on this one must be ready.
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


def cold_copies(weight: torch.Tensor, scales: BlockScales | None = None) -> Iterator[tuple]:
    """(weight, scales) copies, endlessly in turn, that together fill COLD_L2_MULTIPLE L2s: a
    GEMM timed over one weight would find it in L2, left there by the replay before (as served,
    each layer's weights are read from memory: a model's weights are many L2s), so each timed
    call takes the next copy."""
    l2_bytes = torch.cuda.get_device_properties(weight.device).L2_cache_size
    count = max(2, -(-COLD_L2_MULTIPLE * l2_bytes // weight.nbytes))
    return itertools.cycle([(weight.clone(), _cloned(scales)) for _ in range(count)])


def _cloned(scales: BlockScales | None) -> BlockScales | None:
    """A copy of the scales in the same memory layout (the GEMMs pick paths by it)."""
    if scales is None:
        return None
    per_row = None if scales.per_row is None else scales.per_row.clone()
    return dataclasses.replace(scales, scale=scales.scale.clone(), per_row=per_row)


def _best(candidates, run, reference, tolerance: float = 1e-2) -> dict:
    """{candidate: ms} for the candidates that compile and agree with the reference output."""
    times = {}
    for candidate in candidates:
        try:
            out = run(candidate).float()
        except Exception as exc:  # a tile the compiler cannot fit (shared memory, registers)
            print(f"  {candidate}: {type(exc).__name__}", flush=True)
            continue
        error = ((out - reference).norm() / reference.norm()).item()
        assert error < tolerance, f"{candidate} disagrees with the reference: {error:.2e}"
        times[candidate] = _ms(functools.partial(run, candidate))
    return times


def _experts(x, chosen, first, second, shape: TileShape) -> torch.Tensor:
    """Both projections of the routed experts (the activation left out); `first` and `second`
    are (weights, scales or None)."""
    pairs = chosen.numel()
    layout = ExpertRows.build(chosen, EXPERTS, shape.rows)
    hidden = grouped_gemm(x, first[0], layout, pairs, TOP_K, shape, scales=first[1])
    return grouped_gemm(hidden[:, :INTER].contiguous(), second[0], layout, pairs, 1, shape,
                        scales=second[1])


def _dense_bf16(x, copies: Iterator[tuple]) -> torch.Tensor:
    """x @ W^T by cuBLAS, over the next of the weight's `cold_copies`."""
    return F.linear(x, next(copies)[0])


def _dense_fp8(x, copies: Iterator[tuple],
               candidate: GemmTile | str | None = None) -> torch.Tensor:
    """x @ W^T by the `candidate` path (None: `fp8_linear`'s pick), over the next of the
    weight's `cold_copies`."""
    q, scales = next(copies)
    if candidate == CUBLAS:
        return cublas_fp8_linear(x, q, scales)
    if candidate == DEQUANTIZED:
        return dequantized_linear(x, q, scales)
    return fp8_linear(x, q, scales, candidate)


def _tile_name(tile: GemmTile | str) -> str:
    if isinstance(tile, str):
        return tile
    return (f"{MODES[tile.quantize_x]} {tile.cols}x{tile.depth} w{tile.num_warps} "
            f"s{tile.num_stages} split {tile.split_k}")


def dense_rows(sweep: bool) -> list[list[object]]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    gemms = [(gemm, (*DECODE_BATCHES, *PREFILL_BATCHES), LAYOUTS) for gemm in projections(1)]
    gemms += [(gemm, SHARD_BATCHES, {BLOCK_LAYOUT: LAYOUTS[BLOCK_LAYOUT]})
              for tp in SHARDS for gemm in projections(tp)]
    for (name, k, n), batches, layouts in gemms:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        bf16_copies = cold_copies(weight)
        fp8_copies = {layout: cold_copies(*quantize(weight)) for layout, quantize in
                      layouts.items()}
        for batch in batches:
            x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
            bf16_ms = _ms(functools.partial(_dense_bf16, x, bf16_copies))
            for layout, copies in fp8_copies.items():
                q, scales = next(copies)
                quantize_ms = _ms(functools.partial(quantize_activations, x, scales.block_k))
                picked = GemmTile.for_shape(batch, n, k, scales.block_k, sms)
                w8a8 = GemmTile.for_shape(batch, n, k, scales.block_k, sms, weight_only=False)
                # W8A8's e4m3 activations are ~2.5% off (relative norm) of x @ W; a wrong
                # product is ~100% off.
                reference = fp8_weight_only_linear(x.float(), q, scales)
                tiles = [picked, w8a8] + [
                    GemmTile(picked.rows, *candidate, quantize_x=mode)
                    for candidate in (DECODE_TILES if batch <= 64 else PREFILL_TILES)
                    for mode in MODES if sweep]
                tiles = list(dict.fromkeys(tiles))
                # cuBLASLt's FP8 GEMM takes 128 x 128 blocks only; weight-only layouts reach
                # cuBLAS through a dequantized weight.
                library = CUBLAS if scales.block_k == 128 else DEQUANTIZED
                tiles.append(library)
                times = _best(tiles, functools.partial(_dense_fp8, x, copies), reference,
                              tolerance=5e-2)
                cublas = ([f"{times[library] * 1e3:.1f}", f"{bf16_ms / times[library]:.2f}x"]
                          if library in times else ["", ""])
                if runs_on_cublas(batch, n, k, x, scales):
                    picked = CUBLAS
                elif runs_dequantized(batch, scales):
                    picked = DEQUANTIZED
                best = min(times, key=times.get)
                rows.append([name, f"{k} -> {n}", batch, layout, f"{bf16_ms * 1e3:.1f}",
                             f"{times[w8a8] * 1e3:.1f}", f"{bf16_ms / times[w8a8]:.2f}x",
                             f"{quantize_ms * 1e3:.1f}", *cublas, _tile_name(picked),
                             f"{times[picked] * 1e3:.1f}", f"{bf16_ms / times[picked]:.2f}x",
                             _tile_name(best), f"{times[best] * 1e3:.1f}",
                             f"{bf16_ms / times[best]:.2f}x"])
                print(rows[-1], flush=True)
    return rows


def expert_rows(sweep: bool) -> list[list[object]]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", dtype=torch.bfloat16,
                      generator=g) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", dtype=torch.bfloat16,
                     generator=g) / INTER ** 0.5
    rows = []
    for layout, quantize in LAYOUTS.items():
        (q13, s13), (q2, s2) = [_quantize_experts(weights, quantize) for weights in (w13, w2)]
        for batch in (*DECODE_BATCHES, PREFILL_BATCHES[-1]):
            x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
            chosen = torch.rand(batch, EXPERTS, device="cuda", generator=g).topk(TOP_K).indices

            run = functools.partial(_experts, x, chosen, (q13, s13), (q2, s2))
            bf16_ms = _ms(functools.partial(_experts, x, chosen, (w13, None), (w2, None),
                                            TileShape.for_pairs(batch * TOP_K)))
            picked = TileShape.for_pairs(batch * TOP_K, s13.block_k)
            reference = run(picked).float()
            candidates = (EXPERT_TILES if batch in DECODE_BATCHES else EXPERT_PREFILL_TILES
                          ) if sweep else []
            times = _best(list(dict.fromkeys([picked, *candidates])), run, reference)
            best = min(times, key=times.get)
            mode = MODES[not fp8_weight_only(s13.block_k)]
            rows.append(["routed experts (both projections)", "128 experts, top 4", batch,
                         layout, f"{bf16_ms * 1e3:.1f}", f"{times[picked] * 1e3:.1f}",
                         f"{bf16_ms / times[picked]:.2f}x", "", "", "",
                         f"{mode} (grouped GEMM)", f"{times[picked] * 1e3:.1f}",
                         f"{bf16_ms / times[picked]:.2f}x",
                         f"{mode} {best.rows}x{best.cols}x{best.depth} w{best.num_warps} "
                         f"s{best.num_stages}", f"{times[best] * 1e3:.1f}",
                         f"{bf16_ms / times[best]:.2f}x"])
            print(rows[-1], flush=True)
    return rows


def _quantize_experts(weights: torch.Tensor, quantize):
    """`quantize` one expert at a time (bounds the temporaries), stacked, each expert's scales
    in the memory layout `quantize` gives them."""
    pieces = [quantize(w) for w in weights]
    scales = torch.stack([s.scale.transpose(0, 1) for _, s in pieces]).transpose(1, 2)
    first = pieces[0][1]
    if first.scale.stride(0) != 1:  # row-major scales (all but the regrouped ones)
        scales = scales.contiguous()
    return (torch.stack([q for q, _ in pieces]),
            type(first)(scales, first.block_n, first.block_k))


def mode_rows() -> list[list[object]]:
    """Weight-only against W8A8 (each with its own pick of tile) at decode batches of 1-16 rows,
    128 x 128 blocks, every projection at TP 1, 2 and 4: the measurement behind
    `reference.fp8_weight_only`."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for tp in (1, *SHARDS):
        for name, k, n in projections(tp):
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            bf16_copies = cold_copies(weight)
            fp8_copies = cold_copies(*LAYOUTS[BLOCK_LAYOUT](weight))
            block_k = next(fp8_copies)[1].block_k
            for batch in MODE_BATCHES:
                x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
                bf16_ms = _ms(functools.partial(_dense_bf16, x, bf16_copies))
                times = [_ms(functools.partial(_dense_fp8, x, fp8_copies, GemmTile.for_shape(
                    batch, n, k, block_k, sms, weight_only=mode))) for mode in (True, False)]
                rows.append([name, f"{k} -> {n}", batch, f"{bf16_ms * 1e3:.1f}",
                             *(f"{bf16_ms / t:.2f}x" for t in times),
                             f"{times[0] / times[1]:.2f}x"])
                print(rows[-1], flush=True)
    return rows


@dataclasses.dataclass(frozen=True)
class Chain:
    """The kernel that produces an FP8 projection's input x [M, K] in M3 (as served), alone and
    quantizing x as the GEMM takes it."""

    fed_by: str
    produce: Callable[[], torch.Tensor]
    produce_quantized: Callable[[ActivationLayout], QuantizedRows]


def _chain_cells(chain: Chain, bf16_copies: Iterator[tuple], fp8_copies: Iterator[tuple],
                 quantized_as: ActivationLayout) -> list[str]:
    """bf16: the producer, then cuBLAS; FP8: the producer, then the GEMM quantizing x in a kernel
    of its own; FP8: the producer quantizing x, then the GEMM (as served); each GEMM alone, x at
    hand; each producer alone. All in CUDA graphs, each GEMM over the next of its weight's
    `cold_copies`; and the GEMMs alone again over one weight, as it stays in L2."""
    x, quantized = chain.produce(), chain.produce_quantized(quantized_as)
    bf16_ms = _ms(lambda: _dense_bf16(chain.produce(), bf16_copies))
    unfused_ms = _ms(lambda: _dense_fp8(chain.produce(), fp8_copies))
    fused_ms = _ms(lambda: _dense_fp8(chain.produce_quantized(quantized_as), fp8_copies))
    bf16_gemm_ms = _ms(functools.partial(_dense_bf16, x, bf16_copies))
    gemm_ms = _ms(functools.partial(_dense_fp8, quantized, fp8_copies))
    (weight, _), (q, scales) = next(bf16_copies), next(fp8_copies)
    warm_ratio = (_ms(functools.partial(F.linear, x, weight))
                  / _ms(functools.partial(fp8_linear, quantized, q, scales)))
    producer_ms = _ms(chain.produce)
    quantizing_ms = _ms(functools.partial(chain.produce_quantized, quantized_as))
    return [f"{bf16_ms * 1e3:.1f}", f"{unfused_ms * 1e3:.1f}", f"{bf16_ms / unfused_ms:.2f}x",
            f"{fused_ms * 1e3:.1f}", f"{bf16_ms / fused_ms:.2f}x", f"{bf16_gemm_ms * 1e3:.1f}",
            f"{gemm_ms * 1e3:.1f}", f"{bf16_gemm_ms / gemm_ms:.2f}x", f"{warm_ratio:.2f}x",
            f"{producer_ms * 1e3:.1f}", f"{quantizing_ms * 1e3:.1f}",
            CUBLAS if quantized_as.token_major else "Triton W8A8"]


def _norm_chain(x: torch.Tensor, norm_weight: torch.Tensor) -> Chain:
    """The Gemma RMSNorm before q/k/v and the dense MLP: compiled by torch.compile, and
    `kernels.rms_norm_quantize`."""
    return Chain("norm", functools.partial(gemma_rms_norm, x, norm_weight, EPS),
                 functools.partial(gemma_rms_norm_quantized, x, norm_weight, EPS))


def _moe_norm_chain(x: torch.Tensor, norm_weight: torch.Tensor) -> Chain:
    """The Gemma RMSNorm before the MoE, whose router and routed experts take its output as it
    is: compiled by torch.compile, and `kernels.rms_norm_quantize` writing it both as it is and
    quantized for the shared expert's gate/up."""
    def normed_and_quantized(quantized_as: ActivationLayout) -> QuantizedRows:
        return gemma_rms_norm_quantized(x, norm_weight, EPS, quantized_as, torch.empty_like(x))

    return Chain("norm, in bf16 too", functools.partial(gemma_rms_norm, x, norm_weight, EPS),
                 normed_and_quantized)


def _merge_chain(rows: int, num_heads: int, num_groups: int) -> Chain:
    """The log-sum-exp merge that ends decode's split attention before o_proj, over the
    splits the query-major kernel runs at these rows (random partials)."""
    splits = decode_splits(rows, num_groups, TOPK, torch.device("cuda"))
    shape = AttentionShape(rows, num_heads, HEAD_DIM, num_groups, num_heads // num_groups,
                           TOPK, HEAD_DIM ** -0.5)
    like = torch.empty(0, device="cuda", dtype=torch.bfloat16)  # the queries' dtype and device
    partial_out = torch.randn(rows, num_groups, splits, shape.group, HEAD_DIM, device="cuda")
    partial_lse = torch.randn(rows, num_groups, splits, shape.group, device="cuda") * 4

    def merge(quantized_as: ActivationLayout | None = None):
        out, lse = shape.outputs(like, quantized=quantized_as)
        merge_partials(partial_out, partial_lse, out, lse, num_groups, splits)
        return out if quantized_as is not None else out.view(rows, -1)

    return Chain(f"attention's merge ({splits} splits)", merge, merge)


def _swiglu_chain(rows: int, width: int) -> Chain:
    """The MLP's SwiGLU-OAI before its down projection: compiled by torch.compile (as served),
    and `kernels.swiglu_quantize`, on the stacked gate/up projection's two halves."""
    projected = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16) * 4
    gate, up = projected.chunk(2, dim=-1)
    return Chain("SwiGLU", functools.partial(swiglu_oai, gate, up, SWIGLU_ALPHA, SWIGLU_LIMIT),
                 functools.partial(swiglu_oai_quantized, gate, up, SWIGLU_ALPHA, SWIGLU_LIMIT))


def chain_rows() -> list[list[object]]:
    """Each projection fed by a kernel that can quantize its x at decode batches (TP 1 and
    shards): q/k/v, the dense gate/up and the shared expert's gate/up after their norm, the
    dense and shared experts' down_proj after their SwiGLU (and these at a prefill chunk),
    o_proj after decode attention's merge where the rows split; every weight layout run
    W8A8."""
    rows = []
    for tp in (1, *SHARDS):
        layouts = LAYOUTS if tp == 1 else {BLOCK_LAYOUT: LAYOUTS[BLOCK_LAYOUT]}
        for name, k, n in projections(tp):
            if name.startswith("o_proj"):
                num_groups = max(1, KV_HEADS // tp)
                chains = [(batch, _merge_chain(batch, QUERY_HEADS // tp, num_groups))
                          for batch in (*DECODE_BATCHES, 128)
                          if decode_splits(batch, num_groups, TOPK, torch.device("cuda")) > 1]
            elif "down_proj" in name:
                chains = [(batch, _swiglu_chain(batch, k))
                          for batch in (*DECODE_BATCHES, PREFILL_BATCHES[-1])]
            else:  # after a norm
                norm_weight = torch.randn(k, device="cuda", dtype=torch.bfloat16) * 0.1
                norm_chain = _moe_norm_chain if name.startswith("shared") else _norm_chain
                chains = [(batch, norm_chain(torch.randn(batch, k, device="cuda",
                                                         dtype=torch.bfloat16), norm_weight))
                          for batch in (*DECODE_BATCHES, PREFILL_BATCHES[-1])]
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            bf16_copies = cold_copies(weight)
            for layout, quantize in layouts.items():
                fp8_copies = cold_copies(*quantize(weight))
                q, scales = next(fp8_copies)
                for batch, chain in chains:
                    quantized_as = activation_layout(chain.produce(), q, scales)
                    if quantized_as is None:  # weight-only: x goes in as it is produced
                        continue
                    rows.append([name, f"{k} -> {n}", batch, layout, chain.fed_by,
                                 *_chain_cells(chain, bf16_copies, fp8_copies, quantized_as)])
                    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--picks-only", action="store_true")
    parser.add_argument("--modes", action="store_true",
                        help="weight-only against W8A8 at 1-16 rows instead (fp8_modes_<gpu>.md)")
    parser.add_argument("--chains", action="store_true",
                        help="the kernel producing a projection's x and the projection, x "
                             "quantized in that kernel or in the GEMM, instead "
                             "(fp8_chains_<gpu>.md)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    gpu = next((g.lower() for g in ("H100", "H200") if g in gpu), "gpu")
    out_dir = Path(args.out_dir) if args.out_dir else None
    if args.chains:
        table = markdown_table(
            ["GEMM", "shape", "rows", "FP8 layout", "x from", "bf16: x, GEMM (us)",
             "FP8: x, GEMM quantizing x (us)", "vs bf16", "FP8: x quantized, GEMM (us)",
             "vs bf16", "bf16 GEMM alone (us)", "FP8 GEMM alone, x quantized (us)", "vs bf16",
             "vs bf16, weights in L2", "x alone (us)", "x quantized alone (us)", "GEMM path"],
            chain_rows())
        write_results(f"fp8_chains_{gpu}",
                      "FP8 projections with x quantized by the kernel that produces it", table,
                      CHAIN_NOTES, directory=out_dir)
        return
    if args.modes:
        table = markdown_table(["GEMM", "shape", "rows", "bf16 (us)", "weight-only vs bf16",
                                "W8A8 vs bf16", "W8A8 vs weight-only"], mode_rows())
        write_results(f"fp8_modes_{gpu}", "FP8 decode GEMMs: weight-only against W8A8", table,
                      "128 x 128 block scales. Each mode with the tile `GemmTile.for_shape` "
                      "picks for it; W8A8 includes quantizing x. 'vs' above 1: faster. Random "
                      "weights, read from memory (copies in turn that fill four L2s); "
                      "CUDA-graph replays, median.", directory=out_dir)
        return
    sweep = not args.picks_only
    table = markdown_table(
        ["GEMM", "shape", "rows", "FP8 layout", "bf16 (us)", "W8A8 (us)", "vs bf16",
         "of which quantizing x (us)", "cuBLAS path (us)", "vs bf16", "today's pick",
         "today's pick (us)", "vs bf16",
         "best (mode, N x K, warps, stages, K splits)", "best (us)", "vs bf16"],
        dense_rows(sweep) + expert_rows(sweep))
    write_results(("fp8_tiles_" if sweep else "fp8_picks_") + gpu,
                  "FP8 GEMMs (weight-only and W8A8): tiles at M3's width", table,
                  "'vs bf16' above 1 means the FP8 GEMM is faster (goal at batch 64: >= 1.6x). "
                  "'W8A8': the Triton kernel's e4m3 x e4m3 products with x quantized per token "
                  "by a kernel of its own (timed alone in 'of which quantizing x', included in "
                  "the W8A8 times), with the tile the K-split rule picks for that mode (the "
                  "baseline MXFP8's weight-only picks are measured against). 'cuBLAS path': "
                  "cuBLASLt's F.scaled_mm with 1 x 128 activation scales and the weight "
                  "scales it takes at that batch (128 x 128 blocks: their per-row 1 x 128 copy "
                  "up to 64 rows, the blocks from 128; regrouped MXFP8: its 1 x 128), the same "
                  "quantization of x included; for MXFP8 1 x 32 "
                  "the weight dequantized to bf16 by kernels/fp8_dequantize.py, then cuBLAS "
                  "(F.linear), both timed. 'MXFP8 regrouped 1x128': the MXFP8 weights as "
                  "served by default (`mxfp8_mode: w8a8`), their 32-wide groups regrouped into "
                  "128-wide blocks at load (reference.regroup_mxfp8), run W8A8; 'MXFP8 1x32': "
                  "as stored (`mxfp8_mode: weight_only`). 'weight-only': x stays "
                  "bf16 and each e4m3 weight tile is scaled into bf16 in registers, the "
                  "operands swapped (kernels/fp8_weight_only_gemm.py). Dense "
                  "bf16: cuBLAS (F.linear); experts bf16: the same grouped GEMM with bf16 "
                  "weights and its own pick of tile. Random weights, random routing; CUDA-graph "
                  "replays, median; each dense GEMM over copies of its weight that together "
                  "fill four L2s, in turn, so it reads the weight from memory (runs before "
                  "2026-11-28 left it in L2).",
                  directory=out_dir)


if __name__ == "__main__":
    main()

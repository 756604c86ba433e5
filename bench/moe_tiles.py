"""Tile shapes of the grouped-GEMM MoE kernel (`kernels/moe_grouped_gemm.py`) at M3's width.

For each batch of tokens (routed at random over 128 experts, top 4), every candidate
`TileShape` runs both projections; the table gives each one's time against the shape
`TileShape.for_pairs` picks today, so a better shape shows as a ratio above 1.

Usage (CUDA): python bench/moe_tiles.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, write_results  # noqa: E402
from kernels.moe_grouped_gemm import ExpertRows, TileShape, grouped_gemm  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 6144, 3072, 128, 4
BATCHES = (1, 8, 64, 512, 4096, 16384)
CANDIDATES = [TileShape(16, n, k, w, s) for n, k, w, s in
              ((32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3),
               (32, 256, 4, 3), (64, 256, 4, 3))]
CANDIDATES += [TileShape(m, n, k, w, s) for m, n, k, w, s in
               ((64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 4),
                (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4))]


def both_projections(x, w13, w2, chosen, shape: TileShape):
    pairs = chosen.numel()
    layout = ExpertRows.build(chosen, EXPERTS, shape.rows)
    hidden = grouped_gemm(x, w13, layout, pairs, TOP_K, shape)[:, :INTER].contiguous()
    return grouped_gemm(hidden, w2, layout, pairs, 1, shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, **bf16) * 0.02
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, **bf16) * 0.02
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, HIDDEN, **bf16)
        chosen = torch.rand(batch, EXPERTS, device="cuda").topk(TOP_K, dim=-1).indices
        current = TileShape.for_pairs(batch * TOP_K)
        reference = both_projections(x, w13, w2, chosen, current).float()
        shapes = [current] + [s for s in CANDIDATES
                              if s != current and (s.rows == 16) == (batch * TOP_K <= 64)]
        times = {}
        for shape in shapes:
            try:
                out = both_projections(x, w13, w2, chosen, shape).float()
            except Exception as exc:  # a shape the compiler cannot fit (shared memory)
                print(f"{batch} {shape}: {type(exc).__name__}", flush=True)
                continue
            error = ((out - reference).norm() / reference.norm()).item()
            assert error < 1e-2, f"{shape} disagrees with {current}: {error:.2e}"
            times[shape] = triton.testing.do_bench_cudagraph(
                functools.partial(both_projections, x, w13, w2, chosen, shape), rep=100,
                return_mode="median")
        best = min(times, key=times.get)
        for shape, ms in sorted(times.items(), key=lambda item: item[1]):
            rows.append([batch, f"{shape.rows}x{shape.cols}x{shape.depth}",
                         shape.num_warps, shape.num_stages, f"{ms * 1e3:.0f}",
                         f"{times[current] / ms:.2f}x",
                         ("picked today" if shape == current else "")
                         + (" best" if shape == best else "")])
            print(rows[-1], flush=True)
    table = markdown_table(["tokens", "tile (MxNxK)", "warps", "stages", "both GEMMs (us)",
                            "vs today's pick", ""], rows)
    gpu = torch.cuda.get_device_name()
    write_results("moe_tiles_" + next((g.lower() for g in ("H100", "H200") if g in gpu), "gpu"),
                  "MoE grouped GEMM: tile shapes at M3's width", table,
                  f"{EXPERTS} experts, top {TOP_K}, hidden {HIDDEN}, expert width {INTER}, bf16, "
                  "random routing; both projections (activation left out), CUDA-graph replays.",
                  directory=Path(args.out_dir) if args.out_dir else None)


if __name__ == "__main__":
    main()

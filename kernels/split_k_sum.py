"""Triton: the K splits of a decode-sized FP8 GEMM added into its output.

An FP8 GEMM whose K is split over several programs per output tile (`fp8_gemm`,
`fp8_weight_only_gemm`: decode batches, whose column tiles alone are too few programs to keep
every multiprocessor streaming weights) writes each split's fp32 partial sums
(`triton_layout.store_split_k`), and they are added in split order, so the sum does not depend
on which program finished first, in one of two places:

- small partial tiles (up to 16 rows of x): by the split that arrives last at a per-tile count,
  inside the GEMM; no second launch.
- larger ones: by this kernel, which on Hopper launches while the GEMM runs (programmatic
  dependent launch) and waits there for the GEMM's stores. Summed inside the GEMM, a 64-row
  tile's partials held every program until they had landed, which cost more than the launch
  (bench/results/fp8_picks_<gpu>.md measured both)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_layout import (
    MAX_SPLIT_TILES,
    dependent_launch,
    split_arrival_counts,
    wait_for_previous_kernel,
)

# Rows of x per tile up to which the GEMM adds its own K splits.
SUM_IN_GEMM_MAX_ROWS = 16
# Output elements per program: a decode GEMM's few hundred thousand sums take a few hundred
# programs.
_BLOCK = 2048


@triton.jit
def _sum_splits_kernel(partials, out, total, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    wait_for_previous_kernel(USE_PDL)  # the GEMM's partial sums
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # every split's load in flight at once
        acc += tl.load(partials + split * total + offsets, mask=mask)
    tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=mask)


def sums_in_gemm(tile_rows: int) -> bool:
    """Whether a split GEMM with `tile_rows` rows of x per tile adds its K splits itself."""
    return tile_rows <= SUM_IN_GEMM_MAX_ROWS


@dataclass(frozen=True)
class SplitSums:
    """Where an FP8 GEMM launched on `grid` (row tiles, column tiles, K splits) stores its sums
    and how its K splits are added: `partials` and `arrivals` are the kernel's buffers
    (`triton_layout.store_split_k`), `constants` its SUM_IN_GEMM and USE_PDL; `finish()` after
    the launch returns `out`."""

    out: torch.Tensor
    partials: torch.Tensor  # fp32 [split_k, M, N]; `out` itself where K is not split
    arrivals: torch.Tensor
    in_gemm: bool

    @classmethod
    def plan(cls, grid: tuple[int, int, int], out: torch.Tensor, tile_rows: int) -> "SplitSums":
        tiles, split_k = grid[0] * grid[1], grid[2]
        in_gemm = sums_in_gemm(tile_rows)
        if split_k == 1:
            partials = out
        elif in_gemm and tiles > MAX_SPLIT_TILES:
            raise ValueError(f"an FP8 GEMM of {tiles} output tiles can't add its K splits")
        else:
            partials = torch.empty(split_k, *out.shape, dtype=torch.float32, device=out.device)
        return cls(out, partials, split_arrival_counts(out.device), in_gemm)

    @property
    def constants(self) -> dict[str, bool]:
        return {"SUM_IN_GEMM": self.in_gemm, "USE_PDL": dependent_launch(self.out.device)}

    def finish(self) -> torch.Tensor:
        if not self.in_gemm:
            sum_splits(self.partials, self.out)
        return self.out


def sum_splits(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] (contiguous) = partials [S, M, N] summed over S in order; nothing to add
    where `partials` is `out` (K not split)."""
    if partials is out or out.numel() == 0:
        return out
    pdl = dependent_launch(out.device)
    _sum_splits_kernel[(triton.cdiv(out.numel(), _BLOCK),)](
        partials, out, out.numel(), SPLIT_K=partials.shape[0], BLOCK=_BLOCK, USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl)
    return out

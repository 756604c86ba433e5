"""FP8 weights: which parameters a quantized checkpoint stores as e4m3, and their scales.

A module lists the weights it can run in FP8 in `fp8_weights` (name -> how many matrices are
stacked along its output rows: w1 over w3 in the fused expert projection). `quantize_` turns
those of a model built on the meta device into e4m3 parameters with a `<name>_scale_inv`
parameter beside each (the checkpoint's name for the scales), so loading copies the stored
bytes and nothing is ever held in full precision. The kernels multiply by them as they are
(`kernels.fp8_linear`, `kernels.routed_experts`), except that once loaded MXFP8 weights are
regrouped (`regroup_mxfp8_`, unless `mxfp8_mode: weight_only`: same bytes, wider scale blocks)
and the dense projections' block scales get a per-row copy (`spread_block_scales_`) for the
GEMMs that run faster with it.
"""

from __future__ import annotations

import itertools
import logging
import re

import torch
from torch import nn
from tqdm import tqdm

from kernels import E4M3, BlockScales
from kernels.reference import (
    REGROUPED_BLOCK_K,
    fp8_weight_only,
    per_row_scales,
    regroup_mxfp8,
    regroups_to_w8a8,
)
from worker.config import FP8Config
from worker.errors import ModelLoadError
from worker.parallel import set_shard

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"
ROW_SCALE_SUFFIX = "_row_scale"  # `spread_block_scales_`'s per-row copy of the scales
E8M0_STORAGE = torch.uint8  # e8m0 exponents, as the kernels read them
# Weight rows regrouped at a time (`regroup_mxfp8_`): bounds the fp32 temporaries to a few hundred
# MB at M3's width.
REGROUP_ROWS = 4096


def quantize_(model: nn.Module, config: FP8Config) -> None:
    """Makes every FP8-capable weight of `model` (on the meta device) e4m3 with block scales,
    except the modules the config exempts and the LM head (its output embedding)."""
    for module_name, module in model.named_modules():
        if module_name == "lm_head" or _exempt(module_name, config.modules_to_not_convert):
            continue
        for param_name, stacked in getattr(module, "fp8_weights", {}).items():
            _quantize_param(module, f"{module_name}.{param_name}", param_name, stacked, config)


def scales(module: nn.Module, name: str) -> BlockScales | None:
    """The block scales of `module.<name>`, or None when it is not FP8."""
    block = module.__dict__.get("fp8_block")
    if block is None:
        return None
    # Looked up in the buffers directly: every FP8 GEMM call asks, and most modules have no
    # copy, where getattr's miss raises and catches an AttributeError each time.
    return BlockScales(getattr(module, name + SCALE_SUFFIX), *block,
                       per_row=module._buffers.get(name + ROW_SCALE_SUFFIX))


def regroup_mxfp8_(model: nn.Module) -> None:
    """Regroups the loaded MXFP8 weights of `model` into [1, 128] blocks in place
    (`reference.regroup_mxfp8`), so their GEMMs run W8A8. Their scales become fp32 and are stored
    K-block-major: the scales a program reads for one K tile (one per weight row) are adjacent,
    and cuBLASLt's 1 x 128 block scaling takes them in that layout."""
    modules = [(module, stored) for module in model.modules()
               if (stored := {name: found for name in getattr(module, "fp8_weights", {})
                              if (found := scales(module, name)) is not None
                              and regroups_to_w8a8(found)})]
    with torch.no_grad():
        for module, stored in tqdm(modules, desc="regrouping MXFP8 weights", unit="module",
                                   disable=len(modules) < 8, leave=False):
            _regroup_module(module, stored)
    if modules:
        logger.info("regrouped MXFP8 weights into 1 x 128 blocks (mxfp8_mode w8a8)",
                    extra={"modules": len(modules)})


def spread_block_scales_(model: nn.Module) -> None:
    """Gives the loaded dense FP8 projections of `model` whose scale blocks span several weight
    rows (DeepSeek-style 128 x 128) a second copy of their scales, repeated for each weight row
    and stored K-block-major (`reference.per_row_scales`: `BlockScales.per_row`), the layout
    regrouped MXFP8 has. cuBLASLt's block-scaled GEMM runs decode batches far faster with
    1 x 128 weight scales than with 128 x 128 ones, and prefill chunks slower
    (bench/results/fp8_picks_<gpu>.md), so `kernels.fp8_linear` takes each where it wins. The
    copy costs 4 bytes per 128 weights. The experts keep their blocks alone (the grouped GEMM is
    tuned for them), and so do weight-only layouts (never on cuBLASLt's FP8 path)."""
    modules = [(module, name, blocks) for module in model.modules()
               for name in getattr(module, "fp8_weights", {})
               if (blocks := scales(module, name)) is not None and blocks.block_n > 1
               and getattr(module, name).dim() == 2 and not fp8_weight_only(blocks.block_k)]
    with torch.no_grad():
        for module, name, blocks in modules:
            rows = per_row_scales(blocks, getattr(module, name).shape[0])
            # A buffer, not a parameter: it is derived, never loaded or saved.
            module.register_buffer(name + ROW_SCALE_SUFFIX, rows.scale, persistent=False)
    if modules:
        logger.info("copied dense FP8 projections' block scales per weight row",
                    extra={"projections": len(modules)})


def _regroup_module(module: nn.Module, stored: dict[str, BlockScales]) -> None:
    """Regroups `module`'s weights named in `stored` (their MXFP8 scales)."""
    for name, groups in stored.items():
        weight = getattr(module, name)
        *lead, n, k = weight.shape
        regrouped = torch.empty(*lead, -(-k // REGROUPED_BLOCK_K), n,
                                device=weight.device).transpose(-1, -2)
        for index in itertools.product(*map(range, lead)):
            for row in range(0, n, REGROUP_ROWS):
                rows = slice(row, row + REGROUP_ROWS)
                values, block_scales = regroup_mxfp8(
                    weight[index][rows], BlockScales(groups.scale[index][rows], 1, groups.block_k))
                weight[index][rows] = values
                regrouped[index][rows] = block_scales.scale
        setattr(module, name + SCALE_SUFFIX, nn.Parameter(regrouped, requires_grad=False))
    module.__dict__["fp8_block"] = (1, REGROUPED_BLOCK_K)


def _exempt(module_name: str, patterns: tuple[str, ...]) -> bool:
    """As transformers matches `modules_to_not_convert`: a pattern (a regex) from the start of
    the name up to a module boundary, or a suffix; names may carry the checkpoint's
    `language_model.` prefix."""
    names = (module_name, f"language_model.{module_name}")
    return any(re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(pattern)
               for pattern in patterns for name in names)


def _quantize_param(module: nn.Module, full_name: str, name: str, stacked: int,
                    config: FP8Config) -> None:
    weight = getattr(module, name)
    *lead, n, k = weight.shape
    blocks = {weight.dim() - 2: config.block_n, weight.dim() - 1: config.block_k}
    spec = module.__dict__.get("shard_specs", {}).get(name)
    split = spec is not None and spec.dim is not None and spec.parts > 1
    if stacked > 1 or split:
        # A piece of a matrix (a stacked one, or this rank's share) must be whole scale
        # blocks, or the scales would not split with it.
        dim = spec.dim if split else weight.dim() - 2
        extent = weight.shape[dim] // (stacked if dim == weight.dim() - 2 else 1)
        if extent % blocks[dim]:
            raise ModelLoadError(
                f"FP8 weight {full_name}: pieces of {extent} along dim {dim} are not whole "
                f"scale blocks of {blocks[dim]}; pick a tensor_parallel_size that keeps them "
                "whole (or expert_parallel for the experts)")
    setattr(module, name, nn.Parameter(torch.empty(weight.shape, dtype=E4M3,
                                                   device=weight.device), requires_grad=False))
    scale_shape = (*lead, -(-n // config.block_n), -(-k // config.block_k))
    scale_dtype = E8M0_STORAGE if config.e8m0_scales else torch.float32
    setattr(module, name + SCALE_SUFFIX, nn.Parameter(
        torch.empty(scale_shape, dtype=scale_dtype, device=weight.device), requires_grad=False))
    if spec is not None:
        set_shard(module, name + SCALE_SUFFIX, spec)
    module.__dict__["fp8_block"] = (config.block_n, config.block_k)

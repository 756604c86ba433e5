"""RMSNorms: Llama's scales by `weight`, Gemma's (MiniMax-M3's) by `1 + weight`; both
normalize in fp32."""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels import reference
from kernels.reference import rms_normalize
from worker.layers.fused import fused


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * rms_normalize(x, eps).to(x.dtype)


gemma_rms_norm = fused(reference.gemma_rms_norm)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, quantized: kernels.ActivationLayout | None = None
                ) -> torch.Tensor | kernels.QuantizedRows:
        """The normed x, or, given the layout an FP8 projection takes (`input_layout`), the
        normed x quantized for it by the same kernel."""
        if quantized is None:
            return gemma_rms_norm(x, self.weight, self.eps)
        return kernels.gemma_rms_norm_quantized(x, self.weight, self.eps, quantized)

    def normed_and_quantized(self, x: torch.Tensor, quantized: kernels.ActivationLayout
                             ) -> tuple[torch.Tensor, kernels.QuantizedRows]:
        """The normed x both as it is and quantized as `quantized` says, from one kernel: for
        layers that take x in both forms (the MoE's experts and its FP8 shared expert)."""
        plain = torch.empty_like(x, memory_format=torch.contiguous_format)
        return plain, kernels.gemma_rms_norm_quantized(x, self.weight, self.eps, quantized,
                                                       plain)

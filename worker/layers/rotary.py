"""Rotary position embeddings in the rotate_half layout: full-width RoPE from tables computed
once per shape (the Llama family), and partial RoPE over a head's leading channels with tables
computed per step (MiniMax-M3)."""

from __future__ import annotations

import functools

import torch

from worker.layers.fused import fused


@functools.lru_cache(maxsize=8)
def rope_tables(dim: int, theta: float, max_positions: int, device: torch.device):
    """(cos, sin) [max_positions, dim / 2] float32, computed once per shape and device."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float,
               max_positions: int) -> torch.Tensor:
    """Half-split ("rotate_half") RoPE, the Hugging Face Llama convention; x [T, heads, dim]."""
    cos, sin = rope_tables(x.shape[-1], theta, max_positions, x.device)
    return rotate_half(x, positions, cos, sin)


@fused
def rotate_half(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@functools.lru_cache(maxsize=8)
def _inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                         device=device) / rotary_dim))


def rotary_tables(positions: torch.Tensor, rotary_dim: int,
                  theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, rotary_dim] fp32, each frequency twice (the rotate_half layout)."""
    freqs = positions.float()[:, None] * _inv_freq(rotary_dim, theta, positions.device)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


@fused
def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first cos.shape[-1] channels of x [T, heads, dim]; the rest pass through.
    A head narrower than the tables (a small index head) takes the tables' leading columns,
    as the reference does."""
    width = min(cos.shape[-1], x.shape[-1])
    cos, sin = cos[:, None, :width], sin[:, None, :width]
    rotated, rest = x[..., :width].float(), x[..., width:]
    first, second = rotated.chunk(2, dim=-1)
    out = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((out.to(x.dtype), rest), dim=-1)

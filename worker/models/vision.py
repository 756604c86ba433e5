"""The vision tower: one image or video (patches from `preprocess.patchify`) to token embeddings.

Patch rows arrive merge window by merge window, so the merger folds each window's
merge_size^2 consecutive patches into one token with a reshape. Positions are 2D rotary: half
of each head's rotary frequencies turn with the patch's row, half with its column.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.config import VisionConfig


def patch_coordinates(grid_thw: tuple[int, int, int], merge: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every patch, in the window-major order of the patch rows."""
    t, h, w = grid_thw
    rows = torch.arange(h, device=device).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge,
                                                                                merge)
    cols = torch.arange(w, device=device).view(1, 1, w // merge, merge).expand(h // merge, merge,
                                                                                -1, -1)
    # [h/m, m, w/m, m] -> window-major [h/m, w/m, m, m], repeated for every temporal patch
    rows, cols = (x.permute(0, 2, 1, 3).reshape(-1).repeat(t) for x in (rows, cols))
    return rows, cols


def rotary_2d(grid_thw: tuple[int, int, int], merge: int, head_dim: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [patches, head_dim] for rotate-half RoPE on 2D patch positions."""
    rows, cols = patch_coordinates(grid_thw, merge, device)
    quarter = head_dim // 4
    inv_freq = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32)
                                  / quarter))
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half pairs dims i and i + head_dim/2
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        patches = x.shape[0]
        q, k, v = self.qkv(x).view(patches, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
        # Every patch of an item sees every other (no causal mask).
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))
        return self.proj(out[0].transpose(0, 1).reshape(patches, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.intermediate_size),
                                 nn.GELU(approximate="tanh"),
                                 nn.Linear(config.intermediate_size, config.hidden_size))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge^2 neighbouring patches -> one token of the text model's width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(),
                                 nn.Linear(merged, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self.mlp[0].in_features
        return self.mlp(self.ln_q(x).reshape(-1, window))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor,
                grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """pixel_values [t*h*w, patch_dim] of one item -> embeddings [t*h*w / merge^2, hidden]."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        cos, sin = rotary_2d(grid_thw, self.config.spatial_merge_size,
                             self.config.hidden_size // self.config.num_heads, x.device)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.merger(x)

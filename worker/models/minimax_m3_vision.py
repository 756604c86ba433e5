"""MiniMax-M3's vision tower and projector: one image (patches from `preprocess.patchify`) to
text-model embeddings, as transformers' `MiniMaxM3VLVisionModel` + `MultiModalProjector` do.

A CLIP-like ViT: the patch embedding is a Conv3d over (temporal, row, column) patches, which on
flattened patches is one matrix product; then a pre-layernorm, pre-norm encoder layers with
bidirectional attention over the item's patches, and axial rotary positions (a band of
frequencies each for the patch's time, row and column; the last channels of a head pass
through). The projector lifts every patch to the text width (GELU MLP), then folds each
merge x merge window (consecutive rows: patches arrive window by window) into one token with
a second GELU MLP.

Parameter names are the released checkpoint's (`vision_tower.vision_model.*`,
`multi_modal_projector.*`, `patch_merge_mlp.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.config import VisionConfig
from worker.models.vision import patch_coordinates


def axial_rotary(grid_thw: tuple[int, int, int], merge: int, head_dim: int, theta: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [patches, 3 * band] for the rotated leading channels of every head."""
    band = 2 * ((head_dim // 3) // 2)  # channels per axis
    inv_freq = 1.0 / (theta ** (torch.arange(0, band, 2, dtype=torch.float32, device=device)
                                / band))
    t, h, w = grid_thw
    rows, cols = patch_coordinates(grid_thw, merge, device)
    times = torch.arange(t, device=device).repeat_interleave(h * w)
    positions = torch.stack([times, rows, cols], dim=-1).float()  # [patches, 3]: t, row, col
    freqs = (positions[..., None] * inv_freq).flatten(1)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_leading(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    width = cos.shape[-1]
    rotated, rest = x[..., :width].float(), x[..., width:]
    first, second = rotated.chunk(2, dim=-1)
    out = rotated * cos[:, None] + torch.cat((-second, first), dim=-1) * sin[:, None]
    return torch.cat((out.to(x.dtype), rest), dim=-1)


class M3VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = width // config.num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        patches = x.shape[0]

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(patches, self.num_heads, self.head_dim)

        q = _rotate_leading(heads(self.q_proj), cos, sin)
        k = _rotate_leading(heads(self.k_proj), cos, sin)
        # Every patch of an item sees every other (no causal mask).
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None]
                                               for t in (q, k, heads(self.v_proj))))
        return self.out_proj(out[0].transpose(0, 1).reshape(patches, -1))


class M3VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class M3VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = M3VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = M3VisionMLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin)
        return x + self.mlp(self.layer_norm2(x))


class M3VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv3d(
            config.in_channels, config.hidden_size, bias=False,
            kernel_size=(config.temporal_patch_size, config.patch_size, config.patch_size))
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(M3VisionLayer(config) for _ in range(config.depth))


class MergeMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class M3VisionTower(nn.Module):
    """pixel_values [t*h*w, patch_dim] of one item -> embeddings [t*h*w / merge^2, text width].
    Registered on the model as `visual`, with the checkpoint's three top-level prefixes."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = M3VisionModel(config)
        projector = config.projector_hidden_size
        self.multi_modal_projector = MergeMLP(config.hidden_size, projector,
                                              config.out_hidden_size)
        self.patch_merge_mlp = MergeMLP(config.out_hidden_size * config.spatial_merge_size ** 2,
                                        projector, config.out_hidden_size)

    def forward(self, pixel_values: torch.Tensor,
                grid_thw: tuple[int, int, int]) -> torch.Tensor:
        vit = self.vision_tower.vision_model
        weight = vit.embeddings.patch_embedding.weight
        x = F.linear(pixel_values.to(weight.dtype), weight.flatten(1))
        cos, sin = axial_rotary(grid_thw, self.config.spatial_merge_size,
                                self.config.hidden_size // self.config.num_heads,
                                self.config.rope_theta, x.device)
        x = vit.pre_layrnorm(x)
        for layer in vit.encoder.layers:
            x = layer(x, cos, sin)
        x = self.multi_modal_projector(x)
        window = self.config.spatial_merge_size ** 2
        return self.patch_merge_mlp(x.reshape(x.shape[0] // window, -1))

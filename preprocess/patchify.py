"""Normalization and patchify: resized RGB frames to the vision tower's `pixel_values`."""

from __future__ import annotations

import numpy as np

from preprocess.config import VisionGeometry


def patchify(frames: np.ndarray,
             geometry: VisionGeometry) -> tuple[np.ndarray, tuple[int, int, int]]:
    """frames uint8 [T, H, W, 3] (H, W multiples of geometry.factor) ->
    (pixel_values float16 [t * h * w, 3 * temporal_patch * patch^2], grid (t, h, w) in patches).

    float16 halves what travels to the model replica; normalized pixels lie within +-3, where
    float16 keeps 3 significant digits, more than the bf16 tower computes with.

    Rows are ordered merge window by merge window (the merge_size^2 patches of one window are
    consecutive), so the tower's merger concatenates neighbours by a plain reshape. Each row is
    channel-major, then time, then the patch's rows and columns.
    """
    p, tp, m = geometry.patch_size, geometry.temporal_patch_size, geometry.merge_size
    if frames.shape[0] % tp:  # an image, or a video's last frame, repeated to fill the patch
        repeat = tp - frames.shape[0] % tp
        frames = np.concatenate([frames, np.repeat(frames[-1:], repeat, axis=0)])
    t, height, width = frames.shape[0] // tp, frames.shape[1] // p, frames.shape[2] // p
    # Reorder while still uint8 (a quarter of the bytes to move), then normalize through a
    # 256-entry table per channel: no float32 copy of the frames is ever made.
    x = frames.reshape(t, tp, height // m, m, p, width // m, m, p, 3)
    # -> [t, h/m, w/m, m (row in window), m (col in window), C, tp, p, p]
    x = np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7))
    x = x.reshape(t * height * width, 3, tp * p * p)
    out = np.empty(x.shape, dtype=np.float16)
    for channel, table in enumerate(normalization_table(geometry)):
        out[:, channel] = table[x[:, channel]]
    return out.reshape(t * height * width, -1), (t, height, width)


def normalization_table(geometry: VisionGeometry) -> np.ndarray:
    """float16 [3, 256]: (value / 255 - mean) / std of every uint8 value, per channel."""
    mean = np.asarray(geometry.mean, dtype=np.float64)[:, None]
    std = np.asarray(geometry.std, dtype=np.float64)[:, None]
    return ((np.arange(256, dtype=np.float64)[None, :] / 255.0 - mean) / std).astype(np.float16)


def num_tokens(grid: tuple[int, int, int], geometry: VisionGeometry) -> int:
    """Placeholder tokens an item expands to: one per merge window."""
    t, h, w = grid
    return t * h * w // geometry.merge_size ** 2

"""The resize policy: keep the aspect ratio, land on whole merge windows, stay in budget."""

from __future__ import annotations

import math

from preprocess.errors import MediaError

MAX_ASPECT_RATIO = 200


def fit_size(height: int, width: int, factor: int, min_pixels: int,
             max_pixels: int) -> tuple[int, int]:
    """(height, width) that are multiples of `factor`, as close to the input's aspect ratio as
    rounding allows, with min_pixels <= height * width <= max_pixels (when the budget admits
    a factor x factor tile at all)."""
    if height <= 0 or width <= 0:
        raise MediaError(f"the image is empty ({width}x{height} pixels)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w

"""Images: bytes to resized RGB pixels with Pillow."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from preprocess.config import MediaConfig, VisionGeometry
from preprocess.errors import MediaError
from preprocess.resize import fit_size

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_frames(data: bytes, config: MediaConfig, geometry: VisionGeometry) -> np.ndarray:
    """uint8 [1, H, W, 3]: decoded, EXIF-upright, RGB, resized by the policy."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > config.max_image_pixels:
                raise MediaError(f"the image is {width}x{height} pixels; this server decodes at "
                                 f"most {config.max_image_pixels} pixels per image")
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            upright = (width, height) if orientation not in _TRANSPOSED else (height, width)
            target_h, target_w = fit_size(upright[1], upright[0], geometry.factor,
                                          *config.image_budget(geometry))
            # JPEG decodes straight to a smaller scale (1/2, 1/4, 1/8) that still covers the
            # target: a 1080p photo resized to ~1 MP never decodes all of its pixels.
            draft_size = (target_w, target_h) if orientation not in _TRANSPOSED \
                else (target_h, target_w)
            image.draft("RGB", draft_size)
            image.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"the image was refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's decode errors
        raise MediaError(f"the image could not be decoded: {exc}") from None
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    if image.size != (target_w, target_h):
        image = image.resize((target_w, target_h), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)[None]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparent images are composited on white (what a viewer shows); others converted."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image

"""Synthetic media for the preprocess tests, made in memory with Pillow and PyAV."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

from preprocess.sources import data_url

__all__ = ["data_url", "encode_audio_only", "encode_image", "encode_video", "gray_frame"]


def encode_image(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def gray_frame(level: int, width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), level % 256, dtype=np.uint8)


def encode_video(num_frames: int, fps: int, codec: str = "mpeg4", container: str = "mp4",
                 width: int = 64, height: int = 48, options: dict | None = None) -> bytes:
    """Frame i is uniformly gray at level 7 * i mod 256, so a decoded frame tells its index."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if codec != "ffv1" else "yuv444p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(gray_frame(7 * i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def encode_audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as output:
        stream = output.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()

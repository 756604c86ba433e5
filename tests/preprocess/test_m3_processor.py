"""The preprocess tier against transformers' MiniMaxM3VLImageProcessor, with the settings both
read from the same checkpoint's preprocessor_config.json: the same resize (grid_thw equal) and
pixel_values that agree up to the two libraries' bicubic filters."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from preprocess import MediaConfig, VisionGeometry
from preprocess.image import image_frames
from preprocess.patchify import patchify
from preprocess.processor import MediaPart, process_part
from preprocess.sources import data_url
from tests.preprocess.media_files import encode_image
from worker.checkpoint import inspect_model
from worker.tiny_model import make_m3_checkpoint

transformers = pytest.importorskip("transformers", minversion="5.23")
pytest.importorskip("torchvision", reason="transformers' M3 image processor runs on torchvision")

# (width, height): tiny (upscaled to the minimum), 1080p (downscaled to the budget), a 200:1
# panorama (the widest aspect allowed), portrait.
SIZES = [(20, 30), (1920, 1080), (4000, 20), (720, 1280)]


@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory):
    return make_m3_checkpoint(tmp_path_factory.mktemp("tiny-m3-processor"))


def _geometry(m3_dir) -> VisionGeometry:
    return VisionGeometry.for_model(inspect_model(m3_dir).config.vision)


def _picture(width: int, height: int) -> np.ndarray:
    """Smooth gradients and a few edges: what a bicubic filter is sensitive to."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                       127 + 120 * np.sin(x / 7.0) * np.cos(y / 5.0)], axis=-1)
    pixels[height // 3: height // 2, width // 4: width // 2] = (250, 20, 60)
    return pixels.astype(np.uint8)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_processor_parity(m3_dir, size):
    theirs_processor = transformers.AutoImageProcessor.from_pretrained(str(m3_dir))
    assert type(theirs_processor).__name__ == "MiniMaxM3VLImageProcessor"
    pixels = _picture(*size)
    theirs = theirs_processor(images=[Image.fromarray(pixels)], return_tensors="np")
    frames = image_frames(encode_image(Image.fromarray(pixels), "PNG"), MediaConfig(),
                          _geometry(m3_dir))
    ours, grid = patchify(frames, _geometry(m3_dir))
    assert list(grid) == theirs["image_grid_thw"][0].tolist()
    difference = np.abs(ours.astype(np.float32) - theirs["pixel_values"])
    # Ours travel as float16, and PIL's and torchvision's bicubic filters differ by a level
    # out of 255 here and there: measured, mean 2e-4 to 4e-4, max 0.03 (one level is 0.015).
    assert difference.mean() < 1e-3 and difference.max() < 0.05, \
        (difference.mean(), np.quantile(difference, 0.99), difference.max())


def test_the_preprocess_tier_reads_the_checkpoints_processor(m3_dir):
    """The resize budget comes from preprocessor_config.json (M3's 451,584 pixels, not the
    Qwen2-VL default), unless the operator sets one."""
    geometry = _geometry(m3_dir)
    assert (geometry.min_pixels, geometry.max_pixels) == (3136, 451584)
    assert MediaConfig().image_budget(geometry) == (3136, 451584)
    assert MediaConfig(max_pixels=100_000).image_budget(geometry) == (3136, 100_000)


def _moving_clip(width: int = 320, height: int = 240, frames: int = 48, fps: int = 8) -> bytes:
    """A lossless H.264 clip of a picture that moves: every sampled frame differs."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"crf": "0"}
        y, x = np.mgrid[0:height, 0:width]
        for i in range(frames):
            picture = np.stack([(x * 255 / width + 5 * i) % 256, y * 255 / height,
                                128 + 100 * np.sin((x + 4 * i) / 9.0)], axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture.astype(np.uint8),
                                                                   format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def test_video_processor_parity(m3_dir):
    """A 6 s clip sampled at M3's 1 fps (from the checkpoint's processor settings): the frames
    we sample, fed to transformers' MiniMaxM3VLVideoProcessor, give our grid and, up to the
    two resize paths (ours scales from YUV in one swscale pass), our pixel_values."""
    clip = _moving_clip()
    ours = process_part(MediaPart("video", data_url(clip, "video/mp4")), MediaConfig(),
                        _geometry(m3_dir))
    assert ours.frame_times == (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    with av.open(io.BytesIO(clip)) as container:
        decoded = [(frame.time, frame.to_ndarray(format="rgb24"))
                   for frame in container.decode(video=0)]
    frames = np.stack([min(decoded, key=lambda d: abs(d[0] - t))[1] for t in ours.frame_times])
    processor = transformers.models.minimax_m3_vl.video_processing_minimax_m3_vl \
        .MiniMaxM3VLVideoProcessor()
    theirs = processor(videos=[frames], return_tensors="np", do_sample_frames=False)
    assert theirs["video_grid_thw"].tolist() == [list(ours.grid_thw)] == [[3, 18, 22]]
    difference = np.abs(ours.pixel_values.astype(np.float32) - theirs["pixel_values_videos"])
    # measured: mean 0.0035, max 0.044 (three levels out of 255)
    assert difference.mean() < 0.01 and difference.max() < 0.1, \
        (difference.mean(), difference.max())

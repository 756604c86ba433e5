"""Preprocessing: golden resize/patchify values, frame sampling, and every bad input's error."""

from __future__ import annotations

import asyncio
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from preprocess import MediaConfig, MediaError, MediaProcessor, VisionGeometry
from preprocess.patchify import normalization_table, patchify
from preprocess.processor import MediaPart, media_part, process_part
from preprocess.resize import fit_size
from tests.preprocess.media_files import (
    data_url,
    encode_audio_only,
    encode_image,
    encode_video,
)

QWEN_LIKE = VisionGeometry(patch_size=14, temporal_patch_size=2, merge_size=2)
SMALL = VisionGeometry(patch_size=2, temporal_patch_size=2, merge_size=2)  # factor 4
# A budget wide enough that small test images keep their size (rounded to the factor).
KEEP_SIZE = MediaConfig(min_pixels=16, max_pixels=10**6, video_max_pixels=10**6)


def image_part(data: bytes, mime: str = "image/png") -> MediaPart:
    return MediaPart("image", data_url(data, mime))


# -- resize policy -----------------------------------------------------------------------------
@pytest.mark.parametrize("size, budget, expected", [
    ((1080, 1920), (56 * 56, 1280 * 28 * 28), (728, 1316)),  # 1080p shrunk into the budget
    ((10, 20), (56 * 56, 1280 * 28 * 28), (56, 84)),  # tiny image grown to the minimum
    ((300, 500), (56 * 56, 1280 * 28 * 28), (308, 504)),  # within budget: nearest multiples
])
def test_fit_size_golden(size, budget, expected):
    assert fit_size(*size, 28, *budget) == expected
    h, w = expected
    assert h % 28 == 0 and w % 28 == 0 and budget[0] <= h * w <= budget[1]


def test_fit_size_refuses_empty_and_extreme_aspect():
    with pytest.raises(MediaError, match="empty"):
        fit_size(0, 10, 28, 1, 10**6)
    with pytest.raises(MediaError, match="aspect ratio"):
        fit_size(1, 300, 28, 1, 10**6)


# -- patchify ----------------------------------------------------------------------------------
def test_patchify_constant_image_golden():
    frames = np.zeros((1, 28, 56, 3), dtype=np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 200, 100, 0
    pixel_values, grid = patchify(frames, QWEN_LIKE)
    assert grid == (1, 2, 4) and pixel_values.shape == (8, 3 * 2 * 14 * 14)
    assert pixel_values.dtype == np.float16
    per_channel = 2 * 14 * 14
    red, green, blue = (pixel_values[:, c * per_channel:(c + 1) * per_channel] for c in range(3))
    # (value / 255 - CLIP mean) / CLIP std, in float16
    np.testing.assert_array_equal(red, np.float16(1.1274))
    np.testing.assert_array_equal(green, np.float16(-0.2513))
    np.testing.assert_array_equal(blue, np.float16(-1.48))
    assert float(normalization_table(QWEN_LIKE)[0, 255]) == pytest.approx(1.9303, abs=1e-3)


def test_patchify_order_matches_a_loop():
    """Rows go merge window by window; each row is channel, time, patch row, patch column."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 8, 12, 3), dtype=np.uint8)  # 3 frames: one repeated
    pixel_values, grid = patchify(frames, SMALL)
    assert grid == (2, 4, 6)
    padded = np.concatenate([frames, frames[-1:]])
    table = normalization_table(SMALL)
    p, m = 2, 2
    rows = []
    for t in range(2):
        for wr in range(4 // m):
            for wc in range(6 // m):
                for r in range(m):
                    for c in range(m):
                        y, x = (wr * m + r) * p, (wc * m + c) * p
                        patch = padded[2 * t:2 * t + 2, y:y + p, x:x + p, :]  # [tp, p, p, C]
                        rows.append(np.concatenate([table[ch][patch[..., ch].ravel()]
                                                    for ch in range(3)]))
    np.testing.assert_array_equal(pixel_values, np.stack(rows))


# -- images ------------------------------------------------------------------------------------
def test_image_to_model_input():
    image = Image.new("RGB", (1920, 1080), (10, 200, 30))
    item = process_part(image_part(encode_image(image, "JPEG", quality=95), "image/jpeg"),
                        MediaConfig(), QWEN_LIKE)
    assert item.grid_thw == (1, 728 // 14, 1316 // 14)
    assert item.pixel_values.shape == (52 * 94, 1176)
    assert item.num_tokens == 52 * 94 // 4
    again = process_part(image_part(encode_image(image, "PNG")), MediaConfig(), QWEN_LIKE)
    other = process_part(image_part(encode_image(Image.new("RGB", (1920, 1080), (11, 200, 30)),
                                                 "PNG")), MediaConfig(), QWEN_LIKE)
    assert again.content_hash != other.content_hash
    assert again.content_hash == process_part(image_part(encode_image(image, "PNG")),
                                              MediaConfig(), QWEN_LIKE).content_hash


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode_image(stored, "JPEG", quality=95, exif=exif.tobytes())
    frames = process_part(image_part(data, "image/jpeg"), KEEP_SIZE, SMALL)
    assert frames.grid_thw == (1, 20, 10)  # upright: 20 wide, 40 tall
    from preprocess.image import image_frames
    pixels = image_frames(data, KEEP_SIZE, SMALL)[0]
    assert pixels.shape == (40, 20, 3)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # the left half is now on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


@pytest.mark.parametrize("mode, color, expected", [
    ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white background
    ("LA", (50, 255), (50, 50, 50)),
    ("L", 80, (80, 80, 80)),
    ("P", 0, (0, 0, 0)),
])
def test_modes_become_rgb(mode, color, expected):
    from preprocess.image import image_frames
    pixels = image_frames(encode_image(Image.new(mode, (8, 8), color), "PNG"), KEEP_SIZE, SMALL)
    assert pixels.shape == (1, 8, 8, 3)
    assert tuple(pixels[0, 4, 4]) == expected


# -- video -------------------------------------------------------------------------------------
def test_video_sampling_picks_expected_frames():
    # 32 frames at 10 fps (3.2 s), sampled at 2 fps: t = 0, 0.5, ..., 3.0 -> frames 0, 5, .., 30.
    data = encode_video(32, fps=10)
    item = process_part(MediaPart("video", data_url(data, "video/mp4")),
                        KEEP_SIZE.model_copy(update={"video_fps": 2.0}), SMALL)
    assert item.frame_times == pytest.approx((0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0))
    assert item.grid_thw == (4, 24, 32)  # 7 frames padded to 8, 2 per temporal patch
    from preprocess.video import video_frames
    frames, _ = video_frames(data, KEEP_SIZE, SMALL)
    levels = frames[:, 24, 32, 1].astype(int)
    np.testing.assert_allclose(levels, [7 * i for i in (0, 5, 10, 15, 20, 25, 30)], atol=4)


def test_h264_with_b_frames_samples_at_or_just_after_each_time():
    data = encode_video(90, fps=30, codec="libx264", options={"bframes": "3", "g": "30"})
    from preprocess.video import video_frames
    frames, times = video_frames(data, KEEP_SIZE.model_copy(update={"video_fps": 4.0}), SMALL)
    targets = [i / 4 for i in range(12)]
    assert len(times) == 12 and times == sorted(times)
    for target, time_s in zip(targets, times):
        assert target - 1e-6 <= time_s <= target + 4 / 30  # at most a few frames late
    index = np.rint(np.asarray(times) * 30).astype(int)
    np.testing.assert_allclose(frames[:, 24, 32, 1].astype(int), (7 * index) % 256, atol=6)


# -- bad inputs: each a MediaError whose message says what is wrong ----------------------------
def zero_width_png() -> bytes:
    png = bytearray(encode_image(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4:ihdr + 8] = struct.pack(">I", 0)
    png[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr:ihdr + 17])))
    return bytes(png)


BAD_INPUTS = {
    "truncated jpeg": (lambda: image_part(encode_image(Image.new("RGB", (64, 64), (1, 2, 3)),
                                                       "JPEG")[:200], "image/jpeg"),
                       {}, "could not be decoded"),
    "png bomb": (lambda: image_part(encode_image(Image.new("L", (3000, 3000)), "PNG")),
                 {"max_image_pixels": 1_000_000}, "3000x3000 pixels"),
    "zero-size image": (lambda: image_part(zero_width_png()), {}, "image"),
    "not an image": (lambda: image_part(b"hello"), {}, "could not be decoded"),
    "no video stream": (lambda: MediaPart("video", data_url(encode_audio_only(), "audio/wav")),
                        {}, "no video stream"),
    "unsupported codec": (lambda: MediaPart("video", data_url(
        encode_video(4, fps=10, codec="ffv1", container="matroska"), "video/x-matroska")),
        {}, "codec 'ffv1' is not supported"),
    "too many frames": (lambda: MediaPart("video", data_url(encode_video(32, fps=10),
                                                            "video/mp4")),
                        {"max_video_frames": 3}, "at most 3 frames"),
    "too many pixels": (lambda: MediaPart("video", data_url(encode_video(4, fps=10),
                                                            "video/mp4")),
                        {"max_video_frame_size": 1000}, "64x48"),
    "not a video": (lambda: MediaPart("video", data_url(b"\x00" * 64, "video/mp4")), {},
                    "could not be opened"),
    "path outside the allowed dir": (lambda: MediaPart("image", "file:///etc/passwd"),
                                     {"allowed_local_dir": "/tmp"}, "outside the allowed"),
    "file urls disabled": (lambda: MediaPart("image", "file:///tmp/x.png"), {},
                           "file:// URLs are disabled"),
    "url with fetching off": (lambda: MediaPart("image", "https://example.com/cat.png"), {},
                              "fetching media from URLs is off"),
    "url off the allow-list": (lambda: MediaPart("image", "https://evil.example/cat.png"),
                               {"allowed_url_prefixes": ["https://media.example/"]},
                               "not under an allowed URL prefix"),
    "not base64": (lambda: MediaPart("image", "data:image/png;base64,@@@@"), {},
                   "not valid base64"),
    "oversized item": (lambda: image_part(b"x" * 4096), {"max_input_bytes": 1024},
                       "at most 1024 bytes"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_clear_media_error(name):
    make_part, settings, message = BAD_INPUTS[name]
    with pytest.raises(MediaError, match=message):
        process_part(make_part(), MediaConfig(**settings), QWEN_LIKE)


def test_content_parts_are_parsed_or_refused():
    assert media_part({"type": "text", "text": "hi"}) is None
    assert media_part({"type": "image_url", "image_url": {"url": "data:x"}}) == \
        MediaPart("image", "data:x")
    assert media_part({"type": "video_url", "video_url": "data:y"}) == MediaPart("video", "data:y")
    with pytest.raises(MediaError, match="unsupported content part type 'audio'"):
        media_part({"type": "audio", "audio": {}})
    with pytest.raises(MediaError, match="needs"):
        media_part({"type": "image_url", "image_url": {}})


# -- the processor: off the event loop, a pool for many items ------------------------------------
def test_processor_keeps_the_event_loop_free():
    video = MediaPart("video", data_url(encode_video(120, fps=30, width=640, height=480),
                                        "video/mp4"))
    image = image_part(encode_image(Image.new("RGB", (640, 480), (9, 9, 9)), "PNG"))
    processor = MediaProcessor(MediaConfig(workers=2), QWEN_LIKE)

    async def main():
        gaps = []

        async def ticker():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        single = await processor.process([video])
        pooled = await processor.process([video, image])
        task.cancel()
        return single, pooled, gaps

    try:
        single, pooled, gaps = asyncio.run(main())
    finally:
        processor.close()
    assert [p.content_hash for p in pooled] == [single[0].content_hash,
                                                 process_part(image, MediaConfig(),
                                                              QWEN_LIKE).content_hash]
    assert len(gaps) >= 10 and max(gaps) < 0.5, f"the loop stalled for {max(gaps):.2f} s"
    with pytest.raises(MediaError, match="at most 1 media items|at most 1"):
        asyncio.run(MediaProcessor(MediaConfig(max_items_per_request=1), QWEN_LIKE)
                    .process([image, image]))

"""Preprocessing benchmark: images/s and video seconds/s on one CPU core, against a naive baseline.

Workloads (shared/workloads.md): 1080p JPEG photos to model inputs, and a 30 s 720p H.264 clip
sampled at 2 fps. The process is pinned to one core, so ffmpeg's decoder threads and numpy share
it: the figures are per core. Both pipelines end in the same `pixel_values` for the
Qwen2-VL-like geometry (14-pixel patches, 2 x 2 merge, 2-frame temporal patches).
- ours: `preprocess.processor.process_part` (JPEG draft decoding, non-reference frames skipped,
  only sampled frames converted and scaled by swscale, table normalization);
- naive: Pillow decodes the whole JPEG and resizes it; for video PyAV decodes every frame,
  converts each to a Pillow image and resizes each, then the frames at the sampled times are
  kept; normalization and patchify in float32 numpy.

Usage: python bench/preprocess.py [--images 20] [--video-seconds 30]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, write_results  # noqa: E402
from preprocess import MediaConfig, VisionGeometry  # noqa: E402
from preprocess.processor import MediaPart, process_part  # noqa: E402
from preprocess.resize import fit_size  # noqa: E402
from preprocess.sources import data_url  # noqa: E402

GEOMETRY = VisionGeometry(patch_size=14, temporal_patch_size=2, merge_size=2)
# The budgets spelled out (the defaults defer to a model's processor config).
CONFIG = MediaConfig(min_pixels=56 * 56, max_pixels=1280 * 28 * 28,
                     video_max_pixels=256 * 28 * 28, video_fps=2.0)


def synthetic_picture(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients, shapes and mild noise: compresses like a photo, not like static."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 255, y / height * 255,
                      (np.sin(x / 37 + seed) * np.cos(y / 23)) * 127 + 128], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(20, 200)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def make_jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_picture(1920, 1080, seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_clip(seconds: int, fps: int = 30) -> bytes:
    """720p H.264 (libx264 defaults: B-frames, keyframe at most every 250 frames)."""
    base = synthetic_picture(1280 + 8 * seconds * fps // 4, 720, seed=7)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for i in tqdm(range(seconds * fps), desc="encoding the clip", unit="frame"):
            shift = 2 * i  # a slow pan
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, shift:shift + 1280]),
                                               format="rgb24")
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def naive_patchify(frames: np.ndarray) -> np.ndarray:
    p, tp, m = GEOMETRY.patch_size, GEOMETRY.temporal_patch_size, GEOMETRY.merge_size
    if frames.shape[0] % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - frames.shape[0] % tp, 0)])
    x = (frames.astype(np.float32) / 255 - np.float32(GEOMETRY.mean)) / np.float32(GEOMETRY.std)
    t, h, w = frames.shape[0] // tp, frames.shape[1] // p, frames.shape[2] // p
    x = x.reshape(t, tp, h // m, m, p, w // m, m, p, 3).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x).reshape(t * h * w, -1)


def naive_image(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    h, w = fit_size(image.height, image.width, GEOMETRY.factor, CONFIG.min_pixels,
                    CONFIG.max_pixels)
    return naive_patchify(np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))[None])


def naive_video(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base)
        h, w = fit_size(stream.height, stream.width, GEOMETRY.factor, CONFIG.min_pixels,
                        CONFIG.video_max_pixels)
        decoded = [(frame.time, np.asarray(frame.to_image().resize((w, h),
                                                                   Image.Resampling.BICUBIC)))
                   for frame in container.decode(stream)]
    times = [i / CONFIG.video_fps for i in range(math.ceil(duration * CONFIG.video_fps))]
    picked, index = [], 0
    for target in times:
        while index < len(decoded) - 1 and decoded[index][0] < target - 1e-6:
            index += 1
        picked.append(decoded[index][1])
    return naive_patchify(np.stack(picked))


def best_of(runs: int, fn) -> float:
    """Fastest of `runs` timings (seconds): the least disturbed by the machine."""
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--video-seconds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    jpegs = [make_jpeg(seed) for seed in range(args.images)]
    clip = make_clip(args.video_seconds)
    # Requests carry media as data: URLs; ours decodes the base64 inside its timing.
    image_parts = [MediaPart("image", data_url(data, "image/jpeg")) for data in jpegs]
    video_part = MediaPart("video", data_url(clip, "video/mp4"))

    def ours_video():
        return process_part(video_part, CONFIG, GEOMETRY)

    # Same model input shapes from both pipelines (the figures compare equal work).
    ours_item = ours_video()
    assert ours_item.pixel_values.shape == naive_video(clip).shape
    assert process_part(image_parts[0], CONFIG, GEOMETRY).pixel_values.shape == \
        naive_image(jpegs[0]).shape

    figures = {}
    for name, fn, units in (
            ("naive images", lambda: [naive_image(d) for d in jpegs], len(jpegs)),
            ("ours images", lambda: [process_part(p, CONFIG, GEOMETRY) for p in image_parts],
             len(jpegs)),
            ("naive video", lambda: naive_video(clip), args.video_seconds),
            ("ours video", ours_video, args.video_seconds)):
        seconds = best_of(args.runs, fn)
        figures[name] = units / seconds
        print(f"{name}: {figures[name]:.2f} per second", flush=True)
    rows = [["1080p JPEG -> model input (images/s)", f"{figures['naive images']:.1f}",
             f"{figures['ours images']:.1f}",
             f"{figures['ours images'] / figures['naive images']:.2f}x"],
            [f"{args.video_seconds} s 720p H.264, {CONFIG.video_fps:g} fps "
             f"(video seconds/s)", f"{figures['naive video']:.1f}",
             f"{figures['ours video']:.1f}",
             f"{figures['ours video'] / figures['naive video']:.2f}x"]]
    table = markdown_table(["workload (one core)", "naive baseline", "msa-serve preprocess",
                            "speedup"], rows)
    t, h, w = ours_item.grid_thw
    notes = (f"Pinned to one core; best of {args.runs} runs. Images: {len(jpegs)} synthetic "
             f"1920x1080 JPEGs (quality 90) resized to 728x1316 (max_pixels "
             f"{CONFIG.max_pixels}). Video: a synthetic pan, libx264 veryfast, 30 fps, "
             f"{len(clip) // 1024} KiB; {len(ours_item.frame_times)} frames sampled at "
             f"{CONFIG.video_fps:g} fps, resized to {h * 14}x{w * 14} (video_max_pixels "
             f"{CONFIG.video_max_pixels}), grid {ours_item.grid_thw}, {ours_item.num_tokens} "
             f"placeholder tokens. Both pipelines produce the same pixel_values shapes.")
    write_results("preprocess_cpu", "Preprocessing: images and video on one CPU core", table,
                  notes)


if __name__ == "__main__":
    main()

"""Video: bytes to frames sampled at a target rate, resized, with PyAV.

Decoding is the cost, so it is cut three ways: only sampled frames are converted and scaled
(one swscale pass from YUV straight to the target size), non-reference frames are never
decoded (nothing depends on them; a sampled time that falls on one takes the next decoded
frame, at most a few frames later), and a gap of more than SEEK_GAP_S seconds between samples
is crossed by seeking to the keyframe before the next sample instead of decoding through it.
"""

from __future__ import annotations

import io
import math

import av
import numpy as np

from preprocess.config import MediaConfig, VisionGeometry
from preprocess.errors import MediaError
from preprocess.resize import fit_size

SEEK_GAP_S = 2.0


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """0, 1/fps, 2/fps, ... before `duration`; a clip shorter than one step gives its start."""
    count = max(1, math.ceil(duration * fps - 1e-9))
    if count > max_frames:
        raise MediaError(f"sampling {duration:.1f} s of video at {fps:g} fps gives {count} frames; "
                         f"this server takes at most {max_frames} frames per video "
                         f"(send a clip of at most {max_frames / fps:.1f} s)")
    return [i / fps for i in range(count)]


def video_frames(data: bytes, config: MediaConfig,
                 geometry: VisionGeometry) -> tuple[np.ndarray, list[float]]:
    """(uint8 [T, H, W, 3] sampled and resized frames, each frame's time in seconds)."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError) as exc:
        raise MediaError(f"the video could not be opened: {exc}") from None
    with container:
        if not container.streams.video:
            raise MediaError("the file has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec not in config.video_codecs:
            raise MediaError(f"video codec {codec!r} is not supported; send one of "
                             f"{', '.join(config.video_codecs)}")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > config.max_video_frame_size:
            raise MediaError(f"the video is {width}x{height}; this server takes frames of at "
                             f"most {config.max_video_frame_size} pixels")
        target_h, target_w = fit_size(height, width, geometry.factor,
                                      *config.video_budget(geometry))
        times = sample_times(_duration(container, stream), config.frame_rate(geometry),
                             config.max_video_frames)
        stream.codec_context.skip_frame = "NONREF"
        try:
            picked = _decode_at(container, stream, times)
        except av.FFmpegError as exc:
            raise MediaError(f"the video could not be decoded: {exc}") from None
        if not picked:
            raise MediaError("the video has no decodable frame")
        frames = np.stack([frame.reformat(width=target_w, height=target_h, format="rgb24",
                                          interpolation="BICUBIC").to_ndarray()
                           for frame in picked])
        return frames, [float(frame.time) for frame in picked]


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    raise MediaError("the video does not state its duration")


def _decode_at(container, stream, times: list[float]) -> list:
    """The first decoded frame at or after each time (the last frame for times past the end)."""
    picked = []
    frames = container.decode(stream)
    last_time = -math.inf
    frame = None
    for target in times:
        if target - last_time > SEEK_GAP_S and picked:
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
            frames = container.decode(stream)
        for frame in frames:
            if frame.time is None:
                continue
            last_time = frame.time
            if frame.time >= target - 1e-6:
                break
        else:  # the stream ended before this time: the last frame stands in for the rest
            if frame is None:
                break
            picked.extend([frame] * (len(times) - len(picked)))
            break
        picked.append(frame)
    return picked

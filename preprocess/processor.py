"""Content parts in, vision-tower inputs out; decoding runs off the caller's event loop."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from preprocess.config import MediaConfig, VisionGeometry
from preprocess.errors import MediaError
from preprocess.image import image_frames
from preprocess.patchify import num_tokens, patchify
from preprocess.sources import read_source
from preprocess.video import video_frames

MediaKind = Literal["image", "video"]
_PART_KINDS: dict[str, MediaKind] = {"image_url": "image", "video_url": "video"}


@dataclass(frozen=True)
class MediaPart:
    kind: MediaKind
    url: str


@dataclass
class ProcessedMedia:
    """One item, ready for the vision tower."""

    kind: MediaKind
    pixel_values: np.ndarray  # float16 [patches, patch_dim]
    grid_thw: tuple[int, int, int]  # patches along time, height, width
    num_tokens: int  # placeholder tokens the item expands to
    content_hash: str  # of the resized pixels: equal hashes, equal embeddings
    frame_times: tuple[float, ...] = ()  # video: each sampled frame's time in seconds


def media_part(part: dict[str, Any]) -> MediaPart | None:
    """An OpenAI-style content part as media, or None for a text part."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return None
    if kind not in _PART_KINDS:
        raise MediaError(f"unsupported content part type {kind!r}; use text, image_url or "
                         f"video_url")
    source = part.get(kind)
    url = source.get("url") if isinstance(source, dict) else source
    if not isinstance(url, str):
        raise MediaError(f"a {kind} part needs {{'{kind}': {{'url': ...}}}}")
    return MediaPart(_PART_KINDS[kind], url)


def process_part(part: MediaPart, config: MediaConfig, geometry: VisionGeometry) -> ProcessedMedia:
    """Reads, decodes, resizes, normalizes and patchifies one item (pure; runs in any process)."""
    data = read_source(part.url, config)
    times: list[float] = []
    if part.kind == "image":
        frames = image_frames(data, config, geometry)
    else:
        frames, times = video_frames(data, config, geometry)
    pixel_values, grid = patchify(frames, geometry)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{part.kind}:{grid}:{geometry}:{frames.shape}".encode())
    digest.update(frames.tobytes())
    return ProcessedMedia(part.kind, pixel_values, grid, num_tokens(grid, geometry),
                          digest.hexdigest(), tuple(times))


class MediaProcessor:
    """One per preprocess replica: one item runs in a thread, several in a process pool."""

    def __init__(self, config: MediaConfig, geometry: VisionGeometry):
        self.config = config
        self.geometry = geometry
        self._pool: ProcessPoolExecutor | None = None

    async def process(self, parts: list[MediaPart]) -> list[ProcessedMedia]:
        if len(parts) > self.config.max_items_per_request:
            raise MediaError(f"the request has {len(parts)} media items; this server takes at "
                             f"most {self.config.max_items_per_request}")
        if len(parts) <= 1 or self.config.workers == 1:
            return [await asyncio.to_thread(process_part, p, self.config, self.geometry)
                    for p in parts]
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(
            loop.run_in_executor(self._executor(), process_part, p, self.config, self.geometry)
            for p in parts)))

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the replica process runs threads (Ray's, the event loop's).
            self._pool = ProcessPoolExecutor(self.config.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

"""What preprocessing needs to know: the operator's limits and the vision tower's geometry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.config import CLIP_MEAN, CLIP_STD, VisionConfig


@dataclass(frozen=True)
class VisionGeometry:
    """How the model's vision tower cuts pixels into tokens (from its config.json), and its
    image processor's resize budget and normalization (from its preprocessor_config.json)."""

    patch_size: int  # pixels per patch side
    temporal_patch_size: int  # frames per patch (an image is repeated to fill it)
    merge_size: int  # merge_size x merge_size patches become one placeholder token
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    min_pixels: int = 56 * 56  # an image's resize budget, unless the operator sets one
    max_pixels: int = 1280 * 28 * 28
    video_fps: float = 2.0  # frames sampled per second, unless the operator sets a rate
    video_max_pixels: int = 256 * 28 * 28  # a video frame's budget, likewise

    @classmethod
    def for_model(cls, vision: VisionConfig) -> VisionGeometry:
        """The geometry and processor settings of a checkpoint's vision config."""
        return cls(vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size,
                   vision.image_mean, vision.image_std, vision.image_min_pixels,
                   vision.image_max_pixels, vision.video_fps, vision.video_max_pixels)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: whole merge windows of whole patches."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2


class MediaConfig(BaseModel):
    """The preprocess tier's media settings (`preprocess.media` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    allowed_local_dir: Path | None = Field(
        None, description="file:// URLs are served only from inside this directory; "
                          "null refuses them")
    allowed_url_prefixes: list[str] = Field(
        default_factory=list, description="http(s) URLs starting with one of these are fetched; "
                                          "empty = no network fetches")
    fetch_timeout_s: float = Field(10.0, gt=0)
    max_input_bytes: int = Field(32 * 2**20, ge=1024, description="largest encoded item")
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="largest decoded image (decompression-bomb limit)")
    min_pixels: int | None = Field(
        None, ge=1, description="resize budget: fewest pixels per image or frame; null = the "
                                "model's image processor's (its preprocessor_config.json)")
    max_pixels: int | None = Field(
        None, ge=1, description="resize budget: most pixels per image; null = the model's "
                                "image processor's")
    video_max_pixels: int | None = Field(
        None, ge=1, description="resize budget of one video frame (video is many frames: a "
                                "smaller budget than an image's); null = the model's video "
                                "processor's")
    video_fps: float | None = Field(None, gt=0, description="frames sampled per second of "
                                                            "video; null = the model's")
    max_video_frames: int = Field(64, ge=1, description="most frames sampled from one video")
    max_video_frame_size: int = Field(3840 * 2160, ge=1,
                                      description="largest decoded video frame, in pixels")
    video_codecs: list[str] = Field(
        default_factory=lambda: ["h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"],
        description="decodable video codecs; others are refused")
    max_items_per_request: int = Field(16, ge=1)
    workers: int = Field(2, ge=1, description="processes per replica for multi-item requests")

    def image_budget(self, geometry: VisionGeometry) -> tuple[int, int]:
        """(min, max) pixels of a resized image: the operator's where set, else the model's."""
        return (self.min_pixels or geometry.min_pixels, self.max_pixels or geometry.max_pixels)

    def video_budget(self, geometry: VisionGeometry) -> tuple[int, int]:
        """(min, max) pixels of a resized video frame."""
        return (self.image_budget(geometry)[0], self.video_max_pixels or geometry.video_max_pixels)

    def frame_rate(self, geometry: VisionGeometry) -> float:
        return self.video_fps or geometry.video_fps

    @model_validator(mode="after")
    def _budget_in_order(self):
        for budget in ("max_pixels", "video_max_pixels"):
            if self.min_pixels and getattr(self, budget) and \
                    self.min_pixels > getattr(self, budget):
                raise ValueError(f"min_pixels ({self.min_pixels}) exceeds {budget} "
                                 f"({getattr(self, budget)})")
        return self

"""The CPU tier's multimodal preprocessing: images and video to vision-tower inputs.

Pure functions over bytes and numpy arrays (no torch, nothing of `worker` or `kernels`), so
preprocess replicas stay small and the work can move to a process pool. `MediaProcessor` is the
entry point: OpenAI-style content parts in, `ProcessedMedia` (patches, grid, token count,
content hash) out; every bad input raises `MediaError` with a message for the client.
"""

from preprocess.config import MediaConfig, VisionGeometry
from preprocess.errors import MediaError
from preprocess.processor import MediaProcessor, ProcessedMedia

__all__ = ["MediaConfig", "MediaError", "MediaProcessor", "ProcessedMedia", "VisionGeometry"]

"""The preprocess deployment (CPU): chat templating, tokenization, page hashing, and images and
videos decoded into vision-tower inputs.

Model replicas receive token ids (placeholders already expanded) and numpy patches. The page
hashes computed here with the engine's own hash function (the model's fingerprint as salt, each
item's content hash mixed into the pages its placeholders occupy) are what the prefix-aware
router looks up. Prompts that arrive as token ids need no tokenizer: the ingress hashes them.
Decoding never runs on the replica's event loop (a thread for one item, processes for several).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray import serve

from deployments.config import AppConfig
from deployments.protocol import PreparedPrompt
from preprocess import MediaError, MediaProcessor, ProcessedMedia, VisionGeometry
from preprocess.processor import MediaPart, media_part
from worker.checkpoint import inspect_model
from worker.config import M3_VIDEO_TIMESTAMP, VisionConfig
from worker.errors import InvalidRequestError
from worker.wire import MultimodalInput, MultimodalSpan


@serve.deployment(name="Preprocessor")
class Preprocessor:
    def __init__(self, config: dict):
        app = AppConfig.model_validate(config)
        info = inspect_model(app.model.engine.model, app.model.engine.served_model_name)
        self.tokenizer = info.tokenizer
        self.salt = info.fingerprint
        self.model_name = info.name
        self.reasoning_markers = info.reasoning_markers
        self.vision = info.config.vision
        self.media = None
        if self.vision is not None:
            self.media = MediaProcessor(app.preprocess.media,
                                        VisionGeometry.for_model(self.vision))

    async def prepare_chat(self, messages: list[dict[str, Any]],
                           template_kwargs: dict[str, Any] | None = None) -> PreparedPrompt:
        """template_kwargs: variables for the chat template (`thinking_mode`, ...)."""
        parts: list[MediaPart] = []
        texts = [self._message_text(m, parts) for m in messages]
        if parts and self.media is None:
            raise InvalidRequestError(f"{self.model_name} has no vision tower; send text parts "
                                      f"only")
        # Templating and tokenizing a long prompt take CPU seconds: never on the event loop.
        text, token_ids = await asyncio.to_thread(self._render_chat, texts, template_kwargs)
        opens_reasoning = bool(self.reasoning_markers) and \
            text.rstrip().endswith(self.reasoning_markers[0])
        mm_inputs: list[MultimodalInput] = []
        if parts:
            items = await self.media.process(parts)
            token_ids, mm_inputs = expand_placeholders(
                token_ids, items, self.vision,
                lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        return PreparedPrompt.from_token_ids(token_ids, self.salt, mm_inputs, opens_reasoning)

    def _render_chat(self, messages: list[dict[str, Any]],
                     template_kwargs: dict[str, Any] | None) -> tuple[str, list[int]]:
        text = self.tokenizer.apply_chat_template(messages, True, template_kwargs)
        return text, self.tokenizer.encode(text)

    async def prepare_text(self, prompt: str) -> PreparedPrompt:
        token_ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
        return PreparedPrompt.from_token_ids(token_ids, self.salt)

    def _message_text(self, message: dict[str, Any], parts: list[MediaPart]) -> dict[str, Any]:
        """OpenAI content as template text: text parts joined, each image or video part one
        placeholder token (wrapped in the model's vision start/end tokens), collected in order."""
        content = message.get("content")
        if content is None or isinstance(content, str):
            return {**message, "content": content or ""}
        texts = []
        for part in content:
            media = media_part(part)
            if media is None:
                texts.append(part.get("text", ""))
                continue
            parts.append(media)
            texts.append(self._placeholder_text(media) if self.vision else "")
        return {**message, "content": "".join(texts)}

    def _placeholder_text(self, part: MediaPart) -> str:
        vision = self.vision
        if part.kind == "video" and vision.video_frame_timestamps:
            # M3 wraps each frame in markers of its own: expand_placeholders writes them.
            return self.tokenizer.backend.id_to_token(vision.video_token_id)
        ids = [vision.vision_start_token_id,
               vision.image_token_id if part.kind == "image" else vision.video_token_id,
               vision.vision_end_token_id]
        return "".join(self.tokenizer.backend.id_to_token(i) for i in ids if i is not None)

    def __del__(self):
        if self.media is not None:
            self.media.close()


def expand_placeholders(token_ids: list[int], items: list[ProcessedMedia], vision: VisionConfig,
                        encode: Callable[[str], list[int]]) -> tuple[list[int],
                                                                      list[MultimodalInput]]:
    """Each item's single placeholder token becomes num_tokens copies (an M3 video: its frames'
    timestamped, marked runs); returns the new ids and the tower inputs with their spans."""
    pad_ids = {"image": vision.image_token_id, "video": vision.video_token_id}
    found = [i for i, t in enumerate(token_ids) if t in pad_ids.values()]
    if len(found) != len(items):
        raise MediaError(f"the prompt has {len(found)} image/video placeholder tokens for "
                         f"{len(items)} media items: remove placeholder tokens from the text")
    expanded: list[int] = []
    mm_inputs = []
    start = 0
    for position, item in zip(found, items):
        if token_ids[position] != pad_ids[item.kind]:
            raise MediaError("the prompt text holds placeholder tokens of its own; remove them")
        expanded += token_ids[start:position]
        if item.kind == "video" and vision.video_frame_timestamps:
            mm_inputs += _timestamped_video(item, expanded, vision, encode)
        else:
            span = MultimodalSpan(len(expanded), item.num_tokens, item.content_hash)
            expanded += [token_ids[position]] * item.num_tokens
            mm_inputs.append(MultimodalInput((span,), item.pixel_values, item.grid_thw))
        start = position + 1
    return expanded + token_ids[start:], mm_inputs


def _timestamped_video(item: ProcessedMedia, expanded: list[int], vision: VisionConfig,
                       encode: Callable[[str], list[int]]) -> list[MultimodalInput]:
    """MiniMax-M3's video layout, appended to `expanded`: for every temporal patch, its first
    frame's time as `]<]{seconds} seconds[>[`, then its tokens between the image markers. The
    tower sees segments of at most `video_segment_frames` temporal patches (one input each, its
    spans the frames' runs in order), as transformers' processor splits `video_grid_thw`."""
    t, h, w = item.grid_thw
    frame_tokens = h * w // vision.spatial_merge_size ** 2
    segment = vision.video_segment_frames or t
    inputs = []
    for first in range(0, t, segment):
        frames = range(first, min(t, first + segment))
        spans = []
        for frame in frames:
            seconds = item.frame_times[min(frame * vision.temporal_patch_size,
                                           len(item.frame_times) - 1)]
            expanded += encode(M3_VIDEO_TIMESTAMP.format(seconds))
            expanded.append(vision.vision_start_token_id)
            spans.append(MultimodalSpan(len(expanded), frame_tokens,
                                        f"{item.content_hash}:{first}"))
            expanded += [vision.video_token_id] * frame_tokens
            expanded.append(vision.vision_end_token_id)
        rows = slice(first * h * w, frames.stop * h * w)
        inputs.append(MultimodalInput(tuple(spans), item.pixel_values[rows],
                                      (len(frames), h, w)))
    return inputs

"""Images in prompts on the tiny vision checkpoint: embeddings, chunking, prefix caching."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocess import MediaConfig, VisionGeometry
from preprocess.processor import MediaPart, process_part
from tests.preprocess.media_files import data_url, encode_image
from tests.worker.test_engine import GREEDY, assert_no_pages_held, random_prompt
from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.errors import InvalidRequestError
from worker.wire import MultimodalInput, MultimodalSpan

# 64 x 96 pixels in 8-pixel patches: grid (1, 8, 12), 96 patches, 24 placeholder tokens.
IMAGE_SIZE = (96, 64)
MEDIA = MediaConfig(min_pixels=16, max_pixels=64 * 96)


@pytest.fixture
def make_engine(vision_model_dir):
    def make(**overrides) -> LLMEngine:
        settings = dict(model=str(vision_model_dir), device="cpu", dtype="float32",
                        kv_cache_memory="16MiB", max_num_batched_tokens=256, debug_checks=True)
        return LLMEngine(EngineConfig(**{**settings, **overrides}))
    return make


def image_item(engine: LLMEngine, color, offset: int) -> tuple[MultimodalInput, int]:
    vision = engine.model_config.vision
    geometry = VisionGeometry.for_model(vision)
    pixels = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    pixels[:, : IMAGE_SIZE[0] // 2] = color  # half colored: patches differ across the image
    data = encode_image(Image.fromarray(pixels), "PNG")
    media = process_part(MediaPart("image", data_url(data, "image/png")), MEDIA, geometry)
    span = MultimodalSpan(offset, media.num_tokens, media.content_hash)
    return MultimodalInput((span,), media.pixel_values, media.grid_thw), vision.image_token_id


def image_prompt(engine, color, before: int = 300, after: int = 40, seed: int = 1):
    """random text, an image's placeholders, more text; the image spans pages 2 and 3."""
    item, pad = image_item(engine, color, before)
    tokens = (random_prompt(before, seed) + [pad] * item.num_tokens
              + random_prompt(after, seed + 1))
    return tokens, (item,)


def run(engine, tokens, items, params=GREEDY):
    seq = engine.make_sequence(tokens, params, mm_inputs=items)
    engine.add_sequence(seq)
    outputs = []
    while engine.has_unfinished_requests:
        outputs += [o for o in engine.step() if o.request_id == seq.request_id]
    return [t for o in outputs for t in o.new_token_ids], outputs[-1].usage


def test_image_embeddings_steer_generation(make_engine):
    engine = make_engine()
    tokens, red = image_prompt(engine, (255, 0, 0))
    _, blue = image_prompt(engine, (0, 0, 255))
    assert red[0].num_tokens == 24
    with_red, _ = run(engine, tokens, red)
    with_blue, _ = run(engine, tokens, blue)
    text_only = engine.generate([[t if t < 259 else 32 for t in tokens]], GREEDY,
                                use_tqdm=False)[0].new_token_ids
    assert with_red != with_blue, "the image's pixels never reached the model"
    assert with_red != text_only
    assert_no_pages_held(engine)


def test_same_image_hits_the_prefix_cache_and_the_embedding_cache(make_engine):
    engine = make_engine()
    tokens, red = image_prompt(engine, (255, 0, 0))
    first, usage = run(engine, tokens, red)
    assert usage.cached_tokens == 0
    encoded = engine.runner.vision.items_encoded
    again, usage = run(engine, tokens, image_prompt(engine, (255, 0, 0))[1])
    assert again == first
    assert usage.cached_tokens == (len(tokens) - 1) // 128 * 128  # every full page before the end
    assert engine.runner.vision.items_encoded == encoded, "the cached image was encoded again"
    # Same placeholders, another image: the pages before the image hit, none after it does.
    _, usage = run(engine, tokens, image_prompt(engine, (0, 255, 0))[1])
    assert usage.cached_tokens == 256  # pages 0-1; page 2 holds image tokens
    assert engine.runner.vision.items_encoded == encoded + 1


def test_chunked_prefill_through_an_image_equals_one_chunk(make_engine):
    tokens, red = image_prompt(make_engine(), (255, 0, 0))
    whole, _ = run(make_engine(max_num_batched_tokens=512), tokens, red)
    chunked_engine = make_engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    chunked, _ = run(chunked_engine, tokens, red)  # the 24 image tokens span two chunks
    assert chunked == whole


def test_bad_multimodal_requests_are_refused(make_engine, make_tiny_engine):
    engine = make_engine()
    tokens, red = image_prompt(engine, (255, 0, 0))
    item = red[0]
    pad = engine.model_config.vision.image_token_id
    cases = {
        "no vision tower": (make_tiny_engine(), [t if t < 259 else 32 for t in tokens], red),
        "span length": (engine, tokens, (MultimodalInput(
            (MultimodalSpan(300, 20, "x"),), item.pixel_values, item.grid_thw),)),
        "pixel shape": (engine, tokens, (MultimodalInput(
            item.spans, item.pixel_values[:10], item.grid_thw),)),
        "span over text": (engine, tokens, (MultimodalInput(
            (MultimodalSpan(10, 24, "x"),), item.pixel_values, item.grid_thw),)),
        "orphan placeholders": (engine, tokens + [pad] * 3, red),
    }
    messages = {"no vision tower": "has no vision tower", "span length": "fills 24 tokens",
                "pixel shape": "do not match grid", "span over text": "placeholder tokens only",
                "orphan placeholders": "no image or video fills"}
    for name, (target, prompt, items) in cases.items():
        with pytest.raises(InvalidRequestError, match=messages[name]):
            target.make_sequence(prompt, GREEDY, mm_inputs=items)
    assert_no_pages_held(engine)

"""MiniMax-M3 against transformers' own implementation (`MiniMaxM3SparseForConditionalGeneration`,
eager attention, fp32) on the same tiny checkpoint in the released layout: its topk of 3 blocks
makes every prompt over 384 tokens really sparse."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import kernels
from tests.worker.test_model import _forward_logits
from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.errors import ModelLoadError
from worker.loader import load_model
from worker.tiny_model import make_m3_checkpoint
from worker.wire import MultimodalInput, MultimodalSpan, SamplingParams

transformers = pytest.importorskip("transformers", minversion="5.23")

PROMPT_LENGTH = 700  # 6 pages: each query past the third block keeps 3 of up to 6
DECODE_STEPS = 10


@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory):
    return make_m3_checkpoint(tmp_path_factory.mktemp("tiny-m3"), seed=0)


@pytest.fixture(scope="module")
def reference(m3_dir):
    model, info = transformers.MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        str(m3_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), f"transformers did not load the checkpoint cleanly: {info}"
    return model.eval()


def prompt(length: int = PROMPT_LENGTH, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 259) for _ in range(length)]


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(input_ids=torch.tensor([ids])).logits[0].float()


def capture_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """The logits of every row the engine samples from, step by step."""
    captured: list[torch.Tensor] = []
    compute_logits = engine.runner.model.compute_logits

    def spy(hidden):
        captured.append(compute_logits(hidden))
        return captured[-1]

    engine.runner.model.compute_logits = spy
    return captured


def test_logits_and_block_selections_match_transformers(m3_dir, reference, monkeypatch):
    """Every position's logits within 1e-3 (fp32); in every MSA layer, the blocks we select
    per (query, KV group) are the blocks transformers' lightning indexer selects."""
    ours = load_model(m3_dir, torch.float32, torch.device("cpu"))
    ids = prompt()
    ours_selected = []
    select = kernels.select_blocks

    def spy(*args, **kwargs):
        ours_selected.append(select(*args, **kwargs))
        return ours_selected[-1]

    monkeypatch.setattr(kernels, "select_blocks", spy)
    theirs_selected = []
    language = reference.model.language_model
    hooks = [layer.self_attn.indexer.register_forward_hook(
        lambda module, args, output: theirs_selected.append(output))
        for layer in language.layers if layer.self_attn.indexer is not None]
    try:
        logits = _forward_logits(ours, ids, topk=ours.config.msa.topk)
        ref = reference_logits(reference, ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert (logits - ref).abs().max().item() < 1e-3
    assert len(ours_selected) == len(theirs_selected) == 3
    for mine, theirs in zip(ours_selected, theirs_selected):
        theirs = theirs[0].permute(1, 0, 2)  # [B=1, H, T, k] -> [T, H, k]
        assert mine.shape == theirs.shape
        mine_sets = [set(row.tolist()) - {-1} for row in mine.reshape(-1, mine.shape[-1])]
        their_sets = [set(row.tolist()) - {-1} for row in theirs.reshape(-1, theirs.shape[-1])]
        assert mine_sets == their_sets
    visible = [t // 128 + 1 for t in range(len(ids)) for _ in range(mine.shape[1])]
    dropped = sum(len(kept) < blocks for kept, blocks in zip(mine_sets, visible))
    # Every (query, group) that sees more than topk blocks keeps exactly topk of them.
    assert dropped == sum(blocks > 3 for blocks in visible) == 2 * (PROMPT_LENGTH - 384)


def test_engine_chunked_prefill_and_decode_match_transformers(m3_dir, reference):
    """Through the engine: the prompt prefilled in three chunks, then 10 paged decode steps;
    each step's logits match transformers' on the whole sequence. A second run hits the prefix
    cache (K, V and index keys restored) and gives the same logits."""
    engine = LLMEngine(EngineConfig(model=str(m3_dir), device="cpu", dtype="float32",
                                    kv_cache_memory="8MiB", max_num_batched_tokens=256,
                                    debug_checks=True))
    captured = capture_logits(engine)
    params = SamplingParams(temperature=0, max_tokens=DECODE_STEPS, ignore_eos=True)
    ids = prompt(seed=1)
    first = engine.generate([ids], params, use_tqdm=False)[0]
    assert engine.stats.steps == 3 + DECODE_STEPS - 1, "three prefill chunks, then decodes"
    ours = torch.cat(captured)
    full = ids + first.new_token_ids
    ref = reference_logits(reference, full)[len(ids) - 1: len(full) - 1]
    assert (ours - ref).abs().max().item() < 1e-3
    assert first.new_token_ids == ref.argmax(-1).tolist()

    captured.clear()
    again = engine.generate([ids], params, use_tqdm=False)[0]
    assert again.usage.cached_tokens == (len(ids) - 1) // 128 * 128
    assert again.new_token_ids == first.new_token_ids
    assert (torch.cat(captured) - ours).abs().max().item() < 1e-4


def _broken_copy(m3_dir, tmp_path, name: str):
    broken = tmp_path / name
    shutil.copytree(m3_dir, broken)
    return broken


def test_bad_checkpoints_fail_at_load_naming_the_problem(m3_dir, tmp_path):
    missing_shard = _broken_copy(m3_dir, tmp_path, "missing-shard")
    (missing_shard / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00003.safetensors"):
        load_model(missing_shard, torch.float32, torch.device("cpu"))

    wrong_shape = _broken_copy(m3_dir, tmp_path, "wrong-shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    config["text_config"]["index_head_dim"] = 32
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"self_attn\.index_\w+\.weight has shape"):
        load_model(wrong_shape, torch.float32, torch.device("cpu"))

    unknown_layer = _broken_copy(m3_dir, tmp_path, "unknown-layer")
    config = json.loads((unknown_layer / "config.json").read_text())
    config["text_config"]["layer_types"][2] = "sliding_attention"
    (unknown_layer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="layer_types has unknown entries.*sliding_attention"):
        load_model(unknown_layer, torch.float32, torch.device("cpu"))


def test_legacy_config_keys_read_as_transformers_reads_them(m3_dir):
    """`sparse_attention_config` and `moe_layer_freq` (older M3 configs) give the same model."""
    from worker.config import ModelConfig

    raw = json.loads((m3_dir / "config.json").read_text())
    legacy = json.loads(json.dumps(raw))
    text = legacy["text_config"]
    text["sparse_attention_config"] = {
        "sparse_num_index_heads": text.pop("index_n_heads"),
        "sparse_index_dim": text.pop("index_head_dim"),
        "sparse_topk_blocks": text.pop("index_topk_blocks"),
        "sparse_attention_freq": [t == "minimax_m3_sparse" for t in text.pop("layer_types")]}
    text["moe_layer_freq"] = [t == "sparse" for t in text.pop("mlp_layer_types")]
    assert ModelConfig.from_hf_dict(legacy) == ModelConfig.from_hf_dict(raw)
    theirs = transformers.MiniMaxM3VLConfig(**legacy).text_config
    ours = ModelConfig.from_hf_dict(legacy)
    assert list(ours.m3.mlp_layer_types) == theirs.mlp_layer_types
    assert [i for i, t in enumerate(theirs.layer_types) if t == "full_attention"] == \
        list(ours.msa.dense_layers)
    assert ours.msa.topk == theirs.index_topk_blocks


def test_image_in_the_prompt_matches_transformers(m3_dir, reference):
    """An image's patches (the same processed inputs on both sides) through M3's vision tower
    and projector, its tokens between the start and end markers in a sparse prompt prefilled
    in chunks: every step's logits match transformers'."""
    engine = LLMEngine(EngineConfig(model=str(m3_dir), device="cpu", dtype="float32",
                                    kv_cache_memory="8MiB", max_num_batched_tokens=200,
                                    debug_checks=True))
    vision = engine.model_config.vision
    grid = (1, 4, 6)  # 24 patches of 14 x 14 pixels -> 6 tokens after the 2 x 2 merge
    pixels = torch.randn(24, vision.patch_dim, generator=torch.Generator().manual_seed(0))
    before, after = prompt(300, seed=2), prompt(150, seed=3)
    ids = (before + [vision.vision_start_token_id] + [vision.image_token_id] * 6
           + [vision.vision_end_token_id] + after)
    item = MultimodalInput((MultimodalSpan(len(before) + 1, 6, "image-0"),), pixels.numpy(), grid)
    captured = capture_logits(engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_sequence(engine.make_sequence(ids, params, mm_inputs=(item,)))
    generated = []
    while engine.has_unfinished_requests:
        generated += [t for out in engine.step() for t in out.new_token_ids]
    with torch.inference_mode():
        ref = reference(input_ids=torch.tensor([ids + generated[:-1]]), pixel_values=pixels,
                        image_grid_thw=torch.tensor([grid])).logits[0].float()
    ours = torch.cat(captured)
    assert (ours - ref[len(ids) - 1:]).abs().max().item() < 1e-3
    assert engine.runner.vision.items_encoded == 1


def test_dummy_load_format_runs_a_config_without_weights(m3_dir, tmp_path):
    """`load_format: dummy` (benchmarks at full width): config.json and tokenizer only, random
    weights of the config's shapes, the same on every load; without it the missing weights are
    a ModelLoadError that names the way out."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(m3_dir / name, config_only / name)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights.*dummy"):
        load_model(config_only, torch.float32, torch.device("cpu"))
    first, second = (LLMEngine(EngineConfig(model=str(config_only), load_format="dummy",
                                            device="cpu", dtype="float32",
                                            kv_cache_memory="8MiB"))
                     for _ in range(2))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = [e.generate([prompt(500)], params, use_tqdm=False)[0].new_token_ids
               for e in (first, second)]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6
    weights = first.runner.model.state_dict()
    moe = next(w for name, w in weights.items() if name.endswith("block_sparse_moe.w13"))
    assert moe.std() > 0.01  # really filled, not left empty


def test_video_in_the_prompt_matches_transformers(m3_dir, reference):
    """A 12-frame video laid out as M3's processor lays it out (each temporal patch's tokens
    between markers after its timestamp; the tower on segments of at most 4 temporal patches,
    here 4 + 2) and prefilled in chunks: every step's logits match transformers' given the same
    pixel_values_videos and the segments' video_grid_thw."""
    from deployments.preprocessor import expand_placeholders
    from preprocess import ProcessedMedia

    engine = LLMEngine(EngineConfig(model=str(m3_dir), device="cpu", dtype="float32",
                                    kv_cache_memory="8MiB", max_num_batched_tokens=200,
                                    debug_checks=True))
    vision = engine.model_config.vision
    assert vision.video_frame_timestamps and vision.video_segment_frames == 4
    grid = (6, 4, 6)
    pixels = torch.randn(6 * 24, vision.patch_dim, generator=torch.Generator().manual_seed(1))
    video = ProcessedMedia("video", pixels.numpy(), grid, 6 * 6, "video-0",
                           frame_times=tuple(i * 0.5 for i in range(12)))
    before, after = prompt(300, seed=4), prompt(120, seed=5)
    ids, items = expand_placeholders(before + [vision.video_token_id] + after, [video], vision,
                                     lambda text: engine.tokenizer.encode(text))
    assert [item.grid_thw for item in items] == [(4, 4, 6), (2, 4, 6)]
    assert engine.tokenizer.decode(ids[300:320]).startswith("]<]0.0 seconds[>[")
    captured = capture_logits(engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_sequence(engine.make_sequence(ids, params, mm_inputs=tuple(items)))
    generated = []
    while engine.has_unfinished_requests:
        generated += [t for out in engine.step() for t in out.new_token_ids]
    with torch.inference_mode():
        ref = reference(input_ids=torch.tensor([ids + generated[:-1]]),
                        pixel_values_videos=pixels,
                        video_grid_thw=torch.tensor([[4, 4, 6], [2, 4, 6]])).logits[0].float()
    ours = torch.cat(captured)
    assert (ours - ref[len(ids) - 1:]).abs().max().item() < 1e-3
    assert engine.runner.vision.items_encoded == 2

"""Writes random MSA checkpoints in the Hugging Face layout, for tests, demos and benchmarks.

The tiny one has everything a real MSA checkpoint has: a learned index branch (one shared
index-key head), mixture-of-experts layers beside a dense-MLP layer, a dense-attention layer, a
byte-level BPE tokenizer with a ChatML template; topk is small so that a few hundred tokens are
already sparse. `make_m3_checkpoint` writes a tiny MiniMax-M3 in the released layout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from kernels import E4M3
from kernels.reference import quantize_fp8
from worker.config import (
    CLIP_MEAN,
    CLIP_STD,
    M3_IMAGE_MAX_PIXELS,
    M3_IMAGE_MIN_PIXELS,
    M3_IMAGE_TOKEN,
    M3_MODEL_TYPE,
    M3_THINK_END,
    M3_THINK_START,
    M3_VIDEO_FPS,
    M3_VIDEO_MAX_PIXELS,
    M3_VIDEO_SEGMENT_FRAMES,
    M3_VIDEO_TOKEN,
    M3_VISION_END_TOKEN,
    M3_VISION_START_TOKEN,
    FP8Config,
    ModelConfig,
)
from worker.layers import fp8
from worker.loader import WeightFiller
from worker.models.minimax_m3 import MiniMaxM3ForCausalLM
from worker.models.msa import MSAForCausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Qwen2-VL's placeholder tokens; appended after the byte alphabet so text-only ids stay put.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# MiniMax-M3's image/video tokens, then its reasoning markers (special: the tokenizer must keep
# them in decoded text for the reasoning parser).
M3_SPECIAL_TOKENS = (M3_VISION_START_TOKEN, M3_VISION_END_TOKEN, M3_IMAGE_TOKEN, M3_VIDEO_TOKEN,
                     M3_THINK_START, M3_THINK_END)
# Released vocabularies are padded with reserved tokens so that the vocabulary splits evenly
# over tensor-parallel ranks (M3's 200,064 = 8 x 25,008): these pad the tiny one to 272.
M3_RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(7))
# transformers' MiniMaxM3VLImageProcessor settings, as the released checkpoint ships them.
M3_IMAGE_PROCESSOR = {
    "image_processor_type": "MiniMaxM3VLImageProcessor",
    "size": {"shortest_edge": M3_IMAGE_MIN_PIXELS, "longest_edge": M3_IMAGE_MAX_PIXELS},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
}
M3_VIDEO_PROCESSOR = {
    "video_processor_type": "MiniMaxM3VLVideoProcessor", "fps": M3_VIDEO_FPS,
    "min_pixels": M3_IMAGE_MIN_PIXELS, "max_pixels": M3_VIDEO_MAX_PIXELS,
    "vision_segment_max_frames": M3_VIDEO_SEGMENT_FRAMES,
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}
# ChatML whose generation prompt opens M3's reasoning unless `thinking_mode` is "disabled".
# M3's tool-call form (see deployments/tool_calls.py): tools listed in a system block, earlier
# calls written back in the namespaced XML, tool results as their own turns.
_M3_NS = "]<]minimax[>["
M3_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n' }}{% for tool in tools %}"
    "{{ tool | tojson }}{{ '\n' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']}}"
    "{% if message['tool_calls'] %}{{ '" + _M3_NS + "<tool_call>\n' }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '" + _M3_NS + "<invoke name=\"' + call['function']['name'] + '\">' }}"
    "{% for key, value in call['function']['arguments'].items() %}"
    "{{ '" + _M3_NS + "<' + key + '>' }}{{ value if value is string else value | tojson }}"
    "{{ '" + _M3_NS + "</' + key + '>' }}{% endfor %}{{ '" + _M3_NS + "</invoke>\n' }}"
    "{% endfor %}{{ '" + _M3_NS + "</tool_call>' }}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% if thinking_mode != 'disabled' %}"
    "{{ '" + M3_THINK_START + "' }}{% endif %}{% endif %}"
)


def write_tokenizer(path: Path, extra_special_tokens: tuple[str, ...] = (),
                    chat_template: str = CHATML_TEMPLATE) -> Tokenizer:
    """A byte-level BPE tokenizer (no merges) with ChatML's special tokens, then the given
    ones (vision placeholders, reasoning markers); saved with its tokenizer_config.json."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in SPECIAL_TOKENS + extra_special_tokens])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": chat_template}, indent=2))
    return tokenizer


def tiny_vision_config(text_hidden: int) -> dict:
    """A two-block tower with 8-pixel patches (an image side is a multiple of 16)."""
    return {"hidden_size": 32, "depth": 2, "num_heads": 2, "intermediate_size": 64,
            "out_hidden_size": text_hidden, "patch_size": 8, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "in_channels": 3}


def tiny_config_dict(vocab_size: int, topk: int = 4) -> dict:
    return {
        "model_type": "msa",
        "architectures": ["MSAForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "mlp_only_layers": [0],
        "msa_config": {"indexer": "learned", "index_head_dim": 16, "index_key_heads": 1,
                       "topk": topk, "dense_layers": [0]},
    }


def make_random_checkpoint(path: str | Path, raw_config: dict, seed: int = 0) -> Path:
    """config.json + random weights + the byte-level tokenizer (vocab_size is set to match)."""
    path = Path(path)
    vision = "vision_config" in raw_config
    tokenizer = write_tokenizer(path, VISION_TOKENS if vision else ())
    raw = dict(raw_config, vocab_size=tokenizer.get_vocab_size())
    if vision:
        raw.update({f"{name}_token_id": tokenizer.token_to_id(f"<|{name}|>")
                    for name in ("vision_start", "vision_end")},
                   image_token_id=tokenizer.token_to_id("<|image_pad|>"),
                   video_token_id=tokenizer.token_to_id("<|video_pad|>"))
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    torch.manual_seed(seed)
    model = MSAForCausalLM(ModelConfig.from_hf_dict(raw))
    with torch.no_grad():
        # Larger-than-default weights give peaked, input-dependent outputs, so tests that
        # compare generations actually discriminate.
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                continue  # norms and biases keep their default initialization
            param.normal_(0.0, 1.0 if "embed" in name else 1.5 / param.shape[-1] ** 0.5)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    return path


def make_tiny_checkpoint(path: str | Path, seed: int = 0, topk: int = 4,
                         vision: bool = False) -> Path:
    """vision=True adds a vision tower and the image/video placeholder tokens."""
    raw = tiny_config_dict(0, topk)
    if vision:
        raw["vision_config"] = tiny_vision_config(raw["hidden_size"])
    return make_random_checkpoint(path, raw, seed)


# -- MiniMax-M3 in its released layout ------------------------------------------------------------
def tiny_m3_config_dict(vocab_size: int, eos_token_id: int, topk: int = 3) -> dict:
    """MiniMax-M3's architecture at toy width: layer 0 dense attention + dense MLP, layers 1-3
    MSA + MoE (8 experts, top 2, a shared expert), partial RoPE on half of each head; topk 3,
    so prompts over 384 tokens are sparse. A tiny vision tower rides along (its weights are in
    the checkpoint, as in the released one)."""
    return {
        "model_type": M3_MODEL_TYPE,
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "tie_word_embeddings": False,
        "image_token_index": 3, "video_token_index": 4, "projector_hidden_size": 64,
        "text_config": {
            "model_type": "minimax_m3_vl_text",
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 32,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "rotary_dim": 8, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6, "bos_token_id": None, "eos_token_id": eos_token_id,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.5},
            "num_local_experts": 8, "num_experts_per_tok": 2, "routed_scaling_factor": 2.0,
            "dense_intermediate_size": 96, "shared_intermediate_size": 32,
            "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
            "index_n_heads": 2, "index_head_dim": 16, "index_block_size": 128,
            "index_topk_blocks": topk, "index_local_blocks": 1,
            "layer_types": ["full_attention"] + ["minimax_m3_sparse"] * 3,
            "mlp_layer_types": ["dense"] + ["sparse"] * 3,
        },
        "vision_config": {
            "model_type": "minimax_m3_vl_vision", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 3,
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        },
    }


def m3_checkpoint_tensors(model: MiniMaxM3ForCausalLM) -> dict[str, torch.Tensor]:
    """Our M3 weights under the released checkpoint's names (per-expert w1/w2/w3)."""
    inter = model.config.intermediate_size
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.contiguous().cpu()
        if name.startswith("visual."):  # the tower's own names are the checkpoint's
            tensors[name.removeprefix("visual.")] = tensor
            continue
        moe, _, kind = name.rpartition(".")
        if kind in ("w13", "w2"):
            for expert in range(tensor.shape[0]):
                prefix = f"language_model.{moe}.experts.{expert}"
                if kind == "w2":
                    tensors[f"{prefix}.w2.weight"] = tensor[expert].clone()
                else:
                    tensors[f"{prefix}.w1.weight"] = tensor[expert, :inter].clone()
                    tensors[f"{prefix}.w3.weight"] = tensor[expert, inter:].clone()
        else:
            tensors[f"language_model.{name}"] = tensor
    return tensors


# FP8 layouts of the tiny M3 (`make-tiny-model --fp8`): fp32 block scales as in DeepSeek-style
# checkpoints, at a block size the toy widths split into under tensor parallel 2 (a [128, 128]
# block would cover a toy matrix whole), and MXFP8's [1, 32] groups with e8m0 scales. Blocks
# 16 wide along K run weight-only; "wide-block" ones are wide enough for W8A8 (one process only:
# TP 2's shards of the toy widths are not whole 64-wide blocks).
TINY_FP8_LAYOUTS = {
    "block": FP8Config(block_n=16, block_k=16, modules_to_not_convert=("lm_head",)),
    "wide-block": FP8Config(block_n=16, block_k=64, modules_to_not_convert=("lm_head",)),
    "mxfp8": FP8Config(block_n=1, block_k=32, e8m0_scales=True,
                       modules_to_not_convert=("lm_head",)),
}


def quantize_checkpoint_tensors(model: MiniMaxM3ForCausalLM, tensors: dict[str, torch.Tensor],
                                config: FP8Config) -> dict[str, torch.Tensor]:
    """The checkpoint tensors with every weight the loader runs in FP8 stored as e4m3 and its
    `*_scale_inv` beside it (e8m0 scales as float8_e8m0fnu, as transformers writes them)."""
    with torch.device("meta"):
        shell = MiniMaxM3ForCausalLM(dataclasses.replace(model.config, fp8=config))
    fp8.quantize_(shell, config)
    quantized = {name for name, param in shell.named_parameters() if param.dtype == E4M3}
    out = {}
    for name, tensor in tensors.items():
        target = shell.checkpoint_target(name)
        if target is None or target[0] not in quantized:
            out[name] = tensor
            continue
        weight, scales = quantize_fp8(tensor, config.block_n, config.block_k,
                                      config.e8m0_scales)
        out[name] = weight
        out[name + fp8.SCALE_SUFFIX] = (scales.scale.view(torch.float8_e8m0fnu)
                                        if scales.e8m0 else scales.scale)
    return out


def make_m3_checkpoint(path: str | Path, seed: int = 0, topk: int = 3,
                       num_shards: int = 3, fp8_layout: str | None = None,
                       text_overrides: dict | None = None) -> Path:
    """A random tiny MiniMax-M3 written as the released checkpoint is: config.json with
    text_config and vision_config, the checkpoint's own tensor names, sharded safetensors with
    model.safetensors.index.json, and a tokenizer. transformers loads it as
    MiniMaxM3SparseForConditionalGeneration. `fp8_layout` (a key of TINY_FP8_LAYOUTS) stores
    the same random weights quantized, with their quantization_config; `text_overrides`
    changes text_config entries (wider models for memory measurements)."""
    path = Path(path)
    tokenizer = write_tokenizer(path, M3_SPECIAL_TOKENS + M3_RESERVED_TOKENS, M3_CHAT_TEMPLATE)
    raw = tiny_m3_config_dict(tokenizer.get_vocab_size(), tokenizer.token_to_id("<|im_end|>"),
                              topk)
    raw.update(image_token_index=tokenizer.token_to_id(M3_IMAGE_TOKEN),
               video_token_index=tokenizer.token_to_id(M3_VIDEO_TOKEN))
    raw["text_config"].update(text_overrides or {})
    filler = WeightFiller(ModelConfig.from_hf_dict(raw), path, torch.float32,
                          torch.device("cpu"))
    filler.fill_random(seed)
    model = filler.finish(stack=False)  # named as the checkpoint names its tensors
    tensors = m3_checkpoint_tensors(model)
    if fp8_layout is not None:
        fp8_config = TINY_FP8_LAYOUTS[fp8_layout]
        tensors = quantize_checkpoint_tensors(model, tensors, fp8_config)
        raw["quantization_config"] = fp8_config.to_hf_dict()
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(M3_IMAGE_PROCESSOR, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(M3_VIDEO_PROCESSOR, indent=2))
    names = sorted(tensors)
    shards = [names[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        save_file({name: tensors[name] for name in shard}, str(path / file))
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                        for t in tensors.values())},
         "weight_map": weight_map}, indent=2))
    return path

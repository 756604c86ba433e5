"""Writes random MSA checkpoints in the Hugging Face layout, for tests, demos and benchmarks.

The tiny one has everything a real MSA checkpoint has: a learned index branch (one shared
index-key head), mixture-of-experts layers beside a dense-MLP layer, a dense-attention layer, a
byte-level BPE tokenizer with a ChatML template; topk is small so that a few hundred tokens are
already sparse. The M3-shaped one has MiniMax-M3's attention at full width (Hq 64, Hkv 4,
D = Di = 128, topk 16) for GPU benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from worker.config import ModelConfig
from worker.model import MSAForCausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Qwen2-VL's placeholder tokens; appended after the byte alphabet so text-only ids stay put.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _byte_level_tokenizer(vision: bool = False) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + (VISION_TOKENS if vision else ())
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in specials])
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


def m3_shaped_config_dict(vocab_size: int, num_layers: int = 4) -> dict:
    """MiniMax-M3's attention at full width (dense MLPs: the benchmark measures attention)."""
    return {
        "model_type": "msa",
        "architectures": ["MSAForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 6144,
        "intermediate_size": 8192,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 5_000_000.0,
        "max_position_embeddings": 1 << 20,
        "tie_word_embeddings": False,
        "msa_config": {"indexer": "learned", "index_head_dim": 128, "index_key_heads": 1,
                       "topk": 16},
    }


def make_random_checkpoint(path: str | Path, raw_config: dict, seed: int = 0,
                           device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """config.json + random weights + the byte-level tokenizer (vocab_size is set to match)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vision = "vision_config" in raw_config
    tokenizer = _byte_level_tokenizer(vision)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE}, indent=2))
    raw = dict(raw_config, vocab_size=tokenizer.get_vocab_size())
    if vision:
        raw.update({f"{name}_token_id": tokenizer.token_to_id(f"<|{name}|>")
                    for name in ("vision_start", "vision_end")},
                   image_token_id=tokenizer.token_to_id("<|image_pad|>"),
                   video_token_id=tokenizer.token_to_id("<|video_pad|>"))
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    torch.manual_seed(seed)
    with torch.device(device):
        model = MSAForCausalLM(ModelConfig.from_hf_dict(raw)).to(dtype)
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

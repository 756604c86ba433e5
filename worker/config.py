"""Typed configuration: the model's shape (from config.json / GGUF metadata) and the engine's knobs.

`EngineConfig` is a pydantic model so that the same YAML `serve deploy` reads can embed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kernels import BLOCK_SIZE
from worker.errors import ModelLoadError

# Architectures whose Hugging Face layout (weight names and config keys) the model implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "msa")


@dataclass(frozen=True)
class MSAConfig:
    """How attention is made sparse.

    indexer="learned": the checkpoint has an index branch (index_q_proj per KV group,
    index_k_proj with `index_key_heads` heads of `index_head_dim`).
    indexer="derived": a dense GQA checkpoint; the index query is the mean of a group's post-RoPE
    queries and the index keys are that group's keys (no extra weights, no extra cache).
    """

    block_size: int = BLOCK_SIZE
    topk: int = 16
    indexer: Literal["learned", "derived"] = "derived"
    index_head_dim: int = 0
    index_key_heads: int = 1
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.block_size != BLOCK_SIZE:
            raise ModelLoadError(f"MSA block size must be {BLOCK_SIZE}, got {self.block_size}")
        if self.topk < 1:
            raise ModelLoadError(f"MSA topk must be >= 1, got {self.topk}")
        if self.indexer == "learned" and self.index_head_dim <= 0:
            raise ModelLoadError("a learned MSA indexer needs msa_config.index_head_dim > 0")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT-style vision tower in the Qwen2-VL layout (`visual.*` weights): linear patch
    embedding, 2D rotary positions, pre-norm blocks, a merger of merge x merge patches into one
    token of the text model's width. MiniMax-M3's vision config is not public; this follows the
    public layout closest to it."""

    hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # the text model's hidden size
    image_token_id: int
    video_token_id: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    # Tokens that wrap an item's placeholders in the prompt text, when the model uses them.
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def placeholder_token_ids(self) -> tuple[int, int]:
        return self.image_token_id, self.video_token_id

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "VisionConfig | None":
        vision = raw.get("vision_config")
        if not vision:
            return None
        top_level = ("image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id")
        known = set(cls.__dataclass_fields__) - set(top_level)
        try:
            return cls(image_token_id=raw["image_token_id"], video_token_id=raw["video_token_id"],
                       vision_start_token_id=raw.get("vision_start_token_id"),
                       vision_end_token_id=raw.get("vision_end_token_id"),
                       **{k: v for k, v in vision.items() if k in known})
        except KeyError as exc:
            raise ModelLoadError(f"a vision model's config.json needs {exc}") from exc
        except TypeError as exc:
            raise ModelLoadError(f"config.json has an incomplete vision_config: {exc}") from exc


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    # Mixture of experts (Qwen3-MoE naming); num_experts == 0 means a dense MLP everywhere.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    mlp_only_layers: tuple[int, ...] = ()
    msa: MSAConfig = field(default_factory=MSAConfig)
    vision: VisionConfig | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.msa.index_key_heads not in (1, self.num_key_value_heads):
            raise ModelLoadError("msa_config.index_key_heads must be 1 or num_key_value_heads")

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.mlp_only_layers

    def is_dense_attention_layer(self, layer: int) -> bool:
        return layer in self.msa.dense_layers

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face style config.json (llama / mistral / our `msa` type)."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"unsupported model_type {model_type!r}; msa-serve serves "
                                 f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
            raise ModelLoadError(f"rope_scaling {rope_scaling} is not supported yet")
        try:
            heads = raw["num_attention_heads"]
            msa_raw = dict(raw.get("msa_config") or {})
            msa_raw["dense_layers"] = tuple(msa_raw.get("dense_layers", ()))
            return cls(
                model_type=model_type,
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads", heads),
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
                rope_theta=raw.get("rope_theta", 10000.0),
                max_position_embeddings=raw.get("max_position_embeddings", 8192),
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                num_experts=raw.get("num_experts", 0),
                num_experts_per_tok=raw.get("num_experts_per_tok", 0),
                moe_intermediate_size=raw.get("moe_intermediate_size", 0),
                norm_topk_prob=raw.get("norm_topk_prob", True),
                mlp_only_layers=tuple(raw.get("mlp_only_layers", ())),
                msa=MSAConfig(**msa_raw),
                vision=VisionConfig.from_hf_dict(raw),
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks the required key {exc}") from exc
        except TypeError as exc:
            raise ModelLoadError(f"config.json has an unexpected msa_config: {exc}") from exc


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10,
               "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    """'512MiB', '2GB', '1073741824' or an int -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (examples: 512MiB, 2GiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


class EngineConfig(BaseModel):
    """Everything one model replica needs to start. Embedded in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint dir or .gguf file; None = the "
                                                 "embedded default (SmolLM2-135M-Instruct)")
    served_model_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_memory: int | None = Field(
        None, description="bytes for KV pages (e.g. '1GiB'); default 1GiB on CPU, "
                          "gpu_memory_fraction of free memory on CUDA")
    gpu_memory_fraction: float = Field(0.85, gt=0, le=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_model_len: int | None = Field(None, ge=1)
    topk: int | None = Field(None, ge=1, description="override the model's MSA topk")
    index_key_dtype: Literal["auto", "float8_e4m3fn"] = Field(
        "auto", description="index-key cache dtype (learned indexers): fp8 halves the decode "
                            "index scan's bytes; auto = the model dtype")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(False, description="run every step eagerly; by default decode "
                                                   "steps on CUDA replay captured CUDA graphs")
    warm_up: bool | None = Field(None, description="compile kernels and capture decode graphs "
                                                   "at start; None = on CUDA only")
    seed: int = 0
    debug_checks: bool = False

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _parse_size(cls, value):
        return None if value is None else parse_bytes(value)

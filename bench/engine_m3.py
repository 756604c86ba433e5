"""MiniMax-M3's real layers on one GPU: the engine with MSA against dense attention, and the MoE
grouped GEMM against a per-expert loop and against the bytes it must read.

The model is M3 at full width with fewer layers (random weights, `load_format: dummy`): layer 0
is M3's dense attention with its dense MLP, the others MSA (lightning indexer, topk 16) with
the 128-expert MoE (top 4, shared expert). The vocabulary is the test tokenizer's few hundred
tokens, so the LM head costs nothing here. The whole engine runs: scheduler, paged cache,
16K-token prefill chunks, decode steps replayed from CUDA graphs in both modes. "Dense" is the
same engine and weights with topk large enough that every block is visible.

MoE table: one MoE layer's routed experts for a batch of tokens routed by its own router;
"ideal" is the bytes of the experts the batch chose (w13 and w2) at the HBM bandwidth a large
copy reaches in the same run.

Usage (CUDA): python bench/engine_m3.py [--out-dir DIR] [--moe-layers 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from bench.common import markdown_table, write_results  # noqa: E402
from deployments.bench_engine import random_prompts, time_to_first_token  # noqa: E402
from worker.config import M3_MODEL_TYPE, EngineConfig  # noqa: E402
from worker.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.tiny_model import M3_SPECIAL_TOKENS, write_tokenizer  # noqa: E402
from worker.wire import SamplingParams  # noqa: E402

DENSE_TOPK = 1 << 20  # every block of a 128M-token context: attention is dense
DECODE_STEPS = 32
PREFILL_CONTEXTS = (32768, 131072)
DECODE_SHAPES = ((8, 32768), (8, 131072), (64, 32768))  # (requests, context)
MOE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 512, 16384)


def write_config(path: Path, moe_layers: int) -> None:
    """M3's text config (transformers' defaults are the released model's) with fewer layers."""
    tokenizer = write_tokenizer(path, M3_SPECIAL_TOKENS)
    layers = 1 + moe_layers
    (path / "config.json").write_text(json.dumps({
        "model_type": M3_MODEL_TYPE,
        "text_config": {
            "vocab_size": tokenizer.get_vocab_size(), "num_hidden_layers": layers,
            "eos_token_id": tokenizer.token_to_id("<|im_end|>"), "bos_token_id": None,
            "max_position_embeddings": 1 << 20,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                "partial_rotary_factor": 0.5},
            "layer_types": ["full_attention"] + ["minimax_m3_sparse"] * moe_layers,
            "mlp_layer_types": ["dense"] + ["sparse"] * moe_layers,
        }}, indent=2))


def decode_tokens_per_s(engine: LLMEngine, prompts: list[list[int]]) -> float:
    """Prefills all prompts, then times DECODE_STEPS steps of the whole batch."""
    # Early requests decode while later ones still prefill: leave them room, abort after.
    params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while any(engine.requests[i][0].num_output_tokens == 0 for i in ids):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    generated = 0
    for _ in range(DECODE_STEPS):
        generated += len(engine.step())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for request_id in ids:
        engine.abort(request_id)
    return generated / seconds


def engine_table(engine: LLMEngine) -> str:
    runner = engine.runner
    dense_graphs = DecodeGraphs(runner.model, runner.cache, DENSE_TOPK,
                                runner.decode_graphs.max_batch, engine.max_model_len)
    dense_graphs.capture_all()
    modes = {"dense": (DENSE_TOPK, dense_graphs), "MSA": (runner.topk, runner.decode_graphs)}

    def use(mode: str) -> None:  # the same loaded engine, attention path switched
        runner.topk, runner.decode_graphs = modes[mode]

    vocab = engine.model_config.vocab_size
    rows = []
    for context in PREFILL_CONTEXTS:
        prompt = random_prompts(vocab, 1, context, context, seed=context)[0]
        seconds = {}
        for mode in modes:
            use(mode)
            time_to_first_token(engine, prompt)  # compiles this context's kernel variants
            seconds[mode] = time_to_first_token(engine, prompt)
        rows.append([f"prefill {context // 1024}K (s)", f"{seconds['dense']:.3f}",
                     f"{seconds['MSA']:.3f}", f"{seconds['dense'] / seconds['MSA']:.2f}x"])
        print(rows[-1], flush=True)
    for batch, context in DECODE_SHAPES:
        prompts = random_prompts(vocab, batch, context, context, seed=batch + context)
        rate = {}
        for mode in modes:
            use(mode)
            rate[mode] = decode_tokens_per_s(engine, prompts)
        rows.append([f"decode {batch} x {context // 1024}K (tok/s)", f"{rate['dense']:.1f}",
                     f"{rate['MSA']:.1f}", f"{rate['MSA'] / rate['dense']:.2f}x"])
        print(rows[-1], flush=True)
    use("MSA")
    return markdown_table(["measure", "dense", "MSA", "MSA vs dense"], rows)


def hbm_bytes_per_s(device: torch.device) -> float:
    """What a large device-to-device copy reaches (read + write bytes a second)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=5, rep=50,
                                 return_mode="median")
    return 2 * source.numel() / (ms * 1e-3)


def moe_table(engine: LLMEngine) -> str:
    moe = next(layer.block_sparse_moe for layer in engine.runner.model.model.layers
               if hasattr(layer, "block_sparse_moe"))
    device = moe.w13.device
    bandwidth = hbm_bytes_per_s(device)
    bytes_per_expert = (moe.w13[0].numel() + moe.w2[0].numel()) * moe.w13.element_size()
    hidden = moe.w13.shape[2]
    rows = []
    for batch in MOE_BATCHES:
        x = torch.randn(batch, hidden, device=device, dtype=moe.w13.dtype)
        weights, chosen = moe.route(x)
        experts_of = functools.partial(kernels.routed_experts, x, moe.w13, moe.w2, weights,
                                       chosen, moe.activation)
        grouped_ms = triton.testing.do_bench_cudagraph(
            functools.partial(experts_of, backend="triton"), rep=100, return_mode="median")
        loop_ms = triton.testing.do_bench(functools.partial(experts_of, backend="reference"),
                                          warmup=5, rep=100, return_mode="median")
        experts = chosen.unique().numel()
        ideal_ms = experts * bytes_per_expert / bandwidth * 1e3
        flops = 2 * batch * chosen.shape[1] * (moe.w13[0].numel() + moe.w2[0].numel())
        rows.append([batch, experts, f"{grouped_ms * 1e3:.0f}", f"{loop_ms * 1e3:.0f}",
                     f"{ideal_ms * 1e3:.0f}", f"{loop_ms / grouped_ms:.2f}x",
                     f"{ideal_ms / grouped_ms:.0%}", f"{flops / grouped_ms / 1e9:.0f}"])
        print(rows[-1], flush=True)
    header = ["tokens", "experts hit", "grouped GEMM (us)", "per-expert loop (us)",
              "weight-bandwidth ideal (us)", "grouped vs loop", "of ideal", "grouped TFLOP/s"]
    return (markdown_table(header, rows)
            + f"\n\nHBM copy bandwidth measured in this run: {bandwidth / 1e12:.2f} TB/s; one "
              f"expert's w13 + w2: {bytes_per_expert / 2**20:.0f} MiB.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--moe-layers", type=int, default=2)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/engine_m3.py needs a CUDA GPU"
    with tempfile.TemporaryDirectory() as tmp:
        write_config(Path(tmp), args.moe_layers)
        engine = LLMEngine(EngineConfig(
            model=tmp, load_format="dummy", device="cuda", dtype="bfloat16",
            kv_cache_memory="16GiB", max_num_batched_tokens=16384, max_num_seqs=64,
            enable_prefix_caching=False, max_model_len=max(PREFILL_CONTEXTS) + 256))
    moe = moe_table(engine)
    table = engine_table(engine)
    config = engine.model_config
    notes = (f"MiniMax-M3 layers at full width, random weights, bf16: {config.num_hidden_layers} "
             f"layers (layer 0 dense attention + dense MLP {config.m3.dense_intermediate_size}; "
             f"the rest MSA + MoE: {config.num_experts} experts of "
             f"{config.intermediate_size}, top {config.num_experts_per_tok}, shared expert), "
             f"hidden {config.hidden_size}, Hq {config.num_attention_heads}, Hkv "
             f"{config.num_key_value_heads}, D {config.head_dim}, partial RoPE "
             f"{config.m3.rotary_dim}, indexer Di {config.msa.index_head_dim}, topk "
             f"{config.msa.topk}. Prefill: one prompt alone, 16K-token chunks, second run "
             f"(the first compiles). Decode: {DECODE_STEPS} steps of the whole batch after "
             "every prompt is in, CUDA graphs in both modes (dense decode: the paged kernel "
             "over every visible block).")
    gpu = torch.cuda.get_device_name()
    write_results("engine_m3_" + next((g.lower() for g in ("H100", "H200") if g in gpu), "gpu"),
                  "MiniMax-M3 layers on GPU: engine MSA vs dense, MoE grouped GEMM",
                  f"## Engine\n\n{table}\n\n## MoE routed experts (one layer)\n\n{moe}", notes,
                  directory=Path(args.out_dir) if args.out_dir else None)


if __name__ == "__main__":
    main()

"""Engine benchmark: offline throughput and shared-prefix TTFT, against transformers.generate.

Same model (the default SmolLM2-135M-Instruct unless --model), same machine, one run:
- offline batch: N requests with prompts of 256..2,048 tokens, 128 output tokens each;
  msa-serve's LLMEngine vs Hugging Face `generate` on the same prompts (left-padded batch);
- shared prefix: a 2,000-token prefix + 64 new tokens, TTFT with the prefix cached vs not.
Usage: python bench/engine.py [--num-requests 16] [--output-tokens 128]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, timed, write_results  # noqa: E402
from deployments.bench_engine import (  # noqa: E402
    offline_throughput,
    random_prompts,
    shared_prefix_ttft,
)
from worker.checkpoint import default_model_path  # noqa: E402
from worker.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402


def transformers_throughput(prompts: list[list[int]], output_tokens: int) -> float:
    """Output tokens/s of a batched, left-padded `generate` on the default model's GGUF."""
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    longest = max(len(p) for p in prompts)
    pad = 2
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        seconds, out = timed(lambda: model.generate(
            input_ids, attention_mask=mask, max_new_tokens=output_tokens,
            min_new_tokens=output_tokens, do_sample=False, pad_token_id=pad))
    assert out.shape[1] == longest + output_tokens
    return len(prompts) * output_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=256)
    parser.add_argument("--max-prompt", type=int, default=2048)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out-dir", default=None, help="where results go (default bench/results)")
    args = parser.parse_args()

    config = EngineConfig(device=args.device, max_num_seqs=max(64, args.num_requests))
    engine = LLMEngine(config)
    prompts = random_prompts(engine.model_config.vocab_size, args.num_requests, args.min_prompt,
                             args.max_prompt)
    # Warm-up on other prompts (nothing the measured run could hit in the prefix cache):
    # kernels compiled, a CUDA graph captured for every batch size the run passes through.
    warmup = random_prompts(engine.model_config.vocab_size, args.num_requests, args.min_prompt,
                            args.max_prompt, seed=99)
    offline_throughput(engine, warmup, 8)
    ours = offline_throughput(engine, prompts, args.output_tokens)
    # Twice: the first compiles the kernels of a chunk after a cached prefix (Triton compiles
    # each shape bucket on first use, up to ~1 s) and would time the compiler.
    shared_prefix_ttft(engine, prefix_tokens=2000, new_tokens=64, seed=7)
    cached, uncached = shared_prefix_ttft(engine, prefix_tokens=2000, new_tokens=64)
    rows = []
    if engine.runner.decode_graphs is not None:
        del engine  # its KV cache holds most of the GPU's free memory
        gc.collect()
        torch.cuda.empty_cache()
        eager_engine = LLMEngine(config.model_copy(update={"enforce_eager": True}))
        offline_throughput(eager_engine, warmup, 8)
        eager = offline_throughput(eager_engine, prompts, args.output_tokens)
        rows.append(["offline output tok/s, CUDA-graph decode",
                     f"eager steps: {eager.output_tokens_per_s:.1f}",
                     f"msa-serve: {ours.output_tokens_per_s:.1f}",
                     f"{ours.output_tokens_per_s / eager.output_tokens_per_s:.2f}x"])
    if not args.skip_transformers:
        hf_rate = transformers_throughput(prompts, args.output_tokens)
        rows.append(["offline output tok/s", f"transformers generate: {hf_rate:.1f}",
                     f"msa-serve: {ours.output_tokens_per_s:.1f}",
                     f"{ours.output_tokens_per_s / hf_rate:.2f}x"])
    rows.append(["TTFT, 2,000-token prefix + 64 new", f"uncached: {uncached * 1000:.0f} ms",
                 f"cached: {cached * 1000:.0f} ms", f"{uncached / cached:.1f}x lower"])
    table = markdown_table(["figure", "baseline", "msa-serve", "ratio"], rows)
    notes = (f"{args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens "
             f"({ours.prompt_tokens} in all), {args.output_tokens} output tokens each, greedy, EOS "
             f"ignored; model {config.served_model_name or 'SmolLM2-135M-Instruct'}; "
             f"msa-serve wall time {ours.seconds:.1f}s including prefill.")
    device = "gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    write_results(f"engine_{device}", "Engine: offline throughput and prefix-cache TTFT", table,
                  notes, directory=Path(args.out_dir) if args.out_dir else None)


if __name__ == "__main__":
    main()

"""Greedy decoding at batch 1 on the default model: msa-serve's engine vs transformers.generate.

Both run the same dequantized SmolLM2-135M-Instruct weights in float32 on this machine's CPU.
Usage: python bench/cpu_generate.py [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, timed, write_results  # noqa: E402
from worker.checkpoint import default_model_path  # noqa: E402
from worker.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.wire import SamplingParams  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def ours(new_tokens: int, prompt_ids: list[int]) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of the engine, prefix cache off."""
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    engine.add_request(prompt_ids, params)
    ttft, _ = timed(engine.step)

    def finish():
        while engine.has_unfinished_requests:
            engine.step()

    total, _ = timed(finish)
    return ttft, (new_tokens - 1) / total


def transformers_baseline(new_tokens: int, prompt_ids: list[int]) -> tuple[float, float]:
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])

    def run(n):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=2)

    run(4)  # warm-up
    ttft, _ = timed(lambda: run(1))
    total, out = timed(lambda: run(new_tokens))
    assert out.shape[1] == len(prompt_ids) + new_tokens
    return ttft, (new_tokens - 1) / (total - ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", kv_cache_memory="64MiB"))
    prompt_ids = engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    del engine
    our_ttft, our_rate = ours(args.new_tokens, prompt_ids)
    hf_ttft, hf_rate = transformers_baseline(args.new_tokens, prompt_ids)
    table = markdown_table(
        ["engine", "prompt tokens", "TTFT (s)", "decode tok/s", "decode vs transformers"],
        [["transformers generate (baseline)", len(prompt_ids), f"{hf_ttft:.3f}",
          f"{hf_rate:.1f}", "1.00x"],
         ["msa-serve LLMEngine", len(prompt_ids), f"{our_ttft:.3f}", f"{our_rate:.1f}",
          f"{our_rate / hf_rate:.2f}x"]])
    write_results("cpu_generate", "Greedy decoding, batch 1, SmolLM2-135M-Instruct fp32 (CPU)",
                  table, f"{args.new_tokens} new tokens, greedy, EOS ignored; both engines load "
                         "the same GGUF, dequantized to float32.")


if __name__ == "__main__":
    main()

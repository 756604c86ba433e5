"""The engine on CUDA, where attention runs through the Triton kernels (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.worker.test_engine import GREEDY, random_prompt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU; the CPU engine tests cover the same logic"),
]

# Lengths past topk (4) x 128 tokens, so selection really drops blocks.
PROMPTS = [random_prompt(n, seed=n) for n in (700, 900, 1300, 64)]


def test_cuda_engine_matches_cpu_engine_fp32(make_tiny_engine):
    cuda = make_tiny_engine(device="cuda", dtype="float32")
    cpu = make_tiny_engine(device="cpu", dtype="float32")
    on_cuda = cuda.generate(PROMPTS, GREEDY, use_tqdm=False)
    on_cpu = cpu.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.new_token_ids for o in on_cuda] == [o.new_token_ids for o in on_cpu]


def test_cuda_engine_bf16_generates(make_tiny_engine):
    engine = make_tiny_engine(device="cuda", dtype="bfloat16")
    outputs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert all(len(o.new_token_ids) == GREEDY.max_tokens for o in outputs)
    engine.block_manager.check_invariants(live_sequences=[])


def test_minimax_m3_on_cuda_matches_cpu(tmp_path):
    """The tiny M3 (MoE through the grouped-GEMM kernel, decode from CUDA graphs) generates on
    CUDA what it generates on CPU (the reference experts, eager), fp32, greedy; sparse prompts."""
    from worker.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.tiny_model import make_m3_checkpoint

    model = make_m3_checkpoint(tmp_path / "m3")
    outputs = {}
    for device in ("cuda", "cpu"):
        engine = LLMEngine(EngineConfig(model=str(model), device=device, dtype="float32",
                                        kv_cache_memory="64MiB", max_num_batched_tokens=512))
        prompts = [[t % 250 + 5 for t in p] for p in PROMPTS]
        outputs[device] = [o.new_token_ids for o in engine.generate(prompts, GREEDY,
                                                                      use_tqdm=False)]
    assert outputs["cuda"] == outputs["cpu"]

"""Shared fixtures: a tiny random MSA checkpoint and the real default model (loaded once)."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which triton reads at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from worker.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.tiny_model import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-msa"), seed=0, topk=4)


@pytest.fixture(scope="session")
def vision_model_dir(tmp_path_factory):
    """The tiny checkpoint plus a vision tower and image/video placeholder tokens."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vision"), seed=0, vision=True)


@pytest.fixture
def make_tiny_engine(tiny_model_dir):
    """Factory for tiny-model engines with invariant checks on; fp32 on CPU."""

    def make(**overrides) -> LLMEngine:
        settings = dict(model=str(tiny_model_dir), device="cpu", dtype="float32",
                        kv_cache_memory="16MiB", max_num_batched_tokens=256, debug_checks=True)
        settings.update(overrides)
        return LLMEngine(EngineConfig(**settings))

    return make


@pytest.fixture(scope="session")
def default_engine():
    """The embedded SmolLM2-135M-Instruct, fp32 on CPU."""
    return LLMEngine(EngineConfig(device="cpu", dtype="float32", debug_checks=True))

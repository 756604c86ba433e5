"""Prompt-token log-probabilities (SamplingParams.prompt_logprobs: what echo and lm-eval's
log-likelihood tasks read), computed during chunked prefill: equal to transformers'
log-softmax of the same prompt on the real default model (dense), and to our own reference
forward where MSA is really sparse."""

from __future__ import annotations

import pytest
import torch

from tests.worker.test_model import _forward_logits
from worker.config import EngineConfig
from worker.engine.llm_engine import FinishReason, LLMEngine
from worker.loader import load_model
from worker.wire import SamplingParams

SCORE = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)


def _expected(logits: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of prompt token i + 1 at row i, top-5 ids per row)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1), logp.topk(5).indices


def _check(scored, logits: torch.Tensor, ids: list[int], tolerance: float) -> None:
    want, want_top = _expected(logits, ids)
    assert [lp.token_id for lp in scored] == ids[1:]
    got = torch.tensor([lp.logprob for lp in scored])
    assert (got - want).abs().max().item() <= tolerance
    # Near-ties may swap places within the tolerance; the best token may not.
    assert [lp.top[0][0] for lp in scored] == want_top[:, 0].tolist()
    assert all(len(lp.top) == 5 and lp.top[0][1] >= lp.logprob for lp in scored)


@pytest.fixture(scope="module")
def chunked_default_engine():
    """The default model with a small token budget, so a prompt takes several prefill chunks."""
    return LLMEngine(EngineConfig(device="cpu", dtype="float32", max_num_batched_tokens=160,
                                  debug_checks=True))


def test_default_model_prompt_logprobs_equal_transformers(chunked_default_engine):
    transformers = pytest.importorskip("transformers")
    from worker.checkpoint import default_model_path

    engine = chunked_default_engine
    ids = engine.tokenizer.encode("Paged attention keeps each sequence's keys and values in "
                                  "fixed-size pages. " * 22)
    assert 300 < len(ids) <= 16 * 128, "several chunks, and dense (within topk 16 blocks)"
    path = default_model_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = hf_model(torch.tensor([ids])).logits[0]
    out = engine.generate([ids], SCORE, use_tqdm=False)[0]
    _check(out.prompt_logprobs, reference, ids, 1e-3)
    # The prompt's pages are now cached; scoring it again computes it again (cached tokens
    # have no logits), while a plain request takes the cache.
    again = engine.generate([ids], SCORE, use_tqdm=False)[0]
    assert again.usage.cached_tokens == 0
    assert [lp.logprob for lp in again.prompt_logprobs] == pytest.approx(
        [lp.logprob for lp in out.prompt_logprobs], abs=1e-5)
    plain = engine.generate([ids], SamplingParams(temperature=0, max_tokens=1),
                            use_tqdm=False)[0]
    assert plain.usage.cached_tokens > 0 and plain.prompt_logprobs is None


def test_sparse_prompt_logprobs_equal_the_reference_forward(make_tiny_engine, tiny_model_dir):
    engine = make_tiny_engine(max_num_batched_tokens=200)
    loaded = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    vocab, topk = loaded.config.vocab_size, loaded.config.msa.topk
    ids = [(31 * i + 7) % (vocab - 10) + 10 for i in range(700)]
    assert len(ids) > topk * 128, "more blocks than topk: really sparse"
    reference = _forward_logits(loaded, ids, topk)
    out = engine.generate([ids], SCORE, use_tqdm=False)[0]
    _check(out.prompt_logprobs, reference, ids, 1e-4)


def test_scoring_only_and_parallel_samples(make_tiny_engine):
    engine = make_tiny_engine()
    ids = [(13 * i + 5) % (engine.tokenizer.vocab_size - 10) + 10 for i in range(300)]
    only = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0),
                           use_tqdm=False)[0]
    assert only.new_token_ids == [] and only.finish_reason is FinishReason.LENGTH
    assert only.usage.completion_tokens == 0
    assert len(only.prompt_logprobs) == len(ids) - 1
    assert all(lp.top == [] for lp in only.prompt_logprobs)
    both = engine.generate([ids], SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=3,
                                                 prompt_logprobs=0), use_tqdm=False)
    for sample in both:  # the prompt is scored once; each sample reports it
        assert [lp.logprob for lp in sample.prompt_logprobs] == pytest.approx(
            [lp.logprob for lp in only.prompt_logprobs], abs=1e-5)
    assert engine.block_manager.num_pages_in_use == 0  # no page leaked


def test_max_tokens_zero_needs_scoring():
    from worker.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="0 only to score a prompt"):
        SamplingParams(max_tokens=0)

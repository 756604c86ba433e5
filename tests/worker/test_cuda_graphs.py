"""Decode steps through DecodeGraphs' static, padded buffers equal the eager step.

On CPU the graphs run uncaptured (`capture=False`): the same padding, scratch-page writes and
graph-safe layer paths (dense attention as the paged kernel over all blocks, every MoE expert
weighted by its routing weight). The captured replay is checked on CUDA below.
"""

from __future__ import annotations

import pytest
import torch

from tests.worker.test_engine import GREEDY, random_prompt
from worker.config import EngineConfig
from worker.engine.cuda_graphs import DecodeGraphs, is_decode_step
from worker.engine.llm_engine import LLMEngine
from worker.tiny_model import make_m3_checkpoint
from worker.wire import SamplingParams

# The tiny model has topk 4: contexts up to 512 tokens take the all-blocks path, longer ones
# the sparse one. Layer 0 is dense attention and later layers are mixtures of experts.
SHORT = (40, 200, 300)
MIXED = (100, 700, 1300)


def decode_batch(engine, lengths):
    """A scheduled batch in which every sequence of these prompt lengths decodes."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ids = [engine.add_request(random_prompt(n, seed=n), params) for n in lengths]
    while any(engine.requests[i][0].num_output_tokens == 0 for i in ids):
        engine.step()
    batch = engine.scheduler.schedule()
    assert is_decode_step(batch) and len(batch) == len(lengths)
    return batch


def replay(graphs: DecodeGraphs, engine, batch) -> torch.Tensor:
    """Logits [len(batch), vocab] of each sequence's next token, through the graphs."""
    return graphs.replay(graphs.prepare(batch, engine.runner.block_tables))[: len(batch)]


def graphs_for(engine, capture: bool, max_batch: int = 4) -> DecodeGraphs:
    return DecodeGraphs(engine.runner.model, engine.cache, engine.model_config.msa.topk,
                        max_batch=max_batch, max_model_len=engine.max_model_len, capture=capture)


@pytest.mark.parametrize("lengths", [SHORT, MIXED], ids=["all-blocks", "sparse"])
def test_padded_decode_matches_eager(make_tiny_engine, lengths):
    engine = make_tiny_engine()
    batch = decode_batch(engine, lengths)
    eager, rows, _ = engine.runner._run_eager(batch, None)
    assert list(rows) == [0, 1, 2]
    live = engine.cache.k[:, : engine.cache.num_pages].clone()
    scratch = engine.cache.scratch_page
    engine.cache.k[:, scratch] = 0
    padded = replay(graphs_for(engine, capture=False), engine, batch)  # 3 sequences in a bucket of 4
    assert padded.shape == eager.shape
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(padded.argmax(-1), eager.argmax(-1))
    # The padding row wrote its K only to the scratch page; live pages hold what eager wrote.
    assert engine.cache.k[:, scratch].abs().sum() > 0
    torch.testing.assert_close(engine.cache.k[:, : engine.cache.num_pages], live,
                               rtol=1e-4, atol=1e-5)


def test_prefill_steps_and_large_batches_are_not_graphed(make_tiny_engine):
    engine = make_tiny_engine()
    graphs = graphs_for(engine, capture=False, max_batch=2)
    assert graphs.buckets == [1, 2]
    engine.add_request(random_prompt(300, seed=1), GREEDY)
    prefill = engine.scheduler.schedule()
    assert not is_decode_step(prefill) and not graphs.fits(prefill)
    batch = decode_batch(make_tiny_engine(), SHORT)
    assert not graphs.fits(batch), "3 sequences exceed the largest bucket (2)"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a GPU; the padded path is tested above")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lengths", [SHORT, MIXED], ids=["all-blocks", "sparse"])
def test_captured_replay_matches_eager(make_tiny_engine, lengths):
    engine = make_tiny_engine(device="cuda", dtype="float32", debug_checks=False,
                              enforce_eager=True)
    batch = decode_batch(engine, lengths)
    eager = engine.runner._run_eager(batch, None)[0]
    graphs = graphs_for(engine, capture=True)
    first = replay(graphs, engine, batch).clone()
    again = replay(graphs, engine, batch)  # the second call replays the graph captured by the first
    assert len(graphs.graphs) == 1
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, first)


@pytest.mark.gpu
@needs_cuda
def test_engine_with_graphs_generates_like_eager(make_tiny_engine):
    prompts = [random_prompt(n, seed=n) for n in (64, 300, 700, 900, 1300)]
    graphed = make_tiny_engine(device="cuda", dtype="float32", debug_checks=False)
    eager = make_tiny_engine(device="cuda", dtype="float32", debug_checks=False,
                             enforce_eager=True)
    assert graphed.runner.decode_graphs is not None and eager.runner.decode_graphs is None
    with_graphs = graphed.generate(prompts, GREEDY, use_tqdm=False)
    assert graphed.runner.decode_graphs.graphs, "no decode step was replayed"
    without = eager.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.new_token_ids for o in with_graphs] == [o.new_token_ids for o in without]
    graphed.block_manager.check_invariants(live_sequences=[])


@pytest.mark.gpu
@needs_cuda
def test_captured_replay_of_an_fp8_m3_matches_the_uncaptured_one(tmp_path):
    """The tiny MiniMax-M3 with FP8 weights run W8A8 in bf16, captured: the norms quantize x for
    q/k/v and the dense MLP in their own kernel, the GEMMs split K, the experts run grouped. The
    replay computes exactly what the same padded step computes uncaptured. (Against the eager
    step, bf16 logits of FP8 weights differ by more than the fp32 test above allows: the graph's
    other attention and expert paths round differently, and e4m3's steps amplify it.)"""
    path = make_m3_checkpoint(tmp_path / "m3-fp8", seed=0, fp8_layout="wide-block")
    engine = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16",
                                    kv_cache_memory="16MiB", max_num_batched_tokens=256,
                                    debug_checks=False, enforce_eager=True))
    batch = decode_batch(engine, SHORT)
    uncaptured = replay(graphs_for(engine, capture=False), engine, batch).clone()
    graphs = graphs_for(engine, capture=True)
    first = replay(graphs, engine, batch).clone()
    assert len(graphs.graphs) == 1
    torch.testing.assert_close(first, uncaptured, rtol=0, atol=0)
    torch.testing.assert_close(replay(graphs, engine, batch), first, rtol=0, atol=0)

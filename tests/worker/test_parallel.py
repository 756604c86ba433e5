"""Tensor and expert parallelism on CPU (gloo between Ray actors): the tiny MiniMax-M3 split
over two ranks computes what one process computes, through chunked prefill, prefix-cache hits
and paged decode; split replicas pull each other's pages; a rank that dies makes the replica
report itself dead."""

from __future__ import annotations

import time

import pytest
import ray

from worker.config import EngineConfig
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.llm_engine import LLMEngine
from worker.errors import EngineDeadError
from worker.prefix_hash import chain_page_hashes
from worker.tiny_model import make_m3_checkpoint
from worker.wire import BLOCK_SIZE, SamplingParams

# Over the sparse threshold (topk 3 x 128 tokens), so MSA selects blocks; prefilled in chunks.
PROMPT = [(37 * i + 11) % 250 + 10 for i in range(700)]
SHARED = PROMPT[:512] + [(13 * i) % 250 + 10 for i in range(90)]  # 4 cached pages, new tail
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory):
    return make_m3_checkpoint(tmp_path_factory.mktemp("tp-m3"), seed=2)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _engine(m3_dir, **parallel) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(m3_dir), device="cpu", dtype="float32",
                                  kv_cache_memory="8MiB", max_num_batched_tokens=160,
                                  debug_checks=True, **parallel))


def _outputs(engine: LLMEngine):
    """Greedy outputs with top-5 logprobs, then a prefix-cache hit beside a fresh prompt,
    then seeded sampling; how many prompt tokens came from the cache; and the prompt's
    scored tokens (prompt logprobs, in prefill chunks)."""
    greedy = engine.generate([PROMPT], GREEDY, use_tqdm=False)
    greedy += engine.generate([SHARED, PROMPT[:300]], GREEDY, use_tqdm=False)
    seeded = engine.generate([PROMPT, SHARED], SEEDED, use_tqdm=False)
    cached = engine.stats.prompt_tokens_cached
    scored = engine.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=2),
                             use_tqdm=False)[0].prompt_logprobs
    return greedy, seeded, cached, [lp.logprob for lp in scored]


@pytest.fixture(scope="module")
def single_process(m3_dir):
    engine = _engine(m3_dir)
    return _outputs(engine)


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2},
                                      {"tensor_parallel_size": 2, "expert_parallel": True,
                                       "overlap_scheduling": True}],
                         ids=["tp2", "tp2-ep2-overlapped"])
def test_two_ranks_compute_what_one_process_computes(m3_dir, local_ray, single_process,
                                                     parallel):
    engine = _engine(m3_dir, **parallel)
    try:
        greedy, seeded, cached, scored = _outputs(engine)
    finally:
        engine.close()
    want_greedy, want_seeded, want_cached, want_scored = single_process
    assert cached == want_cached > 0
    assert len(scored) == len(PROMPT) - 1
    assert scored == pytest.approx(want_scored, abs=1e-4)
    for ours, want in zip(greedy, want_greedy, strict=True):
        assert ours.new_token_ids == want.new_token_ids
        for got, expected in zip(ours.logprobs, want.logprobs, strict=True):
            assert [t for t, _ in got.top] == [t for t, _ in expected.top]
            assert [lp for _, lp in got.top] == pytest.approx([lp for _, lp in expected.top],
                                                              abs=1e-4)
    assert [o.new_token_ids for o in seeded] == [o.new_token_ids for o in want_seeded]


def test_graphed_decode_steps_replay_on_every_rank(m3_dir, local_ray, single_process):
    """Decode steps through DecodeGraphs (uncaptured on CPU: the same static buffers and
    padding): rank 0 sends each step's DecodeInputs, the other rank replays the same step from
    its own buffers, and the outputs are the single process's. Overlapped: each decode's
    input token reaches the other rank by a broadcast on the device, not in DecodeInputs."""
    engine = _engine(m3_dir, tensor_parallel_size=2, overlap_scheduling=True)
    try:
        engine.runner.decode_graphs = DecodeGraphs(
            engine.runner.model, engine.cache, engine.topk, max_batch=4,
            max_model_len=engine.max_model_len, capture=False)
        replayed = []
        replay = engine.runner.decode_graphs.replay
        engine.runner.decode_graphs.replay = lambda inputs, fed=None: \
            replayed.append(inputs) or replay(inputs, fed)
        ours = engine.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    finally:
        engine.close()
    want = single_process[0][0]
    assert len(replayed) == GREEDY.max_tokens - 1  # every decode step was graphed
    assert all(inputs.fed_rows == [0] for inputs in replayed), "tokens fed on the device"
    assert ours.new_token_ids == want.new_token_ids
    for got, expected in zip(ours.logprobs, want.logprobs, strict=True):
        assert [lp for _, lp in got.top] == pytest.approx([lp for _, lp in expected.top],
                                                          abs=1e-4)


def test_fp8_weights_split_over_two_ranks_compute_what_one_process_computes(tmp_path,
                                                                           local_ray):
    """The scales split with their weights (block scales of 16 x 16 rows and columns)."""
    fp8_dir = make_m3_checkpoint(tmp_path / "fp8", seed=2, fp8_layout="block")
    want = _engine(fp8_dir).generate([PROMPT], GREEDY, use_tqdm=False)[0]
    engine = _engine(fp8_dir, tensor_parallel_size=2)
    try:
        ours = engine.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    finally:
        engine.close()
    assert ours.new_token_ids == want.new_token_ids
    # Activations are quantized to e4m3 as the GEMMs run: an input that differs in its last
    # fp32 bits (the all-reduce adds in another order) can round to the neighbouring e4m3
    # value, and the tiny model's random weights amplify such flips (a relative 1e-6 of noise
    # on its activations moves a log-probability by up to 0.19). So the check is the greedy
    # tokens and log-probabilities within flips; scales split wrongly would move them by whole
    # units.
    for got, expected in zip(ours.logprobs, want.logprobs, strict=True):
        assert [lp for _, lp in got.top] == pytest.approx([lp for _, lp in expected.top],
                                                          abs=5e-2)


def test_pages_pulled_between_split_replicas_give_the_same_tokens(m3_dir, local_ray,
                                                                  single_process):
    """A TP 2 replica exports a prompt's pages (rank 1's shard of each page gathered to rank 0);
    another TP 2 replica imports them (rank 1's shards scattered to its host tier) and answers
    the prompt from them with the single process's tokens. A replica split otherwise refuses
    them: its pages are not the same bytes."""
    # One process holds one replica's group at a time (as each Serve replica does): the
    # holder's pages travel as the payloads a pull carries, after it has closed.
    holder = _engine(m3_dir, tensor_parallel_size=2, kv_host_memory="8MiB")
    try:
        holder.generate([PROMPT], GREEDY, use_tqdm=False)
        full = (len(PROMPT) - 1) // BLOCK_SIZE * BLOCK_SIZE
        hashes = chain_page_hashes(PROMPT[:full], holder.block_manager.salt)
        payloads = holder.page_exchange.export(hashes)
        assert [p.page_hash for p in payloads] == hashes
        assert sum(a.size for a in payloads[0].arrays) == holder.page_exchange.payload_bytes
    finally:
        holder.close()
    puller = _engine(m3_dir, tensor_parallel_size=2, kv_host_memory="8MiB")
    try:
        result = puller.page_exchange.import_(hashes, payloads)
        assert (result.accepted, result.present, result.refused) == (len(hashes), 0, 0)
        ours = puller.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    finally:
        puller.close()
    assert ours.usage.cached_tokens == full
    want = single_process[0][0]
    assert ours.new_token_ids == want.new_token_ids
    for got, expected in zip(ours.logprobs, want.logprobs, strict=True):
        assert [lp for _, lp in got.top] == pytest.approx([lp for _, lp in expected.top],
                                                          abs=1e-4)
    whole = _engine(m3_dir, kv_host_memory="8MiB")
    assert whole.page_exchange.import_(hashes, payloads).refused == len(hashes)
    assert whole.generate([PROMPT], GREEDY, use_tqdm=False)[0].usage.cached_tokens == 0


def test_a_dead_rank_makes_the_replica_report_itself_dead(m3_dir, local_ray):
    engine = _engine(m3_dir, tensor_parallel_size=2)
    try:
        engine.peers.check_alive()
        ray.kill(engine.peers.ranks[0])
        deadline = time.monotonic() + 30
        with pytest.raises(EngineDeadError, match="rank 1 of this replica's tensor-parallel"):
            while time.monotonic() < deadline:
                engine.peers.check_alive()
                time.sleep(0.2)
    finally:
        engine.close()

"""The engine on the tiny MSA checkpoint (topk 4, so prompts over 512 tokens are sparse)."""

from __future__ import annotations

import asyncio
import functools
import random

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from worker.config import EngineConfig
from worker.engine.async_engine import AsyncLLMEngine
from worker.engine.llm_engine import LLMEngine
from worker.engine.sequence import FinishReason
from worker.errors import CapacityError, InvalidRequestError
from worker.prefix_hash import chain_page_hashes
from worker.wire import MultimodalSpan, PageEvent, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_prompt(length: int, seed: int, vocab: int = 259) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def generate_alone(engine, prompt, params=GREEDY) -> list[int]:
    return engine.generate([prompt], params, use_tqdm=False)[0].new_token_ids


def assert_no_pages_held(engine) -> None:
    bm = engine.block_manager
    bm.check_invariants(live_sequences=[])
    assert bm.num_available_pages == bm.num_pages, "pages still referenced after all requests"


def test_batch_invariance(make_tiny_engine):
    """16 concurrent requests of different lengths, chunked and mixed with decodes, equal
    each request run alone."""
    prompts = [random_prompt(n, seed=n) for n in
               (5, 17, 60, 128, 129, 200, 255, 256, 300, 401, 513, 600, 640, 700, 777, 900)]
    batched = make_tiny_engine(max_num_batched_tokens=512)
    outputs = batched.generate(prompts, GREEDY, use_tqdm=False)
    assert batched.stats.steps > 12 + 2, "prefills must have been chunked across steps"
    alone = make_tiny_engine(enable_prefix_caching=False)
    for prompt, out in zip(prompts, outputs):
        assert out.new_token_ids == generate_alone(alone, prompt), f"len {len(prompt)} differs"
        assert out.finish_reason is FinishReason.LENGTH and len(out.new_token_ids) == 12
    assert_no_pages_held(batched)


def test_fp8_index_key_cache(make_tiny_engine):
    """fp8 index keys: a smaller page, the same math elsewhere, and first tokens of sparse
    prompts that mostly agree with full-precision index keys (only near-tie blocks may flip,
    and a greedy continuation diverges for good after its first different token)."""
    fp8 = make_tiny_engine(index_key_dtype="float8_e4m3fn")
    full = make_tiny_engine()
    assert fp8.cache.k_idx.dtype == torch.float8_e4m3fn
    assert fp8.block_manager.num_pages > full.block_manager.num_pages  # same memory, more pages
    prompts = [random_prompt(n, seed=n) for n in range(600, 1000, 40)]
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    ours = fp8.generate(prompts, first, use_tqdm=False)
    theirs = full.generate(prompts, first, use_tqdm=False)
    same = sum(o.new_token_ids == t.new_token_ids for o, t in zip(ours, theirs))
    assert same >= 8, f"only {same} of 10 first tokens agree"
    assert_no_pages_held(fp8)


def test_fp8_index_keys_need_a_learned_indexer(tmp_path):
    from worker.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.errors import ModelLoadError
    from worker.tiny_model import make_random_checkpoint, tiny_config_dict

    raw = tiny_config_dict(0)
    raw["msa_config"] = {"indexer": "derived", "topk": 4}
    path = make_random_checkpoint(tmp_path / "derived", raw)
    with pytest.raises(ModelLoadError, match="learned index branch"):
        LLMEngine(EngineConfig(model=str(path), device="cpu", index_key_dtype="float8_e4m3fn"))


def test_prefix_cache_computes_only_new_tokens(make_tiny_engine):
    events: list[PageEvent] = []
    engine = make_tiny_engine()
    engine.block_manager.listener = events.append
    prefix = random_prompt(1000, seed=1)
    first = prefix + random_prompt(40, seed=2)
    second = prefix + random_prompt(64, seed=3)
    generate_alone(engine, first)
    stored = {h for e in events if e.kind == "stored" for h in e.hashes}
    assert len(stored) >= 1000 // 128

    before = engine.stats.prompt_tokens_computed
    out = engine.generate([second], GREEDY, use_tqdm=False)[0]
    cached = (1000 // 128) * 128
    assert out.usage.cached_tokens == cached
    assert engine.stats.prompt_tokens_computed - before == len(second) - cached
    uncached = make_tiny_engine(enable_prefix_caching=False)
    assert out.new_token_ids == generate_alone(uncached, second)
    assert_no_pages_held(engine)


def test_page_hashes_are_salted_by_model_and_content():
    tokens = random_prompt(512, seed=4)
    base = chain_page_hashes(tokens, salt="model-a")
    assert len(base) == 4 and len(set(base)) == 4
    assert set(base).isdisjoint(chain_page_hashes(tokens, salt="model-b"))
    image_a = chain_page_hashes(tokens, "model-a", [MultimodalSpan(130, 64, "img-a")])
    image_b = chain_page_hashes(tokens, "model-a", [MultimodalSpan(130, 64, "img-b")])
    assert image_a[0] == base[0], "a page the image does not touch keeps its hash"
    assert image_a[1] != base[1] and image_a[1] != image_b[1]
    assert image_a[3] != image_b[3], "every later page differs through the chain"
    assert chain_page_hashes(tokens[:300], "model-a") == base[:2]


def test_preemption_still_gives_unconstrained_outputs(make_tiny_engine):
    prompts = [random_prompt(n, seed=10 + n) for n in (300, 350, 400, 450, 500, 550)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # 1 MiB = 6 pages of 128 tokens: far less than the ~24 the requests need together.
    small = make_tiny_engine(kv_cache_memory="1MiB", max_num_batched_tokens=1024)
    assert small.block_manager.num_pages == 6
    constrained = small.generate(prompts, params, use_tqdm=False)
    assert small.stats.preemptions > 0
    roomy = make_tiny_engine(kv_cache_memory="64MiB", max_num_batched_tokens=1024)
    for a, b in zip(constrained, roomy.generate(prompts, params, use_tqdm=False)):
        assert a.new_token_ids == b.new_token_ids
    assert_no_pages_held(small)


def test_bad_requests_fail_at_add_and_disturb_nothing(make_tiny_engine):
    engine = make_tiny_engine(kv_cache_memory="1MiB")
    good = engine.add_request(random_prompt(50, seed=5), GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request([5, 6], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.add_request([5, 6], SamplingParams(temperature=-0.5))
    with pytest.raises(CapacityError, match="KV cache holds at most 768"):
        engine.add_request(random_prompt(2000, seed=6), GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("", GREEDY)
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request([5, 10**6], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([5, 6], GREEDY, request_id=good)
    outputs = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert list(outputs) == [good] and len(outputs[good]) == 12
    assert_no_pages_held(engine)


def test_stop_strings_stop_tokens_and_eos(make_tiny_engine):
    engine = make_tiny_engine()
    prompt = random_prompt(40, seed=7)
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30,
                                                    ignore_eos=True), use_tqdm=False)[0]
    stop_token = free.new_token_ids[5]
    by_token = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30,
                                                        stop_token_ids=[stop_token],
                                                        ignore_eos=True), use_tqdm=False)[0]
    first = free.new_token_ids.index(stop_token)
    assert by_token.new_token_ids == free.new_token_ids[: first + 1]
    assert by_token.finish_reason is FinishReason.STOP
    stop_text = free.text[6:9]
    by_text = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop_text],
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert by_text.finish_reason is FinishReason.STOP
    assert by_text.text == free.text[: free.text.index(stop_text)]
    assert_no_pages_held(engine)


def test_streamed_deltas_hold_back_partial_stop_strings(make_tiny_engine):
    engine = make_tiny_engine()
    prompt = random_prompt(30, seed=8)
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                           use_tqdm=False)[0]
    stop_text = free.text[10:14]
    request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20,
                                                           stop=[stop_text], ignore_eos=True))
    deltas = []
    while engine.has_unfinished_requests:
        deltas += [o.delta for o in engine.step() if o.request_id == request_id]
    streamed = "".join(deltas)
    assert streamed == free.text[: free.text.index(stop_text)]
    assert stop_text not in streamed


def test_seeded_sampling_is_reproducible_and_logprobs_are_consistent(make_tiny_engine):
    engine = make_tiny_engine()
    prompt = random_prompt(64, seed=9)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True, logprobs=3)
    a, b = engine.generate([prompt, prompt], params, use_tqdm=False)
    assert a.new_token_ids == b.new_token_ids
    other = engine.generate([prompt], SamplingParams(temperature=0.8, seed=99, max_tokens=16,
                                                     ignore_eos=True), use_tqdm=False)[0]
    assert other.new_token_ids != a.new_token_ids
    assert len(a.logprobs) == 16
    for entry, token in zip(a.logprobs, a.new_token_ids):
        assert entry.token_id == token and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.logprob - 1e-6
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=1,
                                                      ignore_eos=True), use_tqdm=False)[0]
    assert all(e.top[0][0] == e.token_id for e in greedy.logprobs)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_parallel_samples_share_the_prompt_pages(make_tiny_engine, prefix_caching):
    """n=3: the prompt's full pages are computed once and shared; each sample computes only
    the partial last page, and equals the same seeded request sent alone."""
    engine = make_tiny_engine(enable_prefix_caching=prefix_caching)
    prompt = random_prompt(600, seed=21)
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True, n=3)
    samples = engine.generate([prompt], params, use_tqdm=False)
    assert [s.index for s in samples] == [0, 1, 2]
    tail = len(prompt) % 128
    assert engine.stats.prompt_tokens_computed == len(prompt) + 2 * tail
    assert [s.usage.cached_tokens for s in samples] == [0, len(prompt) - tail, len(prompt) - tail]
    assert len({tuple(s.new_token_ids) for s in samples}) == 3, "samples must differ"
    for index, sample in enumerate(samples):  # sample i draws from seed 7 + i
        alone = make_tiny_engine().generate(
            [prompt], SamplingParams(temperature=0.9, seed=7 + index, max_tokens=12,
                                     ignore_eos=True), use_tqdm=False)[0]
        assert sample.new_token_ids == alone.new_token_ids
    assert_no_pages_held(engine)


def test_aborting_a_request_ends_all_its_samples(make_tiny_engine):
    engine = make_tiny_engine()
    request_id = engine.add_request(random_prompt(300, seed=4),
                                    SamplingParams(max_tokens=50, n=4, ignore_eos=True))
    for _ in range(3):
        engine.step()
    outputs = engine.abort(request_id)
    assert sorted(o.index for o in outputs) == [0, 1, 2, 3]
    assert all(o.finished and o.finish_reason is FinishReason.ABORT for o in outputs)
    assert not engine.has_unfinished_requests
    assert_no_pages_held(engine)


def test_incremental_detokenizer_never_splits_utf8(make_tiny_engine):
    engine = make_tiny_engine()
    text = "héllo wörld 🎉 ok ✓"
    ids = engine.tokenizer.encode(text)  # byte-level: multi-byte characters span tokens
    assert len(ids) > len(text)
    from worker.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(engine.tokenizer, [])
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_async_engine_streams_and_cancels(make_tiny_engine):
    engine = make_tiny_engine()
    async_engine = AsyncLLMEngine(engine)

    async def scenario():
        prompt = random_prompt(100, seed=12)
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        tokens = []
        async for out in async_engine.generate(prompt, params):
            tokens += out.new_token_ids
        assert tokens == generate_alone(make_tiny_engine(), prompt, params)

        # A consumer that walks away mid-stream aborts its request in the engine.
        long_params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        stream = async_engine.generate(prompt, long_params)
        async for _ in stream:
            break
        await stream.aclose()
        # Bad input raises before the first output, on the caller's side.
        with pytest.raises(InvalidRequestError):
            async for _ in async_engine.generate(prompt, SamplingParams(max_tokens=0)):
                pass
        for _ in range(200):
            if async_engine.num_unfinished == 0 and not engine.requests:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    async_engine.shutdown()
    assert not engine.requests
    assert_no_pages_held(engine)


def test_slow_consumer_gets_coalesced_outputs(make_tiny_engine):
    engine = make_tiny_engine()
    async_engine = AsyncLLMEngine(engine)

    async def scenario():
        prompt = random_prompt(20, seed=13)
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        outputs = []
        async for out in async_engine.generate(prompt, params):
            outputs.append(out)
            await asyncio.sleep(0.05)  # the engine runs ahead meanwhile
        assert sum(len(o.new_token_ids) for o in outputs) == 30
        assert len(outputs) < 30, "outputs produced while the consumer slept were merged"
        assert "".join(o.delta for o in outputs) == outputs[-1].text

    asyncio.run(scenario())
    async_engine.shutdown()


@settings(max_examples=12, stateful_step_count=25, deadline=None)
class EngineLeakMachine(RuleBasedStateMachine):
    """Random adds, aborts, stop strings and steps on a small pool: nothing ever leaks."""

    engine_factory = None

    def __init__(self):
        super().__init__()
        self.engine = type(self).engine_factory(kv_cache_memory="1MiB",
                                                max_num_batched_tokens=300)
        self.live: list[str] = []

    @rule(length=st.integers(1, 500), max_tokens=st.integers(1, 40), seed=st.integers(0, 999),
          with_stop=st.booleans(), n=st.sampled_from([1, 1, 3]))
    def add(self, length, max_tokens, seed, with_stop, n):
        stop = ["a", "e"] if with_stop else []
        self.live.append(self.engine.add_request(
            random_prompt(length, seed), SamplingParams(temperature=0.7, seed=seed, stop=stop,
                                                        max_tokens=max_tokens, n=n)))

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def abort(self, index):
        request_id = self.live[index % len(self.live)]
        if request_id in self.engine.requests:
            self.engine.abort(request_id)

    @rule(steps=st.integers(1, 6))
    def step(self, steps):
        for _ in range(steps):
            self.engine.step()

    @invariant()
    def bookkeeping_is_consistent(self):
        live = self.engine.live_sequences
        self.engine.block_manager.check_invariants(live_sequences=live)

    def teardown(self):
        while self.engine.has_unfinished_requests:
            self.engine.step()
        assert_no_pages_held(self.engine)


@pytest.mark.parametrize("overlap,host_memory", [(False, 0), (True, 0), (True, "1MiB")],
                         ids=["serial", "overlapped", "overlapped-host-tier"])
def test_no_page_leaks_under_random_traffic(make_tiny_engine, overlap, host_memory):
    EngineLeakMachine.engine_factory = staticmethod(
        functools.partial(make_tiny_engine, overlap_scheduling=overlap,
                          kv_host_memory=host_memory))
    EngineLeakMachine.TestCase().runTest()


def test_warm_up_leaves_no_trace(make_tiny_engine, tiny_model_dir):
    """The start-up warm-up (on by default on CUDA) runs through a private BlockManager: no page
    held or cached, no event published, no stats, and the same generations as a cold engine."""
    events = []
    warm = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32",
                                  kv_cache_memory="16MiB", warm_up=True),
                     page_listener=events.append)
    cold = make_tiny_engine(warm_up=False)
    assert warm.stats == cold.stats and not warm.requests
    assert warm.block_manager.cached_hashes() == [] and events == []
    assert_no_pages_held(warm)
    prompts = [random_prompt(n, seed=n) for n in (40, 700)]
    sampled = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    for params in (GREEDY, sampled):
        assert ([o.new_token_ids for o in warm.generate(prompts, params, use_tqdm=False)]
                == [o.new_token_ids for o in cold.generate(prompts, params, use_tqdm=False)])

"""One request can never hurt another: an error raised for one request inside the engine fails
that request alone; the loop and every other stream go on, and no page leaks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.worker.test_engine import GREEDY, assert_no_pages_held, generate_alone, random_prompt
from worker.engine.async_engine import AsyncLLMEngine
from worker.engine.llm_engine import MAX_FAILED_STEPS, LLMEngine
from worker.engine.sequence import FinishReason
from worker.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from worker.wire import SEED_RANGE, SamplingParams


def poison_model(engine: LLMEngine, poison: int) -> None:
    """The model raises for any step whose tokens include `poison`: an error that only one
    request's input triggers (as a vision encoder or a kernel refusing its input would)."""
    model = engine.runner.model
    original = model.forward

    def forward(input_ids, *args, **kwargs):
        if (input_ids == poison).any():
            raise RuntimeError("this input breaks the model")
        return original(input_ids, *args, **kwargs)

    model.forward = forward


def unused_token(token_lists: list[list[int]]) -> int:
    used = {t for tokens in token_lists for t in tokens}
    return next(t for t in range(3, 259) if t not in used)


@pytest.mark.parametrize(
    "field, value",
    [("seed", 2**64), ("seed", -(2**63) - 1), ("top_k", 2**63), ("temperature", float("inf")),
     ("temperature", float("nan")), ("top_p", float("nan")), ("min_p", float("inf")),
     ("max_tokens", 2**80), ("logprobs", 10**30), ("stop_token_ids", [-1]),
     ("temperature", True)])
def test_sampling_fields_that_would_overflow_are_refused(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_extreme_but_valid_values_run(make_tiny_engine):
    """The largest seed and top_k the validator lets through sample without overflowing."""
    engine = make_tiny_engine()
    params = [SamplingParams(max_tokens=3, seed=SEED_RANGE[1], top_k=2**31 - 1),
              SamplingParams(max_tokens=3, seed=SEED_RANGE[0], top_k=1)]
    outputs = engine.generate([random_prompt(20, 1), random_prompt(20, 2)], params,
                              use_tqdm=False)
    assert [len(o.new_token_ids) for o in outputs] == [3, 3]
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        engine.add_request(random_prompt(5, 3), SamplingParams(stop_token_ids=[10**6]))


def test_a_failing_request_fails_alone(make_tiny_engine):
    """Three requests batched with one that breaks the model: that one ends with an error, the
    other three finish with exactly the tokens they get alone, and no page is held after."""
    engine = make_tiny_engine(max_num_batched_tokens=1024)
    good = [random_prompt(n, seed=n) for n in (40, 300, 700)]
    expected = [generate_alone(engine, p) for p in good]
    poison = unused_token(good + expected)
    poison_model(engine, poison)
    bad = random_prompt(200, seed=9)
    bad[150] = poison
    outputs = engine.generate([good[0], bad, good[1], good[2]], GREEDY, use_tqdm=False)
    failed = outputs[1]
    assert failed.finish_reason is FinishReason.ERROR and failed.finished
    assert isinstance(failed.error, RequestFailedError)
    assert "this input breaks the model" in str(failed.error)
    assert [o.new_token_ids for o in (outputs[0], outputs[2], outputs[3])] == expected
    assert all(o.finish_reason is FinishReason.LENGTH for o in (outputs[0], outputs[2], outputs[3]))
    assert_no_pages_held(engine)


def test_a_request_failing_in_decode_fails_alone(make_tiny_engine):
    """The error comes only once the request decodes (its sampled token is the poison)."""
    engine = make_tiny_engine()
    other = random_prompt(50, seed=5)
    expected = generate_alone(engine, other)
    for seed in range(100):  # a prompt whose first token appears nowhere else
        prompt = random_prompt(30, seed=seed)
        first = generate_alone(engine, prompt)[0]
        if first not in other + expected + prompt:
            break
    poison_model(engine, first)
    outputs = engine.generate([prompt, other], GREEDY, use_tqdm=False)
    assert outputs[0].finish_reason is FinishReason.ERROR
    assert outputs[0].new_token_ids == [first], "the token sampled before the failure is kept"
    assert outputs[1].new_token_ids == expected
    assert_no_pages_held(engine)


def test_an_engine_that_fails_everything_gives_up(make_tiny_engine):
    """A broken device fails every request of every step: after MAX_FAILED_STEPS such steps the
    engine raises, so the replica's health check fails and Serve replaces it."""
    engine = make_tiny_engine()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    engine.runner.model.forward = broken
    for i in range(MAX_FAILED_STEPS - 1):
        engine.add_request(random_prompt(10, seed=i), GREEDY)
        [output] = engine.step()
        assert output.finish_reason is FinishReason.ERROR
    engine.add_request(random_prompt(10, seed=99), GREEDY)
    with pytest.raises(EngineDeadError, match="device lost"):
        engine.step()


def test_async_streams_survive_a_failing_request(make_tiny_engine):
    """Through AsyncLLMEngine: the failing request's stream raises, the loop stays alive, the
    concurrent streams complete, and a later request is served."""
    engine = make_tiny_engine()
    good = random_prompt(300, seed=1)
    expected = generate_alone(engine, good)
    poison = unused_token([good, expected, generate_alone(engine, good[:200])])
    poison_model(engine, poison)
    async_engine = AsyncLLMEngine(engine)
    bad = random_prompt(100, seed=2)
    bad[50] = poison

    async def collect(prompt):
        tokens = []
        async for out in async_engine.generate(prompt, GREEDY):
            tokens += out.new_token_ids
        return tokens

    async def main():
        results = await asyncio.gather(collect(good), collect(bad), collect(good[:200]),
                                       return_exceptions=True)
        after = await collect(good)
        return results, after

    try:
        (first, error, third), after = asyncio.run(main())
        async_engine.check_alive(stuck_step_s=60)
    finally:
        async_engine.shutdown()
    assert isinstance(error, RequestFailedError)
    assert first == expected and after == expected and len(third) == GREEDY.max_tokens
    assert_no_pages_held(engine)


def test_health_does_not_wait_for_a_long_step(make_tiny_engine):
    """check_alive answers at once while a step runs, and fails only past the stuck deadline."""
    engine = make_tiny_engine()
    original = engine.runner.launch
    entered, release = threading.Event(), threading.Event()

    def slow_launch(batch, earlier):
        entered.set()
        release.wait(timeout=30)
        return original(batch, earlier)

    engine.runner.launch = slow_launch
    async_engine = AsyncLLMEngine(engine)

    async def main():
        task = asyncio.ensure_future(_drain(async_engine.generate(random_prompt(10, 1), GREEDY)))
        await asyncio.to_thread(entered.wait, 10)
        async_engine.check_alive(stuck_step_s=60)  # a long step is healthy
        await asyncio.sleep(0.2)
        with pytest.raises(EngineDeadError, match="has run for"):
            async_engine.check_alive(stuck_step_s=0.1)
        release.set()
        await task

    try:
        asyncio.run(main())
    finally:
        release.set()
        async_engine.shutdown()


async def _drain(stream):
    async for _ in stream:
        pass


def test_prompt_byte_bound_is_sound(default_engine):
    """No token of the default model stands for more bytes than max_token_bytes, so a text over
    context * max_token_bytes bytes can never fit: refusing it unread is safe."""
    tokenizer = default_engine.tokenizer
    longest = max(len(tokenizer.decode([t], skip_special_tokens=False).encode())
                  for t in range(tokenizer.vocab_size))
    assert longest <= tokenizer.max_token_bytes
    context = default_engine.max_model_len
    text = "word " * (tokenizer.max_prompt_bytes(context) // 5 + 1)
    assert len(tokenizer.encode(text)) > context

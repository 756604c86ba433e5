"""LLMEngine: requests in, token/text deltas out, one `step()` at a time.

The engine owns the model, the KV cache and the scheduling state; it is not thread-safe.
`AsyncLLMEngine` drives it from a background thread for servers.

With overlapped scheduling (`overlap_scheduling`; on by default for single-GPU CUDA
replicas, asked for with tensor parallelism) a step
schedules and launches step N+1 before it reads step N's sampled tokens, so the GPU runs N+1
while the host detokenizes N, matches stop strings and builds the outputs. Step N+1 takes N's
tokens as inputs on the device. A sequence that N finished (EOS, a stop string) has one more
token computed in N+1, which is thrown away: nobody receives a token past a stop, and usage
counts only the tokens delivered. Sequences that finish by length are not scheduled again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from kernels import BLOCK_SIZE
from worker.config import EngineConfig
from worker.engine.block_manager import BlockManager, pages_for
from worker.engine.block_table import BlockTables
from worker.engine.cuda_graphs import DecodeGraphs, max_graph_batch
from worker.engine.grammar import GrammarCompiler
from worker.engine.host_tier import HostPageIndex
from worker.engine.kv_cache import HostKVCache, KVCache
from worker.engine.model_runner import LaunchedStep, ModelRunner
from worker.engine.multimodal import VisionEncoder, validate_inputs
from worker.engine.page_exchange import PageExchange
from worker.engine.rank_workers import CacheSetup, RankWorkers
from worker.engine.sampler import Sampler
from worker.engine.scheduler import ScheduledBatch, Scheduler
from worker.engine.sequence import FinishReason, Sequence, SequenceStatus
from worker.errors import (
    CapacityError,
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
    MSAServeError,
    RequestFailedError,
    RequestNotFoundError,
)
from worker.loader import load_model
from worker.tokenizer import IncrementalDetokenizer
from worker.wire import MultimodalInput, PageEventListener, SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_MEMORY = 1 << 30
MAX_FAILED_STEPS = 3  # steps in a row that fail every request before the engine gives up


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    """What one sample of a request produced since its previous output (deltas), plus
    running totals. A request with n > 1 has n samples, told apart by `index`."""

    request_id: str
    new_token_ids: list[int]
    delta: str
    text: str  # all text emitted so far
    finished: bool
    finish_reason: FinishReason | None
    usage: Usage
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: MSAServeError | None = None  # set when finish_reason is ERROR
    index: int = 0  # which of the request's n samples
    # SamplingParams.prompt_logprobs: prompt tokens 1.. scored, on the sample's first output.
    prompt_logprobs: list[TokenLogprob] | None = None

    def merge(self, later: "RequestOutput") -> "RequestOutput":
        """Coalesces two consecutive outputs of one sample (for slow consumers)."""
        assert later.index == self.index, "only outputs of the same sample merge"
        return RequestOutput(self.request_id, self.new_token_ids + later.new_token_ids,
                             self.delta + later.delta, later.text, later.finished,
                             later.finish_reason, later.usage, self.logprobs + later.logprobs,
                             later.error, self.index,
                             self.prompt_logprobs or later.prompt_logprobs)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_computed: int = 0  # prefill work actually done (prefix hits excluded)
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    preemptions: int = 0


def resolve_device_and_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but no CUDA device is visible")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


class LLMEngine:
    def __init__(self, config: EngineConfig, page_listener: PageEventListener | None = None):
        self.config = config
        self.device, self.dtype = resolve_device_and_dtype(config)
        # Ranks 1.. start first: the layers of every rank are built inside the group.
        self.peers = (RankWorkers(config, self.device) if config.tensor_parallel_size > 1
                      else None)
        try:
            self._build(page_listener)
        except BaseException:
            if self.peers is not None:  # they must not outlive a replica that failed to start
                self.peers.close(graceful=False)
            raise
        num_pages = self.block_manager.num_pages
        logger.info("engine ready: model=%s device=%s dtype=%s kv_pages=%d kv_tokens=%d "
                    "max_model_len=%d topk=%d tensor_parallel=%d", self.model_name, self.device,
                    str(self.dtype).removeprefix("torch."), num_pages, num_pages * BLOCK_SIZE,
                    self.max_model_len, self.topk, self.config.tensor_parallel_size)

    def _build(self, page_listener: PageEventListener | None) -> None:
        """The model, KV cache, scheduling state and runner (on every rank's layers)."""
        config = self.config
        loaded = load_model(config.model, self.dtype, self.device, config.served_model_name,
                            config.load_format, config.mxfp8_mode)
        self.model_name = loaded.name
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.index_key_dtype = self._index_key_dtype()
        self.topk = config.topk or self.model_config.msa.topk  # blocks kept per query
        num_pages = self._num_pages()
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings,
                                 num_pages * BLOCK_SIZE)
        self.cache = KVCache(self.model_config, num_pages, self.dtype, self.device,
                             self.index_key_dtype)
        host_slots = self.config.kv_host_memory // self.page_bytes
        host_index = HostPageIndex(host_slots, page_listener) if host_slots else None
        self.host_cache = HostKVCache(self.cache, host_slots) if host_slots else None
        self.block_manager = BlockManager(num_pages, salt=loaded.fingerprint,
                                          enable_prefix_caching=config.enable_prefix_caching,
                                          listener=page_listener, debug_checks=config.debug_checks,
                                          host=host_index)
        self.page_exchange = (PageExchange(self.block_manager, self.host_cache, self.peers)
                              if host_slots else None)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        decode_graphs = self._decode_graphs(loaded.model)
        if self.peers is not None:
            self.peers.start_caches(CacheSetup(num_pages, self.index_key_dtype, self.topk,
                                               self.max_model_len, host_slots))
        block_tables = BlockTables(config.max_num_seqs, pages_for(self.max_model_len))
        self.runner = ModelRunner(loaded.model, self.cache, Sampler(config.seed, self.device),
                                  block_tables, topk=config.topk, debug_checks=config.debug_checks,
                                  decode_graphs=decode_graphs,
                                  vision=(VisionEncoder(loaded.model.visual)
                                          if loaded.model.visual is not None else None),
                                  peers=self.peers, host_cache=self.host_cache)
        self.requests: dict[str, list[Sequence]] = {}  # each live request's unfinished samples
        self.overlap = (config.overlap_scheduling if config.overlap_scheduling is not None
                        else self.device.type == "cuda" and self.peers is None)
        self._unread: list[LaunchedStep] = []  # launched steps whose tokens are not read yet
        self.stats = EngineStats()
        self._failed_steps = 0  # consecutive steps in which every request failed
        if config.warm_up if config.warm_up is not None else self.device.type == "cuda":
            self._warm_up()

    def _warm_up(self) -> None:
        """Runs throwaway requests through every kind of step (a fresh prompt past the sparse
        threshold, a chunk after a cached prefix, batched decodes) and captures every decode
        graph, so the first users do not wait for Triton to compile (up to ~1 s per kernel
        shape) or for graph capture."""
        started = time.perf_counter()
        with self._private_state():
            length = max(1, min(self.max_model_len - 8, 2 * self.topk * BLOCK_SIZE + 64))
            prompt = self._filler_prompt(length)
            params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            self.generate([prompt], params, use_tqdm=False)  # fresh prompt, decode of one
            batch = min(self.config.max_num_seqs, 8)
            self.generate([prompt[:-1] + [t] for t in self._filler_prompt(batch, stride=1)],
                          params, use_tqdm=False)  # cached prefix
            self.runner.capture_decode_graphs()
        logger.info("warm-up done in %.1f s", time.perf_counter() - started)

    def measure_prefill_cost(self, num_tokens: int = 2 * BLOCK_SIZE) -> float:
        """Seconds one prompt token costs to compute here (a timed prefill, after one untimed
        run): what a replica weighs pulling pages from a peer against."""
        num_tokens = max(1, min(num_tokens, self.max_model_len - 2))
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        with self._private_state():
            self.generate([self._filler_prompt(num_tokens, stride=5)], params, use_tqdm=False)
            started = time.perf_counter()
            self.generate([self._filler_prompt(num_tokens, stride=7)], params, use_tqdm=False)
            return (time.perf_counter() - started) / num_tokens

    def _filler_prompt(self, length: int, stride: int = 7) -> list[int]:
        """Token ids for throwaway requests: no vision placeholder among them."""
        vision = self.model_config.vision
        placeholders = vision.placeholder_token_ids if vision else ()
        tokens = [t for t in range(min(self.model_config.vocab_size, 1024))
                  if t not in placeholders]
        return [tokens[(stride * i) % len(tokens)] for i in range(length)]

    @contextlib.contextmanager
    def _private_state(self):
        """Throwaway requests run through a private BlockManager (no host tier), which keeps
        their pages out of the real prefix cache and away from the page listener (their K/V
        are overwritten before anything reads them); afterwards no request, statistic or
        sampler state of theirs is left."""
        block_manager, scheduler = self.block_manager, self.scheduler
        self.block_manager = BlockManager(block_manager.num_pages, salt="warm-up")
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens, self.max_model_len)
        try:
            yield
        finally:
            self.block_manager, self.scheduler = block_manager, scheduler
            self.requests.clear()
            self._unread.clear()
            self.stats = EngineStats()
            self.runner.sampler = Sampler(self.config.seed, self.device)  # as if never used

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Built at the first constrained request: most engines never need one, and indexing
        a large vocabulary for xgrammar costs start-up time."""
        return GrammarCompiler(self.tokenizer, self.model_config.vocab_size)

    def _decode_graphs(self, model) -> DecodeGraphs | None:
        # debug_checks read indices on the host in every kernel call: not capturable.
        if self.device.type != "cuda" or self.config.enforce_eager or self.config.debug_checks:
            return None
        return DecodeGraphs(model, self.cache, self.topk, max_graph_batch(self.config),
                            self.max_model_len)

    def _index_key_dtype(self) -> torch.dtype | None:
        if self.config.index_key_dtype == "auto":
            return None
        if self.model_config.msa.indexer != "learned":
            raise ModelLoadError(
                f"index_key_dtype {self.config.index_key_dtype} needs a model with a learned "
                f"index branch; {self.model_name} scores blocks with its K cache (derived "
                f"indexer), which stays in {str(self.dtype).removeprefix('torch.')}")
        return getattr(torch, self.config.index_key_dtype)

    @functools.cached_property
    def page_bytes(self) -> int:
        """Bytes of one KV page (every layer's K, V and index keys) on this rank."""
        return KVCache.bytes_per_page(self.model_config, self.dtype, self.index_key_dtype)

    def _num_pages(self) -> int:
        page_bytes = self.page_bytes
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * self.config.gpu_memory_fraction)
            else:
                budget = _DEFAULT_CPU_KV_MEMORY
        num_pages = budget // page_bytes
        if num_pages < 1:
            raise CapacityError(f"kv_cache_memory of {budget} bytes holds no page; one page of "
                                f"this model needs {page_bytes} bytes")
        return num_pages

    # -- requests -------------------------------------------------------------------------------
    def make_sequence(self, prompt: str | list[int], params: SamplingParams,
                      request_id: str | None = None,
                      mm_inputs: tuple[MultimodalInput, ...] = ()) -> Sequence:
        """Validates and tokenizes a request without touching engine state (thread-safe)."""
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            kv_tokens = self.block_manager.num_pages * BLOCK_SIZE
            if self.max_model_len == kv_tokens and pages_for(len(token_ids) + 1) > \
                    self.block_manager.num_pages:
                raise CapacityError(
                    f"the prompt has {len(token_ids)} tokens but this replica's KV cache holds "
                    f"at most {kv_tokens}; raise kv_cache_memory")
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens (prompt + at least one generated token must fit)")
        validate_inputs(tuple(mm_inputs), token_ids, self.runner.model.visual, self.model_name)
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids)
        seq = Sequence(request_id or uuid.uuid4().hex, token_ids, params, detokenizer,
                       tuple(mm_inputs))
        if params.guided is not None:
            seq.grammar = self.grammars.matcher(params.guided)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queues a request; with n > 1 its other samples are forked from it here."""
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        samples = [seq] + [seq.fork(index) for index in range(1, seq.params.n)]
        self.requests[seq.request_id] = samples
        for sample in samples:
            self.scheduler.add(sample)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        seq = self.make_sequence(prompt, params or SamplingParams(), request_id)
        self.add_sequence(seq)
        return seq.request_id

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Ends every unfinished sample of a request."""
        samples = self.requests.get(request_id)
        if samples is None:
            raise RequestNotFoundError(f"no live request {request_id!r}")
        return [self._finish(seq, FinishReason.ABORT, [], None) for seq in list(samples)]

    @property
    def live_sequences(self) -> list[Sequence]:
        return [seq for samples in self.requests.values() for seq in samples]

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def close(self) -> None:
        """Stops the other ranks of a tensor-parallel replica (nothing to do otherwise)."""
        if self.peers is not None:
            self.peers.close()

    def load_figures(self) -> dict[str, int]:
        """What routers and dashboards weigh a replica by, plus its running token total."""
        running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
        host = self.block_manager.host
        exchange = self.page_exchange
        return {"running": len(running), "waiting": len(waiting),
                "kv_pages_in_use": self.block_manager.num_pages_in_use,
                "kv_pages_total": self.block_manager.num_pages,
                "generated_tokens": self.stats.generated_tokens,
                # What a work-counting router weighs (deployments/router.py): prompt tokens
                # still to prefill, and the KV pages the decoding sequences read every step.
                "prefill_tokens_queued": sum(seq.num_prompt_tokens - min(
                    seq.num_computed_tokens, seq.num_prompt_tokens) for seq in running + waiting),
                "decode_pages": sum(len(seq.page_ids) for seq in running if seq.prompt_computed),
                "kv_host_pages": len(host) if host is not None else 0,
                "kv_host_pages_total": host.num_slots if host is not None else 0,
                "kv_pages_from_host": self.block_manager.num_pages_from_host,
                "kv_pages_pulled": exchange.num_pages_pulled if exchange is not None else 0,
                "kv_pages_refused": exchange.num_pages_refused if exchange is not None else 0}

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and launches a step, then reads the tokens of the step launched before
        it (overlapped) or of this one (otherwise): the outputs of the step read."""
        batch = self.scheduler.schedule()
        self.runner.move_pages(self.block_manager.take_transfers())
        self.stats.preemptions += batch.num_preempted
        launched: list[LaunchedStep] = []
        failures: list[tuple[Sequence, Exception]] = []
        if batch:
            for seq, num_tokens in zip(batch.sequences, batch.num_tokens):
                start = seq.num_computed_tokens
                self.stats.prompt_tokens_computed += max(0, min(start + num_tokens,
                                                                seq.num_prompt_tokens) - start)
            launched, failures = self._launch_isolated(batch)
            self.stats.steps += 1
        earlier, self._unread = self._unread, launched
        if not self.overlap or any(step.needs_host_first for step in launched):
            earlier, self._unread = earlier + launched, []
        outputs = [output for step in earlier for output in self._read(step)]
        # After the reads: a failed request still gets the tokens sampled before its failure.
        return outputs + [self._fail(seq, exc) for seq, exc in failures if not seq.is_finished]

    def _launch_isolated(self, batch: ScheduledBatch
                         ) -> tuple[list[LaunchedStep], list[tuple[Sequence, Exception]]]:
        """Launches the step; when that raises, launches its requests one by one so that only
        those that fail alone are failed. Re-launching is safe: a launch changes no request
        state, and writing a token's K/V again writes the same values to the same slots.

        Returns the launched steps (the scheduler has counted their tokens) and the failed
        requests."""
        try:
            launched = [self.runner.launch(batch, self._unread)]
            failures = []
        except Exception as exc:
            if len(batch) == 1:
                launched, failures = [], [(batch.sequences[0], exc)]
            else:
                logger.warning("a step of %d requests failed (%r); running them one at a "
                               "time to find the failing ones", len(batch), exc)
                launched, failures = [], []
                for seq, num_tokens in zip(batch.sequences, batch.num_tokens):
                    try:
                        launched.append(self.runner.launch(ScheduledBatch([seq], [num_tokens]),
                                                           self._unread))
                    except Exception as exc:
                        failures.append((seq, exc))
        for step in launched:
            self.scheduler.postprocess(step.batch, step.sequences, step.prompt_logprobs)
        return launched, self._count_failures(failures, len(launched))

    def _read(self, step: LaunchedStep) -> list[RequestOutput]:
        """Reads a launched step's tokens and turns them into outputs. Its sequences that
        finished (or were aborted) since it was launched drop their token."""
        try:
            result = step.result()
        except Exception as exc:  # the device failed under this step: its requests alone
            live = [seq for seq in step.sequences if not seq.is_finished]
            self._count_failures([(seq, exc) for seq in live], 0)
            return [self._fail(seq, exc) for seq in live]
        for seq in step.batch.sequences:
            if not seq.is_finished:
                self.block_manager.register_full_pages(seq)
        outputs = []
        for seq, token, logprob in zip(result.sequences, result.token_ids, result.logprobs):
            if seq.is_finished:
                continue
            seq.num_pending_tokens -= 1
            try:
                outputs.append(self._append_token(seq, token, logprob))
            except Exception as exc:  # e.g. a detokenizer error: this request's alone
                outputs.append(self._fail(seq, exc))
        return outputs

    def _count_failures(self, failures: list[tuple[Sequence, Exception]], num_ran: int
                        ) -> list[tuple[Sequence, Exception]]:
        """A broken engine (a lost device, corrupt weights) fails every request of every step:
        after MAX_FAILED_STEPS such steps in a row the engine gives up, so that the replica's
        health check fails and Serve replaces it."""
        self._failed_steps = self._failed_steps + 1 if num_ran == 0 else 0
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise EngineDeadError(f"{self._failed_steps} steps in a row failed every request; "
                                  f"last error: {failures[-1][1]!r}") from failures[-1][1]
        return failures

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """Ends one request with an error; its pages go back to the pool."""
        logger.error("request %s failed in the engine", seq.request_id, exc_info=exc)
        error = exc if isinstance(exc, InvalidRequestError) else RequestFailedError(
            f"the engine failed on this request ({type(exc).__name__}: {exc}); other requests "
            f"were not affected")
        output = self._finish(seq, FinishReason.ERROR, [], None)
        output.error = error
        return output

    def _append_token(self, seq: Sequence, token: int,
                      logprob: TokenLogprob | None) -> RequestOutput:
        if seq.num_output_tokens == 0:
            self.stats.prompt_tokens_cached += seq.num_cached_tokens
        params = seq.params
        if params.max_tokens == 0:  # scoring only: the prompt's log-probabilities are the answer
            return self._finish(seq, FinishReason.LENGTH, [], None)
        seq.token_ids.append(token)
        self.stats.generated_tokens += 1
        if seq.grammar is not None:
            if not seq.grammar.accept_token(token):
                raise RequestFailedError(f"token {token} broke this request's output "
                                         f"constraint")
            if seq.grammar.is_terminated():  # the constrained output is complete
                return self._finish(seq, FinishReason.STOP, [token], logprob)
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            return self._finish(seq, FinishReason.STOP, [token], logprob)
        delta = seq.detokenizer.push(token)
        if token in params.stop_token_ids:
            return self._finish(seq, FinishReason.STOP, [token], logprob)
        if params.stop and delta:
            # Earlier text held no stop string, so only one ending in the new text can match.
            text = seq.detokenizer.text
            new_from = len(text) - len(delta)
            hits = [i for i in (text.find(s, max(0, new_from - len(s) + 1)) for s in params.stop)
                    if i >= 0]
            if hits:
                # The stop string and anything after it are not part of the answer.
                seq.detokenizer.text = text[: min(hits)]
                return self._finish(seq, FinishReason.STOP, [token], logprob)
        if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return self._finish(seq, FinishReason.LENGTH, [token], logprob)
        return self._output(seq, [token], logprob)

    def _finish(self, seq: Sequence, reason: FinishReason, new_tokens: list[int],
                logprob: TokenLogprob | None) -> RequestOutput:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending_tokens = 0  # tokens a running step still computes are thrown away
        self.scheduler.remove(seq)
        samples = self.requests[seq.request_id]
        samples.remove(seq)
        if not samples:
            del self.requests[seq.request_id]
        return self._output(seq, new_tokens, logprob)

    def _output(self, seq: Sequence, new_tokens: list[int],
                logprob: TokenLogprob | None) -> RequestOutput:
        text = seq.detokenizer.text
        # While running, hold back a tail that could still grow into a stop string.
        holdback = 0 if seq.is_finished else max((len(s) - 1 for s in seq.params.stop), default=0)
        emit_to = max(seq.num_emitted_chars, len(text) - holdback)
        delta = text[seq.num_emitted_chars:emit_to]
        seq.num_emitted_chars = emit_to
        usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens)
        first = seq.num_output_tokens == len(new_tokens)  # the sample's first output
        prompt_logprobs = (list(seq.prompt_logprobs)
                           if first and seq.params.prompt_logprobs is not None else None)
        return RequestOutput(seq.request_id, new_tokens, delta, text[:emit_to], seq.is_finished,
                             seq.finish_reason, usage, [logprob] if logprob else [],
                             index=seq.index, prompt_logprobs=prompt_logprobs)

    # -- offline batches ----------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs prompts to completion; returns one cumulative output per sample, in order:
        prompt by prompt, and a prompt's n samples by index."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        keys = [(i, index) for i, sp in zip(ids, params_list) for index in range(sp.n)]
        merged: dict[tuple[str, int], RequestOutput] = {}
        with tqdm(total=len(keys), desc="generating", unit="seq", disable=not use_tqdm) as bar:
            while self.has_unfinished_requests:
                for out in self.step():
                    key = (out.request_id, out.index)
                    merged[key] = merged[key].merge(out) if key in merged else out
                    bar.update(int(out.finished))
        return [merged[key] for key in keys]

"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step has a token budget. Running sequences go first, oldest first (decodes and the next
chunk of long prompts alike), then waiting ones are admitted while budget, sequence slots and
pages remain; a prompt longer than what is left is chunked across steps. When pages run out the
newest running sequence is preempted (its pages freed, recomputed later from its tokens), so the
oldest requests always make progress.

The n samples of one request (n > 1) are admitted after the first one has computed the prompt
and take its pages (`BlockManager.share_prompt`): the prompt is computed once, not n times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence, SequenceStatus
from worker.wire import TokenLogprob


@dataclass
class ScheduledBatch:
    sequences: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute, per sequence
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.sequences)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.sequences.append(seq)
        self.num_tokens.append(num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()  # arrival order
        self.running: list[Sequence] = []  # arrival order

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or aborted sequence out and releases its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.samples_no_more(self.max_model_len):  # it finishes when its token is read
                index += 1
                continue
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.reserve(seq, num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                batch.add(seq, num_tokens)
                budget -= num_tokens
                index += 1
        # Admitting new work right after a preemption would only thrash the cache.
        if batch.num_preempted == 0:
            self._admit(batch, budget)
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: list[Sequence],
                    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]]) -> None:
        """After a step was launched: its tokens' K/V are (being) written to the cache, each
        sampled sequence has one more token on the device, which the engine reads after the
        step (at once, or during the next one with overlapped scheduling), and the prompt
        tokens it scored (computed during the launch) are recorded, so that a parallel sample
        admitted next does not score them again."""
        for seq, num_tokens in zip(batch.sequences, batch.num_tokens):
            seq.num_computed_tokens += num_tokens
        for seq in sampled:
            seq.num_pending_tokens += 1
        for seq, scored in prompt_logprobs:
            seq.prompt_logprobs += scored

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            source = seq.fork_of
            # A parallel sample waits for its sibling's prompt, then shares its pages.
            if source is not None and not (source.prompt_computed or source.is_finished):
                break
            if source is not None and source.page_ids:
                self.block_manager.share_prompt(seq, source)
            elif not seq.needs_prompt_logprobs:  # cached tokens would go unscored
                self.block_manager.match_prefix(seq)
            seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.reserve(seq, num_tokens):
                self.block_manager.free(seq)  # give the matched prefix pages back
                seq.reset_for_recompute()
                break
            self.waiting.popleft()
            seq.fork_of = None  # after a preemption it is an ordinary sequence
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_tokens)
            budget -= num_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        # It arrived before everything still waiting, so it goes to the front.
        self.waiting.appendleft(seq)

"""Batched sampling on the logits' device: greedy, temperature, top-k, top-p, min-p, seeds,
and grammar masks for structured output.

Sampling uses the exponential-race form (argmax of p / E with E ~ Exp(1)), which equals a
categorical draw and lets each seeded request draw its noise from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.engine.grammar import mask_logits
from worker.engine.host_copies import to_device
from worker.engine.sequence import Sequence
from worker.wire import TokenLogprob


@dataclass
class ScoredTokens:
    """Log-probabilities of one token per row, with its rank and the row's likeliest tokens,
    as tensors (on the logits' device until copied)."""

    chosen: torch.Tensor  # float32 [R]
    ranks: torch.Tensor  # int64 [R]
    top_values: torch.Tensor  # float32 [R, n]
    top_ids: torch.Tensor  # int64 [R, n]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.ranks, self.top_values, self.top_ids

    def to_list(self, tokens: list[int], top_n: list[int]) -> list[TokenLogprob]:
        """Row i as a TokenLogprob of tokens[i] with its top_n[i] likeliest tokens."""
        chosen, ranks = self.chosen.tolist(), self.ranks.tolist()
        top_values, top_ids = self.top_values.tolist(), self.top_ids.tolist()
        return [TokenLogprob(token, chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])),
                             ranks[j])
                for j, (token, n) in enumerate(zip(tokens, top_n))]


def score_tokens(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> ScoredTokens:
    """Row i's log-probability of tokens[i] (log-softmax of the logits, fp32), its rank, and
    the top_n likeliest tokens, best first. Runs on the logits' device without a host sync."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])
    ranks = (logp > chosen).sum(dim=-1) + 1
    top_values, top_ids = logp.topk(max(top_n, 1), dim=-1)
    return ScoredTokens(chosen.squeeze(-1), ranks, top_values, top_ids)


def token_logprobs(logits: torch.Tensor, tokens: list[int],
                   top_n: list[int]) -> list[TokenLogprob]:
    """score_tokens for tokens and top-n counts given on the host, read back at once."""
    scored = score_tokens(logits, to_device(tokens, logits.device, torch.long), max(top_n))
    return scored.to_list(tokens, top_n)


@dataclass
class SampledTokens:
    """One step's sampled token ids, on the logits' device; `scored` holds the logprobs of
    the rows in `logprob_rows` (the sequences that asked for them)."""

    token_ids: torch.Tensor  # int64 [B]
    logprob_rows: list[int] = field(default_factory=list)
    scored: ScoredTokens | None = None


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        """logits [B, V] float32 -> one token id (and optional logprobs) per sequence, left on
        the device. Constrained sequences (structured output) sample among the tokens their
        grammar allows next."""
        mask_logits(logits, [s.grammar for s in seqs])
        params = [s.params for s in seqs]
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = to_device(sampled_rows, logits.device, torch.long)
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in sampled_rows])
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return SampledTokens(tokens)
        rows = to_device(wanted, logits.device, torch.long)
        scored = score_tokens(logits[rows], tokens[rows],
                              max(params[i].logprobs for i in wanted))
        return SampledTokens(tokens, wanted, scored)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        def column(values, dtype=torch.float32):
            return to_device(values, logits.device, dtype)[:, None]

        params = [s.params for s in seqs]
        logits = logits / column([p.temperature for p in params])
        vocab = logits.shape[-1]
        top_k = column([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params],
                       torch.long)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= top_k
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, -torch.inf), dim=-1)
        # top-p: keep the smallest prefix whose mass reaches p (the best token always stays).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop |= mass_before >= column([p.top_p for p in params])
        drop |= sorted_probs < column([p.min_p for p in params]) * sorted_probs[:, :1]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        probs = torch.softmax(sorted_logits, dim=-1)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=self._generator_for(seq))
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        return order.gather(-1, choice).squeeze(-1)

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.generator

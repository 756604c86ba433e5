"""Batched sampling on the logits' device: greedy, temperature, top-k, top-p, min-p, seeds,
and grammar masks for structured output.

Sampling uses the exponential-race form (argmax of p / E with E ~ Exp(1)), which equals a
categorical draw and lets each seeded request draw its noise from its own generator.
"""

from __future__ import annotations

import torch

from worker.engine.grammar import mask_logits
from worker.engine.sequence import Sequence
from worker.wire import TokenLogprob


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] float32 -> one token id (and optional logprobs) per sequence.
        Constrained sequences (structured output) sample among the tokens their grammar
        allows next."""
        mask_logits(logits, [s.grammar for s in seqs])
        params = [s.params for s in seqs]
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in sampled_rows])
        token_list = tokens.tolist()
        return token_list, self._logprobs(logits, seqs, token_list)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=logits.device)[:, None]

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

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[Sequence],
                  tokens: list[int]) -> list[TokenLogprob | None]:
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(seqs)
        if not wanted:
            return result
        rows = torch.tensor(wanted, device=logits.device)
        scored = token_logprobs(logits[rows], [tokens[i] for i in wanted],
                                [seqs[i].params.logprobs for i in wanted])
        for i, logprob in zip(wanted, scored, strict=True):
            result[i] = logprob
        return result


def token_logprobs(logits: torch.Tensor, tokens: list[int],
                   top_n: list[int]) -> list[TokenLogprob]:
    """Row i's log-probability of tokens[i] (log-softmax of the logits, fp32), its rank, and
    the top_n[i] likeliest tokens, best first."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])
    ranks = (logp > chosen).sum(dim=-1) + 1
    top_values, top_ids = logp.topk(max(max(top_n), 1), dim=-1)
    chosen, ranks = chosen.squeeze(-1).tolist(), ranks.tolist()
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(token, chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])),
                         ranks[j])
            for j, (token, n) in enumerate(zip(tokens, top_n))]

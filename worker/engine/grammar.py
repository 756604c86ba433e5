"""Constrained decoding: a request's output must match a JSON schema, a regex, an EBNF grammar or
a model's tool-call format (xgrammar's structural tag for that model). xgrammar, the grammar
engine vLLM and SGLang use, compiles the constraint against this model's vocabulary once per
request; each step it yields a token bitmask per constrained sequence, applied to the batch's
logits on their device.
"""

from __future__ import annotations

import json

import torch
import xgrammar as xgr

from worker.errors import InvalidRequestError
from worker.tokenizer import Tokenizer
from worker.wire import GuidedDecoding

# Whitespace between a tool call's elements, at most: formats put a newline or none there, and
# an unbounded run would let a model pad the call until max_tokens.
MAX_TOOL_CALL_WHITESPACE = 2


def _vocab_type(backend_json: dict) -> tuple[xgr.VocabType, bool]:
    """(how vocabulary entries spell bytes, whether the tokenizer prepends a space), read from
    the tokenizer's own decoder: ByteLevel (GPT-2 style), ByteFallback (SentencePiece style)
    or plain text."""
    decoder = backend_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {part.get("type") for part in parts}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL, False
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK, True
    return xgr.VocabType.RAW, False


def _strict_json_strings(schema):
    """The schema with every length-bounded string ("minLength"/"maxLength", no "pattern") as
    a pattern of the same bounds over characters that are safe to emit raw: xgrammar's rule
    for bounded strings admits control characters and its byte automaton admits malformed
    UTF-8 for some code point ranges (overlong E0 and surrogate ED sequences), both of which
    strict JSON parsers reject. The pattern leaves out those ranges (U+0800-U+0FFF,
    U+D000-U+DFFF) and escape sequences."""
    if isinstance(schema, list):
        return [_strict_json_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _strict_json_strings(value) for key, value in schema.items()}
    bounded = "minLength" in schema or "maxLength" in schema
    if schema.get("type") == "string" and bounded and "pattern" not in schema:
        low, high = schema.pop("minLength", 0), schema.pop("maxLength", "")
        safe = "[ !#-\\[\\]-~\\u00a0-\\u07ff\\u1000-\\ucfff\\ue000-\\ufffd]"
        schema["pattern"] = f"^{safe}{{{low},{high}}}$"
    return schema


class GrammarCompiler:
    """Compiles a request's constraint into a fresh matcher (compiled grammars are cached)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        backend = tokenizer.backend
        vocab = [""] * vocab_size  # ids past the tokenizer's (padding rows) can never be chosen
        for token, token_id in backend.get_vocab(with_added_tokens=True).items():
            if token_id < vocab_size:
                vocab[token_id] = token
        # Special tokens are control symbols, not text: a constraint never produces them.
        for token_id, token in backend.get_added_tokens_decoder().items():
            if token.special and token_id < vocab_size and token_id not in tokenizer.text_ids:
                vocab[token_id] = ""
        vocab_type, prefix_space = _vocab_type(json.loads(backend.to_str()))
        info = xgr.TokenizerInfo(vocab, vocab_type, vocab_size=vocab_size,
                                 stop_token_ids=list(tokenizer.eos_token_ids),
                                 add_prefix_space=prefix_space)
        self._compiler = xgr.GrammarCompiler(info)

    def matcher(self, guided: GuidedDecoding) -> xgr.GrammarMatcher:
        """Raises InvalidRequestError for a constraint xgrammar cannot compile."""
        try:
            if guided.kind == "json":  # OpenAI's json_object: any JSON object
                compiled = self._compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif guided.kind == "json_schema":
                # Compact JSON: a model cannot pad the output with whitespace until max_tokens.
                schema = _strict_json_strings(json.loads(guided.spec))
                compiled = self._compiler.compile_json_schema(json.dumps(schema),
                                                              any_whitespace=False)
            elif guided.kind == "regex":
                compiled = self._compiler.compile_regex(guided.spec)
            elif guided.kind == "grammar":
                compiled = self._compiler.compile_grammar(guided.spec)
            else:
                spec = json.loads(guided.spec)
                tag = xgr.get_builtin_structural_tag(
                    spec["format"], tools=spec["tools"], tool_choice=spec["tool_choice"],
                    reasoning=spec["reasoning"],
                    parallel_tool_calls=spec["parallel_tool_calls"],
                    max_whitespace_cnt=MAX_TOOL_CALL_WHITESPACE)
                compiled = self._compiler.compile_structural_tag(tag)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the reason
            raise InvalidRequestError(f"the {guided.kind} constraint does not compile: "
                                      f"{str(exc).strip()[:500]}") from None
        return xgr.GrammarMatcher(compiled)


def mask_logits(logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]) -> None:
    """Sets the logits of tokens each constrained row's grammar forbids next to -inf, in
    place; one bitmask for the batch, copied to the logits' device once."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for row in rows:
        matchers[row].fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    indices=rows)

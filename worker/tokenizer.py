"""Tokenizer and chat template, from a GGUF's metadata or a Hugging Face tokenizer.json.

The byte-pair encoding itself is the `tokenizers` library's; this module only assembles it from
what a checkpoint ships and renders chat templates the way Hugging Face does (sandboxed Jinja).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from worker.errors import InvalidRequestError, ModelLoadError

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined.
_SPECIAL_TOKEN_TYPES = (3, 4)


def _raise_exception(message: str):
    raise InvalidRequestError(f"chat template: {message}")


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, eos_token_ids: Sequence[int],
                 chat_template: str | None = None, bos_token: str = "", eos_token: str = "",
                 add_bos: bool = False):
        self.backend = backend
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._skipped_ids: set[int] | None = None  # see keep_in_text
        self.text_ids: frozenset[int] = frozenset()  # special tokens kept in text
        self._template = None
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(chat_template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """No token stands for more input bytes than this: the UTF-8 length of the longest
        vocabulary entry (a byte-level BPE entry has at least one character per byte), times 4
        when a normalizer may shrink the input (NFKC turns a 3-byte ligature into 2 letters)."""
        longest = max(len(token.encode()) for token in
                      self.backend.get_vocab(with_added_tokens=True))
        return longest * (4 if self.backend.normalizer is not None else 1)

    def max_prompt_bytes(self, context_tokens: int) -> int:
        """Text longer than this, in UTF-8 bytes, cannot fit context_tokens tokens: checking it
        costs nothing, where tokenizing megabytes costs seconds."""
        return context_tokens * self.max_token_bytes

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token:
            ids = [self.backend.token_to_id(self.bos_token)] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens and self._skipped_ids is not None:
            # Special tokens the text must keep (reasoning markers): drop the others here.
            ids = [i for i in ids if i not in self._skipped_ids]
            skip_special_tokens = False
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def keep_in_text(self, tokens: Sequence[str]) -> None:
        """Decoded text keeps these tokens even where the vocabulary marks them special (a
        reasoning parser reads the markers from the text)."""
        kept = {self.backend.token_to_id(t) for t in tokens}
        self.text_ids = frozenset(kept)
        self._skipped_ids = {i for i, token in self.backend.get_added_tokens_decoder().items()
                             if token.special and i not in kept}

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            template_kwargs: dict[str, Any] | None = None) -> str:
        """template_kwargs: extra variables the template reads (e.g. `thinking_mode`); they
        cannot override the ones set here."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; send a plain completion")
        try:
            return self._template.render({
                **(template_kwargs or {}), "messages": messages,
                "add_generation_prompt": add_generation_prompt, "bos_token": self.bos_token,
                "eos_token": self.eos_token})
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template failed on these messages: {exc}") from exc

    def hf_config(self, model_max_length: int) -> dict[str, Any]:
        """The tokenizer_config.json of this tokenizer, as Hugging Face tools read it (and as
        vLLM's /tokenizer_info reports it)."""
        return {"tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": self.bos_token or None, "eos_token": self.eos_token,
                "pad_token": None, "unk_token": None, "add_bos_token": self.add_bos,
                "add_eos_token": False, "clean_up_tokenization_spaces": False,
                "model_max_length": model_max_length, "chat_template": self.chat_template}

    def save(self, directory: Path, model_max_length: int) -> None:
        """Writes a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json):
        what tools that load a tokenizer by path need, for a model whose tokenizer lives
        inside its GGUF."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(
            json.dumps(self.hf_config(model_max_length), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> "Tokenizer":
        """Builds the tokenizer from `tokenizer.ggml.*` metadata (gpt2-style byte-level BPE)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' BPE)")
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                              merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        # llama.cpp's pre-tokenizer names: "smollm" splits every digit before the GPT-2 regex.
        if fields.get("tokenizer.ggml.pre") == "smollm":
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type", [])
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t in _SPECIAL_TOKEN_TYPES])
        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = fields.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise ModelLoadError("GGUF metadata lacks tokenizer.ggml.eos_token_id")
        return cls(backend, eos_token_ids=[eos],
                   chat_template=fields.get("tokenizer.chat_template"),
                   bos_token=tokens[bos] if bos is not None else "", eos_token=tokens[eos],
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_directory(cls, path: Path) -> "Tokenizer":
        """tokenizer.json + tokenizer_config.json (bos/eos, chat template) of a HF checkpoint;
        a chat_template.jinja beside them (how transformers 5 saves it) takes precedence."""
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        settings = {}
        if (path / "tokenizer_config.json").exists():
            settings = json.loads((path / "tokenizer_config.json").read_text())

        def content(token) -> str:
            return token.get("content", "") if isinstance(token, dict) else (token or "")

        eos = content(settings.get("eos_token"))
        eos_id = backend.token_to_id(eos) if eos else None
        if eos_id is None:
            raise ModelLoadError(f"{path}/tokenizer_config.json names no eos_token in the vocab")
        template_file = path / "chat_template.jinja"
        template = (template_file.read_text() if template_file.exists()
                    else settings.get("chat_template"))
        return cls(backend, eos_token_ids=[eos_id], chat_template=template,
                   bos_token=content(settings.get("bos_token")), eos_token=eos,
                   add_bos=bool(settings.get("add_bos_token", False)))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Decodes a short window of recent tokens twice (with and without the newest ones) and emits
    only the stable difference; a window ending in U+FFFD waits for the rest of its character.
    """

    # Tokens of context kept before the unread ones, so byte-level merges decode correctly.
    _CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-self._CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly decodable text (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

"""The preprocess deployment (CPU): chat templating, tokenization and page hashing.

Model replicas receive token ids only. The page hashes computed here with the engine's own hash
function (and the model's fingerprint as salt) are what the prefix-aware router looks up.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.config import AppConfig
from deployments.protocol import PreparedPrompt
from kernels import BLOCK_SIZE
from worker.errors import InvalidRequestError
from worker.loader import inspect_model
from worker.prefix_hash import chain_page_hashes


@serve.deployment(name="Preprocessor")
class Preprocessor:
    def __init__(self, config: dict):
        app = AppConfig.model_validate(config)
        info = inspect_model(app.model.engine.model, app.model.engine.served_model_name)
        self.tokenizer = info.tokenizer
        self.salt = info.fingerprint

    def prepare_chat(self, messages: list[dict[str, Any]]) -> PreparedPrompt:
        text = self.tokenizer.apply_chat_template([_text_message(m) for m in messages])
        return self._prepared(self.tokenizer.encode(text))

    def prepare_completion(self, prompt: str | list[int]) -> PreparedPrompt:
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._prepared(token_ids)

    def _prepared(self, token_ids: list[int]) -> PreparedPrompt:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        # Only pages before the last prompt token can come from the cache (BlockManager's rule).
        matchable = (len(token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        return PreparedPrompt(token_ids, chain_page_hashes(token_ids[:matchable], self.salt))


def _text_message(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI content may be a string or a list of parts; text parts are joined."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return {**message, "content": content or ""}
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise InvalidRequestError(f"content parts of type {part.get('type')!r} are not "
                                      f"supported by this model; send text parts")
        texts.append(part.get("text", ""))
    return {**message, "content": "".join(texts)}

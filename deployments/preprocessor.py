"""The preprocess deployment (CPU): chat templating, tokenization and page hashing of text.

Model replicas receive token ids only. The page hashes computed here with the engine's own hash
function (and the model's fingerprint as salt) are what the prefix-aware router looks up.
Prompts that arrive as token ids need no tokenizer: the ingress hashes them itself.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.config import AppConfig
from deployments.protocol import PreparedPrompt
from worker.errors import InvalidRequestError
from worker.loader import inspect_model


@serve.deployment(name="Preprocessor")
class Preprocessor:
    def __init__(self, config: dict):
        app = AppConfig.model_validate(config)
        info = inspect_model(app.model.engine.model, app.model.engine.served_model_name)
        self.tokenizer = info.tokenizer
        self.salt = info.fingerprint

    def prepare_chat(self, messages: list[dict[str, Any]]) -> PreparedPrompt:
        text = self.tokenizer.apply_chat_template([_text_message(m) for m in messages])
        return PreparedPrompt.from_token_ids(self.tokenizer.encode(text), self.salt)

    def prepare_text(self, prompt: str) -> PreparedPrompt:
        return PreparedPrompt.from_token_ids(self.tokenizer.encode(prompt), self.salt)


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

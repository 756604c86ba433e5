"""The whole stack on this machine for a test module: an application config in, its endpoints
(and an `openai` client for them) out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import openai

from deployments.config import AppConfig, ServeConfigFile
from deployments.local import Endpoints, local_stack


@contextlib.contextmanager
def serving(app: dict, num_cpus: int) -> Iterator[Endpoints]:
    """`app` as serve_config.yaml's application section writes it, on free ports."""
    with local_stack(ServeConfigFile.load(), AppConfig.model_validate(app), num_cpus=num_cpus,
                     on_free_ports=True) as endpoints:
        yield endpoints


def openai_client(endpoints: Endpoints, api_key: str = "none") -> openai.OpenAI:
    """No retries: a test sees the first answer."""
    return openai.OpenAI(base_url=f"{endpoints.http}/v1", api_key=api_key, max_retries=0,
                         timeout=120)

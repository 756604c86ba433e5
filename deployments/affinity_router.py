"""Ray Serve LLM's `PrefixCacheAffinityRouter` on our model deployment: the prefix router users
of Ray Serve would otherwise pick, kept as a policy (`prefix_cache_affinity`) to measure ours
against.

Ray's router matches prompt *text* in a prefix tree of what it routed where. Our requests reach
the model deployment as token ids, so each id becomes one character (a private-use code point
offset), which makes the tree's character prefixes exactly our token prefixes. The class comes
from the module that defines it: its public re-export (`ray.serve.llm.request_router`) imports
vLLM or SGLang first, which a replica serving MSA models does not need.
"""

from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.serve.request_router import PendingRequest, RunningReplica

from deployments.protocol import GenerateRequest
from deployments.router import export_target, request_argument

_FIRST_CHARACTER = 0xE000  # past the surrogates: every token id maps to a valid character


def token_text(token_ids: list[int]) -> str:
    return "".join(chr(_FIRST_CHARACTER + t) for t in token_ids)


class PrefixCacheAffinityBaseline(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request: PendingRequest) -> str | None:
        request = request_argument(pending_request, GenerateRequest)
        return token_text(request.prompt.token_ids) if request is not None else None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if (target := export_target(candidate_replicas, pending_request)) is not None:
            return target
        return await super().choose_replicas(candidate_replicas, pending_request)

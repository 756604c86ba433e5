"""Typed errors of the worker. The serving layer maps each class to one HTTP / gRPC status."""

from __future__ import annotations


class MSAServeError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ModelLoadError(MSAServeError):
    """The model path is missing, unreadable, corrupt or of an unsupported architecture."""


class InvalidRequestError(MSAServeError):
    """The request itself is wrong (bad sampling parameters, empty or over-long prompt)."""


class CapacityError(InvalidRequestError):
    """The request can never fit this replica's KV cache, however long it waits."""


class RequestNotFoundError(MSAServeError):
    """No live request has this id (already finished or aborted)."""


class RequestFailedError(MSAServeError):
    """The engine failed while computing this request; it alone was ended, the others go on."""


class PageTransferError(MSAServeError):
    """KV pages could not be moved between replicas; the puller recomputes them instead."""


class EngineDeadError(MSAServeError):
    """The engine's step loop failed; the replica must be restarted."""

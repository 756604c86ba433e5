"""Elementwise glue (norms, rotary embeddings, activations, routing) fused into one kernel per
call on CUDA.

At decode batch sizes every torch op of a norm or an activation is its own launch of a few
microseconds that does almost no work. A MiniMax-M3 layer has about a hundred of them, and,
unlike the GEMMs and attention, they do not shrink when tensor parallelism splits the layer
(`bench/results/parallel_profile_<gpu>.md`). torch.compile (inductor) fuses each function
marked `@fused` into one or two Triton kernels; CUDA-graph capture records those kernels as it
records any other. On the CPU the same function runs eagerly: the math is the eager function,
compiled or not.

`MSA_SERVE_COMPILE=0` runs the eager functions on CUDA too (the baseline of the benchmarks, and
a way out should a compiler bug ever bite).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

COMPILE = os.environ.get("MSA_SERVE_COMPILE", "1") != "0"
# Each dtype, grad mode and tensor kind (inference or not) a function meets is one more compiled
# variant. A serving process meets a handful; a process that runs many models (the tests) meets
# more than dynamo's default limit of 8, past which a function would run eagerly.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def fused(fn: F) -> F:
    """`fn`, compiled on first use with a CUDA tensor as its first argument. Shapes are
    dynamic, so decode buckets and prefill chunks share one compiled kernel. Inside another
    fused function it is simply inlined. Not `fullgraph`: should dynamo ever fail to trace or
    run out of variants, the function runs eagerly rather than failing the step (the tests
    trace every fused function with `fullgraph=True`: tests/worker/test_fused.py)."""
    compiled = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args):
        if x.is_cuda and COMPILE and not torch.compiler.is_compiling():
            return compiled(x, *args)
        return fn(x, *args)

    return dispatch  # type: ignore[return-value]

"""Fused kernels on request: ``AGENTTENSOR_COMPILE=1`` compiles the functions marked `on_request` with torch.compile.

On a GPU a chain of elementwise operations over [B, N] is one pass over memory per operation in eager mode; compiled,
it is one kernel (Triton's) that reads its inputs and writes its outputs once. The marked functions are pure torch
code written for it (the random numbers' hash is compiled the same way, `rng.use_compiled_kernels`); compiled on the
CPU (inductor's C++) they give the eager numbers, tested. The compilation costs seconds once per process and kind of
input, so it is opt-in, read at each call.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch


def requested() -> bool:
    """Whether ``AGENTTENSOR_COMPILE=1`` asks for compiled kernels (read at each call: tests switch it)."""
    return os.environ.get("AGENTTENSOR_COMPILE", "0") == "1"


def on_request(fn: Callable) -> Callable:
    """``fn``, run compiled by ``torch.compile(fn, dynamic=True)`` where `requested`, else as it is. The wrapper keeps
    ``fn`` as ``.eager`` and counts its compiled calls in ``.calls["compiled"]``."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args):
        if not requested():
            return fn(*args)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True))
        call.calls["compiled"] += 1
        return compiled[0](*args)

    call.eager, call.calls = fn, {"compiled": 0}
    return call

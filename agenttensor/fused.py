"""Fused kernels on request: ``AGENTTENSOR_COMPILE=1`` compiles the functions marked `on_request` with torch.compile.

On a GPU a chain of elementwise operations over [B, N] is one pass over memory per operation in eager mode; compiled,
it is one kernel (Triton's) that reads its inputs and writes its outputs once. The marked functions are pure torch
code written for it: the random numbers' hash and hard events (`rng.uniform_kernel`, `rng.hard_events`,
`rng.hard_hazard_events`; inside another marked function the hash is traced into its kernel: `rng.hashed`), the
force of the group layers, and the sync-free day's exits and transition, countdowns, infectiousness and split of
infections by layer. The compilation costs seconds once per process and kind of input, so it is opt-in, read at each
call.

Same numbers: torch.compile is asked for eager numerics (`EAGER_NUMERICS`: no fused multiply-adds, IEEE division, no
flushed denormals), and the first compiled call on each device is checked against the eager one. Equal, it is
counted in ``.calls["checked"]``; different (a device whose compiled maths rounds otherwise), the compiled result is
kept, the difference logged and counted in ``.calls["differs"]``. A compilation that fails (no compiler, an
unsupported platform) turns the function's compilation off, logged and counted in ``.calls["fallback"]``: its calls
then run eagerly, with the same numbers.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves

log = logging.getLogger(__name__)

# torch.compile options for eager-equal numbers on a GPU (Triton): no FMA contraction (`emulate_precision_casts`, which
# also links CUDA's libdevice), round-to-nearest division, denormals kept
EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                  "eager_numerics.disable_ftz": True}


def requested() -> bool:
    """Whether ``AGENTTENSOR_COMPILE=1`` asks for compiled kernels (read at each call: tests switch it)."""
    return os.environ.get("AGENTTENSOR_COMPILE", "0") == "1"


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _differences(compiled, eager) -> int:
    """Elements in which two outputs (tensors, or tuples of them) differ; NaN equals NaN."""
    total = 0
    for a, b in zip(tree_leaves(compiled), tree_leaves(eager), strict=True):
        if not isinstance(a, torch.Tensor):
            total += int(a != b)
        elif a.shape != b.shape or a.dtype != b.dtype:
            total += max(a.numel(), b.numel(), 1)
        else:
            same = a == b
            if a.is_floating_point():
                same |= a.isnan() & b.isnan()
            total += int((~same).sum())
    return total


def on_request(fn: Callable | None = None, *, eager: Callable | None = None, cpu: bool = True) -> Callable:
    """``fn``, run compiled by ``torch.compile(fn, dynamic=True)`` where `requested`, else as ``eager`` (default:
    ``fn`` itself; e.g. an in-place version of the same equations); ``cpu=False``: compiled off the CPU only (where
    inductor's C++ for it is slower than the eager version, e.g. comparisons written as bytes). The wrapper keeps the
    eager function as ``.eager`` and counts its compiled calls, first-call checks and fallbacks in ``.calls``
    (module docstring)."""
    if fn is None:
        return functools.partial(on_request, eager=eager, cpu=cpu)
    run_eagerly = eager or fn
    compiled: list[Callable] = []
    checked: set[str] = set()  # device types whose first compiled call was compared with the eager one

    @functools.wraps(fn)
    def call(*args):
        if not requested() or call.off:
            return run_eagerly(*args)
        device = next((x.device.type for x in tree_leaves(args) if isinstance(x, torch.Tensor)), "none")
        if device == "cpu" and not cpu:
            return run_eagerly(*args)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True, options=EAGER_NUMERICS))
        try:
            out = compiled[0](*args)
        except Exception as e:
            out = run_eagerly(*args)  # an error of the inputs raises here, as it would without compilation
            call.off = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            call.calls["fallback"] += 1
            log.warning("torch.compile failed for %s (%s); it runs eagerly, with the same numbers",
                        fn.__qualname__, call.off)
            return out
        call.calls["compiled"] += 1
        if device not in checked and not _capturing():  # (a capture cannot read a comparison back)
            checked.add(device)
            differing = _differences(out, run_eagerly(*args))
            call.calls["differs" if differing else "checked"] += 1
            if differing:
                log.warning("compiled %s differs from the eager one on %s in %d elements: runs with "
                            "AGENTTENSOR_COMPILE=1 take other draws than runs without it here", fn.__qualname__,
                            device, differing)
        return out

    call.eager, call.off = run_eagerly, None
    call.calls = {"compiled": 0, "checked": 0, "differs": 0, "fallback": 0}
    return call

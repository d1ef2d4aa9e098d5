"""glibc allocator tuning for city-scale tensors (applied once at import; Linux/glibc only).

At millions of agents every step allocates and frees tensors of tens of MB. With glibc's default
settings the freed memory is handed back to the OS and faulted in again on the next step (measured:
layered SEIR at 8.5M agents spends about half its step time in page faults). Keeping freed memory
in the heap (high trim threshold, generous top pad) and capping the number of arenas removes that
churn. Set ``AGENTTENSOR_MALLOC_TUNING=0`` to leave the allocator alone (the test suite does, since
it runs many differently sized simulations in one process and favours a small footprint).

`heap_only()` goes further for runs without gradients: it stops glibc from serving large
allocations by ``mmap`` (``M_MMAP_MAX = 0``). Without it, every tensor above the mmap threshold
(at most 32 MB in glibc, e.g. a float32 [8.7M] tensor) is a fresh mapping whose pages are faulted
in and zeroed on every step: the full-NYC covid step took 3.1M page faults in 21 steps (0.74M
heap-only), and 13.7 → 10.5 CPU s; a [16, 1M] scenario batch 17.6 → 12.3 CPU s (peak RSS +0.5 GB).
Gradient runs keep mmap: autograd's interleaved lifetimes fragment an mmap-free heap (a full-NYC
forward+backward ran out of 24 GB).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536  # glibc's default

applied: dict[str, int] = {}
_heap_only_depth = 0
_lock = threading.Lock()
_mallopt = None


def tune() -> dict[str, int]:
    if applied or os.environ.get("AGENTTENSOR_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return applied
    global _mallopt
    _mallopt = mallopt
    # The mmap threshold stays dynamic: a fixed one makes every mid-sized tensor come from the heap,
    # where long-lived small allocations fragment it (a 500-step run grew to many GB in tests).
    settings = {"M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1), "M_TOP_PAD": (M_TOP_PAD, 1 << 30),
                "M_ARENA_MAX": (M_ARENA_MAX, 2)}
    for name, (option, value) in settings.items():
        if os.environ.get(f"MALLOC_{name[2:]}_") is None and mallopt(option, value) == 1:
            applied[name] = value
    return applied


@contextlib.contextmanager
def heap_only():
    """Serve large allocations from the heap, not fresh mmaps, inside the block (no-op unless `tune`
    was applied, or when ``MALLOC_MMAP_MAX_`` is set by the user). Re-entrant."""
    global _heap_only_depth
    active = bool(applied) and _mallopt is not None and os.environ.get("MALLOC_MMAP_MAX_") is None
    if not active:
        yield False
        return
    with _lock:
        if _heap_only_depth == 0:
            _mallopt(M_MMAP_MAX, 0)
        _heap_only_depth += 1
    try:
        yield True
    finally:
        with _lock:
            _heap_only_depth -= 1
            if _heap_only_depth == 0:
                _mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)

"""glibc allocator tuning for city-scale tensors (applied once at import; Linux/glibc only).

At millions of agents every step allocates and frees tensors of tens of MB. With glibc's default
settings the freed memory is handed back to the OS and faulted in again on the next step (measured:
layered SEIR at 8.5M agents spends about half its step time in page faults). Keeping freed memory
in the heap (high trim threshold, generous top pad) and capping the number of arenas removes that
churn. Set ``AGENTTENSOR_MALLOC_TUNING=0`` to leave the allocator alone (the test suite does, since
it runs many differently sized simulations in one process and favours a small footprint).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

applied: dict[str, int] = {}


def tune() -> dict[str, int]:
    if applied or os.environ.get("AGENTTENSOR_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return applied
    # The mmap threshold stays dynamic: a fixed one makes every mid-sized tensor come from the heap,
    # where long-lived small allocations fragment it (a 500-step run grew to many GB in tests).
    settings = {"M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1), "M_TOP_PAD": (M_TOP_PAD, 1 << 30),
                "M_ARENA_MAX": (M_ARENA_MAX, 2)}
    for name, (option, value) in settings.items():
        if os.environ.get(f"MALLOC_{name[2:]}_") is None and mallopt(option, value) == 1:
            applied[name] = value
    return applied

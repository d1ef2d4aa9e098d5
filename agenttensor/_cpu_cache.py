"""A caching CPU allocator for city-scale runs (agenttensor/csrc/caching_allocator.cpp, built on first use).

A step allocates and frees the same few large sizes ([B, N] tensors of 1, 2, 4 and 8 bytes) many times.
glibc serves blocks above its mmap threshold (capped at 32 MB; a float32 [8.7M] tensor is 35 MB) as fresh
mappings that the kernel faults in and zeroes on first write, and `_malloc.heap_only` cannot help gradient
runs: autograd's interleaved lifetimes fragment an mmap-free heap (a checkpointed 1M-agent run kept 3.4 GB of
heap for 0.5 GB in use; a full-NYC calibration epoch outgrew 24 GB). This allocator keeps freed blocks of at
least 1 MB in exact-size free lists, up to a cap, and hands them out again: no fragmentation (a block only
serves its own size) and no page faults in the steady state. Measured at full NYC (covid, straight-through,
7 days, 2 threads): forward+backward 3.3 → 1.5 s per day, peak RSS 6.6 → 6.8 GB.

A miss first hands back cached blocks of other sizes while in-use + cached bytes would pass the highest in-use
total seen (+ `FOOTPRINT_SLACK_BYTES`), so the cache does not raise a run's peak and its cap can be generous:
full-NYC calibration epoch 155 → 144 s at 16.1 → 14.9 GB peak with a 6 GB cap (a 6 GB cap without the bound
had cost 4.9 GB of peak).

Blocks of 2 MB and more are 2 MB-aligned and marked for transparent huge pages (``madvise``), so that where the
kernel's THP mode is ``madvise`` rather than ``always`` a fresh block is not faulted in 4 KB at a time (a full-NYC
calibration epoch on an AMD EPYC VM with THP ``madvise``, alternating processes: 78.0 / 78.1 → 64.4 / 65.8 s, system
time 55 / 49 → 33 / 38 s, the same final loss and peak); ``AGENTTENSOR_CPU_CACHE_HUGE_PAGES=0`` turns that off.

`simulate` enables it for gradient runs of at least `MIN_AGENTS` agents on CPU. ``AGENTTENSOR_CPU_CACHE=<GB>``
sets the cap (default `default_cap_gb`: a quarter of physical memory, 2–16 GB), ``AGENTTENSOR_CPU_CACHE=0``
turns it off. Building needs a C++ compiler (``c++``) and torch's headers; without them the run goes on with
glibc's allocator (logged once).
The library is cached under ``~/.cache/agenttensor`` (or ``$AGENTTENSOR_CACHE_DIR``) per torch version.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

from . import native

log = logging.getLogger(__name__)

MIN_AGENTS = 1_000_000  # below this, every [B, N] block is under glibc's own heap threshold
DEFAULT_CAP_FRACTION = 0.25  # of physical memory, within [DEFAULT_CAP_GB, MAX_DEFAULT_CAP_GB]
DEFAULT_CAP_GB = 2.0
MAX_DEFAULT_CAP_GB = 16.0
MIN_BLOCK_BYTES = 1 << 20
FOOTPRINT_SLACK_BYTES = 256 << 20  # how far in-use + cached may pass the highest in-use total before a miss evicts
SOURCE = native.CSRC / "caching_allocator.cpp"

_library: ctypes.CDLL | None = None
_failed: str | None = None


def default_cap_gb() -> float:
    """A quarter of physical memory, at least `DEFAULT_CAP_GB` and at most `MAX_DEFAULT_CAP_GB` (5.9 GB on this
    project's 24 GB machine: more than a 7-day full-NYC gradient window frees for the next one)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return DEFAULT_CAP_GB
    return min(MAX_DEFAULT_CAP_GB, max(DEFAULT_CAP_GB, DEFAULT_CAP_FRACTION * physical))


def cap_bytes() -> int:
    """The cap from ``AGENTTENSOR_CPU_CACHE`` (GB; 0 = off), else `default_cap_gb`."""
    raw = os.environ.get("AGENTTENSOR_CPU_CACHE", "")
    try:
        gb = float(raw) if raw.strip() else default_cap_gb()
    except ValueError:
        gb = default_cap_gb()
        log.warning("AGENTTENSOR_CPU_CACHE=%r is not a number of GB; using %.1f", raw, gb)
    return max(0, int(gb * 2**30))


def huge_pages() -> bool:
    """Whether blocks of 2 MB and more are marked for transparent huge pages: ``AGENTTENSOR_CPU_CACHE_HUGE_PAGES``
    (default 1; 0 = off)."""
    return os.environ.get("AGENTTENSOR_CPU_CACHE_HUGE_PAGES", "1").strip() != "0"


def enable(cap: int | None = None, slack: int = FOOTPRINT_SLACK_BYTES) -> bool:
    """Install the caching allocator for this process (idempotent; a later call sets a new cap and empties
    the cache; `slack`, bytes above the highest in-use total before a miss evicts, is fixed at installation).
    Returns False, with one logged warning, where it cannot be built or loaded."""
    global _library, _failed
    cap = cap_bytes() if cap is None else int(cap)
    if cap <= 0 or _failed is not None or not sys.platform.startswith("linux"):
        return False
    try:
        if _library is None:
            library = ctypes.CDLL(str(native.build(SOURCE, "agenttensor_cpu_cache", with_torch=True)))
            library.agenttensor_cache_install.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                                                          ctypes.c_int]
            library.agenttensor_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
            _library = library
        _library.agenttensor_cache_install(MIN_BLOCK_BYTES, cap, int(slack), int(huge_pages()))
    except Exception as e:  # no compiler, no headers, unexpected platform
        _failed = str(e)
        log.warning("caching CPU allocator unavailable (%s); using the system allocator", e)
        return False
    return True


def enable_for(num_agents: int, device: torch.device | str = "cpu") -> bool:
    """`enable` for CPU runs of at least `MIN_AGENTS` agents (what `simulate` calls for gradient runs)."""
    if _library is not None:
        return True
    if num_agents < MIN_AGENTS or torch.device(device).type != "cpu":
        return False
    return enable()


def stats() -> dict[str, int] | None:
    """{hits, misses, cached_bytes, cap_bytes, min_block_bytes, evicted_blocks, live_bytes, peak_live_bytes} since
    installation (the peak since the last `empty`), or None if not installed."""
    if _library is None:
        return None
    out = (ctypes.c_size_t * 8)()
    _library.agenttensor_cache_stats(out)
    return dict(zip(("hits", "misses", "cached_bytes", "cap_bytes", "min_block_bytes", "evicted_blocks", "live_bytes",
                     "peak_live_bytes"), out))


def empty() -> None:
    """Hand every cached block back to the system (the allocator stays installed)."""
    if _library is not None:
        _library.agenttensor_cache_empty()

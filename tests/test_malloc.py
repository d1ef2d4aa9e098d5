"""glibc allocator tuning (agenttensor._malloc): heap_only() keeps large tensors off fresh mmaps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, torch
    import agenttensor  # applies the tuning at import
    from agenttensor import _malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_during(fn):
        before = libc.mallinfo2().hblks
        x = fn()
        during = libc.mallinfo2().hblks
        del x
        return during - before

    big = lambda: torch.ones(16_000_000)  # 64 MB: above any glibc mmap threshold
    assert _malloc.applied, "tuning not applied"
    plain = mmapped_during(big)
    with _malloc.heap_only() as active:
        assert active
        with _malloc.heap_only():  # re-entrant
            inner = mmapped_during(big)
        heap = mmapped_during(big)
    after = mmapped_during(lambda: torch.ones(40_000_000))  # larger than the heap space freed above
    print(plain, inner, heap, after)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_heap_only_serves_large_tensors_from_the_heap_and_restores_mmap():
    # no top pad, so the heap's free top does not absorb the test allocation
    env = {**os.environ, "AGENTTENSOR_MALLOC_TUNING": "1", "MALLOC_TOP_PAD_": "0"}
    env.pop("MALLOC_MMAP_MAX_", None)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plain, inner, heap, after = map(int, out.stdout.split())
    assert plain == 1 and after == 1  # default (and after the block): a large tensor is its own mapping
    assert inner == 0 and heap == 0  # heap_only: no new mapping


def test_heap_only_is_a_no_op_without_tuning(monkeypatch):
    from agenttensor import _malloc

    monkeypatch.setattr(_malloc, "applied", {})
    with _malloc.heap_only() as active:
        assert active is False

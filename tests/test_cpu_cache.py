"""The caching CPU allocator (agenttensor/_cpu_cache.py): blocks reused by exact size, capped with
least-recently-used eviction of other sizes , values intact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from agenttensor import _cpu_cache

    MB = 1 << 20
    assert _cpu_cache.stats() is None
    assert _cpu_cache.enable(cap=64 * MB)
    for k in range(6):  # the same 4 MB size again and again: served from the cache after the first free
        x = torch.full((MB,), float(k))
        assert float(x.sum()) == k * MB
        del x
    s = _cpu_cache.stats()
    assert s["hits"] >= 5 and s["cap_bytes"] == 64 * MB, s
    big = torch.ones(40 * MB, dtype=torch.uint8)
    del big
    assert _cpu_cache.stats()["cached_bytes"] >= 40 * MB
    hits = _cpu_cache.stats()["hits"]
    again = torch.zeros(40 * MB, dtype=torch.uint8)  # same size: a cached block, written afresh
    assert _cpu_cache.stats()["hits"] == hits + 1 and int(again.sum()) == 0
    del again
    huge = torch.ones(100 * MB, dtype=torch.uint8)  # above the cap: never cached
    del huge
    assert _cpu_cache.stats()["cached_bytes"] <= 64 * MB
    _cpu_cache.empty()
    three = [torch.ones(4 * MB) for _ in range(3)]  # 16 MB each: 48 MB cached once freed
    del three
    assert _cpu_cache.stats()["cached_bytes"] == 48 * MB
    evicted = _cpu_cache.stats()["evicted_blocks"]
    other = torch.ones(40 * MB, dtype=torch.uint8)
    del other  # does not fit next to them: the least recently used other size is released to make room
    s = _cpu_cache.stats()
    assert s["cached_bytes"] == 40 * MB and s["evicted_blocks"] == evicted + 3, s
    small = [torch.ones(1000) for _ in range(100)]  # below 1 MB: the system allocator
    assert sum(float(t.sum()) for t in small) == 100_000
    _cpu_cache.empty()
    assert _cpu_cache.stats()["cached_bytes"] == 0
    y = torch.arange(3 * MB, dtype=torch.float32)
    assert float(y[-1]) == 3 * MB - 1
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not (shutil.which("c++") or shutil.which("g++")),
                    reason="needs Linux and a C++ compiler")
def test_caching_allocator_reuses_blocks_by_size_under_its_cap(tmp_path):
    env = {**os.environ, "AGENTTENSOR_CACHE_DIR": str(tmp_path)}  # built afresh: the build itself is tested
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


FOOTPRINT_SCRIPT = textwrap.dedent("""
    import torch
    from agenttensor import _cpu_cache

    MB = 1 << 20
    assert _cpu_cache.enable(cap=256 * MB, slack=8 * MB)
    three = [torch.ones(4 * MB) for _ in range(3)]  # 48 MB in use: the highest so far
    del three  # 48 MB cached, none in use
    s = _cpu_cache.stats()
    assert (s["live_bytes"], s["peak_live_bytes"], s["cached_bytes"]) == (0, 48 * MB, 48 * MB), s
    y = torch.ones(5 * MB)  # a 20 MB miss: 0 + 48 + 20 > 48 + 8, so the 16 MB size is handed back first
    s = _cpu_cache.stats()
    assert s["cached_bytes"] == 0 and s["evicted_blocks"] == 3 and s["live_bytes"] == 20 * MB, s
    z = [torch.ones(4 * MB) for _ in range(3)]  # in use 68 MB: a new high-water mark
    del z
    w = torch.ones(MB // 2)  # a 2 MB miss: 20 + 48 + 2 <= 68 + 8, nothing is evicted
    s = _cpu_cache.stats()
    assert s["cached_bytes"] == 48 * MB and s["evicted_blocks"] == 3 and s["peak_live_bytes"] == 68 * MB, s
    assert float(y.sum()) == 5 * MB and float(w.sum()) == MB // 2
    _cpu_cache.empty()  # the high-water mark restarts from what is in use
    assert _cpu_cache.stats()["peak_live_bytes"] == 22 * MB
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not (shutil.which("c++") or shutil.which("g++")),
                    reason="needs Linux and a C++ compiler")
def test_a_miss_hands_back_other_sizes_only_above_the_highest_use_seen(tmp_path):
    """Footprint bound: cached blocks never push in-use + cached past the highest in-use total (+ slack)."""
    env = {**os.environ, "AGENTTENSOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", FOOTPRINT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


HUGE_PAGES_SCRIPT = textwrap.dedent("""
    import os, torch
    from agenttensor import _cpu_cache

    MB = 1 << 20
    huge = os.environ["AGENTTENSOR_CPU_CACHE_HUGE_PAGES"] != "0"
    assert _cpu_cache.huge_pages() == huge and _cpu_cache.enable(cap=256 * MB)
    blocks = [torch.ones(MB + 7 * k) for k in range(1, 6)]  # ~4 MB each, fresh sizes: misses
    assert all(float(x.sum()) == x.numel() for x in blocks)

    def advised(address):  # the mapping holding `address` is marked for huge pages (smaps' VmFlags: hg)
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "VmFlags:":
                    return "hg" in line.split()[1:]
        return False

    if huge:  # 2 MB-aligned and advised, every one
        assert all(x.data_ptr() % (2 * MB) == 0 and advised(x.data_ptr()) for x in blocks)
    else:  # c10's blocks: not advised
        assert not any(advised(x.data_ptr()) for x in blocks)
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not (shutil.which("c++") or shutil.which("g++"))
                    or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="needs Linux with transparent huge pages and a C++ compiler")
@pytest.mark.parametrize("huge", ["1", "0"])
def test_blocks_of_2_mb_and_more_are_marked_for_huge_pages_unless_switched_off(tmp_path, huge):
    env = {**os.environ, "AGENTTENSOR_CACHE_DIR": str(tmp_path), "AGENTTENSOR_CPU_CACHE_HUGE_PAGES": huge}
    done = subprocess.run([sys.executable, "-c", HUGE_PAGES_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_cap_setting_is_read_from_the_environment(monkeypatch):
    from agenttensor import _cpu_cache

    monkeypatch.setenv("AGENTTENSOR_CPU_CACHE", "0.5")
    assert _cpu_cache.cap_bytes() == 2**29
    monkeypatch.setenv("AGENTTENSOR_CPU_CACHE", "0")
    assert _cpu_cache.cap_bytes() == 0
    monkeypatch.setenv("AGENTTENSOR_CPU_CACHE", "lots")
    default = int(_cpu_cache.default_cap_gb() * 2**30)
    assert _cpu_cache.cap_bytes() == default and 2 * 2**30 <= default <= 16 * 2**30
    monkeypatch.delenv("AGENTTENSOR_CPU_CACHE")
    assert _cpu_cache.cap_bytes() == default
    assert not _cpu_cache.enable_for(10_000)  # small runs keep the system allocator


def test_without_a_compiler_runs_go_on_with_the_system_allocator(tmp_path):
    """No C++ compiler: `enable` returns False with one logged warning, and tensors still work."""
    script = textwrap.dedent("""
        import logging, torch
        from agenttensor import _cpu_cache
        records = []
        logging.getLogger("agenttensor._cpu_cache").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r)})())
        assert _cpu_cache.enable() is False and _cpu_cache.enable() is False and _cpu_cache.stats() is None
        assert len(records) == 1 and "unavailable" in records[0].getMessage()
        assert float(torch.ones(3_000_000).sum()) == 3_000_000
        print("ok")
    """)
    env = {**os.environ, "AGENTTENSOR_CACHE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]

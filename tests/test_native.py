"""Every native kernel source builds and loads where a C++ compiler is present. The kernels' users fall back to torch
ops (with one logged warning) when a build fails, and their own tests skip then: without this test a source that no
longer compiles (as select_kernels.cpp did for one commit, after a shared header lost its <cstddef>) passes CI."""

from __future__ import annotations

import importlib
import shutil

import pytest

from agenttensor import _cpu_cache, native

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")

LIBRARIES = ["agenttensor._group_kernels", "agenttensor._rng_kernels", "agenttensor._event_kernels", "models.covid.labour_native",
             "agenttensor.select", "models.covid.contributions_native", "models.covid.hard_native",
             "models.covid.shadow_native", "models.covid.exits_native"]


@pytest.mark.parametrize("module", LIBRARIES)
def test_every_kernel_source_builds_and_loads(module, monkeypatch, caplog):
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "1")
    monkeypatch.setattr(native, "_loaded", {})  # load afresh: not an earlier test's result
    mod = importlib.import_module(module)
    assert mod._library() is not None, caplog.text


def test_every_source_under_csrc_is_checked():
    """A new kernel source must join LIBRARIES (the caching allocator has its own tests: test_cpu_cache.py)."""
    checked = {importlib.import_module(m).SOURCE.name for m in LIBRARIES} | {_cpu_cache.SOURCE.name}
    sources = {p.name for p in native.CSRC.glob("*.cpp")}
    sources |= {p.name for p in (native.CSRC.parents[1] / "models").glob("*/csrc/*.cpp")}
    assert sources == checked


def test_status_names_the_libraries_that_did_not_build(monkeypatch, tmp_path, caplog):
    """`native.status` (what benchmarks record): a source that fails to compile is False there, after its one warning."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("AGENTTENSOR_CACHE_DIR", str(tmp_path / "cache"))
    from agenttensor import _group_kernels

    assert _group_kernels._library() is not None
    assert native.load(broken, "broken", lambda library: None) is None
    assert native.status() == {"agenttensor_group_kernels": True, "broken": False}
    assert "broken.cpp unavailable" in caplog.text


def test_the_switch_is_read_at_every_call(monkeypatch):
    """`kernels_enabled` reads os.environ's own mapping (no per-call encoding): it must still follow every change."""
    monkeypatch.delenv("AGENTTENSOR_NATIVE_KERNELS", raising=False)
    assert native.kernels_enabled()
    for value, expected in (("0", False), ("1", True), (" 0 ", False), ("", True), ("0", False)):
        monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", value)
        assert native.kernels_enabled() is expected, value
    monkeypatch.delenv("AGENTTENSOR_NATIVE_KERNELS")
    assert native.kernels_enabled()

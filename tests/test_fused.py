"""`fused.on_request` (``AGENTTENSOR_COMPILE=1``): compiled where asked, checked against the eager numbers on its first
call per device, and eager with the same numbers when compilation fails. torch.compile is replaced here by stand-ins
(a compiler that fails, one whose maths rounds otherwise); the real compilations are checked bit for bit in
tests/test_rng.py and tests/test_sync_free.py."""

from __future__ import annotations

import logging

import pytest
import torch

from agenttensor import fused


def scaled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 3 + y, (x > y)


@pytest.fixture
def compile_with(monkeypatch):
    """Requests compilation and makes torch.compile return ``make(fn)``; returns the marked `scaled`."""
    monkeypatch.setenv("AGENTTENSOR_COMPILE", "1")

    def use(make):
        monkeypatch.setattr(torch, "compile", lambda fn, **options: make(fn))
        return fused.on_request(scaled)
    return use


X, Y = torch.arange(6.0), torch.full((6,), 2.0)


def test_runs_eagerly_unless_requested(monkeypatch):
    monkeypatch.setenv("AGENTTENSOR_COMPILE", "0")
    monkeypatch.setattr(torch, "compile", lambda fn, **options: pytest.fail("compiled without a request"))
    marked = fused.on_request(scaled, eager=lambda x, y: (x * 3 + y, x > y))
    assert torch.equal(marked(X, Y)[0], scaled(X, Y)[0]) and marked.calls["compiled"] == 0


def test_compiled_calls_are_counted_and_the_first_per_device_checked(compile_with):
    marked = compile_with(lambda fn: fn)
    for _ in range(3):
        out = marked(X, Y)
    assert torch.equal(out[0], scaled(X, Y)[0])
    assert marked.calls == {"compiled": 3, "checked": 1, "differs": 0, "fallback": 0}


def test_a_compiler_that_rounds_otherwise_is_logged_and_its_result_kept(compile_with, caplog):
    marked = compile_with(lambda fn: lambda x, y: (fn(x, y)[0] + 1e-6 * (x == 4), fn(x, y)[1]))
    with caplog.at_level(logging.WARNING, logger="agenttensor.fused"):
        out = marked(X, Y)
    assert marked.calls["differs"] == 1 and marked.calls["checked"] == 0
    assert "differs from the eager one on cpu in 1 elements" in caplog.text
    assert not torch.equal(out[0], scaled(X, Y)[0])


def test_a_failed_compilation_runs_eagerly_with_the_same_numbers(compile_with, caplog):
    def broken(fn):
        def call(*args):
            raise RuntimeError("no C++ compiler found\nlong traceback")
        return call
    marked = compile_with(broken)
    with caplog.at_level(logging.WARNING, logger="agenttensor.fused"):
        first, second = marked(X, Y), marked(X, Y)
    assert torch.equal(first[0], scaled(X, Y)[0]) and torch.equal(second[1], scaled(X, Y)[1])
    assert marked.off == "RuntimeError: no C++ compiler found"
    assert marked.calls == {"compiled": 0, "checked": 0, "differs": 0, "fallback": 1}
    assert caplog.text.count("torch.compile failed for scaled") == 1


def test_an_error_of_the_inputs_is_the_eager_functions_own(compile_with):
    marked = compile_with(lambda fn: fn)
    with pytest.raises(RuntimeError, match="size of tensor a"):
        marked(X, torch.ones(4))
    assert marked.off is None and marked.calls["fallback"] == 0


def test_a_function_marked_for_devices_off_the_cpu_runs_eagerly_on_it(compile_with):
    compile_with(lambda fn: pytest.fail("compiled for the CPU"))
    marked = fused.on_request(scaled, cpu=False)
    assert torch.equal(marked(X, Y)[0], scaled(X, Y)[0]) and marked.calls["compiled"] == 0

"""benchmarks/native_calls.py: its timers see the kernels a day calls and change none of the numbers."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch

import agenttensor as at
from agenttensor import Hard, StraightThrough, native
from models.covid import hard_native

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import native_calls  # noqa: E402
from covid_step import MODEL, CovidParams, timed_steps  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not native.kernels_enabled(), reason="native kernels unavailable")]


def test_the_timed_windows_give_the_untimed_numbers_and_count_the_kernels():
    env = MODEL.setup(at.synthetic(3_000, seed=2), CovidParams().as_tensors("cpu"), torch.device("cpu"))
    params = CovidParams(initial_prevalence=0.01).as_tensors("cpu")
    learn = CovidParams(initial_prevalence=0.01, transmission_multiplier=torch.ones(2)).as_tensors(
        "cpu", learn=native_calls.LEARN)

    def runs():
        hard = timed_steps(env, params, Hard(), 8)[2][1]
        soft = timed_steps(env, learn, StraightThrough(), 8)[2][1]
        sum(r["new_infections"].sum() + r["reported_cases"].sum() for r in soft).backward()
        grads = [getattr(learn, name).grad.clone() for name in native_calls.LEARN]
        for name in native_calls.LEARN:
            getattr(learn, name).grad = None
        return [r["new_infections"] for r in hard + soft], grads

    plain = runs()
    timer = native_calls.NativeTimer()
    env.native.clear()  # (plans made anew under the timer: the hard force's takes the layered force's address)
    try:
        timed = runs()
        entries = set(timer.calls)
        rows = [native_calls.window(env, 4, mode, learn, params, timer, top=5)
                for mode in ("hard", "gradient forward", "backward")]
    finally:
        timer.restore()
    (infections, gradients), (timed_infections, timed_gradients) = plain, timed
    for a, b in zip(infections + gradients, timed_infections + timed_gradients):
        assert torch.equal(a, b)
    assert {"agenttensor_covid_hard_progress", "agenttensor_covid_shadow_backward_fused"} <= entries
    for row in rows:
        assert row["calls"] and 0 < row["native_ms_per_day"] <= row["ms_per_day"] + 1e-6, row
        assert all(c["calls_per_day"] > 0 and c["ms_per_call"] >= 0 for c in row["calls"])
    assert rows[0]["calls"][0]["entry"].startswith("agenttensor_")
    # restored: the libraries' entry points are ctypes functions again
    library = hard_native._library()
    assert all(isinstance(getattr(library, n), ctypes._CFuncPtr) for n in vars(library) if n.startswith("agenttensor_"))

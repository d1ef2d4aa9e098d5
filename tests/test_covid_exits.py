"""The gradient modes' exits as one native node (models/covid/exits_native.py) against the torch ops in `progress`."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

import agenttensor as at
from agenttensor import StraightThrough
from models.covid import exits_native
from models.covid.model import MODEL, CovidParams

START = dt.date(2020, 9, 13)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LEARN = ("transmission_scale", "detection_rate", "asymptomatic_detection_ratio", "symptomatic_fraction",
         "hosp_given_symptomatic", "death_given_hosp", "vaccine_efficacy_severe")


@pytest.fixture(scope="module")
def population():
    return at.synthetic(20_000, seed=3)


CASES = {
    "plain": (dict(), [], [0]),
    "levers": (dict(), [at.Intervention("testing_isolation", 3, 400, 0.3),
                        at.Intervention("vaccination", 2, 400, 0.05)], [0]),
    # a [B, 1] parameter: each element's exits read their own value (`At`: [M] at the exits)
    "per element": (dict(detection_rate=torch.tensor([[0.3], [0.6]]),
                         asymptomatic_detection_ratio=torch.tensor([[0.5], [0.2]])),
                    [at.Intervention("testing_isolation", 3, 400, 0.3)], [0, 1]),
}


@pytest.mark.skipif(not exits_native.native.kernels_enabled(), reason="native kernels off")
@pytest.mark.parametrize("case", sorted(CASES))
def test_native_exits_give_the_torch_ops_numbers_and_gradients_bit_for_bit(population, monkeypatch, case):
    """With straight-through draws on CPU the exits run as one native node (forward and backward); every metric and
    the gradient of every parameter the exits read (the age tables through index_select's backward, a broadcast or
    per-element detection rate, the vaccine's efficacy through efficacy · vaccinated) are the torch ops', bit for bit,
    under a loss that reaches every output of the node (its seven changes and three per-borough sums)."""
    changes, interventions, seeds = CASES[case]
    params = CovidParams(initial_prevalence=0.02, transmission_scale=0.4, **changes)
    env = MODEL.setup(population, CovidParams().as_tensors(), "cpu")
    supported, apply = exits_native.supported, exits_native._ExitFlows.apply
    calls = []
    monkeypatch.setattr(exits_native._ExitFlows, "apply", lambda *a: calls.append(1) or apply(*a))

    def run(native: bool):
        monkeypatch.setattr(exits_native, "supported", supported if native else lambda *a, **k: False)
        learn = params.as_tensors(learn=LEARN)
        res = at.simulate(MODEL, None, learn, steps=30, seeds=seeds, env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 3 * res["hospital_admissions"].sum()
         + 5 * res["deaths"].sum() + res["I_sym"].sum() + 0.7 * res["I_asym"].sum() + 0.2 * res["E"].sum()
         + 0.5 * res["H"].sum() + 0.3 * res["R"].sum() + res["D"].sum() + 100 * res["isolating_share"].sum()
         ).backward()
        return res, [getattr(learn, name).grad for name in LEARN]

    native_res, native_grads = run(True)
    assert len(calls) >= 25  # (a day without exits takes the torch ops: nothing to draw)
    calls.clear()
    torch_res, torch_grads = run(False)
    assert not calls
    for name in torch_res.metrics:
        assert torch.equal(native_res[name], torch_res[name]), name
    for name, a, b in zip(LEARN, native_grads, torch_grads):
        if name == "vaccine_efficacy_severe" and case != "levers":
            assert a is None and b is None
            continue
        assert a.abs().sum() > 0 and torch.equal(a, b), (case, name, a, b)


def test_native_exits_apply_only_to_straight_through_on_cpu(population):
    """The node's conditions: straight-through draws (not the relaxed sampler's, whose derivatives differ), float32
    values at one or more exits, int16 countdowns."""
    env = MODEL.setup(population, CovidParams().as_tensors(), "cpu")
    params = CovidParams().as_tensors()
    M = 5
    leaving = {name: torch.zeros(M) for name in ("E", "I_asym", "I_sym", "H", "isolating")}
    u, stage_end = torch.rand(6, M), torch.zeros(1, env.num_agents, dtype=torch.int16)
    assert exits_native.supported(StraightThrough(), leaving, u, params, env, stage_end) \
        == exits_native.native.kernels_enabled()
    assert not exits_native.supported(at.Relaxed(0.3), leaving, u, params, env, stage_end)
    assert not exits_native.supported(StraightThrough(), {k: v.double() for k, v in leaving.items()}, u, params, env,
                                      stage_end)
    assert not exits_native.supported(StraightThrough(), {k: v[:0] for k, v in leaving.items()}, u[:, :0], params,
                                      env, stage_end)
    assert not exits_native.supported(StraightThrough(), leaving, u, params, env, stage_end.int())
    # what is read at the exits: numbers or float32 tensors (a float64 rate keeps the torch ops, which promote)
    assert exits_native.supported(StraightThrough(), leaving, u, params, env, stage_end, (0.3, None, torch.ones(2))) \
        == exits_native.native.kernels_enabled()
    assert not exits_native.supported(StraightThrough(), leaving, u, params, env, stage_end,
                                      (torch.tensor(0.3, dtype=torch.float64),))

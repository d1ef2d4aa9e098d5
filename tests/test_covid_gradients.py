"""Gradient-mode correctness of the covid model against finite differences on common random numbers."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

import agenttensor as at
from agenttensor import Hard, StraightThrough
from agenttensor.model import StepContext
from agenttensor.rng import Randomness
from models.covid import model as covid
from models.covid.model import MODEL, CovidParams

START = dt.date(2020, 9, 13)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def population():
    return at.synthetic(20_000, seed=1)


def moderate(**changes) -> CovidParams:
    """A non-saturating epidemic (a few % infected in 5 weeks), as in NYC in fall 2020."""
    return CovidParams(**{"initial_prevalence": 0.005, "transmission_scale": 0.3, "initial_immunity": 0.2, **changes})


def test_force_gradient_is_exact_for_parameters_inside_the_group_sums(population):
    """λ is linear in the isolation effectiveness η at a fixed state: d(Σ_S λ)/dη from autograd equals the
    central difference to float precision (each source's derivative is counted once: the sparse forward
    sum carries no gradient, the dense term does)."""
    params = moderate()
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    state = at.simulate(MODEL, None, params, steps=6, seeds=[0], env=env, start_date=START, progress=False).final_state
    assert state.isolating.sum() > 0
    rng = Randomness.for_agents([0], env.agent_ids)

    def force(eta, sampler):
        ctx = StepContext(step=6, env=env, rng=rng, sampler=sampler, start_date=START, schedule=None)
        s = state.replace(**{k: v.float() for k, v in state.tensors().items() if v.dtype == torch.uint8}) \
            if sampler.differentiable else state
        covid.infection_pressure(s, params.as_tensors().replace(isolation_effectiveness=eta), ctx)
        return (ctx.scratch["force"] * state.S.float()).sum()

    eta = torch.tensor(0.8, requires_grad=True)
    force(eta, StraightThrough()).backward()
    with torch.no_grad():
        fd = (force(torch.tensor(0.85), Hard()) - force(torch.tensor(0.75), Hard())) / 0.1
    assert eta.grad.item() < 0
    assert eta.grad.item() == pytest.approx(fd.item(), rel=1e-3)


@pytest.mark.slow
def test_gradients_through_later_generations_match_finite_differences(population):
    """Straight-through d(outcome)/d(β) over 35 days (several generations; 8 seeds, common random numbers)
    agrees with central finite differences for new infections and reported cases: the derivative of
    infections that did not happen is carried through the stages (`shadow_flows`). Without it the
    gradient of reported cases was 14 % of the finite difference (60 days)."""
    from agenttensor.calibration import sensitivities

    table = sensitivities(MODEL, population, moderate(), outcomes={"infections": "new_infections",
                                                                   "reported": "reported_cases"},
                          wrt=["transmission_scale", "isolation_effectiveness"], steps=35, seeds=list(range(8)),
                          start_date=START, fd_steps={"transmission_scale": 0.03, "isolation_effectiveness": 0.1})
    for row in table.iter_rows(named=True):
        assert row["rel_diff"] < 0.2, row
    beta = table.filter((table["wrt"] == "transmission_scale") & (table["outcome"] == "reported")).row(0, named=True)
    assert beta["gradient"] > 0 and beta["rel_diff"] < 0.1, beta


def test_shadow_flows_leave_the_forward_pass_unchanged(population):
    """Gradient mode with the shadow flows gives bit-identical metrics to hard mode."""
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    hard = at.simulate(MODEL, None, params, steps=30, seeds=[0, 1], env=env, start_date=START, progress=False)
    beta = torch.tensor(0.3, requires_grad=True)
    soft = at.simulate(MODEL, None, params.replace(transmission_scale=beta), steps=30, seeds=[0, 1], env=env,
                       start_date=START, progress=False, sampler=StraightThrough())
    for name in ("new_infections", "reported_cases", "hospital_admissions", "deaths", "I_sym", "R"):
        assert torch.equal(hard[name].float(), soft[name].detach().float()), name
    soft["deaths"].sum().backward()
    assert beta.grad.item() > 0


def test_checkpointed_gradients_equal_the_full_graph(population):
    """grad_checkpoint_every=k (segment inputs compacted to uint8 values + derivative carriers) gives the
    gradients of the uncheckpointed run."""
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    grads = []
    for every in (None, 4):
        beta = torch.tensor(0.3, requires_grad=True)
        eta = torch.tensor(0.8, requires_grad=True)
        res = at.simulate(MODEL, None, params.replace(transmission_scale=beta, isolation_effectiveness=eta), steps=18,
                          seeds=[0, 1], env=env, start_date=START, progress=False, sampler=StraightThrough(),
                          grad_checkpoint_every=every)
        (res["reported_cases"].sum() + res["deaths"].sum()).backward()
        grads.append((beta.grad.item(), eta.grad.item()))
    assert grads[0][0] > 0 and grads[0][1] < 0
    assert grads[1] == pytest.approx(grads[0], rel=1e-5)

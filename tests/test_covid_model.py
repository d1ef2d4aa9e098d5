"""NYC COVID-19 model (models/covid): invariants, hard/gradient equivalence, gradients, interventions."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

import agenttensor as at
from agenttensor import Intervention, StraightThrough
from models.covid import disease
from models.covid.calendar import is_school_day, is_work_day
from models.covid.model import CALIBRATABLE, MODEL, STAGES, CovidParams, make_model

START = dt.date(2020, 3, 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These runs are small; one thread avoids oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def population():
    return at.synthetic(20_000, seed=1)


@pytest.fixture(scope="module")
def env(population):
    return MODEL.setup(population, CovidParams().as_tensors(), "cpu")


def busy_params(**changes) -> CovidParams:
    """More initial infections so short runs exercise every transition."""
    return CovidParams(**{"initial_prevalence": 0.01, **changes})


ALL_LEVERS = [
    Intervention("school_closure", dt.date(2020, 3, 16), dt.date(2020, 4, 10), 1.0),
    Intervention("workplace_closure", dt.date(2020, 3, 9), dt.date(2020, 4, 10), 0.5),
    Intervention("stay_at_home", dt.date(2020, 3, 8), dt.date(2020, 4, 10), 0.6, boroughs=("Bronx", "Queens")),
    Intervention("transmission_reduction", dt.date(2020, 3, 12), dt.date(2020, 4, 10), 0.3, layer="community"),
    Intervention("transmission_reduction", dt.date(2020, 3, 18), dt.date(2020, 4, 10), 0.1),
    Intervention("testing_isolation", dt.date(2020, 3, 10), dt.date(2020, 4, 10), 0.3),
    Intervention("vaccination", dt.date(2020, 3, 5), dt.date(2020, 4, 10), 0.02, ages=(65, 120)),
]


def run(env, params=None, steps=40, seeds=(0,), **kwargs):
    return at.simulate(MODEL, env=env, params=params or busy_params(), steps=steps, seeds=list(seeds),
                       start_date=START, progress=False, **kwargs)


def test_invariants_every_day(env):
    results = run(env, seeds=(0, 1), interventions=ALL_LEVERS)
    N = env.num_agents
    stages = torch.stack([results[f"{s}_by_borough"] for s in STAGES])  # [7, T, B, G]
    assert stages.dtype == torch.int64
    assert (stages >= 0).all()
    assert torch.equal(stages.sum(0), env.borough_size.to(torch.int64).expand_as(stages[0]))
    assert (torch.stack([results[s] for s in STAGES]).sum(0) == N).all()
    deaths = results["D"]
    assert (deaths[1:] >= deaths[:-1]).all()
    assert torch.equal(deaths[-1], results["deaths"].sum(0))  # flows add up to the stock
    for name in ("new_infections", "reported_cases", "hospital_admissions", "deaths"):
        assert (results[name] >= 0).all() and torch.equal(results[name], results[f"{name}_by_borough"].sum(-1))
    assert (results["reported_cases"] <= results["new_infections"].cumsum(0) + 10_000).all()
    assert results["new_infections"].sum() > 0 and results["hospital_admissions"].sum() > 0
    state = results.final_state
    for s in STAGES:
        assert set(getattr(state, s).unique().tolist()) <= {0, 1}
    assert ((state.employed + state.unemployed) <= 1).all()
    rate = results["unemployment_rate_by_borough"]
    assert ((rate >= 0) & (rate <= 1)).all()


@pytest.mark.parametrize("params", [busy_params(), busy_params(transmission_scale=3.0)], ids=["busy", "explosive"])
def test_hard_and_gradient_modes_same_trajectory(env, params):
    """Also once most agents are infected (hard mode then draws infections at susceptible agents only)."""
    hard = run(env, params, steps=30, interventions=ALL_LEVERS)
    soft = run(env, params, steps=30, interventions=ALL_LEVERS, sampler=StraightThrough())
    if params.transmission_scale == 3.0:
        assert hard["S"][-1].item() * 4 < env.num_agents
    for name, value in hard.metrics.items():
        if name.startswith("infections_"):
            assert torch.allclose(value.float(), soft[name].detach(), rtol=1e-4, atol=1e-3), name
        else:
            assert torch.equal(value.float(), soft[name].detach().float()), name


def test_gradients_reach_every_calibratable_parameter(env):
    weeks = 4
    params = busy_params(transmission_multiplier=torch.ones(weeks)).as_tensors(learn=CALIBRATABLE)
    results = run(env, params=params, steps=7 * weeks, interventions=ALL_LEVERS, sampler=StraightThrough())
    loss = sum(results[name].sum() for name in ("new_infections", "reported_cases", "hospital_admissions", "deaths"))
    loss = loss + 1000 * (results["unemployment_rate"].sum() + results["isolating_share"].sum())
    loss.backward()
    for name in CALIBRATABLE:
        grad = getattr(results.params, name).grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
    multiplier_grad = results.params.transmission_multiplier.grad
    assert multiplier_grad.shape == (weeks,) and (multiplier_grad != 0).all()


def test_noop_interventions_change_nothing_bit_for_bit(env):
    base = run(env, steps=25)
    noop = [Intervention(iv.lever, iv.start, iv.end, 0.0, iv.boroughs, iv.ages, iv.layer) for iv in ALL_LEVERS]
    with_noop = run(env, steps=25, interventions=noop)
    for name, value in base.metrics.items():
        assert torch.equal(value, with_noop[name]), name


def test_school_closure_lowers_school_infections_in_expectation(env):
    seeds = range(4)
    params = busy_params(initial_prevalence=0.003)
    open_ = run(env, params, steps=35, seeds=seeds)
    closed = run(env, params, steps=35, seeds=seeds,
                 interventions=[Intervention("school_closure", START, START + dt.timedelta(days=34), 1.0)])
    assert closed["infections_school"].sum() == 0
    assert open_["infections_school"].sum() > 0
    assert closed["new_infections"].float().sum(0).mean() < open_["new_infections"].float().sum(0).mean()


def test_workplace_closure_raises_unemployment(env):
    closure = [Intervention("workplace_closure", START, START + dt.timedelta(days=55), 1.0)]
    base = run(env, steps=56, seeds=(0, 1))
    closed = run(env, steps=56, seeds=(0, 1), interventions=closure)
    assert (closed["unemployment_rate"][-1] > base["unemployment_rate"][-1] + 0.05).all()
    assert closed["infections_workplace"].sum() == 0


def test_behaviour_source_plugs_in(population):
    seen = {}

    class StayHome:
        def decide(self, env, state, params, ctx, observations):
            seen.update(observations)
            B, N = state.S.shape
            return {"isolate_prob": torch.ones(B, N), "work_prob": torch.zeros(B, N)}

    model = make_model(behavior=StayHome())
    results = at.simulate(model, population, busy_params(), steps=15, start_date=START, progress=False)
    assert results["infections_workplace"].sum() == 0
    assert seen["cases_per_100k"].shape == (1, 5) and seen["unemployment_rate"].shape == (1, 5)
    assert results.final_state.on_site.sum() == 0


def test_isolation_propensity_lowers_infections(env):
    never = run(env, busy_params(isolate_intercept=-20.0, isolate_incidence_slope=0.0), steps=30, seeds=range(3))
    always = run(env, busy_params(isolate_intercept=20.0), steps=30, seeds=range(3))
    assert always["isolating_share"].max() > 0 and never["isolating_share"].max() == 0
    assert always["new_infections"].sum() < never["new_infections"].sum()


def test_calendar():
    assert not is_school_day(dt.date(2020, 3, 1))  # Sunday
    assert is_school_day(dt.date(2020, 3, 2)) and is_work_day(dt.date(2020, 3, 2))
    assert not is_school_day(dt.date(2020, 7, 15)) and is_work_day(dt.date(2020, 7, 15))  # summer break
    assert not is_school_day(dt.date(2020, 11, 26)) and not is_work_day(dt.date(2020, 11, 26))  # Thanksgiving
    assert not is_work_day(dt.date(2020, 12, 25)) and not is_school_day(dt.date(2020, 12, 28))


def test_disease_tables_and_durations():
    severity = disease.severity_tables()
    assert all(0 < p <= 1 for k in severity for p in severity[k])
    ifr = severity["IFR"]
    assert ifr[3:] == sorted(ifr[3:]) and 0.03 < ifr[-1] < 0.1  # rises with age from 18; 75+ a few percent
    cdf = disease.lognormal_cdf_table_median(5.1, 0.418)
    days = disease.draw_duration(cdf, torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    assert days.min() >= 1 and abs(days.float().median().item() - 5.0) <= 1.0
    assert days.dtype == torch.int16
    groups = disease.age_group_of(torch.tensor([0, 4, 5, 12, 13, 17, 18, 64, 65, 74, 75, 100]))
    assert groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 7, 8, 8, 9, 9]


def test_cli_run_writes_results(tmp_path):
    from agenttensor.cli import main

    out = tmp_path / "covid"
    code = main(["run", "models/covid", "--population", "synthetic:20000", "--steps", "10", "--start-date",
                 "2020-03-01", "--out", str(out), "--no-progress"])
    assert code == 0
    assert (out / "results.parquet").exists() and (out / "results_by_group.parquet").exists()
    from models.covid.report import write_report

    table = write_report(out)
    assert table["group"].to_list() == ["Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island", "NYC"]
    assert table.filter(table["group"] == "NYC")["residents"].item() == 20_000
    assert (out / "covid_report.png").exists() and (out / "weekly_by_borough.parquet").exists()


def test_initial_immunity_puts_exact_share_in_R_disjoint_from_E(env):
    params = busy_params(initial_immunity=0.25)
    N = env.num_agents
    first = at.simulate(MODEL, env=env, params=params, steps=0, seeds=[0], start_date=START, progress=False).final_state
    assert int(first.R.sum()) == round(0.25 * N) and int(first.E.sum()) == round(0.01 * N)
    assert int((first.R * first.E).sum()) == 0
    assert int((first.S + first.E + first.R).min()) == 1 and int((first.S + first.E + first.R).max()) == 1
    # the same E agents as without immunity (the next-lowest seeding uniforms become immune)
    plain = at.simulate(MODEL, env=env, params=busy_params(), steps=0, seeds=[0], start_date=START,
                        progress=False).final_state
    assert torch.equal(plain.E, first.E)

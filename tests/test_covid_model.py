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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    Intervention("stimulus", dt.date(2020, 3, 8), dt.date(2020, 4, 10), 0.8, boroughs=("Bronx", "Brooklyn", "Queens")),
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


@pytest.mark.parametrize("sampler", [at.Hard(), StraightThrough()], ids=["hard", "straight-through"])
def test_stage_counts_rolled_by_the_days_flows_equal_sums_over_agents(env, sampler, monkeypatch):
    """The metrics' per-borough stage counts (and isolating share) are yesterday's counts plus today's changes
    (`CovidEnv.rolled_counts`): the same numbers as summing every agent, and the same derivative."""
    from models.covid.model import CovidEnv

    def stage_run():
        learn = busy_params().as_tensors(learn=("transmission_scale", "hosp_given_symptomatic"))
        params = learn if sampler.differentiable else busy_params()
        res = run(env, params, steps=35, seeds=(0, 1), interventions=ALL_LEVERS, sampler=sampler)
        names = [f"{s}_by_borough" for s in STAGES] + ["isolating_share_by_borough"]
        values = {name: res[name].detach().clone() for name in names}
        grads = None
        if sampler.differentiable:
            (res["I_sym"].sum() + 3 * res["H"].sum() + res["isolating_share"].sum() * 1e3).backward()
            grads = [learn.transmission_scale.grad.clone(), learn.hosp_given_symptomatic.grad.clone()]
        return values, grads

    rolled_used = []
    rolled = CovidEnv.rolled_counts

    def counting(*args):
        counts = rolled(*args)
        rolled_used.append(counts is not None)
        return counts

    monkeypatch.setattr(CovidEnv, "rolled_counts", counting)
    fast, fast_grads = stage_run()
    monkeypatch.setattr(CovidEnv, "rolled_counts", lambda *a: None)  # every count summed over the agents
    slow, slow_grads = stage_run()
    per_day = 1 if not sampler.differentiable else 8  # hard mode: the 8 fields' counts stacked, one call a day
    assert len(rolled_used) == per_day * 35 and sum(rolled_used) == per_day * 34  # all but the first day rolled forward
    assert fast["H_by_borough"].sum() > 0 and fast["isolating_share_by_borough"].sum() > 0
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name
    if sampler.differentiable:
        for a, b in zip(fast_grads, slow_grads):
            assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-5), (a, b)


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


@pytest.mark.parametrize("sampler", [None, StraightThrough()], ids=["hard", "straight-through"])
def test_per_borough_sums_by_runs_equal_the_scatter(env, sampler, monkeypatch):
    """The day's per-borough flows summed over runs of pairs (`by_borough_at` above `RUNS_ABOVE` pairs, as at the
    peak of a city-scale epidemic) and by a scatter (below): the same metrics, and the same gradients."""
    import models.covid.model as covid_model

    def both():
        params = busy_params(transmission_scale=3.0).as_tensors(learn=("transmission_scale", "detection_rate"))
        results = run(env, params, steps=25, seeds=(0, 1), interventions=ALL_LEVERS,
                      **({} if sampler is None else dict(sampler=sampler)))
        if sampler is not None:
            (results["reported_cases"].sum() + results["hospital_admissions"].sum()).backward()
        return results, [params.transmission_scale.grad, params.detection_rate.grad]

    scattered, grads = both()
    monkeypatch.setattr(covid_model, "RUNS_ABOVE", 0)
    runs, run_grads = both()
    for name, value in scattered.metrics.items():
        assert torch.equal(value.detach(), runs[name].detach()), name
    for a, b in zip(grads, run_grads):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_native_kernels_change_no_number(env, threads, monkeypatch):
    """Hard runs with the native kernels (uniforms, fused events, index selection, group sums) and with torch ops
    only: the same trajectories, bit for bit, through the dense phase and the sparse one (most agents infected),
    with every lever and a batch of two seeds."""
    torch.set_num_threads(threads)  # the `one_thread` fixture restores it
    params = busy_params(transmission_scale=3.0)
    native = run(env, params, steps=30, seeds=(0, 1), interventions=ALL_LEVERS)
    assert native["S"][-1].max().item() * 4 < env.num_agents
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "0")
    reference = run(env, params, steps=30, seeds=(0, 1), interventions=ALL_LEVERS)
    for name, value in native.metrics.items():
        assert torch.equal(value, reference[name]), name


@pytest.mark.parametrize("seeds,threads,vaccination", [((0,), 1, True), ((0, 1), 2, True), ((0,), 1, False)],
                         ids=["one-seed", "two-seeds-two-threads", "no-vaccination"])
def test_gradient_mode_source_totals_are_the_torch_ops_numbers(env, seeds, threads, vaccination, monkeypatch):
    """Straight-through runs with every lever (closed workplaces, a school closure, a stay-at-home order) and the
    infectious agents' group totals summed by the native pass (`hard_native.source_totals_at`, its reads at the
    sources on the threads from 4,096 sources, and the scaled layers' values at the slots summed at while the sources
    are few) or by the torch ops (their gathers, index_add and `_product_at`): the same metrics and the same
    gradients, bit for bit, and the native pass ran, both ways. Without the vaccination lever σ carries no derivative,
    so the force keeps no household table (`table_kept`) and the households' values go into one buffer from day to
    day, set back to zeros where written (with it, new zeros each day)."""
    from models.covid import hard_native

    torch.set_num_threads(threads)  # the `one_thread` fixture restores it

    calls, products, household_buffers = [], [], []
    native = hard_native.source_totals_at
    levers = [x for x in ALL_LEVERS if vaccination or x.lever != "vaccination"]

    def counted(*args, **kwargs):
        out = native(*args, **kwargs)
        calls.append(out is not None)
        products.append(any(layer.product is not None for layer in args[-1]))
        if args[-1][0].product is not None:
            household_buffers.append(args[-1][0].product.data_ptr())
        return out

    def both():
        params = busy_params(transmission_scale=3.0).as_tensors(
            learn=("transmission_scale", "household_weight", "workplace_weight", "community_weight", "detection_rate"))
        results = run(env, params, steps=24, seeds=seeds, interventions=levers, sampler=StraightThrough())
        (results["new_infections"].sum() + results["reported_cases"].sum()).backward()
        return results, [params.transmission_scale.grad, params.household_weight.grad, params.workplace_weight.grad,
                         params.community_weight.grad, params.detection_rate.grad]

    monkeypatch.setattr(hard_native, "source_totals_at", counted)
    fused, grads = both()
    assert calls and all(calls)
    assert any(products) and not all(products)  # the scaled layers' values made natively while the sources are few
    assert (len(set(household_buffers)) == 1) == (not vaccination) and len(household_buffers) > 2
    monkeypatch.setattr(hard_native, "source_totals_at", lambda *args, **kwargs: None)
    reference, reference_grads = both()
    assert reference["new_infections"].sum() > 0
    for name, value in fused.metrics.items():
        assert torch.equal(value.detach(), reference[name].detach()), name
    for a, b in zip(grads, reference_grads):
        assert a is not None and torch.equal(a, b)


@pytest.mark.parametrize("sampler", [at.Hard(), StraightThrough()], ids=["hard", "straight-through"])
def test_steps_leave_no_tensors_in_reference_cycles(env, sampler):
    """A closure that captured the step context (whose scratch keeps closures) once kept every day's [B, N] tensors
    and autograd graphs alive until a garbage collection: +2 GB and 1.6× slower gradient runs at full NYC."""
    import gc

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = run(env, busy_params(), steps=20, interventions=ALL_LEVERS, sampler=sampler)
        assert result["S"].shape[0] == 20  # a run took place
        del result
        gc.collect()
        cycles = [x for x in gc.garbage if isinstance(x, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not cycles, f"{len(cycles)} tensors were only freed by the garbage collector"


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


@pytest.mark.parametrize("levers", [False, True], ids=["no policies", "stay at home and stimulus"])
def test_heuristic_behaviour_per_profile_is_the_per_agent_formula(env, levers, monkeypatch):
    """The heuristic's probabilities computed per (borough, age) profile and read by each agent: every agent's profile
    has its borough, age and policy cell; the values are the per-agent formula's (the same operations; the sigmoid's
    vectorised and scalar paths may differ by an ulp), and so are the derivatives of the parameters and the incidence."""
    from models.covid import behavior

    profile, borough, age, cell = behavior.profiles(env)
    index = profile.long()
    assert borough.numel() < env.num_agents // 10
    assert torch.equal(borough.index_select(0, index), env.borough.long())
    assert torch.equal(age.index_select(0, index), env.age_decades_centered)
    assert torch.equal(cell.index_select(0, index), env.cell.long())
    names = ("isolate_intercept", "isolate_incidence_slope", "work_age_slope", "work_stay_home_slope")
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(2, env.num_agents, generator=g), torch.randn(2, env.num_agents, generator=g)

    def decided(per_profile: bool):
        if not per_profile:
            monkeypatch.setattr(behavior, "profiles", lambda env: None)
        params = busy_params().as_tensors(learn=names)
        cases = (torch.rand(2, 5, generator=torch.Generator().manual_seed(4)) * 100).requires_grad_()
        A = len(MODEL.age_band_edges)
        policies = {"stay_at_home": torch.rand(2, 5, A, generator=torch.Generator().manual_seed(5)),
                    "stimulus": torch.rand(2, 5, A, generator=torch.Generator().manual_seed(6))} if levers else {}
        out = behavior.HeuristicBehavior().decide(env, None, params, None,
                                                   dict(cases_per_100k=cases, policies=policies))
        ((out["isolate_prob"] * weights[0]).sum() + (out["work_prob"] * weights[1]).sum()).backward()
        monkeypatch.undo()
        return out, [getattr(params, name).grad for name in names] + [cases.grad]

    (fast, fast_grads), (dense, dense_grads) = decided(True), decided(False)
    for name in dense:
        assert fast[name].shape == dense[name].shape
        assert torch.allclose(fast[name], dense[name], rtol=0, atol=1.2e-7) and (fast[name] != dense[name]).sum() < 10
    for k, (x, y) in enumerate(zip(fast_grads, dense_grads)):
        if k == 3 and not levers:  # (no stay-at-home order: its slope has no derivative)
            assert x is None and y is None
            continue
        assert x is not None and torch.allclose(x, y, rtol=1e-4, atol=1e-3) and bool(x.ne(0).any()), k


def test_borough_values_are_each_agents_boroughs(env):
    """The heuristic behaviour reads each agent's borough value by ranges (agents sorted by borough): the values of a
    gather by ``env.borough``, and the same derivative."""
    from models.covid.behavior import borough_values

    per_borough = torch.randn(3, 5, requires_grad=True)
    spread = borough_values(env, per_borough)
    assert torch.equal(spread, per_borough.index_select(1, env.borough))
    upstream = torch.randint(-3, 4, spread.shape).float()
    (spread * upstream).sum().backward()
    assert torch.equal(per_borough.grad, torch.zeros(3, 5).index_add_(1, env.borough, upstream))


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


def test_one_search_over_stacked_tables_draws_each_tables_durations():
    """draw_durations (the stage exits' one search) equals draw_duration with each agent's own table, including
    uniforms equal to table entries and at the ends of (0, 1)."""
    tables = [disease.lognormal_cdf_table(5.0, 2.0), disease.lognormal_cdf_table(8.0, 4.0),
              disease.lognormal_cdf_table_median(9.0, 0.9, shift=1.0)]
    g = torch.Generator().manual_seed(0)
    u = torch.cat([torch.rand(20_000, generator=g), torch.cat(tables).clamp(2.0**-25, 1 - 2.0**-25),
                   torch.tensor([2.0**-25, 0.5, 1 - 2.0**-25])])
    which = torch.randint(0, 3, u.shape, generator=g)
    drawn = disease.draw_durations(disease.stacked_cdf_keys(tables), disease.MAX_DURATION_DAYS, which, u)
    expected = torch.stack([disease.draw_duration(cdf, u) for cdf in tables]).gather(0, which[None])[0]
    assert torch.equal(drawn, expected.to(torch.int64))
    # every agent's three searches and two selections (the sync-free exits): the same numbers, as [B, N]
    selected = disease.draw_durations_where(torch.stack(tables), (which == 1).to(torch.uint8).view(1, -1),
                                            (which == 2).to(torch.uint8).view(1, -1), u.view(1, -1))
    assert selected.dtype == torch.int32 and torch.equal(selected[0], expected.to(torch.int32))


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


# ---- stimulus lever -----------------------------------------------------------------------------

def stimulus(intensity=1.0, days=35, **kw):
    return Intervention("stimulus", START, START + dt.timedelta(days=days), intensity, **kw)


def closure(intensity=1.0, days=35):
    return Intervention("workplace_closure", START, START + dt.timedelta(days=days), intensity)


def test_zero_stimulus_is_bit_identical_to_none(env):
    """Intensity 0 (alone, and on top of a workplace closure so the job-loss relief path runs) changes nothing."""
    for base in ([], [closure(0.6)]):
        plain = run(env, steps=22, seeds=(0, 1), interventions=base or None)
        zero = run(env, steps=22, seeds=(0, 1), interventions=base + [stimulus(0.0)])
        for name, value in plain.metrics.items():
            assert torch.equal(value, zero[name]), name
        assert torch.equal(plain.final_state.work_prob, zero.final_state.work_prob)


def test_stimulus_lowers_go_to_work_logit_and_on_site_work(env):
    """At the first decision (same observations in both runs) the go-to-work logit falls by exactly
    work_stimulus_slope · s, only where the stimulus is paid; on common random numbers nobody goes on
    site who would not have without it."""
    params = busy_params(work_stimulus_slope=0.8)
    none = run(env, params, steps=1, seeds=(0, 1))
    paid = run(env, params, steps=1, seeds=(0, 1), interventions=[stimulus(0.5, boroughs=("Bronx", "Queens"))])
    drop = torch.logit(none.final_state.work_prob.double()) - torch.logit(paid.final_state.work_prob.double())
    in_paid = torch.isin(env.borough, torch.tensor([0, 3], dtype=env.borough.dtype))
    assert torch.allclose(drop[:, in_paid], torch.tensor(0.4, dtype=torch.float64), atol=1e-5)
    assert torch.equal(drop[:, ~in_paid], torch.zeros_like(drop[:, ~in_paid]))
    assert (paid.final_state.on_site <= none.final_state.on_site).all()
    assert (paid["on_site_share"] < none["on_site_share"]).all()
    # over five weeks of decisions and several seeds: lower on-site share in expectation
    none = run(env, params, steps=35, seeds=range(3))
    paid = run(env, params, steps=35, seeds=range(3), interventions=[stimulus(1.0)])
    assert paid["on_site_share"].mean() < none["on_site_share"].mean() - 0.02


def test_stimulus_relieves_job_loss(env):
    """Relief channel alone (work_stimulus_slope = 0): job-loss probabilities fall by the factor
    (1 − relief · s), so on common random numbers nobody loses a job at the first labour-market step
    who kept it without the payment; under a workplace closure unemployment is lower in expectation
    with both channels on."""
    params = busy_params(work_stimulus_slope=0.0, stimulus_job_loss_relief=0.5)
    none = run(env, params, steps=1, seeds=(0, 1, 2), interventions=[closure()])
    paid = run(env, params, steps=1, seeds=(0, 1, 2), interventions=[closure(), stimulus(1.0)])
    assert (paid.final_state.employed >= none.final_state.employed).all()
    assert paid.final_state.employed.sum() > none.final_state.employed.sum()
    assert torch.equal(paid.final_state.on_site, none.final_state.on_site)
    params = busy_params(initial_prevalence=0.003)  # default slopes: both channels
    none = run(env, params, steps=36, seeds=range(3), interventions=[closure()])
    paid = run(env, params, steps=36, seeds=range(3), interventions=[closure(), stimulus(1.0)])
    assert paid["unemployment_rate"][-1].mean() < none["unemployment_rate"][-1].mean() - 0.005


def test_gradient_flows_to_stimulus_intensity(env):
    """d(outcome)/d(stimulus intensity) through the [B, G, A] schedule in straight-through mode:
    negative for on-site work, and non-zero for unemployment and infections."""
    from agenttensor.calibration import sensitivities

    table = sensitivities(MODEL, None, busy_params(), env=env, steps=15, start_date=START, fd_check=False,
                          interventions=[closure(0.8, days=14), stimulus(1.0, days=14)],
                          outcomes={"on_site": "on_site_share", "unemployment": "unemployment_rate",
                                    "infections": "new_infections"})
    grad = {r["outcome"]: r["gradient"] for r in table.iter_rows(named=True) if r["wrt"] == "stimulus.intensity"}
    assert grad["on_site"] < 0 and grad["unemployment"] < 0
    assert grad["infections"] != 0 and all(torch.isfinite(torch.tensor(g)) for g in grad.values())


def test_llm_archetypes_see_their_own_scenarios_stimulus(population):
    """In a scenario batch each element is asked with its own policy context: the stimulus world's
    prompts state the payment ($1,200 × s), the others' prompts are unchanged; prompts identical
    across scenarios (before the payment starts) are asked once and then read from the cache."""
    import numpy as np

    from agenttensor.llm.cache import AnswerCache
    from agenttensor.scenarios import Scenario, run_scenarios
    from models.covid.archetype_behavior import ArchetypeBehavior

    class FakeLLM:
        """P(Yes) 0.2 when the prompt mentions a stimulus payment, else 0.9; records prompts."""

        model_id, settings, last_errors = "fake:stimulus", {}, []

        def __init__(self):
            self.prompts = []

        def option_probabilities(self, prompts, options):
            self.prompts += prompts
            yes = np.array([0.2 if "stimulus payment" in p else 0.9 for p in prompts])
            return np.stack([yes, 1 - yes] + [np.zeros_like(yes)] * (len(options) - 2), 1)

    llm = FakeLLM()
    behaviour = ArchetypeBehavior(llm, cache=AnswerCache(":memory:"))
    model = make_model(behavior=behaviour)
    paid_from = START + dt.timedelta(days=7)
    scenarios = [Scenario("baseline"),
                 Scenario("stimulus", (Intervention("stimulus", paid_from, START + dt.timedelta(days=13), 0.5),))]
    res = run_scenarios(model, population, scenarios, seeds=[0, 1], steps=14, start_date=START,
                        params=busy_params(), progress=False)
    with_payment = [p for p in llm.prompts if "stimulus payment" in p]
    assert with_payment and all("$600" in p for p in with_payment)
    assert any("Will you go to your workplace" in p for p in with_payment)
    assert any("would you stay at home and isolate" in p for p in with_payment)
    stats = behaviour.stats
    assert stats["calls"] == len(llm.prompts) and stats["cache_hits"] > 0
    assert stats["work+stimulus"]["calls"] > 0 and stats["isolate+stimulus"]["calls"] > 0
    # day 0-6: same prompts in both worlds, identical on-site work; from the payment on, less on-site work
    first_week = slice(0, 7)
    assert torch.equal(res.metrics["baseline"]["on_site_share"][first_week],
                       res.metrics["stimulus"]["on_site_share"][first_week])
    assert (res.metrics["stimulus"]["on_site_share"][7:] < res.metrics["baseline"]["on_site_share"][7:]).all()


def test_batched_parameter_overrides_equal_single_runs():
    """Scenario batches put a per-scenario parameter in a [B, 1] tensor; the sparse code paths
    (infectious agents only, stage exits, rehiring among the few unemployed) must read each
    element's own value: every count equals the same run done alone with that value."""
    from agenttensor.scenarios import Scenario, run_scenarios

    population = at.synthetic(4_000, seed=2)
    changes = dict(isolation_effectiveness=0.95, asymptomatic_infectiousness=0.6, detection_rate=0.7,
                   asymptomatic_detection_ratio=0.5, vaccine_efficacy_infection=0.3, vaccine_efficacy_severe=0.0,
                   rehire_rate=0.2, job_loss_base=0.01, job_loss_closed=0.3, job_loss_absent=0.05,
                   stimulus_job_loss_relief=0.6, work_stimulus_slope=2.0, remote_work_share=0.7,
                   isolate_intercept=1.5, transmission_scale=0.9, community_borough_share=0.8)
    base = busy_params(initial_prevalence=0.02)
    scenarios = [Scenario("baseline", tuple(ALL_LEVERS))] + [
        Scenario(name, tuple(ALL_LEVERS), overrides={name: value}) for name, value in changes.items()]
    res = run_scenarios(MODEL, population, scenarios, seeds=[0, 1], steps=22, start_date=START, params=base,
                        progress=False)
    assert res.info["passes"] == 1  # one batch: every override is a [B, 1] tensor
    for name, value in changes.items():
        alone = at.simulate(MODEL, population, base.replace(**{name: value}), steps=22, seeds=[0, 1],
                            start_date=START, progress=False, interventions=ALL_LEVERS)
        for k in ("new_infections", "reported_cases", "hospital_admissions", "deaths", "I_sym", "R",
                  "isolating_share", "unemployment_rate", "on_site_share"):
            assert torch.equal(alone[k], res.metrics[name][k]), (name, k)
        assert any(not torch.equal(v, res.metrics["baseline"][k]) for k, v in res.metrics[name].items()), \
            f"overriding {name} changed nothing; the test does not exercise it"


def test_memoised_per_agent_values_follow_lever_and_labour_changes(population, monkeypatch):
    """`CovidEnv.memo` (per-agent lever values, workplace closures and labour metrics reused while their inputs
    are unchanged) gives the numbers of recomputing them every step, through lever switches on and off, a
    closure intensity change and weekly labour-market moves; a second run on the same env (new random
    streams, same closure intensity) does not reuse the first run's closed workplaces."""
    interventions = [Intervention("workplace_closure", 4, 12, 0.3), Intervention("workplace_closure", 12, 20, 0.7),
                     Intervention("transmission_reduction", 6, 15, 0.4, layer="community"),
                     Intervention("school_closure", 2, 9, 1.0)]
    env = MODEL.setup(population, CovidParams().as_tensors(), "cpu")

    def run(seeds, levers):
        return at.simulate(MODEL, None, busy_params(), steps=24, seeds=seeds, env=env, start_date=START,
                           progress=False, interventions=levers)

    # the second run starts with the closure intensity the first ended with, on other seeds
    runs = [([0, 1], interventions + [Intervention("workplace_closure", 20, 30, 0.7)]),
            ([2, 3], [Intervention("workplace_closure", 0, 30, 0.7)])]
    cached = [run(*args) for args in runs]
    assert {key[0] if isinstance(key, tuple) else key for key in env.cache} >= {"lever", "closed_workplaces",
                                                                               "labour_shares"}
    monkeypatch.setattr(type(env), "memo", lambda self, key, inputs, compute, values_only=False: compute())
    fresh = [run(*args) for args in runs]
    for a, b in zip(cached, fresh):
        for name in ("new_infections_by_borough", "on_site_share_by_borough", "unemployment_rate_by_borough",
                     "infections_workplace", "infections_community", "infections_school"):
            assert torch.equal(a[name], b[name]), name


def test_a_memo_read_for_values_matches_views_of_the_same_elements_only(population):
    """`CovidEnv.memo` with ``values_only``: an input passed on as a view of the same elements (e.g. the week's decision
    through `select.scale_and_pass_on`, a new view a day) finds the result; a view of other elements of the same
    memory, a change in place through any alias and a new tensor with equal values do not."""
    env = MODEL.setup(population, CovidParams().as_tensors(), "cpu")
    x = torch.rand(2, 5000).requires_grad_()
    calls = []

    def memo(of):
        return env.memo("test_values", (of,), lambda: calls.append(1) or of.detach().sum(), values_only=True)

    first = memo(x)
    view = x.view_as(x)
    assert memo(view) is first and memo(view.view_as(view)) is first and len(calls) == 1
    memo(x[1:])  # other elements of the same memory
    memo(x)
    assert len(calls) == 3
    with torch.no_grad():
        view[0, 0] += 1.0  # in place through an alias: the root's version moves
    assert float(memo(x)) == pytest.approx(float(x.detach().sum())) and len(calls) == 4
    memo(x.detach().clone())  # equal values, another tensor
    assert len(calls) == 5


def test_autograd_nodes_keep_a_days_tensors_only_as_saved_tensors(env):
    """Gradient checkpointing (`simulate(grad_checkpoint_every=...)`) drops a segment's saved tensors and recomputes
    them, but not what a custom autograd node keeps as a plain attribute of its ctx: such a per-day tensor stays alive
    for the whole run (the own contributions' per-group scales did: +1.5 GB over a 120-day calibration epoch at full
    NYC). So the model's nodes keep no tensor of their own on ctx, only the environment's and small tables."""
    from dataclasses import fields, is_dataclass

    env_storages = set()

    def collect(x, into: set, seen: set) -> None:
        if id(x) in seen or x is None or isinstance(x, (str, int, float, bool)):
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            into.add((x.untyped_storage().data_ptr(), x.numel()))
        elif isinstance(x, dict):
            for v in x.values():
                collect(v, into, seen)
        elif isinstance(x, (tuple, list)):
            for v in x:
                collect(v, into, seen)
        elif is_dataclass(x):
            for f in fields(x):
                collect(getattr(x, f.name), into, seen)
        elif isinstance(x, at.GroupLayer):
            collect(vars(x), into, seen)

    collect(vars(env), env_storages, set())
    env_pointers = {pointer for pointer, _ in env_storages}
    learn = busy_params().as_tensors(learn=("transmission_scale", "household_weight", "isolation_effectiveness"))
    result = run(env, learn, steps=42, interventions=ALL_LEVERS, sampler=StraightThrough())
    kept, nodes, seen, stack = [], 0, set(), [result["new_infections"].sum().grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "__dict__"):  # a custom Function's ctx: its attributes set in forward
            nodes += 1
            found: set = set()
            for name, value in vars(node).items():
                if name == "env" or type(value).__name__ == "CovidEnv":
                    continue
                collect({k: v for k, v in vars(value).items() if k != "env"} if is_dataclass(value) else value, found,
                        set())
            kept += [(type(node).__name__, numel) for pointer, numel in found
                     if pointer not in env_pointers and numel >= 1000]
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert nodes > 20  # the model's custom nodes were walked
    assert not kept, f"per-day tensors kept on autograd ctx (not saved tensors): {kept[:5]}"


@pytest.mark.parametrize("sampler", [at.Hard(), StraightThrough()], ids=["hard", "straight-through"])
def test_donated_states_change_no_number_and_leave_the_callers_state_alone(env, sampler, monkeypatch):
    """`simulate` donates the states its own steps made (`StepContext.donate`): the covid step then writes today's
    exits into yesterday's tensors in place (hard mode: every transition field; gradient modes: H, R, D, which no
    autograd node saves, and I_sym, I_asym, isolating, which the own contributions' node saves packed), from the first
    day on (the state the model's init made for the run is the run's own). Metrics, final state and gradients are those of the pure step, bit for bit; the state a
    run starts from (a caller's, here an earlier run's final state) is never written."""
    from agenttensor.model import StepContext

    def go(**kwargs):
        learn = busy_params().as_tensors(learn=("transmission_scale", "hosp_given_symptomatic"))
        params = learn if sampler.differentiable else busy_params()
        res = run(env, params, steps=30, seeds=(0, 1), interventions=ALL_LEVERS, sampler=sampler, **kwargs)
        grads = None
        if sampler.differentiable:
            (res["reported_cases"].sum() + res["deaths"].sum() + res["H"].sum()).backward()
            grads = [learn.transmission_scale.grad, learn.hosp_given_symptomatic.grad]
        return res, grads

    from models.covid import shadow

    owned, in_place = [], []
    owns, donatable = StepContext.owns, shadow.donatable
    monkeypatch.setattr(StepContext, "owns", lambda self, x: owned.append(owns(self, x)) or owned[-1])
    monkeypatch.setattr(shadow, "donatable", lambda *a: in_place.append(donatable(*a)) or in_place[-1])
    donated, donated_grads = go()
    assert sum(owned) >= 3 * 25  # H, R and D (at least) in place on most days
    if sampler.differentiable:  # all six exit fields on every day, the first too (the state init made is the run's)
        assert len(in_place) == 30 and all(len(names) == 6 for names in in_place), in_place
    monkeypatch.setattr(StepContext, "owns", lambda self, x: False)
    pure, pure_grads = go()
    for name in pure.metrics:
        assert torch.equal(donated[name], pure[name]), name
    for name, x in pure.final_state.tensors().items():
        assert torch.equal(getattr(donated.final_state, name), x), name
    if sampler.differentiable:
        assert donated_grads[0] > 0
        for a, b in zip(donated_grads, pure_grads):
            assert torch.equal(a, b)
    # a continuation from the donated run's final state: that state is the caller's, it stays as it was
    monkeypatch.setattr(StepContext, "owns", owns)
    start = {name: x.detach().clone() for name, x in donated.final_state.tensors().items()}
    later = run(env, busy_params(), steps=45, seeds=(0, 1), interventions=ALL_LEVERS, sampler=sampler,
                initial_state=donated.final_state, first_step=30)
    assert later["new_infections"].sum() > 0
    for name, x in donated.final_state.tensors().items():
        assert torch.equal(x.detach(), start[name]), name


def test_a_checkpointed_segments_inputs_are_not_the_loops_own(env):
    """A checkpointed segment starts from its inputs, which the recomputation reads again: the first step must not
    update them in place. Compacted fields are rebuilt fresh; the others (fractional or without a derivative) are
    handed over as aliases that do not carry the loop's mark (`StepContext.owns` is False for them)."""
    from agenttensor.model import StepContext
    from agenttensor.run import _compact_inputs

    ctx = StepContext(step=1, env=env, rng=None, donate=object())
    fractional = ctx.own(torch.rand(2, 50, requires_grad=True) * 1.0)
    plain = ctx.own(torch.zeros(2, 50))
    members = ctx.own((torch.rand(2, 50) < 0.5).float().requires_grad_())
    assert all(ctx.owns(x) for x in (fractional, plain, members))
    carriers, values = _compact_inputs([fractional, plain, members])
    assert values[0] is None and values[1] is None and values[2] is not None
    assert not any(ctx.owns(c) for c in carriers)
    assert torch.equal(carriers[0], fractional) and carriers[0].requires_grad and torch.equal(carriers[1], plain)


@pytest.mark.parametrize("native", [True, False])
def test_a_field_a_step_passes_through_stays_the_callers(env, native, monkeypatch):
    """On a day without exits the covid step returns the caller's H, R and D tensors as they are (torch ops) or copies
    (the native transition copies the caller's fields once): the caller's must not be marked as the loop's own, or
    the loop's next step would write into the caller's state."""
    from agenttensor.model import StepContext
    from models.covid import hard_native

    if not native:
        monkeypatch.setattr(hard_native, "_library", lambda: None)

    params = busy_params().as_tensors()
    rng = at.Randomness.for_agents([0], env.agent_ids)
    owner = object()
    ctx = lambda t: StepContext(step=t, env=env, rng=rng, start_date=START, donate=owner)  # noqa: E731
    state = MODEL.init(env, params, StepContext(step=0, env=env, rng=rng, start_date=START))  # the caller's
    state = state.replace(stage_end=torch.full_like(state.stage_end, -1))  # nobody's countdown ends: no exits
    kept = {name: getattr(state, name).clone() for name in ("H", "R", "D")}
    after, _ = MODEL.step(state, params, ctx(0))
    for name in kept:
        assert not ctx(1).owns(getattr(state, name))
        assert getattr(after, name) is getattr(state, name) if not native else ctx(1).owns(getattr(after, name))
    ill = torch.rand(after.S.shape, generator=torch.Generator().manual_seed(0)) < 0.3  # asymptomatic, recover today
    after = after.replace(S=after.S.masked_fill(ill, 0), I_asym=after.I_asym.masked_fill(ill, 1),
                          stage_end=torch.where(ill, 1, -1).to(torch.int16))
    later, _ = MODEL.step(after, params, ctx(1))  # R changes: into a new tensor, not the caller's
    assert int(later.R.sum()) == int(ill.sum())
    for name, x in kept.items():
        assert torch.equal(getattr(state, name), x), name


def test_the_native_hard_day_gives_the_torch_ops_numbers(env, monkeypatch):
    """Hard mode on CPU: the force of infection (`hard_native.hard_force`: the group totals of the infectious agents, the
    layers' tables and the layered force in one call), the day's transition (`hard_native.hard_progress`) and the split
    of infections by layer (`layer_shares_at`) as native passes give every day's force and every metric and state field
    of the torch ops, bit for bit, with every lever on (closures and stay-at-home change the presences, testing raises
    detection, vaccination lowers hospitalisation) over two seeds. A kernel that
    skips the vaccinated's lower hospitalisation, draws a countdown from the wrong table or counts a flow twice fails."""
    from agenttensor import _group_kernels
    from models.covid import hard_native, model

    forces = []  # every day's force of infection, bit for bit (a metric may not show a 1-ulp difference)

    def recorded(state, force, *args, fn=model.native_hard_progress):
        forces.append(force.clone())
        return fn(state, force, *args)

    monkeypatch.setattr(model, "native_hard_progress", recorded)
    calls = {"hard_progress": 0, "hard_force": 0, "layered_shares_at": 0}
    for module, name in ((hard_native, "hard_progress"), (hard_native, "hard_force"),
                         (_group_kernels, "layered_shares_at")):
        def counted(*args, fn=getattr(module, name), key=name, **kwargs):
            out = fn(*args, **kwargs)
            calls[key] += out is not None
            return out
        monkeypatch.setattr(module, name, counted)
    native = run(env, seeds=(0, 1), interventions=ALL_LEVERS, steps=45)
    assert calls == {"hard_progress": 45, "hard_force": 45, "layered_shares_at": 45}  # every day, natively
    run(env, steps=10)  # and without levers (σ then one row for every element)
    assert calls == {"hard_progress": 55, "hard_force": 55, "layered_shares_at": 55}
    del forces[45:]
    monkeypatch.setattr(hard_native, "_library", lambda: None)
    monkeypatch.setattr(_group_kernels, "layered_shares_at", lambda *args: None)
    native_forces, forces[:] = forces[:], []
    reference = run(env, seeds=(0, 1), interventions=ALL_LEVERS, steps=45)
    assert len(forces) == len(native_forces) == 45
    for day, (x, y) in enumerate(zip(native_forces, forces)):
        assert torch.equal(x, y), day
    for name in reference.metrics:
        assert torch.equal(native[name], reference[name]), name
    for name, x in reference.final_state.tensors().items():
        assert torch.equal(getattr(native.final_state, name), x), name
    assert int(native["deaths"].sum()) > 0 and int(native["reported_cases"].sum()) > 0
    assert float(native["infections_household"].sum()) > 0 and float(native["infections_school"].sum()) > 0


def test_gradient_modes_split_infections_by_layer_in_the_native_pass_with_the_torch_numbers(env, monkeypatch):
    """Straight-through runs split the day's infections by layer in one native pass too (`layer_shares_at` over the
    terms the force's `_LayeredForce` node kept): every day, with the numbers and the gradients of the torch ops."""
    from agenttensor import _group_kernels

    calls = []
    native_shares = _group_kernels.layered_shares_at

    def counted(*args):
        out = native_shares(*args)
        calls.append(out is not None)
        return out

    def once():
        params = busy_params(transmission_scale=3.0).as_tensors(learn=("transmission_scale", "school_weight"))
        results = run(env, params, steps=20, seeds=(0, 1), interventions=ALL_LEVERS, sampler=StraightThrough())
        (results["new_infections"].sum() + results["reported_cases"].sum()).backward()
        return results, (params.transmission_scale.grad, params.school_weight.grad)

    monkeypatch.setattr(_group_kernels, "layered_shares_at", counted)
    native, native_grads = once()
    assert calls == [True] * 20
    monkeypatch.setattr(_group_kernels, "layered_shares_at", lambda *args: None)
    reference, grads = once()
    layers = [name for name in reference.metrics if name.startswith("infections_")]
    assert len(layers) == 4 and float(native["infections_school"].sum()) > 0
    for name in reference.metrics:
        assert torch.equal(native[name].detach(), reference[name].detach()), name
    for x, y in zip(native_grads, grads):
        assert torch.equal(x, y)


def test_a_hard_day_with_a_learnable_beta_keeps_its_derivative_through_the_torch_ops(env):
    """The native force declines where a derivative would reach its inputs (a learnable β under a hard sampler): the
    torch ops then give the same force with its derivative, d λ / d β = λ / β."""
    from agenttensor.model import StepContext

    def force(params):  # on day 8 (a school and work day; infectious agents by then)
        rng = at.Randomness.for_agents([0], env.agent_ids)
        state = MODEL.init(env, params, StepContext(step=0, env=env, rng=rng, start_date=START))
        for t in range(9):
            ctx = StepContext(step=t, env=env, rng=rng, start_date=START)
            state, _ = MODEL.step(state, params, ctx)
        return ctx.scratch["force"]

    plain = force(busy_params().as_tensors())
    learn = busy_params().as_tensors(learn=("transmission_scale",))
    learnt = force(learn)
    assert learnt.requires_grad and not plain.requires_grad and torch.equal(learnt.detach(), plain)
    learnt.sum().backward()
    expected = float(plain.double().sum()) / float(learn.transmission_scale.detach())
    assert float(plain.sum()) > 0 and abs(float(learn.transmission_scale.grad) - expected) < 1e-4 * expected


def test_the_native_hard_infection_draws_decide_as_torchs_exp_does_at_the_threshold(monkeypatch):
    """The native transition makes exp(−λ) with a fast polynomial and takes torch's exp only for the agents whose
    decision its error bound leaves open (hard_kernel.cpp `certified_tests`): its infections are those of torch's
    survival, also where λ puts 1 − exp(−λ) within an ulp of the agent's uniform, for λ negative, NaN, infinite or
    above 87. The polynomial's error over [-87, 0] stays far below the bound the decisions rely on."""
    import ctypes

    from agenttensor import native
    from agenttensor.rng import uniform_of_hash
    from models.covid import hard_native

    inside = native.torch_exp()
    if inside is None or hard_native._library() is None:
        pytest.skip("needs the native kernels and torch's exp (MKL)")
    library = hard_native._library()
    error = library.agenttensor_covid_fast_exp_error
    error.argtypes = [ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    error.restype = ctypes.c_double
    worst = error(-87.0, 0.0, 97, inside.function, inside.mode, inside.local_threads)  # every 97th float
    assert 1e-8 < worst < 1e-6  # (kFastExpBound: 4e-6)

    B, N, G, K, t = 2, 200_000, 5, 60, 9
    keys = torch.randint(-2**31, 2**31 - 1, (8, B), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    base = torch.arange(N, dtype=torch.int32) * 7919
    u = uniform_of_hash(base[None, :], keys[7][:, None])  # [B, N]: the infection draws (agenttensor/csrc/uniform.h's)
    at_threshold = -torch.log1p(-u.double()).float()  # λ with 1 − exp(−λ) ≈ u
    steps = torch.randint(-4, 5, (B, N), generator=torch.Generator().manual_seed(2)).to(torch.float32)
    hazard = torch.nextafter(at_threshold, torch.full_like(at_threshold, float("inf")) * steps.sign())
    for _ in range(3):  # up to 4 ulps either way
        hazard = torch.where(steps.abs() > _ + 1, torch.nextafter(hazard, torch.full_like(hazard, float("inf")) *
                                                                  steps.sign()), hazard)
    hazard[:, :8] = torch.tensor([-0.5, float("nan"), float("inf"), 90.0, 87.5, 0.0, -0.0, 1e-30])
    survival = torch.exp(-hazard)
    torch_infected = (u < 1 - survival)
    flips = (u < 1 - torch.nextafter(survival, torch.zeros_like(survival))) != torch_infected
    assert int(flips.sum()) > 1000  # many decisions hinge on the last bit of exp(−λ)
    out = {}
    for exp in (inside, None):  # in the pass (the fast exp, certified), and made by torch before it
        monkeypatch.setattr(native, "_torch_exp", exp)
        f = {name: torch.zeros(B, N, dtype=torch.uint8) for name in ("E", "I_asym", "I_sym", "H", "R", "D", "isolating")}
        f["S"] = torch.ones(B, N, dtype=torch.uint8)
        se = torch.full((B, N), -1, dtype=torch.int16)
        cdf = torch.linspace(0.05, 1.0, K)
        drawn = hard_native.hard_progress(
            f, se, t, hazard, keys, base, torch.arange(N, dtype=torch.int32) % 10,
            (torch.arange(N, dtype=torch.int32) * G) // N, G,
            dict(symptomatic=torch.full((10,), 0.6), hosp=torch.full((10,), 0.2), death=torch.full((10,), 0.3)),
            dict(detect=torch.tensor(0.4), detect_asym_ratio=torch.tensor(0.5), isolate=torch.full((B, N), 0.7)),
            None, cdf, torch.stack([cdf, cdf.sqrt(), cdf ** 2]))
        assert drawn is not None
        out[exp is None] = 1 - f["S"]
    assert torch.equal(out[False], out[True]) and torch.equal(out[True].bool(), torch_infected)


def test_the_native_hard_transition_counts_the_same_flows_on_any_number_of_threads(monkeypatch):
    """The native transition's per-borough flows are integer counts per thread, summed after: two threads give one
    thread's numbers, states and infections (a population large enough for two chunks); the infections it returns
    are the agents that left S, in row-major order. exp(−λ) made inside the pass (torch's own exp, where found) gives
    the numbers of exp(−λ) made by torch before it."""
    from agenttensor import native
    from models.covid import hard_native

    B, N, G, K, t = 2, 70_000, 5, 60, 9
    gen = torch.Generator().manual_seed(3)
    stage = torch.randint(0, 5, (B, N), generator=gen)  # 0 S, 1 E, 2 I_asym, 3 I_sym, 4 H
    fields = {name: (stage == k).to(torch.uint8) for k, name in enumerate(("S", "E", "I_asym", "I_sym", "H"))}
    fields.update(R=torch.zeros(B, N, dtype=torch.uint8), D=torch.zeros(B, N, dtype=torch.uint8),
                  isolating=(torch.rand(B, N, generator=gen) < 0.1).to(torch.uint8) * (stage >= 2))
    stage_end = torch.where(stage > 0, torch.randint(t, t + 3, (B, N), generator=gen), -1).to(torch.int16)
    hazard = 0.05 * torch.rand(B, N, generator=gen)  # λ: about 2.5 % of S infected
    cdf = torch.linspace(0.05, 1.0, K)
    out = {}
    inside = native.torch_exp()
    for threads, exp in ((1, inside), (2, inside), (2, None)):  # (None: exp(−λ) made by torch)
        monkeypatch.setattr(native, "_torch_exp", exp)
        torch.set_num_threads(threads)
        f = {name: x.clone() for name, x in fields.items()}
        se = stage_end.clone()
        drawn = hard_native.hard_progress(
            f, se, t, hazard, torch.randint(-2**31, 2**31 - 1, (8, B), generator=torch.Generator().manual_seed(1),
                                              dtype=torch.int32),
            torch.arange(N, dtype=torch.int32) * 7919, torch.arange(N, dtype=torch.int32) % 10,
            (torch.arange(N, dtype=torch.int32) * G) // N, G,
            dict(symptomatic=torch.full((10,), 0.6), hosp=torch.full((10,), 0.2), death=torch.full((10,), 0.3)),
            dict(detect=torch.tensor(0.4), detect_asym_ratio=torch.tensor(0.5), isolate=torch.full((B, N), 0.7)),
            None, cdf, torch.stack([cdf, cdf.sqrt(), cdf ** 2]))
        assert drawn is not None
        out[threads, exp is None] = (*drawn, f, se)
    torch.set_num_threads(1)
    (flows1, infected1, f1, se1) = out[1, inside is None]
    for flows2, infected2, f2, se2 in (out[2, inside is None], out[2, True]):
        assert torch.equal(flows1, flows2) and torch.equal(se1, se2)
        assert all(torch.equal(f1[name], f2[name]) for name in f1)
        assert all(torch.equal(a, b) for a, b in zip(infected1, infected2))
    new_E = fields["S"] - f1["S"]
    assert all(torch.equal(a, b) for a, b in zip(infected1, new_E.nonzero(as_tuple=True)))
    assert 0.01 < float(new_E.sum()) / float(fields["S"].sum()) < 0.04 and torch.equal(f1["E"] * new_E, new_E)
    exits = int(((stage_end == t) & (stage > 0)).sum())
    assert float(sum(flows1[hard_native.FLOWS.index(name)].sum() for name in ("out_E", "out_Ia", "out_Is", "out_H"))
                 ) == exits  # every exit left exactly one stage
    assert float(flows1[hard_native.FLOWS.index("new_infections")].sum()) == int(new_E.sum())
    changes = flows1[len(hard_native.FLOWS):]  # the stage counts' changes: agents move, none appear or vanish
    assert float(changes[:7].sum()) == 0 and float(changes[0].sum()) == -int(new_E.sum())
    assert not (se1 == t).any()

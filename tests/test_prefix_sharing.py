"""Shared-prefix execution in run_scenarios: the steps every scenario agrees on run once per seed and
the result is bit-identical to running every scenario from step 0; automatic fallbacks; scenario
runs from a given state; [run].params / report_from; the compare CLI."""

import dataclasses
import datetime as dt
import json
import textwrap

import polars as pl
import pytest
import torch

import agenttensor as at
from agenttensor.errors import ConfigError
from agenttensor.interventions import compile_schedule
from agenttensor.prefix import shared_prefix_steps
from agenttensor.scenarios import Scenario, load_scenarios, run_scenarios
from models.covid.behavior import HeuristicBehavior
from models.covid.model import MODEL as COVID
from models.covid.model import make_model
from models.seir import SEIRParams

START = dt.date(2020, 3, 1)
D = dt.date
DAYS = 30
BASE = COVID.params_type().replace(initial_prevalence=0.01)
COMMON = (at.Intervention("school_closure", D(2020, 3, 5), D(2020, 3, 20), 1.0, ages=(5, 17)),)
SCENARIOS = [
    Scenario("baseline", COMMON),
    Scenario("lockdown from day 12", COMMON + (at.Intervention("stay_at_home", D(2020, 3, 13), D(2020, 3, 30), 0.7),
                                                at.Intervention("workplace_closure", D(2020, 3, 13), D(2020, 3, 30),
                                                                0.8))),
    Scenario("vaccination from day 15", COMMON + (at.Intervention("vaccination", D(2020, 3, 16), D(2020, 3, 30), 0.02,
                                                                  ages=(65, 100)),)),
    Scenario("lower transmission from week 2", COMMON, overrides={"transmission_multiplier": [1.0, 1.0, 0.6]}),
    Scenario("baseline again", COMMON),
]


@pytest.fixture(scope="module")
def population():
    return at.synthetic(8_000, seed=3)


@pytest.fixture(scope="module")
def plain(population):
    return run_scenarios(COVID, population, SCENARIOS, seeds=[0, 1, 2], steps=DAYS, start_date=START, params=BASE,
                         progress=False, share_prefix=False)


def assert_same(a, b, steps=None):
    assert a.names == b.names and a.seeds == b.seeds
    for name in a.names:
        assert a.metrics[name].keys() == b.metrics[name].keys()
        for k, v in a.metrics[name].items():
            other = b.metrics[name][k] if steps is None else b.metrics[name][k][steps]
            assert torch.equal(v, other), (name, k)


@pytest.mark.parametrize("max_batch", [None, 4, 2])  # one chunk; chunked continuation; chunked prefix too
def test_shared_prefix_is_bit_identical_to_running_every_scenario(population, plain, max_batch):
    shared = run_scenarios(COVID, population, SCENARIOS, seeds=[0, 1, 2], steps=DAYS, start_date=START, params=BASE,
                           progress=False, max_batch=max_batch)
    (entry,) = shared.info["prefix"]
    assert entry["shared"] and entry["steps"] == 12 and shared.info["prefix_steps"] == 12
    assert entry["limited_by"].startswith("lever stay_at_home from step 12")
    assert entry["saved_element_steps"] == 12 * 4 * 3 and shared.timing["prefix_seconds"] > 0
    assert_same(shared, plain)  # every metric, counts and float diagnostics alike
    assert not torch.equal(plain.metrics["lockdown from day 12"]["new_infections"],
                           plain.metrics["baseline"]["new_infections"])  # the branches do diverge


def test_prefix_detection_from_parameters_and_schedules():
    env_labels = ["a", "b"]

    def schedule(*lists):
        return compile_schedule([list(x) for x in lists], levers=COVID.levers, steps=40, start_date=START,
                                group_labels=env_labels, age_band_edges=COVID.age_band_edges)

    p = BASE
    weekly = p.replace(transmission_multiplier=torch.tensor([1.0, 1.0, 0.5]))  # period 7: differs from step 14
    assert shared_prefix_steps([p, p], None, 40) == (40, "")
    assert shared_prefix_steps([p, weekly], None, 40) == (14, "parameter transmission_multiplier from step 14")
    # a series that only repeats its last value is the same input
    assert shared_prefix_steps([p, p.replace(transmission_multiplier=torch.ones(5))], None, 40)[0] == 40
    assert shared_prefix_steps([p, p.replace(detection_rate=0.4)], None, 40) == (0, "parameter detection_rate")
    later = at.Intervention("stay_at_home", START + dt.timedelta(days=9), START + dt.timedelta(days=20), 0.5)
    elsewhere = dataclasses.replace(later, boroughs=("b",))
    assert shared_prefix_steps([p, p, weekly], schedule([], [later], []), 40)[0] == 9
    assert shared_prefix_steps([p, p], schedule([later], [elsewhere]), 40) == (9, "lever stay_at_home from step 9")
    assert shared_prefix_steps([p, p], schedule([later], [later]), 40)[0] == 40


def test_identical_scenarios_share_the_whole_run(population, plain):
    same = [SCENARIOS[0], SCENARIOS[4]]
    res = run_scenarios(COVID, population, same, seeds=[0, 1, 2], steps=DAYS, start_date=START, params=BASE,
                        progress=False)
    assert res.info["prefix"][0]["steps"] == DAYS and res.info["chunks"][0]["first_step"] == DAYS
    for name in res.names:
        for k, v in res.metrics[name].items():
            assert torch.equal(v, plain.metrics[name][k]), (name, k)


class CountingBehavior(HeuristicBehavior):
    """A behaviour source with state between steps (a call counter): not declared stateless."""

    stateless = False

    def __init__(self):
        self.calls = 0

    def decide(self, *args):
        self.calls += 1
        return super().decide(*args)


def test_fallbacks_are_exact_and_give_a_reason(population, plain):
    subset = SCENARIOS[:2]
    kw = dict(seeds=[0, 1, 2], steps=DAYS, start_date=START, params=BASE, progress=False)
    stateful = run_scenarios(make_model(CountingBehavior()), population, subset, **kw)
    (entry,) = stateful.info["prefix"]
    assert not entry["shared"] and "stateless" in entry["reason"] and entry["identical_until_step"] == 12
    for name in stateful.names:
        assert torch.equal(stateful.metrics[name]["I_sym"], plain.metrics[name]["I_sym"])
    graded = run_scenarios(COVID, population, subset, sampler=at.StraightThrough(), **dict(kw, steps=14))
    assert "gradient" in graded.info["prefix"][0]["reason"]
    off = run_scenarios(COVID, population, subset, share_prefix=False, **dict(kw, steps=14))
    assert off.info["prefix"][0]["reason"] == "share_prefix=False"
    first_day = [SCENARIOS[0], Scenario("R", COMMON, overrides={"transmission_scale": 0.5})]
    differ = run_scenarios(COVID, population, first_day, **dict(kw, steps=5))
    assert differ.info["prefix"][0]["reason"] == "scenarios differ from step 0 (parameter transmission_scale)"


def test_scenarios_start_from_a_given_state(population, plain):
    """initial_state/first_step: every scenario continues one saved state; equal to the full run."""
    k = 8
    head = at.simulate(COVID, population, BASE, steps=k, seeds=[0, 1, 2], start_date=START, progress=False,
                       interventions=list(COMMON))
    for share in (True, False):
        res = run_scenarios(COVID, population, SCENARIOS, seeds=[0, 1, 2], steps=DAYS, start_date=START,
                            params=BASE, progress=False, initial_state=head.final_state, first_step=k,
                            share_prefix=share)
        assert res.first_step == k and res.steps == DAYS - k
        assert res.to_polars()["date"].min() == START + dt.timedelta(days=k)
        assert_same(res, plain, steps=slice(k, None))
    with pytest.raises(ConfigError, match="batch size 3; expected 2"):
        run_scenarios(COVID, population, SCENARIOS, seeds=[0, 1], steps=DAYS, start_date=START, params=BASE,
                      progress=False, initial_state=head.final_state, first_step=k)


def test_report_from_keeps_the_projection_period_only(population, plain):
    res = run_scenarios(COVID, population, SCENARIOS, seeds=[0, 1, 2], steps=DAYS, start_date=START, params=BASE,
                        progress=False, report_from=D(2020, 3, 21))
    assert res.first_step == 20 and res.steps == DAYS - 20
    assert_same(res, plain, steps=slice(20, None))
    totals = res.compare().filter((pl.col("scenario") == "baseline") & (pl.col("metric") == "total_new_infections"))
    assert totals["mean"].item() == pytest.approx(float(plain.metrics["baseline"]["new_infections"][20:].sum(0)
                                                        .double().mean()))
    with pytest.raises(ConfigError, match="outside the results"):
        res.since(D(2020, 3, 2))


def test_run_params_file_and_report_from_in_toml(tmp_path, population):
    fit = {"learned": {"detection_rate": 0.11}, "info": {"start_date": "2020-03-01"},
           "params": {"detection_rate": 0.11, "initial_prevalence": 0.01, "transmission_multiplier": [1.0, 0.7]}}
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "params.json").write_text(json.dumps(fit))
    toml = tmp_path / "s.toml"
    toml.write_text(textwrap.dedent("""
        [run]
        days = 20
        start_date = "2020-03-01"
        seeds = 2
        params = "fit/params.json"
        report_from = "2020-03-11"

        [[scenario]]
        name = "baseline"

        [[scenario]]
        name = "closure from day 10"
        [[scenario.intervention]]
        lever = "workplace_closure"
        start = "2020-03-11"
        end = "2020-03-20"
        intensity = 0.8
    """))
    sset = load_scenarios(toml)
    assert sset.params == str(tmp_path / "fit" / "params.json") and sset.report_from == D(2020, 3, 11)
    res = run_scenarios(COVID, population, sset, progress=False)
    assert res.params.detection_rate == pytest.approx(0.11) and res.first_step == 10
    assert res.info["prefix"][0]["steps"] == 10 and res.info["params_file"] == sset.params
    alone = run_scenarios(COVID, population, sset.scenarios, seeds=2, steps=20, start_date=START,
                          params=COVID.params_type().replace(detection_rate=0.11, initial_prevalence=0.01,
                                                             transmission_multiplier=torch.tensor([1.0, 0.7])),
                          progress=False)
    assert_same(res, alone, steps=slice(10, None))
    # the saved scenarios.toml + params.json rerun to the same numbers
    paths = res.save(tmp_path / "out", plots=False, report=False)
    again = run_scenarios(COVID, population, load_scenarios(paths["scenarios.toml"]), progress=False)
    assert_same(again, res)
    # weekly series calibrated on another calendar are refused
    with pytest.raises(ConfigError, match="calendar starting 2020-03-01.*starts 2020-03-08"):
        run_scenarios(COVID, population, sset, start_date=D(2020, 3, 8), progress=False)


def test_cli_compare_with_params_and_report_from(tmp_path, capsys):
    from agenttensor.cli import main

    params = tmp_path / "p.json"
    params.write_text(json.dumps({"provenance": "test", "initial_prevalence": 0.01, "detection_rate": 0.2}))
    toml = tmp_path / "s.toml"
    toml.write_text(textwrap.dedent("""
        [run]
        days = 16
        start_date = "2020-03-01"

        [[scenario]]
        name = "baseline"

        [[scenario]]
        name = "stay at home from day 9"
        [[scenario.intervention]]
        lever = "stay_at_home"
        start = "2020-03-10"
        end = "2020-03-16"
        intensity = 0.7
    """))
    out = tmp_path / "out"
    rc = main(["compare", "models/covid", "--population", "synthetic:3000", "--scenarios", str(toml), "--seeds", "2",
               "--params", str(params), "--report-from", "2020-03-10", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "shared prefix: steps 0..8 ran once per seed" in text and "compared from 2020-03-10" in text
    trajectories = pl.read_parquet(out / "trajectories.parquet")
    assert trajectories["date"].min() == D(2020, 3, 10) and trajectories.height == 2 * 2 * 7
    assert json.loads((out / "params.json").read_text())["detection_rate"] == pytest.approx(0.2)
    saved = load_scenarios(out / "scenarios.toml")
    assert saved.report_from == D(2020, 3, 10) and saved.days == 16 and saved.params.endswith("params.json")
    rc = main(["compare", "models/covid", "--population", "synthetic:3000", "--scenarios", str(toml), "--seeds", "2",
               "--params", str(tmp_path / "missing.json"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "missing.json" in err


def test_seir_scenarios_share_a_prefix_too():
    """Model-independent: SEIR scenarios that change the transmission multiplier from day 9."""
    from models.seir import MODEL as SEIR

    population = at.synthetic(8_000, seed=1)
    scenarios = [Scenario("baseline"), Scenario("distancing from day 9", overrides={"transmission_multiplier":
                                                                                    [1.0] * 9 + [0.5]})]
    kw = dict(seeds=[0, 1], steps=25, params=SEIRParams(R0=3.0, initial_infected=20), progress=False)
    shared = run_scenarios(SEIR, population, scenarios, **kw)
    assert shared.info["prefix"][0]["steps"] == 9
    assert_same(shared, run_scenarios(SEIR, population, scenarios, share_prefix=False, **kw))


def test_prospective_file_branches_from_the_calibrated_history():
    """The shipped projection: calibrated parameters on their own calendar, every scenario identical
    until the first school day of 2021 (shared prefix), compared from the day after the fit window."""
    from pathlib import Path

    from agenttensor.population import BOROUGHS
    from agenttensor.scenarios import load_run_params, scenario_params

    sset = load_scenarios(Path(__file__).resolve().parents[1] / "models/covid/scenarios/prospective_winter_2021.toml")
    params = load_run_params(COVID, sset.params, sset.start_date)
    assert sset.start_date == D(2020, 9, 13) and sset.report_from == D(2021, 1, 3)
    assert params.transmission_multiplier.numel() == 17 and abs(params.initial_immunity - 0.227) < 1e-9
    schedule = compile_schedule([list(s.interventions) for s in sset.scenarios], levers=COVID.levers, steps=sset.days,
                                start_date=sset.start_date, group_labels=BOROUGHS,
                                age_band_edges=COVID.age_band_edges)
    d, _ = shared_prefix_steps([scenario_params(params, s) for s in sset.scenarios], schedule, sset.days)
    assert sset.start_date + dt.timedelta(days=d) == D(2021, 1, 4)
    assert sset.start_date + dt.timedelta(days=sset.days - 1) == D(2021, 3, 31)

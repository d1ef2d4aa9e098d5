"""Scenario batches: common random numbers, batched == one by one, chunking, sanity in expectation,
validation errors naming the scenario and field, TOML round-trip, CLI and report outputs."""

import dataclasses
import datetime as dt
import textwrap

import polars as pl
import pytest
import torch

import agenttensor as at
from agenttensor.errors import ConfigError, InputError
from agenttensor.scenarios import (Scenario, ScenarioSet, batch_params, load_scenarios, run_scenarios,
                                   save_scenarios, scenarios_from_dict, t_quantile)
from models.seir import model as seir

START = dt.date(2020, 3, 1)
DAYS = 40
LEVER_MODEL_SOURCE = '''
import dataclasses
from agenttensor import LeverSpec, Substep
from models.seir import model as seir


def infection_pressure(state, params, ctx):
    """SEIR pressure, cut by 70 % x the lockdown intensity in the agent's borough."""
    state = seir.infection_pressure(state, params, ctx)
    lockdown = ctx.lever("lockdown")  # [B, G, A]
    if lockdown is None:
        return state
    return state.replace(force=state.force * (1 - 0.7 * lockdown[:, ctx.env.borough, 0]))


MODEL = dataclasses.replace(
    seir.MODEL, name="seir-lockdown",
    substeps=(Substep("infection_pressure", "observe", infection_pressure),
              Substep("progress", "transition", seir.progress)),
    levers=(LeverSpec("lockdown", "cuts transmission by 70 % x intensity", layers=("work",)),))
'''
_namespace: dict = {}
exec(compile(LEVER_MODEL_SOURCE, "lever_model", "exec"), _namespace)
MODEL = _namespace["MODEL"]
PARAMS = seir.SEIRParams(initial_infected=20, R0=3.0)


def lockdown(start_day, end_day=DAYS - 1, intensity=1.0, **kw):
    return at.Intervention("lockdown", START + dt.timedelta(days=start_day), START + dt.timedelta(days=end_day),
                           intensity, **kw)


@pytest.fixture(scope="module")
def population():
    return at.synthetic(20_000, seed=3)


@pytest.fixture(scope="module")
def batch(population):
    scenarios = [
        Scenario("baseline"),
        Scenario("baseline again"),
        Scenario("no-op lockdown", (lockdown(10, intensity=0.0),)),
        Scenario("lockdown day 20", (lockdown(20),)),
        Scenario("lockdown day 13", (lockdown(13),)),
        Scenario("R0 2.2", overrides={"R0": 2.2}),
    ]
    return run_scenarios(MODEL, population, scenarios, seeds=[0, 1, 2, 3], steps=DAYS, start_date=START,
                         params=PARAMS, progress=False)


def test_identical_scenarios_are_bit_identical_and_noop_gives_zero(batch):
    for other in ("baseline again", "no-op lockdown"):
        for name, v in batch.metrics["baseline"].items():
            assert torch.equal(v, batch.metrics[other][name]), (other, name)
    table = batch.compare()
    rows = table.filter(pl.col("scenario").is_in(["baseline again", "no-op lockdown"]))
    assert (rows["diff"] == 0).all() and (rows["diff_lo"] == 0).all() and (rows["diff_hi"] == 0).all()


def test_batched_equals_one_by_one(batch, population):
    """Each element of the batch equals its own run: via run_scenarios with batches of one, and
    via plain `simulate` with the scenario's parameters/interventions and that seed alone."""
    subset = [batch.scenarios[i] for i in (0, 3, 5)]
    one = run_scenarios(MODEL, population, subset, seeds=batch.seeds[1:3], steps=DAYS, start_date=START,
                        params=PARAMS, progress=False, max_batch=1)
    assert len(one.info["chunks"]) == 6
    for name in one.names:
        for k, v in one.metrics[name].items():
            assert torch.equal(v, batch.metrics[name][k][:, 1:3]), (name, k)
    alone = at.simulate(MODEL, population, PARAMS.replace(R0=2.2), steps=DAYS, seeds=[2], start_date=START,
                        progress=False)
    assert torch.equal(alone["I"][:, 0], batch.metrics["R0 2.2"]["I"][:, 2])
    alone = at.simulate(MODEL, population, PARAMS, steps=DAYS, seeds=[3], start_date=START, progress=False,
                        interventions=[lockdown(13)])
    assert torch.equal(alone["new_infections"][:, 0], batch.metrics["lockdown day 13"]["new_infections"][:, 3])


def test_memory_budget_chunks_without_changing_numbers(batch, population):
    chunked = run_scenarios(MODEL, population, batch.scenarios[3:4], seeds=batch.seeds[:3], steps=DAYS,
                            start_date=START, params=PARAMS, progress=False, memory_budget=2.5e6, bytes_per_element=1e6)
    assert [c["elements"] for c in chunked.info["chunks"]] == [2, 1]
    for name in chunked.names:
        for k, v in chunked.metrics[name].items():
            assert torch.equal(v, batch.metrics[name][k][:, :3])


def test_earlier_lockdown_means_fewer_infections_in_expectation(batch):
    table = batch.compare().filter(pl.col("metric") == "total_new_infections")
    row = {r["scenario"]: r for r in table.iter_rows(named=True)}
    base = row["baseline"]["mean"]
    assert row["lockdown day 13"]["mean"] < row["lockdown day 20"]["mean"] < base
    assert row["lockdown day 13"]["diff_hi"] < 0 and row["lockdown day 20"]["diff_hi"] < 0
    assert row["baseline"]["lo"] <= base <= row["baseline"]["hi"]
    # Paired differences are less variable than the outcomes themselves (common random numbers).
    outcomes = {n: batch.outcomes(n)["total_new_infections"] for n in ("baseline", "R0 2.2")}
    paired = (outcomes["R0 2.2"] - outcomes["baseline"]).var()
    assert paired < outcomes["R0 2.2"].var() + outcomes["baseline"].var()


def test_structural_overrides_run_in_separate_passes(population):
    scenarios = [Scenario("baseline"), Scenario("more seeds", overrides={"initial_infected": 40}),
                 Scenario("weekly multiplier", overrides={"transmission_multiplier": [1.0, 0.5]}),
                 Scenario("daily multiplier", overrides={"transmission_multiplier": [1.0] * 10 + [0.5]})]
    res = run_scenarios(MODEL, population, scenarios, seeds=[5], steps=20, start_date=START, params=PARAMS,
                        progress=False)
    assert res.info["passes"] == 2
    alone = at.simulate(MODEL, population, PARAMS.replace(initial_infected=40), steps=20, seeds=[5],
                        start_date=START, progress=False)
    assert torch.equal(alone["I"][:, 0], res.metrics["more seeds"]["I"][:, 0])
    alone = at.simulate(MODEL, population, PARAMS.replace(transmission_multiplier=torch.tensor([1.0, 0.5])),
                        steps=20, seeds=[5], start_date=START, progress=False)
    assert torch.equal(alone["I"][:, 0], res.metrics["weekly multiplier"]["I"][:, 0])


def test_batch_params_pads_time_varying_and_stacks_scalars():
    p = batch_params([PARAMS, PARAMS.replace(R0=2.0, transmission_multiplier=torch.tensor([1.0, 0.5, 0.25]))])
    assert p.R0.shape == (2, 1) and p.R0[1, 0] == 2.0
    assert torch.equal(p.transmission_multiplier, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.5, 0.25]]))
    assert p.infectious_days == PARAMS.infectious_days  # unchanged fields stay as they are


TOML = textwrap.dedent("""
    [run]
    days = 45
    start_date = "2020-03-01"
    seeds = 3

    [[scenario]]
    name = "baseline"

    [[scenario]]
    name = "lockdown"
    description = "from day 14"
    overrides = { R0 = 2.8 }
    [[scenario.intervention]]
    lever = "lockdown"
    start = "2020-03-15"
    end = "2020-04-14"
    intensity = 0.8
    boroughs = ["B0"]
    ages = [18, 64]
    layer = "work"
""")


def test_toml_round_trip(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TOML)
    sset = load_scenarios(path)
    assert sset.days == 45 and sset.start_date == START and sset.seeds == 3 and sset.baseline_name == "baseline"
    iv = sset.scenarios[1].interventions[0]
    assert iv == at.Intervention("lockdown", dt.date(2020, 3, 15), dt.date(2020, 4, 14), 0.8, ("B0",), (18, 64),
                                 "work")
    again = load_scenarios(save_scenarios(sset, tmp_path / "again.toml"))
    assert again.scenarios == sset.scenarios and again.days == sset.days and again.start_date == sset.start_date


def _error(tmp_path, population, replace: str, by: str, error=ConfigError) -> str:
    path = tmp_path / "bad.toml"
    assert replace in TOML
    path.write_text(TOML.replace(replace, by))
    with pytest.raises(error) as info:
        run_scenarios(MODEL, population, load_scenarios(path), seeds=1, params=PARAMS, progress=False)
    return str(info.value)


@pytest.mark.parametrize("replace, by, expected", [
    ('lever = "lockdown"', 'lever = "curfew"', ["'lockdown'", "intervention[0]", "'lever'", "curfew"]),
    ('end = "2020-04-14"', 'end = "2020-03-10"', ["'lockdown'", "'end'", "before start"]),
    ('start = "2020-03-15"\nend = "2020-04-14"', 'start = "2020-06-01"\nend = "2020-06-30"',
     ["'lockdown'", "'start/end'", "outside the run"]),
    ('boroughs = ["B0"]', 'boroughs = ["Atlantis"]', ["'lockdown'", "'boroughs'", "Atlantis"]),
    ('ages = [18, 64]', 'ages = [64, 18]', ["'lockdown'", "'ages'"]),
    ('layer = "work"', 'layer = "school"', ["'lockdown'", "'layer'", "school"]),
    ('intensity = 0.8', 'intensity = 1.5', ["'lockdown'", "'intensity'"]),
    ('overrides = { R0 = 2.8 }', 'overrides = { R_zero = 2.8 }', ["'lockdown'", "overrides.R_zero", "unknown"]),
    ('overrides = { R0 = 2.8 }', 'overrides = { R0 = -1.0 }', ["'lockdown'", "overrides", "R0"]),
])
def test_invalid_scenarios_name_scenario_and_field(tmp_path, population, replace, by, expected):
    message = _error(tmp_path, population, replace, by)
    for text in expected:
        assert text in message, (text, message)
    assert "bad.toml" in message


@pytest.mark.parametrize("replace, by, expected", [
    ('start = "2020-03-15"', 'start = "March 15"', ["'lockdown'", "intervention[0].start", "March 15"]),
    ('layer = "work"', 'layer = "work"\nwhen = 3', ["'lockdown'", "'when'"]),
    ('name = "lockdown"', 'name = "baseline"', ["'baseline'", "more than once"]),
    ('days = 45', 'days = -3', ["[run].days"]),
    ('ages = [18, 64]', 'ages = "adults"', ["'lockdown'", "intervention[0].ages"]),
])
def test_malformed_scenario_files(tmp_path, population, replace, by, expected):
    message = _error(tmp_path, population, replace, by, error=InputError)
    for text in expected:
        assert text in message, (text, message)


def test_t_quantile_known_values():
    assert abs(t_quantile(0.95, 3) - 2.353) < 2e-3
    assert abs(t_quantile(0.975, 10) - 2.228) < 2e-3
    assert abs(t_quantile(0.95, 1000) - 1.645) < 2e-3


def test_cli_compare_writes_table_plots_and_report(tmp_path, capsys):
    from agenttensor.cli import main

    model_dir = tmp_path / "lockmodel"
    model_dir.mkdir()
    (model_dir / "model.py").write_text(LEVER_MODEL_SOURCE)
    scen = tmp_path / "s.toml"
    scen.write_text(TOML.replace('boroughs = ["B0"]\n', ""))
    out = tmp_path / "out"
    rc = main(["compare", str(model_dir), "--population", "synthetic:5000", "--scenarios", str(scen), "--seeds", "2",
               "--days", "30", "--out", str(out), "--no-progress", "--set", "initial_infected=10"])
    assert rc == 0
    table = pl.read_parquet(out / "compare.parquet")
    assert set(table["scenario"]) == {"baseline", "lockdown"}
    assert {"mean", "lo", "hi", "diff", "diff_lo", "diff_hi"} <= set(table.columns)
    assert pl.read_csv(out / "compare.csv").height == table.height
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "<table>" in html and 'src="http' not in html
    assert (out / "trajectories_new_infections.png").exists()
    assert pl.read_parquet(out / "trajectories.parquet").height == 2 * 2 * 30
    # Invalid file: one line, exit status 2, names the scenario and field.
    scen.write_text(TOML.replace('lever = "lockdown"', 'lever = "curfew"'))
    rc = main(["compare", str(model_dir), "--population", "synthetic:5000", "--scenarios", str(scen), "--out",
               str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "'lockdown'" in err and "curfew" in err
    assert err.count("\n") == 1


def test_covid_scenarios_batched_equal_single_runs():
    """The NYC covid model with targeted levers: each batch element equals its own run (counts)."""
    covid = pytest.importorskip("models.covid.model").MODEL
    population = at.synthetic(4_000, seed=1)
    closure = at.Intervention("school_closure", dt.date(2020, 3, 3), dt.date(2020, 3, 20), 1.0, boroughs=("Brooklyn",),
                              ages=(5, 17))
    scenarios = [Scenario("baseline"), Scenario("schools closed in Brooklyn", (closure,)),
                 Scenario("less transmission", overrides={"transmission_scale": 0.4})]
    base = covid.params_type().replace(initial_prevalence=0.01)
    res = run_scenarios(covid, population, scenarios, seeds=[0, 1], steps=14, start_date=START, params=base,
                        progress=False)
    for scenario, params, interventions in ((scenarios[1], base, [closure]),
                                            (scenarios[2], base.replace(transmission_scale=0.4), None)):
        alone = at.simulate(covid, population, params, steps=14, seeds=[1], start_date=START, progress=False,
                            interventions=interventions)
        for k in ("new_infections", "reported_cases", "I_sym", "E", "R"):
            assert torch.equal(alone[k][:, 0], res.metrics[scenario.name][k][:, 1]), (scenario.name, k)


# ---- extends / remove -------------------------------------------------------------------------

EXTENDS = textwrap.dedent("""
    [run]
    days = 45
    start_date = "2020-03-01"

    [[scenario]]
    name = "stricter"
    extends = "lockdown"             # the parent may come later in the file
    remove = ["early lockdown"]
    overrides = { R0 = 2.5 }
    [[scenario.intervention]]
    name = "late lockdown"
    lever = "lockdown"
    start = "2020-03-20"
    end = "2020-04-10"
    intensity = 1.0

    [[scenario]]
    name = "lockdown"
    overrides = { R0 = 2.8, incubation_days = 4.0 }
    [[scenario.intervention]]
    name = "early lockdown"
    lever = "lockdown"
    start = "2020-03-10"
    end = "2020-03-20"
    intensity = 0.5
    [[scenario.intervention]]
    lever = "lockdown"
    start = "2020-04-01"
    end = "2020-04-14"
    intensity = 0.2

    [[scenario]]
    name = "stricter still"
    description = "a chain: extends a scenario that extends another"
    extends = "stricter"
    remove = "lockdown"              # an unnamed intervention is removed by its lever
""")


def test_extends_inherits_removes_and_overrides():
    sset = scenarios_from_dict(tomllib_loads(EXTENDS), source="x.toml")
    by = {s.name: s for s in sset.scenarios}
    assert [s.name for s in sset.scenarios] == ["stricter", "lockdown", "stricter still"]  # file order kept
    parent = by["lockdown"]
    assert [iv.label for iv in parent.interventions] == ["early lockdown", "lockdown"]
    # inherited (minus removed) first, then its own; overrides merged, its own winning
    assert by["stricter"].interventions == (parent.interventions[1], by["stricter"].interventions[-1])
    assert by["stricter"].interventions[-1].name == "late lockdown"
    assert dict(by["stricter"].overrides) == {"R0": 2.5, "incubation_days": 4.0}
    assert [iv.label for iv in by["stricter still"].interventions] == ["late lockdown"]
    assert dict(by["stricter still"].overrides) == dict(by["stricter"].overrides)
    assert by["stricter still"].description.startswith("a chain") and by["stricter"].description == ""
    # the resolved set round-trips (files written by save_scenarios need no extends)
    assert scenarios_from_dict(sset.to_dict()).scenarios == sset.scenarios


def tomllib_loads(text):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


@pytest.mark.parametrize("replace, by, expected", [
    ('extends = "lockdown"', 'extends = "lockdwn"', ["'stricter'", "field 'extends'", "unknown scenario 'lockdwn'"]),
    ('extends = "lockdown"', 'extends = "stricter"', ["'stricter'", "field 'extends'", "cycle", "stricter -> stricter"]),
    ('name = "lockdown"\noverrides', 'name = "lockdown"\nextends = "stricter still"\noverrides',
     ["field 'extends'", "cycle", "lockdown -> stricter"]),
    ('remove = ["early lockdown"]', 'remove = ["earl lockdown"]',
     ["'stricter'", "field 'remove'", "'lockdown' has no intervention named 'earl lockdown'", "early lockdown"]),
    ('remove = "lockdown"', 'remove = "late lockdown"\nremove_typo = 1', ["'stricter still'", "'remove_typo'"]),
    ('extends = "stricter"\nremove = "lockdown"', 'remove = "lockdown"', ["'stricter still'", "field 'remove'",
                                                                        "extends"]),
    ('extends = "lockdown"', 'extends = 3', ["'stricter'", "field 'extends'"]),
    ('remove = ["early lockdown"]', 'remove = [1]', ["'stricter'", "field 'remove'"]),
])
def test_extends_errors_name_the_scenario_and_field(replace, by, expected):
    assert replace in EXTENDS
    with pytest.raises(InputError) as info:
        scenarios_from_dict(tomllib_loads(EXTENDS.replace(replace, by)), source="x.toml")
    message = str(info.value)
    assert message.startswith("x.toml: ")
    for text in expected:
        assert text in message, (text, message)


def _shipped(name: str) -> ScenarioSet:
    from pathlib import Path

    return load_scenarios(Path(__file__).resolve().parents[1] / "models" / "covid" / "scenarios" / f"{name}.toml")


def _key(iv):
    return (iv.name, iv.lever, iv.start, iv.end, iv.intensity, iv.boroughs, iv.ages, iv.layer)


def test_shipped_scenario_files_compile_to_their_timelines():
    """The shipped files use `extends`; each scenario resolves to the intervention lists the files
    spelled out in full before (counts as then), and derived scenarios are their parent's list with
    exactly the stated differences. Every file validates against the covid model."""
    from agenttensor.population import BOROUGHS
    from agenttensor.scenarios import validate_scenarios
    from models.covid.model import MODEL as COVID

    day = dt.timedelta(days=1)
    counts = {"counterfactual_spring_2020": {"actual": 10, "closures two weeks earlier": 10,
                                             "closures one week earlier": 10, "closures one week later": 10,
                                             "closures two weeks later": 10, "schools open": 9,
                                             "higher isolation compliance": 10, "testing and isolation": 11,
                                             "stimulus paid in April": 11},
              "retrospective_2020": {"no policy": 0, "actual 2020": 25, "actual spring only": 10},
              # the projection branches from the calibrated fall-2020 world, whose levers are in its multipliers
              "prospective_winter_2021": {"status quo": 0, "vaccination": 2, "vaccination twice as fast": 2,
                                          "schools fully closed": 1, "winter PAUSE": 2}}
    for file, expected in counts.items():
        sset = _shipped(file)
        assert {s.name: len(s.interventions) for s in sset.scenarios} == expected, file
        validate_scenarios(COVID, sset.scenarios, steps=sset.days, start_date=sset.start_date,
                           group_labels=BOROUGHS, source=file)

    spring = {s.name: s for s in _shipped("counterfactual_spring_2020").scenarios}
    actual = spring["actual"].interventions
    closures = {"NYC public schools closed", "bars, restaurants, gyms, theatres closed", "NY on PAUSE",
                "PAUSE: non-essential workplaces closed"}
    for name, shift in (("closures two weeks earlier", -14), ("closures one week earlier", -7),
                        ("closures one week later", 7), ("closures two weeks later", 14)):
        moved = []
        for iv in actual:  # the four closures start `shift` days off (dining closure: whole window), rest as is
            if iv.name in closures:
                end = iv.end + shift * day if iv.name.startswith("bars") else iv.end
                iv = dataclasses.replace(iv, start=iv.start + shift * day, end=end)
            moved.append(_key(iv))
        assert sorted(map(_key, spring[name].interventions)) == sorted(moved), name
    assert spring["schools open"].interventions == tuple(iv for iv in actual if iv.lever != "school_closure")
    for name in ("higher isolation compliance", "testing and isolation", "stimulus paid in April"):
        assert spring[name].interventions[:len(actual)] == actual, name
    assert dict(spring["higher isolation compliance"].overrides) == {"isolate_intercept": 1.5,
                                                                     "isolation_effectiveness": 0.95}
    (stimulus,) = spring["stimulus paid in April"].interventions[len(actual):]
    assert (stimulus.lever, stimulus.start, stimulus.intensity) == ("stimulus", dt.date(2020, 4, 10), 1.0)

    winter = {s.name: s for s in _shipped("prospective_winter_2021").scenarios}
    status_quo = winter["status quo"].interventions
    for name, scenario in winter.items():
        assert scenario.interventions[:len(status_quo)] == status_quo, name

    retro = {s.name: s for s in _shipped("retrospective_2020").scenarios}
    spring_only = retro["actual spring only"].interventions
    assert [_key(iv) for iv in spring_only[:6]] == [_key(iv) for iv in actual[:6]]  # spring as in the spring file
    assert all(iv.start <= dt.date(2020, 6, 22) for iv in spring_only)
    assert {iv.end for iv in spring_only[6:]} == {dt.date(2020, 12, 31)}


def test_scenario_api_is_exported_at_top_level():
    import agenttensor
    from agenttensor import scenarios

    for name in ("Scenario", "ScenarioSet", "ScenarioResults", "run_scenarios", "load_scenarios"):
        assert getattr(agenttensor, name) is getattr(scenarios, name), name
        assert name in agenttensor.__all__, name
    assert at.run_scenarios is run_scenarios


def test_cli_compare_takes_model_options(tmp_path, capsys):
    """`compare --behavior ...` configures the model like `run`; summary.json records the behaviour
    source. A model without a configure hook rejects the option in one line."""
    import json

    from agenttensor.cli import main

    scen = tmp_path / "s.toml"
    scen.write_text(textwrap.dedent("""
        [run]
        days = 10
        start_date = "2020-03-01"
        [[scenario]]
        name = "baseline"
        [[scenario]]
        name = "stimulus"
        [[scenario.intervention]]
        lever = "stimulus"
        start = "2020-03-02"
        end = "2020-03-10"
    """))
    out = tmp_path / "out"
    rc = main(["compare", "models/covid", "--population", "synthetic:3000", "--scenarios", str(scen), "--seeds", "2",
               "--behavior", "heuristic", "--out", str(out), "--no-progress", "--set", "initial_prevalence=0.01"])
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["info"]["behavior"] == "HeuristicBehavior"
    model_dir = tmp_path / "lockmodel"
    model_dir.mkdir()
    (model_dir / "model.py").write_text(LEVER_MODEL_SOURCE)
    scen.write_text(TOML)
    capsys.readouterr()
    rc = main(["compare", str(model_dir), "--population", "synthetic:2000", "--scenarios", str(scen), "--behavior",
               "embedded", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not take --behavior" in err and err.count("\n") == 1


def test_shorter_run_leaves_out_interventions_that_start_after_it():
    """`--days` shorter than [run].days: interventions starting after the last day cannot act and are
    left out (listed); the others are kept as they are (those running past the end are clipped later)."""
    sset = _shipped("counterfactual_spring_2020")
    short, dropped = sset.shortened(46)
    assert short.days == 46 and [s.name for s in short.scenarios] == [s.name for s in sset.scenarios]
    last = sset.start_date + dt.timedelta(days=45)
    for before, after in zip(sset.scenarios, short.scenarios):
        assert after.interventions == tuple(iv for iv in before.interventions if iv.start <= last)
        assert dict(after.overrides) == dict(before.overrides)
    assert "actual: Phase 1 reopening (2020-06-08)" in dropped
    assert "actual: face coverings (community) (2020-04-17)" in dropped  # day 47
    assert not any("CARES Act" in d for d in dropped)  # the payment starts 2020-04-10, day 40
    assert sset.shortened(sset.days)[1] == []

import datetime as dt
import json
import math

import polars as pl
import pytest
import torch

from agenttensor import StraightThrough, simulate
from agenttensor.calibration import (CovariateNet, Exp, Learn, Observe, Sigmoid, Softplus, calibrate, loss_named,
                                     negative_binomial, persistence_forecast, sensitivities)
from agenttensor.errors import ConfigError, InputError
from agenttensor.population import BOROUGHS, synthetic
from models.seir.model import MODEL, SEIRParams

START = dt.date(2020, 10, 4)


@pytest.fixture(scope="module")
def setup():
    pop = synthetic(20_000, seed=0, num_neighbourhoods=5)
    truth = SEIRParams(mixing="well-mixed", R0=2.0, initial_infected=60,
                       transmission_multiplier=torch.tensor([1.0, 1.3, 0.8]).repeat_interleave(7))
    env = MODEL.setup(pop, truth.as_tensors(), "cpu")
    res = simulate(MODEL, None, truth, steps=21, seeds=[0, 1], env=env, start_date=START, progress=False)
    daily = res["new_infections_by_borough"].float().mean(1) * 0.4
    rows = [dict(date=START + dt.timedelta(days=7 * w + 6), borough=b, metric="cases",
                 value=float(daily[7 * w: 7 * w + 7, g].sum())) for w in range(3) for g, b in enumerate(BOROUGHS)]
    return env, truth, pl.DataFrame(rows)


def test_transforms_round_trip():
    x = torch.tensor([0.01, 0.5, 3.0])
    for t in (Softplus(), Exp(), Sigmoid(0.0, 5.0)):
        assert torch.allclose(t.forward(t.inverse(x)), x, rtol=1e-4)


def test_negative_binomial_matches_torch_distribution():
    mu, obs, r = torch.tensor([3.0, 40.0]), torch.tensor([5.0, 31.0]), 7.0
    expected = -torch.distributions.NegativeBinomial(total_count=r, probs=mu / (mu + r)).log_prob(obs).mean()
    assert negative_binomial(r)(mu, obs).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_named("negative_binomial:7")(mu, obs).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError):
        loss_named("nope")


@pytest.mark.slow
def test_weekly_gradients_distinct_and_match_finite_differences():
    """ST d(total infections)/d(weekly multiplier) vs central FD on common random numbers (8 seeds)."""
    pop = synthetic(40_000, seed=0)
    p = SEIRParams(mixing="well-mixed", initial_infected=200)
    env = MODEL.setup(pop, p.as_tensors(), "cpu")
    m = torch.ones(3, requires_grad=True)
    seeds = list(range(8))
    out = simulate(MODEL, None, p.replace(transmission_multiplier=m.repeat_interleave(7)), steps=21, seeds=seeds,
                   sampler=StraightThrough(), env=env, progress=False)["new_infections"].sum(0).mean()
    out.backward()
    assert len(set(m.grad.tolist())) == 3 and m.grad[0] > m.grad[1] > m.grad[2] > 0
    h = 0.2
    for k in range(3):
        vals = []
        for s in (1, -1):
            mm = torch.ones(3)
            mm[k] += s * h
            r = simulate(MODEL, None, p.replace(transmission_multiplier=mm.repeat_interleave(7)), steps=21, seeds=seeds,
                         env=env, progress=False)
            vals.append(float(r["new_infections"].float().sum(0).mean()))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(m.grad[k].item() - fd) / fd < 0.10, (k, m.grad[k].item(), fd)


def test_calibrate_moves_towards_truth_and_saves(setup, tmp_path):
    env, truth, targets = setup
    learn = [Learn("R0", init=2.6), Learn("transmission_multiplier", init=1.0, size=3, period=7, anchor=True),
             Learn("detection_rate", init=0.25, transform=Sigmoid(0.0, 1.0))]
    result = calibrate(MODEL, None, targets, learn, observe=[Observe("cases", "new_infections_by_borough", "detection_rate")],
                       window=(START, START + dt.timedelta(days=20)), loss="mse_sqrt", epochs=12, lr=0.08,
                       params=truth, seeds=[0, 1], env=env)
    assert result.loss_history[-1] < 0.5 * result.loss_history[0]
    assert abs(result.values["detection_rate"] - 0.4) < abs(0.25 - 0.4)
    assert len(result.values["transmission_multiplier"]) == 3 and result.values["transmission_multiplier"][0] == 1.0
    assert set(result.fit.columns) == {"date", "borough", "metric", "observed", "fitted", "split"}
    out = result.save(tmp_path)
    assert {p.name for p in out.iterdir()} >= {"params.json", "loss.png", "fit.png", "fit.parquet"}
    assert "errors" in json.loads((out / "params.json").read_text())


def test_forecast_rows_and_persistence(setup):
    env, truth, targets = setup
    result = calibrate(MODEL, None, targets, [Learn("detection_rate", init=0.3, transform=Sigmoid(0.0, 1.0))],
                       observe=[Observe("cases", "new_infections_by_borough", "detection_rate")],
                       window=(START, START + dt.timedelta(days=13)), forecast_days=7, epochs=1, params=truth,
                       seeds=[0, 1], env=env)
    assert set(result.fit["split"].unique()) == {"train", "test"}
    base = persistence_forecast(result.fit)
    assert base.height == 5 and base["persistence"].null_count() == 0
    assert set(result.errors()) == {"train", "test"}


def test_covariate_network_gets_gradients(setup):
    env, truth, targets = setup
    net = CovariateNet(num_covariates=2, hidden=4)
    covariates = torch.randn(3, 2)
    assert torch.allclose(net(covariates), torch.ones(3), atol=1e-5)
    result = calibrate(MODEL, None, targets, [Learn("detection_rate", init=0.3, transform=Sigmoid(0.0, 1.0))],
                       observe=[Observe("cases", "new_infections_by_borough", "detection_rate")],
                       window=(START, START + dt.timedelta(days=20)), epochs=2, lr=0.05, params=truth, seeds=[0],
                       env=env, networks={"transmission_multiplier": (net, covariates, 7)})
    assert net.readout.weight.abs().sum() > 0  # moved from its zero init
    assert len(result.values["transmission_multiplier"]) == 3


def test_bad_inputs_raise_clear_errors(setup):
    env, truth, targets = setup
    obs = [Observe("cases", "new_infections_by_borough", "detection_rate")]
    with pytest.raises(ConfigError, match="not a parameter"):
        calibrate(MODEL, None, targets, [Learn("nonsense")], observe=obs, window=(START, START), params=truth, env=env)
    with pytest.raises(ConfigError, match="not learned"):
        calibrate(MODEL, None, targets, [Learn("R0")], observe=obs, window=(START, START), params=truth, env=env)
    with pytest.raises(InputError, match="outside"):
        calibrate(MODEL, None, targets, [Learn("detection_rate", transform=Sigmoid())], observe=obs,
                  window=(dt.date(2021, 1, 1), dt.date(2021, 1, 5)), params=truth, env=env)


def test_sensitivities_table_with_fd_check():
    pop = synthetic(20_000, seed=0)
    p = SEIRParams(mixing="well-mixed", initial_infected=100)
    table = sensitivities(MODEL, pop, p, outcomes={"infections": "new_infections"}, wrt=["R0", "infectious_days"],
                          steps=28, seeds=[0, 1, 2, 3], fd_check=["R0"], fd_rel_step=0.05)
    assert set(table["wrt"]) == {"R0", "infectious_days"}
    r0 = table.filter(pl.col("wrt") == "R0").row(0, named=True)
    assert r0["gradient"] > 0 and r0["rel_diff"] < 0.15
    assert table.filter(pl.col("wrt") == "infectious_days")["fd_gradient"].null_count() == 1


def test_cli_calibrate(tmp_path, capsys):
    from agenttensor.cli import main

    targets = tmp_path / "t.csv"
    rows = [dict(date=str(START + dt.timedelta(days=7 * w + 6)), borough=b, metric="cases", value=5.0 + w)
            for w in range(2) for b in BOROUGHS]
    pl.DataFrame(rows).write_csv(targets)
    code = main(["calibrate", "models/seir", "--population", "synthetic:5000", "--targets", str(targets),
                 "--window", f"{START}:{START + dt.timedelta(days=13)}", "--epochs", "2", "--set", "mixing=well-mixed",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"params.json", "loss.png", "fit.png", "fit.parquet"}
    assert main(["calibrate", "models/seir", "--targets", str(targets), "--window", "2020-13-01:x"]) == 2
    assert "error: --window" in capsys.readouterr().err


@pytest.mark.slow
def test_recovers_known_parameters_within_5_percent():
    """Targets = the model's own daily detected cases at R0 2.5, multipliers [1, .8, .6, .7], detection 0.4
    (10,000 agents, seeds 0-3, common random numbers); fit from R0 1.8, multipliers 1, detection 0.25."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from calibration_checks import recover, recovery_errors, recovery_setup

    seeds = [0, 1, 2, 3]
    env, truth, targets = recovery_setup(10_000, seeds)
    result = recover(env, truth, targets, seeds, epochs=150, lr=0.5, lr_decay=0.98)
    errors = recovery_errors(result)
    assert max(e["rel_error"] for e in errors.values()) < 0.05, errors


def test_random_walk_penalty_known_value():
    from agenttensor.calibration import random_walk_penalty

    values = {"transmission_multiplier": torch.tensor([1.0, 2.0, 1.0, 1.0])}
    log2 = torch.log(torch.tensor(2.0)).item()
    assert random_walk_penalty("transmission_multiplier", 0.5)(values).item() == pytest.approx(0.5 * 2 * log2 ** 2)
    assert random_walk_penalty("transmission_multiplier", 0.5, log=False)(values).item() == pytest.approx(1.0)
    assert random_walk_penalty("transmission_multiplier", 1.0, skip_first=2)(values).item() == 0.0
    with pytest.raises(ConfigError, match="not learned"):
        random_walk_penalty("R0", 1.0)(values)


def test_penalty_is_added_to_the_loss_and_smooths(setup):
    """loss = data loss + penalty (same forward at epoch 0); starting at the true, unequal multipliers,
    a strong random-walk prior pulls them together while the data alone keep them apart."""
    from agenttensor.calibration import random_walk_penalty

    env, truth, targets = setup
    obs = [Observe("cases", "new_infections_by_borough", "detection_rate")]

    def fit(penalty):
        learn = [Learn("transmission_multiplier", init=[1.0, 1.3, 0.8], size=3, period=7, transform=Exp()),
                 Learn("detection_rate", init=0.4, transform=Sigmoid(0.0, 1.0))]
        return calibrate(MODEL, None, targets, learn, observe=obs, window=(START, START + dt.timedelta(days=20)),
                         loss="mse_sqrt", epochs=4, lr=0.1, params=truth, seeds=[0], env=env, penalty=penalty)

    plain, smooth = fit(None), fit(random_walk_penalty("transmission_multiplier", 100.0))
    expected = 100.0 * (math.log(1.3) ** 2 + math.log(0.8 / 1.3) ** 2)
    assert smooth.info["penalty_history"][0] == pytest.approx(expected, rel=1e-5)
    assert smooth.loss_history[0] - smooth.info["penalty_history"][0] == pytest.approx(plain.loss_history[0], rel=1e-5)
    assert plain.info["penalty_history"] == [0.0] * 4

    def spread(result):
        m = torch.log(torch.tensor(result.values["transmission_multiplier"]))
        return float(m.max() - m.min())

    assert spread(plain) > 0.3 and spread(smooth) < 0.5 * spread(plain)
    with pytest.raises(ConfigError, match="penalty must"):
        fit(lambda values: torch.ones(2))


def test_learn_hold_uses_mean_of_last_values_after_the_learned_weeks(setup):
    env, truth, targets = setup
    obs = [Observe("cases", "new_infections_by_borough", "detection_rate")]
    learn = [Learn("transmission_multiplier", init=[1.0, 1.4], size=2, period=7, hold=2, transform=Exp()),
             Learn("detection_rate", init=0.4, transform=Sigmoid(0.0, 1.0))]
    result = calibrate(MODEL, None, targets, learn, observe=obs, window=(START, START + dt.timedelta(days=13)),
                       forecast_days=7, epochs=1, lr=0.05, params=truth, seeds=[0], env=env)
    m = result.params.transmission_multiplier
    learned = result.values["transmission_multiplier"]
    assert m.shape == (21,)
    assert torch.allclose(m[:7], torch.tensor(learned[0])) and torch.allclose(m[7:14], torch.tensor(learned[1]))
    assert torch.allclose(m[14:], torch.tensor((learned[0] + learned[1]) / 2))
    with pytest.raises(ConfigError, match="time-varying"):
        calibrate(MODEL, None, targets, [Learn("R0", hold=1)], observe=[Observe("cases", "new_infections_by_borough")],
                  window=(START, START + dt.timedelta(days=13)), epochs=0, params=truth, env=env)
    with pytest.raises(ConfigError, match="between 1 and size"):
        calibrate(MODEL, None, targets, [Learn("transmission_multiplier", size=2, period=7, hold=3)],
                  observe=[Observe("cases", "new_infections_by_borough")],
                  window=(START, START + dt.timedelta(days=13)), epochs=0, params=truth, env=env)


def test_one_date_parser_with_config_and_input_errors(setup):
    """Bad dates in a calibration window are configuration errors; bad dates in target tables are input errors."""
    from agenttensor.observed import parse_date, window

    assert parse_date("2020-10-04") == START and parse_date(START) == START
    assert parse_date(dt.datetime(2020, 10, 4, 12)) == START
    with pytest.raises(InputError, match="not a date"):
        parse_date("2020-13-01")
    with pytest.raises(ConfigError, match="window start '2020-10-4x' is not a date"):
        parse_date("2020-10-4x", error=ConfigError, what="window start")
    env, truth, targets = setup
    with pytest.raises(ConfigError, match="window end 'soon' is not a date"):
        calibrate(MODEL, None, targets, [Learn("R0")], observe=[Observe("cases", "new_infections_by_borough")],
                  window=(START, "soon"), params=truth, env=env)
    with pytest.raises(InputError, match="window start"):
        window(targets, "yesterday", "2020-10-10")


def test_checkpointed_gradient_runs_release_their_tensors():
    """simulate(grad_checkpoint_every=k) in a gradient mode leaves nothing alive after backward (the
    recompute function used to close over the final state: a cycle through autograd that leaked every
    run's state tensors, ~300 MB per calibration epoch at 175k agents)."""
    import gc

    pop = synthetic(3_000, seed=0)
    p = SEIRParams(mixing="well-mixed", initial_infected=30)
    env = MODEL.setup(pop, p.as_tensors(), "cpu")

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for _ in range(3):
        r0 = torch.tensor(2.0, requires_grad=True)
        res = simulate(MODEL, None, p.replace(R0=r0), steps=12, seeds=[0], env=env, sampler=StraightThrough(),
                       grad_checkpoint_every=4)
        res["new_infections"].sum().backward()
        del res, r0
        counts.append(live())
    assert counts[2] == counts[1], counts

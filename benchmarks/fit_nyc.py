"""Fit NYC weekly reported COVID-19 cases by borough (DOHMH) with the covid model, forecast 4 weeks.

Data and split. DOHMH confirmed cases by borough, weeks ending Saturday (`nyc-cases-weekly`).
The run starts on Sunday 2020-09-13 (3 burn-in weeks, not fitted); training weeks end
2020-10-10 .. 2021-01-02 (13 weeks × 5 boroughs = 65 points); the next 4 weeks (to 2021-01-30) are
an out-of-sample forecast, compared with a persistence baseline (each borough's last training week
carried forward). Observed counts are scaled to the simulated population per borough (agents /
2020-census residents); errors are reported on the observed scale.

Initial conditions (derived, not tuned):

- ``initial_immunity = 0.227``: share of agents starting in R = the NYC SARS-CoV-2 antibody
  prevalence after the spring wave, 22.7 % (Rosenberg ES, Tesoriero JM, Rosenthal EM, et al.
  Cumulative incidence and diagnosis of SARS-CoV-2 infection in New York. Ann Epidemiol 2020;
  48:23-29.e4; statewide serosurvey of 15,101 adults, 19-28 April 2020). Infections between May and
  mid-September (a few hundred reported cases a day) and waning are neglected; the citywide value is
  used in every borough.
- ``initial_prevalence`` (agents in E at step 0): the observed incidence around the start date
  turned into infections and multiplied by the time an infection stays in E + I:

      prevalence = (C / 7) / a × (D_E + D_I) / N_NYC

  with C the reported cases citywide in the first burn-in week (2020-09-13..19: reports lag
  infection by the incubation period, 5.6 days mean, plus testing, so these reflect infections
  around the start), a = 0.25 reported cases per infection (the ascertainment the covid model's
  severity tables already assume, `models.covid.disease.CASE_ASCERTAINMENT`), D_E and D_I the mean
  latent and infectious durations of the model's own duration tables (D_I weighted by the
  population's symptomatic share) and N_NYC the 2020 census population. The seeded cohort enters E
  together; its total infectious time equals that of the steady state it stands for, and the
  burn-in weeks let the stage mix settle. The model's detection rate is set to the value that gives
  a = 0.25 in the model (P(report | symptomatic) · (f_sym + r_asym (1 − f_sym)) = a).

Learned (21 values for 65 points): one transmission multiplier per week of the training period
(16: burn-in and training weeks; `Exp` transform) and a per-borough reporting scale (5; `Exp`,
starting at 1): an observation parameter multiplying the model's reported cases of each borough
(boroughs tested at different rates; the learned detection per borough is the model's rate times
it). ``--detection citywide`` learns the model's detection rate instead (1 value). A Gaussian
random-walk prior on the log multipliers (step sd ``--rw-sd``,
default 0.15 per week) is added to the loss through ``calibrate(penalty=random_walk_penalty(...))``
with the weight s² / (n σ²) that makes it the prior of the mean-squared-log-error data term
(n = 65, s = ``--obs-sd`` = 0.15). Loss: ``mse_log``; Adam with exponential learning-rate decay;
straight-through gradients; ``--seeds`` seeds per epoch (common random numbers across epochs).

Forecast rule, fixed before any run and not tuned on the test weeks: the multiplier for the
forecast weeks is the mean of the last 2 learned weekly multipliers (``Learn(hold=2)``), i.e. the
recent transmission level with one week of noise averaged out; everything else keeps its learned
value. The school calendar (winter recess 24 Dec-1 Jan) applies in the forecast as in training.

    python benchmarks/fit_nyc.py [--scale 0.02] [--epochs 80] [--seeds 2] [--lr 0.08] [--threads 1]

Writes docs/fit.png, docs/fit_loss.png, docs/fit_nyc.json and benchmarks/results/fit_nyc.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import time
from pathlib import Path

import polars as pl
import torch

from agenttensor.calibration import (Exp, Learn, Observe, Sigmoid, calibrate, fit_errors, persistence_forecast,
                                     plot_fit, plot_loss, random_walk_penalty)
from agenttensor.calibration_cli import BOROUGH_POPULATION_2020, auto_target_scale
from agenttensor.observed import load_targets

ROOT = Path(__file__).resolve().parent.parent
WINDOW = (dt.date(2020, 10, 4), dt.date(2021, 1, 2))
BURN_IN_START = dt.date(2020, 9, 13)
FORECAST_DAYS = 28
HOLD_WEEKS = 2  # forecast multiplier = mean of the last 2 learned weeks (chosen a priori)
SEROPREVALENCE = 0.227  # Rosenberg et al. 2020, Ann Epidemiol 48:23-29.e4 (NYC, late April 2020)
ASCERTAINMENT = 0.25  # reported cases per infection, models.covid.disease.CASE_ASCERTAINMENT


def mean_duration(cdf: torch.Tensor) -> float:
    """Mean of the model's discrete durations d = 1 + #{k : u >= F_k}: 1 + Σ_k (1 − F_k)."""
    return 1.0 + float((1 - cdf.double()).clamp_min(0).sum())


def initial_conditions(env, params, targets: pl.DataFrame) -> dict:
    """initial_prevalence from the first burn-in week's reported cases (see module docs)."""
    first_week = BURN_IN_START + dt.timedelta(days=6)
    cases = float(targets.filter(pl.col("date") == first_week)["value"].sum())
    f_sym = float(params.symptomatic_fraction[env.age_group.long()].mean())
    d_latent = mean_duration(env.durations["E"])
    d_infectious = f_sym * mean_duration(env.durations["I_sym"]) + (1 - f_sym) * mean_duration(env.durations["I_asym"])
    infections_per_day = cases / 7 / ASCERTAINMENT
    prevalence = infections_per_day * (d_latent + d_infectious) / sum(BOROUGH_POPULATION_2020.values())
    reports_per_symptomatic = ASCERTAINMENT / (f_sym + float(params.asymptomatic_detection_ratio) * (1 - f_sym))
    return dict(week_ending=str(first_week), reported_cases=cases, infections_per_day=infections_per_day,
                symptomatic_share=f_sym, latent_days=d_latent, infectious_days=d_infectious,
                initial_prevalence=prevalence, initial_immunity=SEROPREVALENCE, ascertainment=ASCERTAINMENT,
                detection_init=reports_per_symptomatic)


def nyc_world(scale: float):
    """The covid model's env on the NYC population at ``scale`` with this fit's derived initial conditions.
    -> (env, default params, initial_conditions(...), weekly case targets, number of agents)."""
    from models.covid.model import MODEL
    from populations.nyc import load_or_build

    population = load_or_build(ROOT / f"populations/built/nyc_scale{scale:g}", scale=scale)
    agents = len(population)
    base = MODEL.params_type()
    env = MODEL.setup(population, base.as_tensors("cpu"), "cpu")
    del population
    targets = load_targets("nyc-cases-weekly", metrics=["cases"])
    return env, base, initial_conditions(env, base, targets), targets, agents


def split_errors(table: pl.DataFrame):
    """(fit rows, persistence rows, errors {train, forecast, persistence}, per-borough normalised deviations)."""
    fit = table.filter(pl.col("split") != "before")
    baseline = persistence_forecast(fit)
    errors = dict(train=fit_errors(fit.filter(pl.col("split") == "train")),
                  forecast=fit_errors(baseline), persistence=fit_errors(baseline, predicted="persistence"))
    by_borough = {b: dict(train_nd=fit_errors(fit.filter((pl.col("split") == "train") & (pl.col("borough") == b)))["nd"],
                          forecast_nd=fit_errors(baseline.filter(pl.col("borough") == b))["nd"],
                          persistence_nd=fit_errors(baseline.filter(pl.col("borough") == b), predicted="persistence")["nd"])
                  for b in fit["borough"].unique(maintain_order=True).to_list()}
    return fit, baseline, errors, by_borough


def evaluate_on_fresh_seeds(model, env, targets, params, learn, observe, scale, values, first: int, count: int) -> dict:
    """The learned values run (hard mode) on seeds the fit never saw, first .. first + count − 1:
    errors of the mean over those seeds (`calibrate` with epochs=0 and the learned values as init)."""
    if count <= 0:
        return {}
    fixed = [dataclasses.replace(spec, init=values[spec.name]) for spec in learn]
    seeds = list(range(first, first + count))
    result = calibrate(model, None, targets, fixed, observe=observe, window=WINDOW, loss="mse_log", epochs=0,
                       params=params, start_date=BURN_IN_START, forecast_days=FORECAST_DAYS, seeds=seeds, env=env,
                       target_scale=scale)
    _, _, errors, by_borough = split_errors(result.fit)
    return dict(seeds=seeds, errors=errors, errors_by_borough=by_borough,
                note="mean over these seeds of a hard run with the learned values; the fit used seeds 0.."
                     f"{first - 1} (common random numbers)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.02, help="NYC population scale (share of 8.7M residents)")
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--lr", type=float, default=0.08)
    ap.add_argument("--lr-decay", type=float, default=0.98)
    ap.add_argument("--seeds", type=int, default=2, help="seeds averaged every epoch")
    ap.add_argument("--rw-sd", type=float, default=0.15, help="random-walk prior: sd of the weekly log change")
    ap.add_argument("--obs-sd", type=float, default=0.15, help="observation noise sd on the log scale (prior weight)")
    ap.add_argument("--multiplier-init", type=float, default=0.5)
    ap.add_argument("--detection", choices=("borough", "citywide"), default="borough")
    ap.add_argument("--grad-checkpoint-every", type=int, default=14)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-seeds", type=int, default=8, help="fresh seeds to evaluate the learned values on")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="skip training: evaluate the learned values of the existing fit_nyc.json on fresh seeds "
                         "and add them to it")
    ap.add_argument("--out", default=None, help="write outputs here instead of docs/ and benchmarks/results/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.covid.model import MODEL

    t0 = time.perf_counter()
    env, base, init, targets, agents = nyc_world(args.scale)
    setup_seconds = time.perf_counter() - t0
    params = base.replace(initial_prevalence=init["initial_prevalence"], initial_immunity=SEROPREVALENCE)

    steps = (WINDOW[1] - BURN_IN_START).days + 1 + FORECAST_DAYS
    train_weeks = ((WINDOW[1] - BURN_IN_START).days + 1) // 7
    detection_size = 5 if args.detection == "borough" else 1
    learn = [Learn("transmission_multiplier", init=args.multiplier_init, size=train_weeks, period=7, hold=HOLD_WEEKS,
                   transform=Exp()),
             Learn("detection_rate", init=init["detection_init"], transform=Sigmoid(0.02, 0.98), size=detection_size)]
    if args.detection == "borough":  # per-borough reporting: an observation parameter on the expected reports
        observe = [Observe("cases", "reported_cases_by_borough", "detection_scale")]
        learn[1] = Learn("detection_scale", init=1.0, transform=Exp(), size=5)
    else:
        observe = [Observe("cases", "reported_cases_by_borough")]
    n_train = 5 * ((WINDOW[1] - WINDOW[0]).days + 1) // 7
    weight = args.obs_sd ** 2 / (n_train * args.rw_sd ** 2)
    penalty = random_walk_penalty("transmission_multiplier", weight)
    scale = auto_target_scale(env, list(env.group_labels))
    if args.evaluate_only:  # add an evaluation on fresh seeds to the stored fit
        paths = [ROOT / "docs" / "fit_nyc.json", ROOT / "benchmarks" / "results" / "fit_nyc.json"]
        stored = json.loads(paths[0].read_text())
        if stored.get("agents") != agents or stored.get("detection") != args.detection:
            raise SystemExit(f"{paths[0]} is a fit of {stored.get('agents')} agents / detection "
                             f"{stored.get('detection')}; pass the same --scale/--detection")
        fresh = evaluate_on_fresh_seeds(MODEL, env, targets, params, learn, observe, scale, stored["learned"],
                                        stored["seeds"], args.eval_seeds)
        stored["fresh_seeds"] = fresh
        for path in paths:
            path.write_text(json.dumps(stored, indent=2, default=str))
        for name, e in fresh["errors"].items():
            print(f"fresh seeds {name:12s} MAE {e['mae']:10.1f} RMSE {e['rmse']:10.1f} ND {e['nd']:.3f}")
        return

    def report(epoch, loss, values):
        extra = " ".join(f"{v:.3f}" for v in values[learn[1].name].reshape(-1).tolist())
        m = values["transmission_multiplier"].reshape(-1)
        print(f"epoch {epoch + 1:4d} loss {loss:.5f} {learn[1].name} {extra} m[0,8,15] {m[0]:.3f} {m[8]:.3f} "
              f"{m[-1]:.3f} t {time.perf_counter() - t0:.0f}s", flush=True)

    result = calibrate(MODEL, None, targets, learn, observe=observe, window=WINDOW, loss="mse_log", epochs=args.epochs,
                       lr=args.lr, lr_decay=args.lr_decay, params=params, start_date=BURN_IN_START,
                       forecast_days=FORECAST_DAYS, seeds=list(range(args.seeds)), env=env, target_scale=scale,
                       grad_checkpoint_every=args.grad_checkpoint_every, penalty=penalty, callback=report)
    fit, baseline, errors, by_borough = split_errors(result.fit)
    m = result.values["transmission_multiplier"]
    held = sum(m[-HOLD_WEEKS:]) / HOLD_WEEKS
    fresh = evaluate_on_fresh_seeds(MODEL, env, targets, params, learn, observe, scale, result.values, args.seeds,
                                    args.eval_seeds)
    docs = Path(args.out) if args.out else ROOT / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    title = (f"covid model, {agents:,} agents (NYC scale {args.scale:g}), {args.seeds} seeds: weekly confirmed cases, "
             f"fit {WINDOW[0]}..{WINDOW[1]}, forecast 4 weeks (multiplier = mean of last {HOLD_WEEKS} weeks)")
    plot_fit(fit, docs / "fit.png", title=title, baseline=baseline)
    plot_loss(result.loss_history, docs / "fit_loss.png")
    tail = result.loss_history[-10:]
    out = dict(model="covid", agents=agents, nyc_scale=args.scale, window=[str(w) for w in WINDOW],
               burn_in_start=str(BURN_IN_START), forecast_weeks=4, epochs=args.epochs, seeds=args.seeds, lr=args.lr,
               lr_decay=args.lr_decay, detection=args.detection, learned_values=train_weeks + detection_size,
               train_points=n_train, prior=dict(rw_sd=args.rw_sd, obs_sd=args.obs_sd, weight=weight),
               forecast_rule=f"mean of the last {HOLD_WEEKS} weekly multipliers (chosen a priori)",
               forecast_multiplier=held, initial_conditions=init, errors=errors, errors_by_borough=by_borough,
               learned=result.values, loss_history=result.loss_history,
               params=dict(start_date=str(BURN_IN_START),
                           initial_prevalence=init["initial_prevalence"], initial_immunity=SEROPREVALENCE,
                           transmission_multiplier=list(m) + [held],
                           detection_rate=float(result.params.detection_rate),
                           note="model parameters of this fit: weekly multipliers from start_date (the last value, "
                                "the mean of the last two learned ones, holds afterwards); the per-borough reporting "
                                "scale (learned.detection_scale, order Bronx, Brooklyn, Manhattan, Queens, Staten "
                                "Island) is an observation parameter outside the model"),
               fresh_seeds=fresh,
               penalty_history=result.info.get("penalty_history"),
               loss_last10_relative_range=(max(tail) - min(tail)) / max(abs(sum(tail) / len(tail)), 1e-12),
               info={k: v for k, v in result.info.items() if k != "penalty_history"},
               setup_seconds=setup_seconds, threads=torch.get_num_threads(),
               machine=dict(cpus=__import__("os").cpu_count(), python=platform.python_version(), torch=torch.__version__),
               units="persons per week per borough (observed scale)",
               command="python benchmarks/fit_nyc.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"))
    paths = [docs / "fit_nyc.json"] + ([] if args.out else [ROOT / "benchmarks" / "results" / "fit_nyc.json"])
    for path in paths:
        path.write_text(json.dumps(out, indent=2, default=str))
    fit.write_csv(docs / "fit_nyc_table.csv") if args.out else None
    print(f"{'':12s} {'MAE':>10s} {'RMSE':>10s} {'ND':>8s}")
    for name, e in errors.items():
        print(f"{name:12s} {e['mae']:10.1f} {e['rmse']:10.1f} {e['nd']:8.3f}")
    print(f"wrote {docs / 'fit.png'} and fit_nyc.json ({result.info['seconds_per_epoch']:.1f} s/epoch)")


if __name__ == "__main__":
    main()

"""Fit NYC weekly reported COVID-19 cases by borough (DOHMH) with the covid model, forecast 4 weeks.

Training window: 13 weeks (weeks ending Saturday 2020-10-10 .. 2021-01-02), then a 4-week
out-of-sample forecast (to 2021-01-30) with the last weekly multiplier held, compared with a
persistence baseline (last observed week carried forward). Learned: one transmission multiplier
per week (weeks aligned to the simulation calendar) and the detection rate. Observed counts are
scaled to the simulated population per borough (agents / 2020 census residents).

    python benchmarks/fit_nyc.py [--scale 0.005] [--epochs 30] [--model covid|seir]

Writes docs/fit.png, docs/fit_nyc.json and benchmarks/results/fit_nyc.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import polars as pl
import torch

from agenttensor.calibration import Learn, Observe, Sigmoid, calibrate, fit_errors, persistence_forecast, plot_fit
from agenttensor.calibration_cli import auto_target_scale
from agenttensor.observed import load_targets

ROOT = Path(__file__).resolve().parent.parent
WINDOW = (dt.date(2020, 10, 4), dt.date(2021, 1, 2))
BURN_IN_START = dt.date(2020, 9, 13)
FORECAST_DAYS = 28


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="covid", choices=("covid", "seir"))
    ap.add_argument("--scale", type=float, default=0.005, help="NYC population scale (share of 8.3M residents)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.08)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from populations.nyc import build_nyc

    population = build_nyc(scale=args.scale, seed=0)
    build_seconds = time.perf_counter() - t0
    if args.model == "covid":
        from models.covid.model import MODEL

        params = MODEL.params_type().replace(initial_prevalence=1e-3)
        observe = [Observe("cases", "reported_cases_by_borough")]
        extra = [Learn("detection_rate", init=0.3, transform=Sigmoid(0.02, 0.98))]
    else:
        from models.seir.model import MODEL

        params = MODEL.params_type().replace(R0=1.3, initial_infected=int(8e-4 * len(population)))
        observe = [Observe("cases", "new_infections_by_borough", "detection_rate")]
        extra = [Learn("detection_rate", init=0.3, transform=Sigmoid(0.0, 1.0), size=5)]
    steps = (WINDOW[1] - BURN_IN_START).days + 1 + FORECAST_DAYS
    weeks = (steps + 6) // 7
    learn = [Learn("transmission_multiplier", init=1.0, size=weeks, period=7)] + extra
    targets = load_targets("nyc-cases-weekly", metrics=["cases"])
    env = MODEL.setup(population, params.as_tensors("cpu"), "cpu")
    scale = auto_target_scale(env, list(getattr(env, "group_labels", [])))

    def report(epoch, loss, values):
        print(f"epoch {epoch + 1:3d} loss {loss:.4f} detection {values['detection_rate'].mean():.3f}", flush=True)

    result = calibrate(MODEL, None, targets, learn, observe=observe, window=WINDOW, loss="mse_log", epochs=args.epochs,
                       lr=args.lr, lr_decay=0.98, params=params, start_date=BURN_IN_START, forecast_days=FORECAST_DAYS,
                       seeds=list(range(args.seeds)), env=env, target_scale=scale, callback=report)
    fit = result.fit.filter(pl.col("split") != "before")
    baseline = persistence_forecast(fit)
    errors = dict(train=fit_errors(fit.filter(pl.col("split") == "train")),
                  forecast=fit_errors(baseline), persistence=fit_errors(baseline, predicted="persistence"))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    title = (f"{MODEL.name} model, {len(population):,} agents (NYC scale {args.scale:g}): weekly confirmed cases, "
             f"fit {WINDOW[0]}..{WINDOW[1]}, forecast 4 weeks")
    plot_fit(fit, docs / "fit.png", title=title, baseline=baseline)
    out = dict(model=MODEL.name, agents=len(population), nyc_scale=args.scale, window=[str(w) for w in WINDOW],
               burn_in_start=str(BURN_IN_START), forecast_weeks=4, epochs=args.epochs, errors=errors,
               learned=result.values, loss_history=result.loss_history, info=result.info,
               population_build_seconds=build_seconds, units="persons per week per borough (observed scale)")
    for path in (docs / "fit_nyc.json", ROOT / "benchmarks" / "results" / "fit_nyc.json"):
        path.write_text(json.dumps(out, indent=2, default=str))
    print(f"{'':12s} {'MAE':>10s} {'RMSE':>10s} {'ND':>8s}")
    for name, e in errors.items():
        print(f"{name:12s} {e['mae']:10.1f} {e['rmse']:10.1f} {e['nd']:8.3f}")
    print(f"wrote {docs / 'fit.png'} and fit_nyc.json ({result.info['seconds_per_epoch']:.1f} s/epoch)")


if __name__ == "__main__":
    main()

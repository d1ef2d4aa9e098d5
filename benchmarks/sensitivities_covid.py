"""One-shot policy sensitivities of the NYC covid model: d(deaths)/d(·) and d(unemployment)/d(·).

Setting: the covid model on the NYC census population (`populations.nyc`, default scale 0.01) from
Sunday 2020-09-13 for 16 weeks (to 2021-01-02), started as in `benchmarks/fit_nyc.py` (22.7 % immune,
initial prevalence from the reported cases of 2020-09-13..19) and, when `benchmarks/results/fit_nyc.json`
exists, with its learned weekly transmission multipliers (otherwise the model defaults). On top of that
world, three policy levers (`agenttensor.interventions`), at assumed intensities:

- ``schools``: school buildings closed (intensity 1) from Thu 2020-11-19, as NYC did, to the end of Sun
  2020-12-06 (reopening Mon 2020-12-07), with a 3-day logistic ramp at the end (``Intervention(ramp=3)``);
- ``testing``: ``testing_isolation`` 0.1 (extra probability that a new infection is detected, after which
  aware agents isolate w.p. isolate_prob), from 2020-11-01 (the second wave) to the end;
- ``masks``: ``transmission_reduction`` 0.2 (share of per-contact transmission removed), from 2020-11-01;

and the behaviour parameter ``isolate_intercept`` (logit of isolating when aware; 0 → 50 % at age 40
and no incidence). Outcomes: deaths and new infections over the 16 weeks (agents; the JSON also gives
NYC-scale values, ÷ scale) and the unemployment rate on the last day (percentage points). The levers act
from November, so their effects pass through at most ~9 weeks of transmission chains (straight-through
gradients of the covid model are 0.92–0.99 of finite differences up to 8 weeks and 0.87–0.94 at 16 in this
calibrated setting, `benchmarks/gradient_horizon.py`; agenttensor/CALIBRATION.md).

What the derivatives mean:

- ``<lever>.intensity``: d(outcome)/d(intensity), the intensity being a tensor that requires grad, so
  every cell of the [B, T, borough, age band] schedule it sets moves together;
- ``schools.length``: d(outcome)/d(end date) per day, i.e. per extra day of closure. With the ramp the
  schedule on day t ≥ start is ``intensity · σ((end + ½ − t) / 3)``: the closure keeps its intensity-days
  (Σ_t σ ≈ end − start + 1) and the end is a continuous, differentiable quantity; the derivative is the
  effect of shifting the end by one day, averaged over the ramp's ~2 weeks (so over weekdays and weekend
  days alike: closing schools on a Saturday changes nothing);
- ``isolate_intercept``: d/d(logit), per unit of the isolation logit (compliance).

All come from ONE forward pass in straight-through mode and one backward pass per outcome
(`agenttensor.calibration.sensitivities`). The finite-difference column reruns the model in hard mode
at value ± h on the same seeds (common random numbers; each outcome is the mean over ``--seeds``):
intensities ± 0.05 (masks, testing; schools at 1 one-sided − 0.05), isolate_intercept ± 0.5, the
schools' end ± 3.5 days (a full week in total).

    python benchmarks/sensitivities_covid.py [--scale 0.01] [--seeds 8] [--threads 1]

Prints the table and writes benchmarks/results/sensitivities_covid.json and .csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import polars as pl
import torch

from agenttensor import Intervention
from agenttensor.calibration import sensitivities

ROOT = Path(__file__).resolve().parent.parent
START = dt.date(2020, 9, 13)
DAYS = 112  # 16 weeks, to 2021-01-02
LEVERS_FROM = dt.date(2020, 11, 1)  # the second wave: levers act for 9 weeks before the outcomes end


def calibrated_multipliers(path: Path) -> tuple[list[float] | None, str]:
    if not path.exists():
        return None, "model default (no benchmarks/results/fit_nyc.json)"
    fit = json.loads(path.read_text())
    weekly = list(fit["learned"]["transmission_multiplier"])
    held = fit.get("forecast_multiplier")
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return weekly + ([held] if held is not None else []), f"{name} ({fit.get('agents')} agents)"


def calibrated_params(base, init: dict, fit: Path):
    """The fit's world: derived initial conditions and detection rate, plus the learned weekly multipliers
    (daily values) when ``fit`` exists. -> (params, description of the multipliers' source)."""
    from fit_nyc import SEROPREVALENCE

    multipliers, source = calibrated_multipliers(fit)
    changes = dict(initial_prevalence=init["initial_prevalence"], initial_immunity=SEROPREVALENCE,
                   detection_rate=init["detection_init"])
    if multipliers is not None:
        changes["transmission_multiplier"] = torch.tensor(multipliers, dtype=torch.float32).repeat_interleave(7)
    return base.replace(**changes), source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--grad-checkpoint-every", type=int, default=14)
    ap.add_argument("--fit", default=str(ROOT / "benchmarks" / "results" / "fit_nyc.json"),
                    help="fit_nyc.py output whose weekly multipliers to use")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fit_nyc import SEROPREVALENCE, nyc_world
    from models.covid.model import MODEL

    t0 = time.perf_counter()
    env, base, init, _, agents = nyc_world(args.scale)
    params, source = calibrated_params(base, init, Path(args.fit))
    end = START + dt.timedelta(days=DAYS - 1)
    interventions = [
        Intervention("school_closure", dt.date(2020, 11, 19), dt.date(2020, 12, 6), 1.0, ramp=3.0, name="schools"),
        Intervention("testing_isolation", LEVERS_FROM, end, 0.1, name="testing"),
        Intervention("transmission_reduction", LEVERS_FROM, end, 0.2, name="masks"),
    ]
    outcomes = {
        "infections": "new_infections",
        "deaths": "deaths",
        "unemployment_pp": lambda r: 100 * r["unemployment_rate"][-1].to(torch.float32).mean(),
    }
    fd_steps = {"schools.intensity": 0.05, "testing.intensity": 0.05, "masks.intensity": 0.05,
                "isolate_intercept": 0.5, "schools.length": 3.5}
    check = list(fd_steps)
    t1 = time.perf_counter()
    table = sensitivities(MODEL, None, params, outcomes=outcomes, wrt=["isolate_intercept"], interventions=interventions,
                          steps=DAYS, seeds=list(range(args.seeds)), start_date=START, fd_check=check, fd_steps=fd_steps,
                          env=env, grad_checkpoint_every=args.grad_checkpoint_every)
    seconds = time.perf_counter() - t1
    table = table.filter(~pl.col("wrt").is_in(["testing.length", "masks.length"]))  # they last the whole run
    counts = pl.col("outcome").is_in(["deaths", "infections"])
    table = table.with_columns(pl.when(counts).then(pl.col("gradient") / args.scale)
                               .otherwise(pl.col("gradient")).alias("gradient_nyc"),
                               pl.when(counts).then(pl.col("fd_gradient") / args.scale)
                               .otherwise(pl.col("fd_gradient")).alias("fd_gradient_nyc"))
    with pl.Config(tbl_rows=30, tbl_cols=12, float_precision=4, tbl_width_chars=160):
        print(table.select("outcome", "wrt", "value", "outcome_value", "gradient", "fd_step", "fd_gradient", "rel_diff",
                           "elasticity"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.write_csv(out_dir / "sensitivities_covid.csv")
    payload = dict(model="covid", agents=agents, nyc_scale=args.scale, start_date=str(START), days=DAYS,
                   seeds=args.seeds, sampler="StraightThrough", multipliers=source,
                   initial_conditions=dict(initial_prevalence=init["initial_prevalence"],
                                           initial_immunity=SEROPREVALENCE, detection_rate=init["detection_init"]),
                   interventions=[dict(name=iv.label, lever=iv.lever, start=str(iv.start), end=str(iv.end),
                                       intensity=iv.intensity, ramp=iv.ramp) for iv in interventions],
                   fd_steps=fd_steps, seconds_total=seconds, setup_seconds=t1 - t0,
                   threads=torch.get_num_threads(), load_average=list(os.getloadavg()),
                   machine=dict(cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__),
                   note="gradient: one straight-through forward and one backward per outcome; fd_gradient: central "
                        "finite differences in hard mode on the same seeds; deaths in agents (gradient_nyc: / scale), "
                        "unemployment in percentage points on the last day",
                   rows=table.to_dicts())
    (out_dir / "sensitivities_covid.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"{seconds:.0f} s (gradients + finite differences); wrote {out_dir / 'sensitivities_covid.json'} and .csv")


if __name__ == "__main__":
    main()

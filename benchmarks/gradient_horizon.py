"""How far do the covid model's straight-through gradients stay true? Ratio to finite differences by horizon.

Setting (as `benchmarks/sensitivities_covid.py`): the covid model on the NYC census population (default
scale 0.01) from Sunday 2020-09-13, 22.7 % immune, initial prevalence from the reported cases of
2020-09-13..19, the weekly transmission multipliers learned by `benchmarks/fit_nyc.py` when its result
exists. Outcomes: new infections, reported cases and deaths summed over the first h days, for h = 28, 56,
84 and 112, all from ONE straight-through run of 112 days (one backward pass per outcome), against central
finite differences in hard mode on the same seeds (common random numbers; β ± 3 %, η ± 0.1).

    python benchmarks/gradient_horizon.py [--scale 0.01] [--seeds 8] [--first-seed 0] [--threads 1]

Prints gradient / finite difference per outcome and horizon; writes benchmarks/results/gradient_horizon.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import polars as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
START = dt.date(2020, 9, 13)
HORIZONS = (28, 56, 84, 112)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first .. first + seeds − 1")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--horizons", default=",".join(map(str, HORIZONS)))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gradient_horizon.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fit_nyc import nyc_world
    from sensitivities_covid import calibrated_params

    from agenttensor.calibration import sensitivities
    from models.covid.model import MODEL

    horizons = [int(h) for h in args.horizons.split(",")]
    env, base, init, _, agents = nyc_world(args.scale)
    params, source = calibrated_params(base, init, ROOT / "benchmarks" / "results" / "fit_nyc.json")

    def summed(metric: str, h: int):
        return lambda r: r[metric][:h].to(torch.float32).sum(0).mean()

    outcomes = {f"{name}@{h}": summed(metric, h) for h in horizons
                for name, metric in (("infections", "new_infections"), ("reported", "reported_cases"),
                                     ("deaths", "deaths"))}
    t0 = time.perf_counter()
    table = sensitivities(MODEL, None, params, outcomes=outcomes, wrt=["transmission_scale", "isolation_effectiveness"],
                          steps=max(horizons), seeds=list(range(args.first_seed, args.first_seed + args.seeds)), start_date=START, env=env,
                          fd_steps={"transmission_scale": 0.03 * float(params.transmission_scale),
                                    "isolation_effectiveness": 0.1}, grad_checkpoint_every=14)
    seconds = time.perf_counter() - t0
    table = table.with_columns((pl.col("gradient") / pl.col("fd_gradient")).alias("ratio"),
                               pl.col("outcome").str.split("@").list.get(0).alias("metric"),
                               pl.col("outcome").str.split("@").list.get(1).cast(pl.Int64).alias("days"))
    wide = (table.select("wrt", "metric", "days", "ratio")
            .pivot(on="days", index=["wrt", "metric"], values="ratio").sort("wrt", "metric"))
    with pl.Config(tbl_rows=40, float_precision=3, tbl_width_chars=140):
        print(table.select("wrt", "outcome", "outcome_value", "gradient", "fd_gradient", "ratio"))
        print("gradient / finite difference by horizon (days):")
        print(wide)
    payload = dict(model="covid", agents=agents, nyc_scale=args.scale, start_date=str(START), seeds=args.seeds, first_seed=args.first_seed,
                   sampler="StraightThrough", multipliers=source, horizons=horizons, seconds=seconds,
                   threads=torch.get_num_threads(), load_average=list(os.getloadavg()),
                   machine=dict(cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__),
                   ratios=wide.to_dicts(), rows=table.drop("metric", "days").to_dicts())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2, default=str))
    print(f"{seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()

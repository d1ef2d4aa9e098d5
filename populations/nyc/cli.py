"""``agenttensor population build nyc --out DIR [--boroughs BK,QN] [--scale F] [--seed S]`` and
``agenttensor population describe DIR``. Registered on the main CLI by ``add_population_parser``."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from agenttensor.errors import ConfigError, InputError

CITIES = ("nyc",)


def add_population_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``population {build,describe}`` on an argparse subparsers object."""
    pop = subparsers.add_parser("population", help="build or describe a census-based population")
    sub = pop.add_subparsers(dest="population_command", required=True)
    build = sub.add_parser("build", help="build a city's synthetic population from census tables")
    build.add_argument("city", help=f"city to build ({', '.join(CITIES)})")
    build.add_argument("--out", required=True, help="output directory (written atomically)")
    build.add_argument("--boroughs", default=None, help="comma-separated borough codes, e.g. BK,QN (default: all)")
    build.add_argument("--scale", type=float, default=1.0, help="fraction of the real population, in (0, 1]")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--commute-stay-share", type=float, default=None,
                       help="share of non-Manhattan workers working in their home borough (default 0.55; 1 = no commuting)")
    build.set_defaults(func=cmd_build)
    describe = sub.add_parser("describe", help="totals by borough and an age-pyramid PNG for a built population")
    describe.add_argument("directory")
    describe.add_argument("--png", default=None, help="age pyramid path (default DIR/age_pyramid.png)")
    describe.set_defaults(func=cmd_describe)
    return pop


def cmd_build(args: argparse.Namespace) -> int:
    from . import builder

    if args.city.lower() not in CITIES:
        raise ConfigError(f"unknown city {args.city!r}; available: {', '.join(CITIES)}")
    commute = builder.Commute() if args.commute_stay_share is None else builder.Commute(stay_share=args.commute_stay_share)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    pop = builder.build_nyc(scale=args.scale, boroughs=args.boroughs, seed=args.seed, commute=commute, timings=timings)
    out = pop.save(args.out)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    totals = pop.meta["totals"]
    print(f"built {totals['persons']:,} agents, {totals['households']:,} households, {totals['schools']:,} schools, "
          f"{totals['workplaces']:,} workplaces -> {out} in {time.perf_counter() - t0:.1f} s (peak RSS {peak_gb:.2f} GB)")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    import numpy as np
    import polars as pl

    from agenttensor.population import BOROUGH_CODES, Population

    directory = Path(args.directory)
    pop = Population.load(directory)
    p = pop.persons
    table = (p.group_by("borough").agg(persons=pl.len(), median_age=pl.col("age").median(),
                                       under18=(pl.col("age") < 18).sum(), over65=(pl.col("age") >= 65).sum(),
                                       employed=(pl.col("employment") == 1).sum(), in_school=(pl.col("school_id") >= 0).sum(),
                                       households=pl.col("household_id").n_unique())
             .sort("borough"))
    print(f"{'borough':<8}{'persons':>12}{'households*':>13}{'median age':>12}{'<18':>10}{'65+':>10}{'employed':>11}{'in school':>11}")
    for r in table.iter_rows(named=True):
        print(f"{BOROUGH_CODES[r['borough']]:<8}{r['persons']:>12,}{r['households']:>13,}{r['median_age']:>12.0f}"
              f"{r['under18']:>10,}{r['over65']:>10,}{r['employed']:>11,}{r['in_school']:>11,}")
    print(f"{'total':<8}{p.height:>12,}{p['household_id'].n_unique():>13,}   (*households incl. group-quarters units)")
    print("groups:", json.dumps({k: v.height for k, v in pop.groups.items()}), "| seed:", pop.meta.get("seed"),
          "| scale:", pop.meta.get("scale"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = np.minimum(p["age"].to_numpy().astype(np.int64) // 5, 20)
    sex = p["sex"].to_numpy()
    female = np.bincount(bands[sex == 0], minlength=21)
    male = np.bincount(bands[sex == 1], minlength=21)
    fig, ax = plt.subplots(figsize=(6, 5))
    y = np.arange(21)
    ax.barh(y, -male, color="#4477aa", label="male")
    ax.barh(y, female, color="#cc6677", label="female")
    ax.set_yticks(y[::2], [f"{5 * i}" for i in y[::2]])
    ax.set_ylabel("age (5-year bands; 100 = 100+)")
    ax.set_xlabel("persons")
    ax.set_title(f"Age pyramid: {p.height:,} agents")
    ax.legend()
    png = Path(args.png) if args.png else directory / "age_pyramid.png"
    try:
        fig.savefig(png, dpi=100, bbox_inches="tight")
    except OSError as e:
        raise InputError(f"cannot write age pyramid to {png}: {e.strerror}") from None
    finally:
        plt.close(fig)
    print(f"age pyramid -> {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m populations.nyc.cli population build nyc ...``): the main CLI,
    so errors are reported the same way."""
    from agenttensor.cli import main as agenttensor_main

    return agenttensor_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Full NYC population build: wall time per step, peak RSS, save/load times and accuracy against the ACS inputs.

    python benchmarks/population_build.py [--scale 1.0] [--seed 0] [--out DIR]

Prints a table and writes ``benchmarks/results/population_build.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agenttensor.population import BOROUGH_CODES, Population  # noqa: E402
from populations.nyc.builder import AGE_BANDS, DATA_DIR, RACE_COLUMNS, build_nyc  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def accuracy(pop: Population, scale: float) -> dict:
    nta = pl.read_csv(DATA_DIR / "nta_profile.csv")
    codes = pop.meta["ntas"]
    nta = nta.with_columns(idx=pl.col("nta").replace_strict({c: i for i, c in enumerate(codes)}))
    nta = nta.filter(pl.col("borough").is_in(pop.meta["built_boroughs"]))
    p = pop.persons.with_columns(band=pl.min_horizontal(pl.col("age").cast(pl.Int32) // 5, pl.lit(17)))
    out = {}
    for name, cols, levels in (("age_band", AGE_BANDS, 18), ("sex", ["female", "male"], 2), ("race", RACE_COLUMNS, 5)):
        key = {"age_band": "band"}.get(name, name)
        got = p.group_by("nta", key).len().pivot(on=key, index="nta", values="len").fill_null(0)
        got = nta.select("idx").join(got, left_on="idx", right_on="nta", how="left").fill_null(0)
        sim = got.select([pl.col(str(i)) if str(i) in got.columns else pl.lit(0) for i in range(levels)]).to_numpy()
        target = nta.select(cols).to_numpy() * scale
        dev = np.abs(sim - target)
        rel = dev / np.maximum(target, 1)
        out[f"nta_{name}_max_abs_dev"] = float(dev.max())
        out[f"nta_{name}_max_rel_dev_cells_ge100"] = float(rel[target >= 100].max()) if (target >= 100).any() else 0.0
    by_b = p.group_by("borough").len()
    hh = pop.groups["households"].filter(pl.col("kind") == 0).group_by("borough").len()
    b11016 = pl.read_csv(DATA_DIR / "borough_household_size.csv").group_by("borough").agg(pl.col("households").sum())
    rows = []
    for b, code in enumerate(BOROUGH_CODES):
        if code not in pop.meta["built_boroughs"]:
            continue
        sel = nta.filter(pl.col("borough") == code)
        persons = by_b.filter(pl.col("borough") == b)["len"].sum()
        households = hh.filter(pl.col("borough") == b)["len"].sum()
        rows.append(dict(borough=code, persons=int(persons), acs_persons=int(sel["pop"].sum()),
                         persons_rel_dev=float(persons / (sel["pop"].sum() * scale) - 1),
                         households=int(households), acs_households_nta=int(sel["households"].sum()),
                         households_rel_dev=float(households / (sel["households"].sum() * scale) - 1),
                         acs_households_b11016_2016_2020=int(b11016.filter(pl.col("borough") == code)["households"][0]),
                         households_rel_dev_vs_b11016=float(households / (b11016.filter(pl.col("borough") == code)["households"][0] * scale) - 1)))
    out["by_borough"] = rows
    enrol = p.filter(pl.col("school_id") >= 0).height
    target = nta.select(["enrol_prek", "enrol_k", "enrol_g1_8", "enrol_g9_12", "enrol_college"]).to_numpy().sum() * scale
    out["enrolled"] = int(enrol)
    out["enrolled_rel_dev"] = float(enrol / target - 1)
    out["enrolment_shortfall"] = pop.meta.get("enrolment_shortfall", {})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where to save (default: a temporary folder, removed afterwards)")
    args = ap.parse_args()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pop = build_nyc(scale=args.scale, seed=args.seed, timings=timings)
    build_s = time.perf_counter() - t0
    rss_build = peak_rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "nyc"
        t = time.perf_counter()
        pop.save(out)
        save_s = time.perf_counter() - t
        size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
        t = time.perf_counter()
        loaded = Population.load(out)
        tensors = loaded.tensors()
        load_s = time.perf_counter() - t
    acc = accuracy(pop, args.scale)
    result = dict(
        agents=len(pop), households=pop.meta["totals"]["households"], schools=pop.meta["totals"]["schools"],
        workplaces=pop.meta["totals"]["workplaces"], scale=args.scale, seed=args.seed,
        build_seconds=round(build_s, 2), steps_seconds={k: round(v, 2) for k, v in timings.items()},
        save_seconds=round(save_s, 2), load_to_tensors_seconds=round(load_s, 2), parquet_mb=round(size_mb, 1),
        peak_rss_gb_after_build=round(rss_build, 2), peak_rss_gb=round(peak_rss_gb(), 2), accuracy=acc,
        machine=dict(cpus=os.cpu_count(), python=platform.python_version(), platform=platform.platform()),
        tensors=len(tensors),
    )
    print(f"{'metric':<36}{'value':>16}")
    for k in ("agents", "households", "schools", "workplaces", "build_seconds", "save_seconds", "load_to_tensors_seconds",
              "parquet_mb", "peak_rss_gb_after_build", "peak_rss_gb"):
        v = result[k]
        print(f"{k:<36}{v:>16,}" if isinstance(v, int) else f"{k:<36}{v:>16}")
    for k, v in result["steps_seconds"].items():
        print(f"  step {k:<30}{v:>16}")
    for k, v in acc.items():
        if k.startswith("nta_") or k.startswith("enrolled"):
            print(f"{k:<36}{v:>16.4g}")
    print(f"{'borough':<8}{'persons':>10}{'dev':>9}{'households':>12}{'dev':>9}{'dev B11016':>12}")
    for r in acc["by_borough"]:
        print(f"{r['borough']:<8}{r['persons']:>10,}{r['persons_rel_dev']:>9.2%}{r['households']:>12,}"
              f"{r['households_rel_dev']:>9.2%}{r['households_rel_dev_vs_b11016']:>12.2%}")
    path = Path(__file__).parent / "results" / "population_build.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()

"""The gradient forward's group totals of the infectious agents at full NYC: the native call
(`hard_native.source_totals_at`) against the torch ops it replaces, day by day, in one process.

    python benchmarks/ab_source_totals.py [--scale 1] [--days 28] [--runs 3] [--threads 2]

A straight-through window is run alternately with the native call and with it switched off (the torch ops: the
gathers at the infectious agents, index_add, `_product_at`); both give the same numbers (checked here on the daily
infections, and in tests/test_covid_model.py on the metrics and gradients). The timed region of a day runs from the
selection of the infectious agents (`select.nonzero_bits`) to the call of the layered force: the totals, the tables
made from them and the own contributions' forward, which is the same in both. Each day's figure is its fastest of
``--runs`` windows (the day's number of infectious agents is the same in every window); the table gives the days'
means and the infectious agents per day. Prints a table and writes benchmarks/results/ab_source_totals.json (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agenttensor import StraightThrough, _cpu_cache  # noqa: E402
from covid_step import MODEL, CovidParams, timed_steps  # noqa: E402
from models.covid import hard_native  # noqa: E402
from models.covid import model as covid_model  # noqa: E402

NAMES = ("transmission_scale", "transmission_multiplier", "household_weight", "community_weight", "detection_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ab_source_totals.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from populations.nyc import load_or_build

    folder = Path(__file__).resolve().parent.parent / "populations" / "built" / f"nyc_scale{args.scale:g}"
    population = load_or_build(str(folder), scale=args.scale, boroughs=None, seed=0)
    env = MODEL.setup(population, CovidParams().as_tensors("cpu"), torch.device("cpu"))
    learn = CovidParams(initial_prevalence=1e-3, transmission_multiplier=torch.ones(args.days // 7 + 1))
    learn = learn.as_tensors("cpu", learn=NAMES)
    _cpu_cache.enable_for(env.num_agents, torch.device("cpu"))

    native, select_bits, force = hard_native.source_totals_at, covid_model.select.nonzero_bits, \
        covid_model.layered_force
    marks: list[tuple[str, float, int]] = []

    def selected(flags, bits):
        pairs = select_bits(flags, bits)
        marks.append(("start", time.perf_counter(), pairs[0].numel()))
        return pairs

    def timed_force(*a, **k):
        marks.append(("end", time.perf_counter(), 0))
        return force(*a, **k)

    def window(on: bool) -> tuple[list[float], list[int], torch.Tensor]:
        hard_native.source_totals_at = native if on else (lambda *a, **k: None)
        marks.clear()
        _, _, (_, records) = timed_steps(env, learn, StraightThrough(), args.days)  # (its graph freed on return)
        times, sources, start = [], [], None
        for kind, t, m in marks:
            if kind == "start":
                start, count = t, m
            elif start is not None:
                times.append((t - start) * 1e3)
                sources.append(count)
                start = None
        return times, sources, torch.stack([r["new_infections"].detach() for r in records])

    covid_model.select.nonzero_bits, covid_model.layered_force = selected, timed_force
    try:
        window(True), window(False)  # warm-ups
        runs = {True: [], False: []}
        infections = {}
        for r in range(args.runs):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                times, sources, infections[on] = window(on)
                runs[on].append(times)
    finally:
        hard_native.source_totals_at = native
        covid_model.select.nonzero_bits, covid_model.layered_force = select_bits, force
    same = torch.equal(infections[True], infections[False])
    best = {on: [min(day) for day in zip(*runs[on])] for on in runs}
    mean = {on: sum(best[on]) / len(best[on]) for on in best}
    print(f"{env.num_agents:,} agents, {args.days} days, {args.runs} windows each, {args.threads} threads; "
          f"the same daily infections: {same}")
    print("day | infectious agents | native ms | torch ops ms")
    for d, (a, b, m) in enumerate(zip(best[True], best[False], sources)):
        print(f"{d} | {m} | {a:.2f} | {b:.2f}")
    print(f"mean per day: native {mean[True]:.2f} ms, torch ops {mean[False]:.2f} ms, "
          f"difference {mean[True] - mean[False]:+.2f} ms")
    out = dict(agents=env.num_agents, days=args.days, runs=args.runs, threads=args.threads,
               same_daily_infections=same, infectious_per_day=sources,
               native_ms_per_day=[round(x, 3) for x in best[True]], torch_ms_per_day=[round(x, 3) for x in best[False]],
               native_mean_ms=round(mean[True], 3), torch_mean_ms=round(mean[False], 3),
               difference_ms_per_day=round(mean[True] - mean[False], 3))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()

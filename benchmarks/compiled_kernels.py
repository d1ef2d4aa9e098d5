"""Side by side: the NYC covid forward step with its random numbers drawn three ways, interleaved in one process
so all see the same machine load: the native CPU kernels (the default), the opt-in fused kernels (``torch.compile``,
``AGENTTENSOR_COMPILE=1``) and eager torch ops, the last two with the native kernels off
(``AGENTTENSOR_NATIVE_KERNELS=0``, which also turns off the other native kernels); checks that all three give
identical results.

    python benchmarks/compiled_kernels.py [--scale 1] [--steps 14] [--repeats 3] [--threads 2]

Prints a table and writes benchmarks/results/compiled_kernels.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch

import agenttensor as at
from agenttensor import Intervention, rng
from models.covid.model import MODEL, CovidParams

START = dt.date(2020, 3, 2)
SCENARIO = [Intervention("school_closure", 0, 400, 1.0, ages=(11, 17)), Intervention("workplace_closure", 0, 400, 0.3),
            Intervention("transmission_reduction", 0, 400, 0.2, layer="community")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from populations.nyc import load_or_build

    population = load_or_build(f"populations/built/nyc_scale{args.scale:g}", scale=args.scale)
    env = MODEL.setup(population, CovidParams().as_tensors(), "cpu")
    del population
    params = CovidParams(initial_prevalence=1e-3)

    def run():
        return at.simulate(MODEL, None, params, steps=args.steps, seeds=[0], env=env, start_date=START,
                           progress=False, interventions=SCENARIO)

    t0 = time.perf_counter()
    os.environ["AGENTTENSOR_COMPILE"], os.environ["AGENTTENSOR_NATIVE_KERNELS"] = "1", "0"
    run()
    compiled_ok = rng.uniform_kernel.off is None
    compile_seconds = time.perf_counter() - t0
    modes = ("native", "eager", "compiled")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    outputs = {}
    for _ in range(args.repeats):
        for mode in modes:
            os.environ["AGENTTENSOR_NATIVE_KERNELS"] = "1" if mode == "native" else "0"
            os.environ["AGENTTENSOR_COMPILE"] = "1" if mode == "compiled" else "0"
            result = run()
            times[mode].append(result.timing["seconds_per_step"])
            outputs[mode] = result["new_infections"].clone()
    os.environ["AGENTTENSOR_NATIVE_KERNELS"], os.environ["AGENTTENSOR_COMPILE"] = "1", "0"
    identical = all(torch.equal(outputs["native"], outputs[mode]) for mode in modes)
    best = {k: min(v) for k, v in times.items()}
    out = dict(agents=env.num_agents, steps=args.steps, threads=args.threads, compiled_available=compiled_ok,
               seconds_per_day=times, best_seconds_per_day=best, speedup=best["eager"] / best["compiled"],
               first_compile_and_run_seconds=compile_seconds, identical_results=identical,
               torch=torch.__version__, load_average=os.getloadavg())
    print(f"{env.num_agents:,} agents, {args.threads} threads: native kernels {best['native']:.3f} s/day; kernels off: "
          f"eager {best['eager']:.3f} s/day, compiled kernels {best['compiled']:.3f} s/day "
          f"({out['speedup']:.2f}x), identical={identical}, compile+first run {compile_seconds:.0f} s, "
          f"load {os.getloadavg()[0]:.2f}")
    path = Path(__file__).resolve().parent / "results" / "compiled_kernels.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

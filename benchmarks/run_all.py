"""Run every benchmark in turn (each prints its table and writes JSON to benchmarks/results/).

    python benchmarks/run_all.py [--quick] [--only engine_seir,covid_step,...]

--quick uses small sizes (a smoke run, minutes); the default sizes are the ones quoted in the README
(full NYC and 8.5M agents: expect tens of minutes on a 2-core machine). Covasim is installed into its
own venv (benchmarks/.covasim-venv) on first use.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "engine_seir": ["--sizes", "1000000,8500000"],
    "covid_step": ["--sizes", "1000000", "--nyc", "--agenttorch", "--threads", "2"],
    "compiled_kernels": [],
    "calibration_epoch_nyc": [],
    "archetype_step": [],
    "population_build": [],
    "scenario_batch": [],
    "calibration_epoch": [],
    "covasim_side_by_side": [],
    "instructions_per_day": ["--simulate"],
    "stream_floor": [],
    "native_calls": [],
    "ab_source_totals": [],
    "device_path_day": [],
}
NEEDS = {"instructions_per_day": "valgrind"}  # skipped, with a note, where this tool is not on PATH
QUICK = {
    "engine_seir": ["--sizes", "100000", "--steps", "5"],
    "covid_step": ["--sizes", "100000", "--threads", "2"],
    "covasim_side_by_side": ["--n", "50000"],
    "stream_floor": ["--agents", "1000000", "--passes-days", "0",
                     "--out", str(HERE / "results" / "stream_floor_quick.json")],
    "native_calls": ["--scale", "0.05", "--days", "7", "--out", str(HERE / "results" / "native_calls_quick.json")],
    "ab_source_totals": ["--scale", "0.05", "--days", "7", "--runs", "1",
                         "--out", str(HERE / "results" / "ab_source_totals_quick.json")],
    "device_path_day": ["--large", "100000", "--pairs", "1",
                        "--out", str(HERE / "results" / "device_path_day_quick.json")],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(FULL)
    failed = []
    for name in names:
        extra = QUICK.get(name, FULL[name]) if args.quick else FULL[name]
        if args.quick and name not in QUICK:
            continue
        if name in NEEDS and not shutil.which(NEEDS[name]):
            print(f"\n=== {name}: skipped (needs {NEEDS[name]})", flush=True)
            continue
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra])
        print(f"=== {name}: exit {code}, {time.perf_counter() - t0:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

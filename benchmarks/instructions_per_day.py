"""Instructions per simulated day of the NYC COVID model's hard forward at small N, counted by callgrind: a measure of
the per-day fixed costs (Python, torch dispatch) that this VM's ±30–50 % swings in speed do not blur. Two runs of one
tree differ by ~0.1 %, so two trees (or two commits) compare directly.

    python benchmarks/instructions_per_day.py [--agents 2000,37518] [--simulate] [--breakdown]

Each size runs in a child process under ``valgrind --tool=callgrind`` with instrumentation off until a 28-day warm-up
has run; one 28-day run is then counted (the benchmark's loop, `covid_step.timed_steps`, init and schedule included;
with --simulate also one `agenttensor.simulate` of 28 days: its recorder and results too), one torch thread.
--breakdown splits the benchmark loop's count by substep, from more counted runs: each substep that returns a new
state (infection pressure, behaviour, labour market) run twice a day (the extra instructions are its own), the metrics
left out (a run without them), and a run with neither substeps nor metrics (the loop itself: contexts, init and the
schedule, per day); the transition, which updates the state in place, is what remains. Needs
valgrind and its headers (``apt-get install valgrind``) and a C compiler. Prints a table and writes
benchmarks/results/instructions_per_day.json.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DAYS = 28
CONTROL = """#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def child(agents: int, mode: str, control: str) -> None:
    """Under callgrind: a warm-up, then one counted run of ``mode`` ("timed_steps" or "simulate")."""
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
    import torch

    torch.set_num_threads(1)
    import agenttensor as at
    from covid_step import MODEL, SCENARIO, START, CovidParams, timed_steps

    import covid_step

    env = MODEL.setup(at.synthetic(agents, seed=0), CovidParams().as_tensors("cpu"), "cpu")
    params = CovidParams(initial_prevalence=1e-3).as_tensors("cpu")
    covid_step.MODEL = variant(MODEL, mode)  # (the model `timed_steps` runs)

    def run() -> None:
        if mode == "simulate":
            at.simulate(MODEL, params=params, env=env, steps=DAYS, start_date=START, interventions=SCENARIO,
                        progress=False)
        else:
            timed_steps(env, params, at.Hard(), DAYS)

    run()  # warm-up: kernels built and loaded, caches filled
    library = ctypes.CDLL(control)
    library.start()
    run()
    library.stop()


TWICE = ("infection_pressure", "behaviour", "labour_market")  # substeps that return a new state: run twice, the same


def variant(model, mode: str):
    """The model for a --breakdown run: "twice:<substep>" runs that substep twice a step, "no_metrics" reports none,
    "loop_only" has neither substeps nor metrics; any other mode: the model itself."""
    def no_metrics(*args):
        return {}

    if mode.startswith("twice:"):
        name = mode.split(":", 1)[1]

        def twice(fn):
            def run(state, params, ctx):
                fn(state, params, ctx)
                return fn(state, params, ctx)
            return run

        return dataclasses.replace(model, substeps=[dataclasses.replace(s, fn=twice(s.fn)) if s.fn.__name__ == name
                                                    else s for s in model.substeps])
    if mode == "no_metrics":
        return dataclasses.replace(model, metrics=no_metrics)
    if mode == "loop_only":
        return dataclasses.replace(model, substeps=[], metrics=no_metrics)
    return model


def count(agents: int, mode: str, control: str) -> int:
    """Instructions of one counted run (callgrind's "Collected")."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
                               f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, __file__, "--child",
                               str(agents), mode, control], capture_output=True, text=True)
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise SystemExit(f"callgrind run failed ({agents} agents, {mode}): {done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", default="2000,37518")
    parser.add_argument("--simulate", action="store_true", help="also count a run through agenttensor.simulate")
    parser.add_argument("--breakdown", action="store_true", help="also split the loop's count by substep")
    parser.add_argument("--out", default="benchmarks/results/instructions_per_day.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.child[2])
        return
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not shutil.which("valgrind") or not compiler:
        raise SystemExit("needs valgrind (with its headers: apt-get install valgrind) and a C compiler")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        control = f"{tmp}/libcontrol.so"
        (Path(tmp) / "control.c").write_text(CONTROL)
        built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", control, f"{tmp}/control.c"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"could not build the callgrind control library (valgrind's headers?): {built.stderr}")
        for agents in [int(float(x)) for x in args.agents.split(",") if x]:
            for mode in ("timed_steps", "simulate") if args.simulate else ("timed_steps",):
                total = count(agents, mode, control)
                rows.append(dict(agents=agents, loop=mode, days=DAYS, instructions=total,
                                 instructions_per_day=round(total / DAYS)))
                print(rows[-1], flush=True)
            if args.breakdown:
                loop = next(r for r in rows if r["agents"] == agents and r["loop"] == "timed_steps")
                total = loop["instructions"]
                parts = {name: count(agents, f"twice:{name}", control) - total for name in TWICE}
                parts["metrics"] = total - count(agents, "no_metrics", control)
                parts["loop (contexts, init, schedule)"] = count(agents, "loop_only", control)
                parts = {"progress (the remainder)": total - sum(parts.values()), **parts}
                loop["breakdown_per_day"] = {k: round(v / DAYS) for k, v in parts.items()}
                print(dict(agents=agents, breakdown_per_day=loop["breakdown_per_day"]), flush=True)
    print("agents | loop | instructions per day")
    for row in rows:
        print(f"{row['agents']:,} | {row['loop']} | {row['instructions_per_day']:,}")
        for name, value in row.get("breakdown_per_day", {}).items():
            print(f"  {name}: {value:,}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out.write_text(json.dumps(dict(benchmark="instructions_per_day", rows=rows, commit=commit,
                                   machine=platform.processor() or platform.machine(),
                                   python=platform.python_version()), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Where a simulated day's time goes, call by call: every native kernel's entry point timed in a hard forward window, a
gradient forward window and its backward pass.

    python benchmarks/native_calls.py [--scale 1] [--days 28] [--threads 2] [--top 16]

Each kernel library the model loads (agenttensor's group, event, random-number and selection kernels; the covid model's
hard, shadow, contributions, exits and labour kernels) has its ctypes entry points wrapped by a timer, after a warm-up
window of each mode (a backward included). Then one window of each mode runs on the NYC population: the table gives, per
mode, the window's wall time per day, the part spent inside native calls and the rest (torch ops and Python), and the
slowest entry points with their calls per day and time per call. A pass whose time per call is far above what its bytes
need at this machine's streaming speed (`stream_floor.py`) is the one to look at: this is how the thirty-second round's
labour market backward (28-45 ms a weekly call for ~22 bytes per agent: its loop was not vectorised) was found.

The wrappers only time: the runs' numbers are the unwrapped ones (tests/test_native_calls.py).

Prints the tables and writes benchmarks/results/native_calls.json.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agenttensor import Hard, StraightThrough, _cpu_cache  # noqa: E402
from covid_step import MODEL, CovidParams, timed_steps  # noqa: E402

MODULES = ("agenttensor._event_kernels", "agenttensor._group_kernels", "agenttensor._rng_kernels", "agenttensor.select",
           "models.covid.contributions_native", "models.covid.exits_native", "models.covid.hard_native",
           "models.covid.labour_native", "models.covid.shadow_native")
LEARN = ("transmission_scale", "transmission_multiplier", "household_weight", "community_weight", "detection_rate")


class _Timed:
    """A ctypes function with a timer: called, it times the call; where code takes the function's address instead
    (``ctypes.cast(f, c_void_p)``, e.g. the hard force's plan, which calls the layered force through a pointer), it
    converts to the original's (those calls are then not timed)."""

    def __init__(self, timer: "NativeTimer", entry: str, function):
        self.timer, self.entry, self.function = timer, entry, function
        self.argtypes, self.restype = function.argtypes, function.restype
        self._as_parameter_ = ctypes.cast(function, ctypes.c_void_p)

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.function(*args)
        finally:
            self.timer.seconds[self.entry] += time.perf_counter() - start
            self.timer.calls[self.entry] += 1


class NativeTimer:
    """Wraps every ``agenttensor_*`` entry point of the loaded kernel libraries (their ctypes functions replaced on
    the library objects, which the modules call through) with a wall-clock timer; `restore` puts them back."""

    def __init__(self, modules=MODULES):
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self._originals: list[tuple[ctypes.CDLL, str, object]] = []
        for name in modules:
            library = importlib.import_module(name)._library()
            if library is None:
                continue
            for entry in [n for n in vars(library) if n.startswith("agenttensor_")]:
                function = getattr(library, entry)
                if isinstance(function, ctypes._CFuncPtr):
                    self._originals.append((library, entry, function))
                    setattr(library, entry, _Timed(self, entry, function))

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def restore(self) -> None:
        for library, entry, function in self._originals:
            setattr(library, entry, function)
        self._originals.clear()


def window(env, days: int, mode: str, learn, params, timer: NativeTimer, top: int) -> dict:
    """One window of `mode` ('hard', 'gradient forward' or 'backward'), its time per day split into native calls
    (the `top` slowest entry points listed) and the rest."""
    for name in LEARN:
        getattr(learn, name).grad = None
    timer.clear()
    if mode == "hard":
        wall = timed_steps(env, params, Hard(), days)[0]
    else:
        wall, _, (_, records) = timed_steps(env, learn, StraightThrough(), days)
        if mode == "backward":
            loss = sum(r["new_infections"].sum() + r["reported_cases"].sum() + r["hospital_admissions"].sum()
                       for r in records)
            timer.clear()
            start = time.perf_counter()
            loss.backward()
            wall = time.perf_counter() - start
    native = sum(timer.seconds.values())
    calls = [dict(entry=entry, ms_per_day=round(seconds / days * 1e3, 3),
                  calls_per_day=round(timer.calls[entry] / days, 2),
                  ms_per_call=round(seconds / timer.calls[entry] * 1e3, 3))
             for entry, seconds in timer.seconds.most_common(top)]
    return dict(mode=mode, ms_per_day=round(wall / days * 1e3, 2), native_ms_per_day=round(native / days * 1e3, 2),
                rest_ms_per_day=round((wall - native) / days * 1e3, 2), calls=calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="the NYC population's scale (1: full NYC)")
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=16, help="entry points listed per mode")
    parser.add_argument("--population", type=Path, default=None,
                        help="a built population's folder (default populations/built/nyc_scale<scale>)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "native_calls.json")
    args = parser.parse_args()
    if args.days < 1 or args.scale <= 0:
        parser.error("--days must be at least 1 and --scale positive")
    torch.set_num_threads(args.threads)
    from populations.nyc import load_or_build

    folder = args.population or ROOT / "populations" / "built" / f"nyc_scale{args.scale:g}"
    population = load_or_build(str(folder), scale=args.scale, boroughs=None, seed=0)
    env = MODEL.setup(population, CovidParams().as_tensors("cpu"), torch.device("cpu"))
    params = CovidParams(initial_prevalence=1e-3).as_tensors("cpu")
    learn = CovidParams(initial_prevalence=1e-3, transmission_multiplier=torch.ones(max(1, args.days // 7 + 1)))
    learn = learn.as_tensors("cpu", learn=LEARN)
    _cpu_cache.enable_for(env.num_agents, torch.device("cpu"))  # as `simulate` does for gradient runs
    timed_steps(env, params, Hard(), args.days)  # warm-ups (kernels built, caches filled, as covid_step.py's): a
    records = timed_steps(env, learn, StraightThrough(), args.days)[2][1]  # first backward's fresh memory took 3x
    sum(r["new_infections"].sum() for r in records).backward()
    del records
    timer = NativeTimer()
    try:
        rows = [window(env, args.days, mode, learn, params, timer, args.top)
                for mode in ("hard", "gradient forward", "backward")]
    finally:
        timer.restore()
    for row in rows:
        print(f"\n{row['mode']}: {row['ms_per_day']} ms/day = native {row['native_ms_per_day']} + torch ops and Python "
              f"{row['rest_ms_per_day']}")
        print("ms/day | calls/day | ms/call | entry point")
        for call in row["calls"]:
            print(f"{call['ms_per_day']:6.2f} | {call['calls_per_day']:5.2f} | {call['ms_per_call']:7.2f} | "
                  f"{call['entry']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(agents=env.num_agents, days=args.days, threads=args.threads,
                                        machine=platform.processor() or platform.machine(), windows=rows), indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Seconds per simulated day of the NYC COVID-19 model (models/covid), forward (hard mode) and
forward+backward (StraightThrough, gradients to β and the weekly multiplier), at 0.1M and 1M
synthetic agents and at full NYC when the population builder is available.

    python benchmarks/covid_step.py [--sizes 100000,1000000] [--nyc] [--threads 1,2] [--without-native] [--repeats 2]

Each figure is the fastest of --repeats timed runs after a warm-up run (every run is in the JSON).

Both modes run 28 days (--fwd-steps, --bwd-steps): equal horizons, and long enough for the gradient's steady state.
In a 7-day window (this benchmark's gradient window until the twenty-second round) most of the derivative paths
are not yet live: no parameter reaches the infectious memberships before the latent period has passed, the weekly
decision and labour-market days (day 7 on) are outside it, and the last day's backward pass, which is cheap, is one
day in seven. Full NYC, one process, alternating: 7-day windows 2.8–3.1× the hard forward, 28-day windows 3.6–3.8×.

Gradient runs of 1M+ agents use the caching CPU allocator as `simulate` does (agenttensor/_cpu_cache.py;
AGENTTENSOR_CPU_CACHE=0 turns it off for a comparison). --without-native measures every size a second time
with the native CPU kernels off (agenttensor/native.py), in the same process, right after.

Prints a table and writes benchmarks/results/covid_step.json (covid_step_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import agenttensor as at
from agenttensor import Hard, Intervention, Randomness, StraightThrough
from agenttensor import _cpu_cache
from agenttensor._malloc import heap_only
from agenttensor.interventions import compile_schedule
from agenttensor.model import StepContext
from models.covid.model import MODEL, CovidParams

AGENTTORCH_SMALL = 37_518  # AgentTorch's small reference population (issue #8)
BATCH = 16
START = dt.date(2020, 3, 2)  # a Monday: every layer is active on the first days
SCENARIO = [Intervention("school_closure", 0, 400, 1.0, ages=(11, 17)),  # step numbers: active from day 0
            Intervention("workplace_closure", 0, 400, 0.3),
            Intervention("transmission_reduction", 0, 400, 0.2, layer="community")]


def native_kernels_built() -> bool:
    """Whether the native CPU kernels (agenttensor/native.py) are on and every one this process asked for built (one
    that failed to compile would fall back to torch ops: slower, and not what the row claims)."""
    from agenttensor import _group_kernels, native

    return _group_kernels.enabled() and all(native.status().values())


def env_bytes(env) -> int:
    """Bytes of the environment's tensors, its group layers, what `CovidEnv.memo` holds (per-agent lever
    values, closed workplaces, susceptibility: filled during the run) and the native force's table buffers."""
    total = 0
    for value in vars(env).values():
        tensors = [value] if isinstance(value, torch.Tensor) else \
            [getattr(value, k) for k in ("slot", "group_size", "inv_others")] if isinstance(value, at.GroupLayer) else []
        total += sum(t.numel() * t.element_size() for t in tensors)
    for _, result, *_ in getattr(env, "cache", {}).values():
        results = result if isinstance(result, tuple) else (result,)
        total += sum(t.numel() * t.element_size() for t in results if isinstance(t, torch.Tensor))
    buffers = getattr(env, "native", {}).get("hard_force_tables", {})  # the native force's tables (kept buffers)
    total += sum(t.numel() * t.element_size() for t in buffers.values())
    return total


def seconds(x: float) -> float:
    """A time to 4 significant digits (1.3 ms/day was 0.0013: ±4 % in the AgentTorch ratio from rounding alone)."""
    return float(f"{x:.4g}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a timer must not stop before them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(env, params, sampler, steps: int, seeds=(0,)) -> tuple[float, float, object]:
    """Init, then time `steps` model steps (wall and process CPU seconds, init excluded). -> (wall, cpu, records)."""
    device = env.agent_ids.device
    rng = Randomness.for_agents(list(seeds), env.agent_ids).to(device)
    schedule = compile_schedule([SCENARIO] * len(seeds), levers=MODEL.levers, steps=steps, start_date=START,
                                group_labels=env.group_labels, age_band_edges=MODEL.age_band_edges).to(device)
    owner = None if os.environ.get("AGENTTENSOR_DONATE") == "0" else object()  # as `simulate` does (A/B: 0 = off)
    state = MODEL.init(env, params, StepContext(step=0, env=env, rng=rng, sampler=sampler, start_date=START,
                                                schedule=schedule, donate=owner))
    records = []
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.nullcontext() if sampler.differentiable or device.type != "cpu" else heap_only():  # as `simulate` does
        for t in range(steps):
            ctx = StepContext(step=t, env=env, rng=rng, sampler=sampler, start_date=START, schedule=schedule,
                              donate=owner)
            state, record = MODEL.step(state, params, ctx)
            records.append(record)
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, (state, records)


def measure(name: str, population, fwd_steps: int, bwd_steps: int, repeats: int = 2, device: str = "cpu",
            pairs: int = 0) -> dict:
    """One population's row: forward and forward+backward seconds per day, each the fastest of `repeats`
    timed runs (after a warm-up run), and memory (on CUDA: the peak of torch's allocator). ``pairs``: then that many
    (hard forward, forward+backward) pairs run back to back, and the median of their ratios (robust to a machine
    whose speed drifts between runs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    env = MODEL.setup(population, CovidParams().as_tensors(device), device)
    synchronize(device)
    setup_s = time.perf_counter() - t0
    params = CovidParams(initial_prevalence=1e-3).as_tensors(device)
    timed_steps(env, params, Hard(), 2)  # warm-up
    runs = [timed_steps(env, params, Hard(), fwd_steps) for _ in range(repeats)]
    wall, cpu, (state, _) = min(runs, key=lambda run: run[0])
    forward, forward_cpu = wall / fwd_steps, cpu / fwd_steps
    forward_runs = [seconds(run[0] / fwd_steps) for run in runs]
    del runs
    env_size = env_bytes(env)  # one seed's memoised values included (before the batch below replaces them)
    batch = {}
    if env.num_agents == AGENTTORCH_SMALL or device.type == "cuda":  # a day's fixed cost (Python, kernel launches)
        timed_steps(env, params, Hard(), 2, seeds=range(BATCH))          # shared by a batch of seeds
        batch_wall = min(timed_steps(env, params, Hard(), fwd_steps, seeds=range(BATCH))[0] for _ in range(repeats))
        batch = dict(batch_seeds=BATCH, forward_s_per_day_per_run_in_batch=seconds(batch_wall / fwd_steps / BATCH))
    row = dict(population=name, agents=env.num_agents, setup_s=round(setup_s, 2), fwd_steps=fwd_steps,
               forward_s_per_day=seconds(forward), forward_cpu_s_per_day=seconds(forward_cpu),
               forward_runs_s_per_day=forward_runs,
               state_bytes_per_agent=round(state.nbytes() / env.num_agents, 2),
               env_bytes_per_agent=round(env_size / env.num_agents, 2), **batch)
    if bwd_steps:
        learn = CovidParams(initial_prevalence=1e-3, transmission_multiplier=torch.ones(max(1, bwd_steps // 7 + 1)))
        names = ("transmission_scale", "transmission_multiplier", "household_weight", "community_weight", "detection_rate")
        learn = learn.as_tensors(device, learn=names)
        _cpu_cache.enable_for(env.num_agents, device)  # as `simulate` does for gradient runs (AGENTTENSOR_CPU_CACHE=0: off)
        _, _, (_, warm) = timed_steps(env, learn, StraightThrough(), bwd_steps)  # warm-up: steady state, as in a calibration
        sum(r["new_infections"].sum() for r in warm).backward()
        for name in names:
            getattr(learn, name).grad = None
        del warm
        def forward_backward() -> tuple[float, float, float]:  # s/day: (wall, cpu, the gradient forward's wall)
            for name in names:
                getattr(learn, name).grad = None
            wall, cpu, (_, records) = timed_steps(env, learn, StraightThrough(), bwd_steps)
            t1, cpu1 = time.perf_counter(), time.process_time()
            loss = sum(r["new_infections"].sum() + r["reported_cases"].sum() + r["hospital_admissions"].sum()
                       for r in records)
            loss.backward()
            synchronize(device)
            del records, loss
            return ((wall + time.perf_counter() - t1) / bwd_steps, (cpu + time.process_time() - cpu1) / bwd_steps,
                    wall / bwd_steps)

        runs = [forward_backward() for _ in range(repeats)]
        both, both_cpu, gradient_forward = min(runs)
        if pairs:  # adjacent hard and gradient runs, alternating: each pair's ratio sees the same machine speed
            ratios = []
            for _ in range(pairs):
                hard_s = timed_steps(env, params, Hard(), fwd_steps)[0] / fwd_steps
                ratios.append(forward_backward()[0] / hard_s)
            row.update(pair_ratios=[round(r, 2) for r in ratios], pair_ratio_median=round(statistics.median(ratios), 2))
        row.update(bwd_steps=bwd_steps, forward_backward_s_per_day=seconds(both),
                   forward_backward_runs_s_per_day=[seconds(run[0]) for run in runs],
                   gradient_forward_s_per_day=seconds(gradient_forward),
                   forward_backward_cpu_s_per_day=seconds(both_cpu), ratio_to_forward=round(both / forward, 2),
                   cpu_ratio_to_forward=round(both_cpu / forward_cpu, 2),
                   grad_transmission_scale=float(learn.transmission_scale.grad), cpu_cache=_cpu_cache.stats())
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if device.type == "cuda":
        row.update(device=torch.cuda.get_device_name(device),
                   peak_gpu_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--nyc", action="store_true", help="also full NYC (builds populations/built/nyc_scale1 once)")
    parser.add_argument("--agenttorch", action="store_true",
                        help="also the sizes of AgentTorch's reference figures (37,518 agents; Brooklyn, 2.7M) and the ratios")
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts to measure, e.g. 1,2")
    parser.add_argument("--fwd-steps", type=int, default=28, help="days of each hard forward run")
    parser.add_argument("--bwd-steps", type=int, default=28,
                        help="days of each forward+backward run (see the module docstring: shorter windows leave "
                             "derivative paths out and understate the per-day cost)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per measurement after the warm-up; the fastest is reported (all are in the JSON)")
    parser.add_argument("--pairs", type=int, default=0,
                        help="also run this many (hard forward, forward+backward) pairs back to back per size and report "
                             "the median of the pairs' ratios (pair_ratio_median)")
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/covid_step.json, covid_step_cuda.json on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda --threads and --without-native are ignored)")
    parser.add_argument("--without-native", action="store_true",
                        help="also measure each size with the native CPU kernels off (AGENTTENSOR_NATIVE_KERNELS=0), "
                             "right after the measurement with them on")
    args = parser.parse_args()
    args.out = args.out or ("benchmarks/results/covid_step_cuda.json" if torch.device(args.device).type == "cuda"
                            else "benchmarks/results/covid_step.json")
    rows = []
    populations = [(f"synthetic:{n}", lambda n=n: at.synthetic(n, seed=0)) for n in
                   [int(float(x)) for x in args.sizes.split(",") if x]]
    if args.nyc:
        from populations.nyc import load_or_build

        populations.append(("NYC full (populations.nyc, scale 1)",
                            lambda: load_or_build("populations/built/nyc_scale1", scale=1.0, boroughs=None, seed=0)))
    if args.agenttorch:
        from populations.nyc import load_or_build

        populations.insert(0, (f"synthetic:{AGENTTORCH_SMALL}", lambda: at.synthetic(AGENTTORCH_SMALL, seed=0)))
        populations.append(("NYC Brooklyn (populations.nyc, scale 1)",
                            lambda: load_or_build("populations/built/nyc_brooklyn", scale=1.0, boroughs="BK", seed=0)))
    on_cpu = torch.device(args.device).type == "cpu"
    for name, make in populations:
        population = make()
        for threads in [int(x) for x in args.threads.split(",")] if on_cpu else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            for native in (True, False) if args.without_native and on_cpu else (on_cpu,):
                os.environ["AGENTTENSOR_NATIVE_KERNELS"] = "1" if native else "0"  # read at every kernel call
                rows.append(dict(measure(name, population, args.fwd_steps, args.bwd_steps, args.repeats, args.device,
                                         args.pairs if native else 0),  # (the pairs: the shipped path's ratio)
                                 threads=threads, native_kernels=native and native_kernels_built()))
                print(rows[-1], flush=True)
            os.environ.pop("AGENTTENSOR_NATIVE_KERNELS", None)
        del population
    header = ("population", "agents", "threads", "native_kernels", "forward_s_per_day", "forward_cpu_s_per_day",
              "gradient_forward_s_per_day", "forward_backward_s_per_day", "ratio_to_forward", "pair_ratio_median",
              "forward_backward_cpu_s_per_day", "cpu_ratio_to_forward",
              "state_bytes_per_agent", "env_bytes_per_agent", "peak_rss_gb")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in header))
    reference = {AGENTTORCH_SMALL: 0.047, "Brooklyn": 11.2}  # AgentTorch 0.6.0 s/day, from issue #8 (not rerun here)
    agenttorch = []
    for row in rows:
        if not row["native_kernels"] and args.without_native:
            continue
        ref = reference.get(row["agents"]) or (reference["Brooklyn"] if "Brooklyn" in row["population"] else None)
        if ref:
            runs = row["forward_runs_s_per_day"]  # (the median run too: this VM's speed swings between runs)
            agenttorch.append(dict(population=row["population"], agents=row["agents"], threads=row["threads"],
                                   agenttorch_s_per_day=ref, agenttensor_s_per_day=row["forward_s_per_day"],
                                   speedup=round(ref / row["forward_s_per_day"], 1),
                                   speedup_of_median_run=round(ref / statistics.median(runs), 1)))
            if "forward_s_per_day_per_run_in_batch" in row:
                agenttorch[-1]["speedup_per_run_in_batch_of_16"] = round(ref / row["forward_s_per_day_per_run_in_batch"], 1)
            print(f"vs AgentTorch at {row['agents']:,} agents ({row['threads']} threads): {agenttorch[-1]['speedup']}x"
                  f" (median run: {agenttorch[-1]['speedup_of_median_run']}x)"
                  + (f"; per run in a batch of {BATCH} seeds: {agenttorch[-1]['speedup_per_run_in_batch_of_16']}x"
                     if "speedup_per_run_in_batch_of_16" in agenttorch[-1] else ""))
    from agenttensor import native

    built = native.status()
    if on_cpu and not all(built.values()):
        print(f"WARNING: native kernels that did not build (their torch ops ran instead): "
              f"{sorted(k for k, ok in built.items() if not ok)}", flush=True)
    out = dict(benchmark="covid_step", rows=rows, agenttorch_reference=agenttorch, torch=torch.__version__,
               native_libraries=built,
               malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
               python=platform.python_version(), cpu_count=os.cpu_count(), load_average=os.getloadavg(),
               date=time.strftime("%Y-%m-%dT%H:%M:%S"),
               note="*_s_per_day: wall clock; *_cpu_s_per_day: process CPU time (robust on a shared machine; equals wall "
                    "time on an idle machine with --threads 1); init excluded; each the fastest of --repeats timed runs after a warm-up run "
                    "(all runs in *_runs_s_per_day). hard-mode forward and StraightThrough forward+backward (gradients to 5 parameters incl. the "
                    "weekly multiplier); scenario with school/workplace closures and masks; shared machine, see load")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Scenario batches: B scenarios×seeds in one pass vs B separate runs, and memory per batch element.

    python benchmarks/scenario_batch.py [--agents 1000000] [--batch 16] [--days 15] [--model models/seir]
    python benchmarks/scenario_batch.py --model models/covid --agents 100000 --days 7 \
        --out benchmarks/results/scenario_batch_covid.json

- timing, in one process and interleaved (one pass, then the B separate runs, three times; the
  minimum of each arm), so both arms see the same machine load:
  ``batched`` = `run_scenarios` with 4 scenarios (transmission overrides, one time-varying) × B/4
  seeds as one batch; ``separate`` = the same B runs as B calls of `simulate` with one seed each,
  sharing one prebuilt environment (the most favourable case for separate runs; each is checked
  bit-identical to its batch element), plus the setup a separate CLI run would pay each time;
- memory per batch element = (peak RSS at B − peak RSS at B = 1) / (B − 1), each in a fresh
  subprocess running 3 days.

Prints a table and writes benchmarks/results/scenario_batch.json. Results are checked to be
bit-identical between the batched and separate runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scenarios_for(batch: int, params):
    """Four scenarios: baseline, two transmission levels, distancing from day 7 (a time-varying override)."""
    from agenttensor.scenarios import Scenario

    name = "R0" if "R0" in params.spec() else "transmission_scale"
    value = float(getattr(params, name))
    period = params.spec()["transmission_multiplier"].metadata.get("period", 1)
    four = [Scenario("baseline"), Scenario(f"{name} × 0.8", overrides={name: 0.8 * value}),
            Scenario("distancing from day 7", overrides={"transmission_multiplier": [1.0] * (7 // period) + [0.6]}),
            Scenario(f"{name} × 1.2", overrides={name: 1.2 * value})]
    k = min(4, batch)
    return four[:k], max(1, batch // k)


def worker(mode: str, model_dir: str, agents: int, batch: int, days: int) -> dict:
    import torch

    from agenttensor import simulate, synthetic
    from agenttensor.loading import load_model
    from agenttensor.scenarios import run_scenarios, scenario_params

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_dir)
    t0 = time.perf_counter()
    population = synthetic(agents, seed=0)
    population_seconds = time.perf_counter() - t0
    base = model.params_type()
    if "initial_infected" in base.spec():
        base = base.replace(initial_infected=max(10, agents // 10_000))
    t0 = time.perf_counter()
    env = model.setup(population, base.as_tensors("cpu"), "cpu")
    setup_seconds = time.perf_counter() - t0
    scenarios, seeds_per = scenarios_for(batch, base)
    seeds = list(range(seeds_per))
    if mode == "timing":
        return timing(model, env, base, scenarios, seeds, days, repeats=3) | dict(
            agents=agents, batch=len(scenarios) * len(seeds), days=days, setup_seconds=setup_seconds,
            population_seconds=population_seconds)
    t0 = time.perf_counter()
    finals = []
    if mode == "batched":
        res = run_scenarios(model, None, scenarios, seeds=seeds, steps=days, params=base, env=env, progress=False)
        for s in scenarios:
            finals.append(res.metrics[s.name]["new_infections"].sum(0).tolist())
    else:
        for s in scenarios:
            p = scenario_params(base, s)
            row = []
            for seed in seeds:
                r = simulate(model, None, p, steps=days, seeds=[seed], env=env, progress=False)
                row.append(int(r["new_infections"][:, 0].sum()))
            finals.append(row)
    run_seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return dict(mode=mode, agents=agents, batch=len(scenarios) * len(seeds), days=days, run_seconds=run_seconds,
                setup_seconds=setup_seconds, population_seconds=population_seconds, peak_rss_bytes=peak,
                finals=finals)


def timing(model, env, base, scenarios, seeds, days, repeats: int) -> dict:
    """Interleaved in one process: (one pass of B, then the B separate runs) × repeats, so both
    arms see the same machine load; the minimum over repeats is reported for each arm."""
    from agenttensor import simulate
    from agenttensor.scenarios import run_scenarios, scenario_params

    batched, separate, identical = [], [], True
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run_scenarios(model, None, scenarios, seeds=seeds, steps=days, params=base, env=env, progress=False)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in scenarios:
            p = scenario_params(base, s)
            for k, seed in enumerate(seeds):
                r = simulate(model, None, p, steps=days, seeds=[seed], env=env, progress=False)
                identical &= bool((r["new_infections"][:, 0] == res.metrics[s.name]["new_infections"][:, k]).all())
        separate.append(time.perf_counter() - t0)
    return dict(mode="timing", batched_seconds=batched, separate_seconds=separate, bit_identical=identical,
                run_seconds=min(batched))


def run_worker(*args) -> dict:
    cmd = [sys.executable, __file__, "--worker", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--days", type=int, default=15)
    ap.add_argument("--model", default="models/seir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scenario_batch.json"))
    ap.add_argument("--worker", nargs=5, metavar=("MODE", "MODEL", "AGENTS", "BATCH", "DAYS"))
    args = ap.parse_args()
    if args.worker:
        mode, model, agents, batch, days = args.worker
        print(json.dumps(worker(mode, model, int(agents), int(batch), int(days))))
        return
    load_before = os.getloadavg()
    times = run_worker("timing", args.model, args.agents, args.batch, args.days)
    memory_days = min(args.days, 3)  # peak memory is reached in the first steps
    batched = run_worker("batched", args.model, args.agents, args.batch, memory_days)
    single = run_worker("batched", args.model, args.agents, 1, memory_days)
    B = times["batch"]
    identical = times["bit_identical"]
    batched = dict(batched, run_seconds=min(times["batched_seconds"]), setup_seconds=times["setup_seconds"],
                   population_seconds=times["population_seconds"])
    separate = dict(run_seconds=min(times["separate_seconds"]), setup_seconds=times["setup_seconds"],
                    population_seconds=times["population_seconds"])
    per_element = (batched["peak_rss_bytes"] - single["peak_rss_bytes"]) / max(B - 1, 1)
    separate_with_setup = separate["run_seconds"] + B * (separate["setup_seconds"] + separate["population_seconds"])
    batched_with_setup = batched["run_seconds"] + batched["setup_seconds"] + batched["population_seconds"]
    result = dict(
        model=args.model, agents=args.agents, batch=B, days=args.days,
        batched_run_seconds=batched["run_seconds"], separate_run_seconds=separate["run_seconds"],
        speedup_run_only=separate["run_seconds"] / batched["run_seconds"],
        batched_seconds_with_setup=batched_with_setup, separate_seconds_with_setup=separate_with_setup,
        speedup_with_setup=separate_with_setup / batched_with_setup,
        agent_steps_per_second_batched=args.agents * B * args.days / batched["run_seconds"],
        agent_steps_per_second_separate=args.agents * B * args.days / separate["run_seconds"],
        setup_seconds=batched["setup_seconds"], population_seconds=batched["population_seconds"],
        peak_rss_bytes_batch=batched["peak_rss_bytes"], peak_rss_bytes_single=single["peak_rss_bytes"],
        memory_per_element_bytes=per_element, memory_per_agent_per_element_bytes=per_element / args.agents,
        batched_seconds_all=times["batched_seconds"], separate_seconds_all=times["separate_seconds"],
        bit_identical=identical,
        cpu_count=os.cpu_count(), load_average_before=load_before, load_average_after=os.getloadavg(),
        platform=platform.platform(), python=platform.python_version(),
        written_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    import torch

    result["torch"] = torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    rows = [("model", args.model), ("agents", f"{args.agents:,}"), ("batch (scenarios×seeds)", B), ("days", args.days),
            ("one pass, run s", f"{batched['run_seconds']:.1f}"), (f"{B} separate runs, run s", f"{separate['run_seconds']:.1f}"),
            ("speed-up (run only)", f"{result['speedup_run_only']:.2f}×"),
            ("one pass incl. population+setup s", f"{batched_with_setup:.1f}"),
            (f"{B} separate incl. population+setup s", f"{separate_with_setup:.1f}"),
            ("speed-up incl. setup", f"{result['speedup_with_setup']:.2f}×"),
            ("memory per batch element", f"{per_element / 2**20:.1f} MiB ({per_element / args.agents:.1f} B/agent)"),
            ("bit-identical", identical), ("load average before/after", f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f}")]
    width = max(len(str(k)) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

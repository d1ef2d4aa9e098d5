"""Scenario batches: B scenarios×seeds in one pass vs B separate runs, shared-prefix execution, the
ceiling of batching on this machine, and memory per batch element.

    python benchmarks/scenario_batch.py [--agents 1000000] [--batch 16] [--days 15] [--branch-day 8] \
        [--model models/seir] [--threads 1]
    python benchmarks/scenario_batch.py --model models/covid --agents 100000 --seeds 4 \
        --scenario-file models/covid/scenarios/prospective_winter_2021.toml \
        --out benchmarks/results/scenario_batch_prospective.json

Timing runs in one process, interleaved (every arm once, three times over; the minimum of each arm
is reported), so all arms see the same machine load; the load average is recorded. Wall-clock and
process CPU time are both recorded: with one torch thread (default) CPU time is what the run costs,
unaffected by other jobs taking turns on the cores (the wall clock is not). Cases:

- ``day0``: 4 scenarios that differ from step 0 (transmission × 0.8 / × 1.2, distancing from day 7
  as a time-varying override) × B/4 seeds. Arms: ``batched`` = `run_scenarios` (one pass; nothing to
  share) vs ``separate`` = the same B runs as B `simulate` calls with one seed each, sharing one
  prebuilt environment (the most favourable case for separate runs).
- ``midrun``: 4 scenarios identical until ``--branch-day`` (baseline, then transmission × 0.6 / 0.8
  / 1.2 from that day) × B/4 seeds. Arms: ``shared`` (run_scenarios, default: steps before the
  branch run once per seed), ``unshared`` (share_prefix=False) and ``separate``.
- ``file`` (with ``--scenario-file``): a real counterfactual file, its own days, start date and
  parameters; arms as for ``midrun``.

Every separate run and the unshared pass are checked bit-identical to the shared pass.

``ceiling``: seconds per step of plain `simulate` at N = 1e3 .. ``--agents`` for B = 1 and B =
``--batch``. At N = 1,000 a step is almost all fixed cost (Python, dispatch, per-step keys), so
o = t(1e3, 1); at the benchmark size the overhead share is f = o / t(N, 1), and no batching of
independent runs can be faster than 1 / (1 − f) per element (batching removes only the fixed cost
of B − 1 runs; the per-agent work is the same). Memory per batch element = (peak RSS at B − peak RSS
at B = 1) / (B − 1), each in a fresh subprocess running 3 days.

Prints tables and writes benchmarks/results/scenario_batch.json (or --out).
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
sys.path.insert(0, str(ROOT))


def scenarios_day0(batch: int, params):
    """Four scenarios that differ from step 0: baseline, two transmission levels, distancing from day 7."""
    from agenttensor.scenarios import Scenario

    name = "R0" if "R0" in params.spec() else "transmission_scale"
    value = float(getattr(params, name))
    period = params.spec()["transmission_multiplier"].metadata.get("period", 1)
    four = [Scenario("baseline"), Scenario(f"{name} × 0.8", overrides={name: 0.8 * value}),
            Scenario("distancing from day 7", overrides={"transmission_multiplier": [1.0] * (7 // period) + [0.6]}),
            Scenario(f"{name} × 1.2", overrides={name: 1.2 * value})]
    k = min(4, batch)
    return four[:k], max(1, batch // k)


def scenarios_midrun(batch: int, params, branch_day: int):
    """Four scenarios identical until ``branch_day`` (rounded up to the multiplier's period), then
    transmission × 0.6 / 0.8 / 1.2 from that day: a counterfactual that branches mid-run."""
    from agenttensor.scenarios import Scenario

    period = params.spec()["transmission_multiplier"].metadata.get("period", 1)
    weeks = -(-branch_day // period)

    def branch(x: float) -> list[float]:
        return [1.0] * weeks + [x]

    four = [Scenario("baseline"), Scenario("× 0.6 from branch", overrides={"transmission_multiplier": branch(0.6)}),
            Scenario("× 0.8 from branch", overrides={"transmission_multiplier": branch(0.8)}),
            Scenario("× 1.2 from branch", overrides={"transmission_multiplier": branch(1.2)})]
    k = min(4, batch)
    return four[:k], max(1, batch // k)


def setup(cfg: dict):
    import torch

    from agenttensor import synthetic
    from agenttensor.loading import load_model

    torch.set_num_threads(cfg["threads"])
    model = load_model(cfg["model"])
    t0 = time.perf_counter()
    population = synthetic(cfg["agents"], seed=0)
    population_seconds = time.perf_counter() - t0
    base = model.params_type()
    if "initial_infected" in base.spec():
        base = base.replace(initial_infected=max(10, cfg["agents"] // 10_000))
    return model, population, base, population_seconds


def timing_case(model, env, base, scenarios, seeds, days, start_date, repeats: int, arms: tuple[str, ...]) -> dict:
    """Arms interleaved, `repeats` times; returns seconds per arm (all repeats), prefix info, bit-identity."""
    from agenttensor import simulate
    from agenttensor.scenarios import run_scenarios, scenario_params

    seconds: dict[str, list[float]] = {arm: [] for arm in arms}  # wall clock
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}  # process CPU time (robust to other jobs' load)
    identical, prefix = True, None
    kw = dict(seeds=seeds, steps=days, start_date=start_date, params=base, env=env, progress=False)

    def timed(arm: str, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        seconds[arm].append(time.perf_counter() - t0)
        cpu[arm].append(time.process_time() - c0)
        return value

    def separate():
        ok = True
        for s in scenarios:
            p = scenario_params(base, s)
            for k, seed in enumerate(seeds):
                r = simulate(model, None, p, steps=days, seeds=[seed], env=env, progress=False, start_date=start_date,
                             interventions=list(s.interventions) or None)
                ok &= all(bool((r[m][:, 0] == res.metrics[s.name][m][:, k]).all()) for m in r.metrics)
        return ok

    for _ in range(repeats):
        res = timed(arms[0], lambda: run_scenarios(model, None, scenarios, **kw))
        prefix = res.info["prefix"][0]
        if "unshared" in arms:
            plain = timed("unshared", lambda: run_scenarios(model, None, scenarios, share_prefix=False, **kw))
            identical &= all(bool((plain.metrics[s.name][k] == v).all())
                             for s in scenarios for k, v in res.metrics[s.name].items())
        identical &= timed("separate", separate)
    out = {f"{arm}_seconds": min(v) for arm, v in seconds.items()}
    out.update({f"{arm}_cpu_seconds": min(v) for arm, v in cpu.items()})
    out.update({f"{arm}_seconds_all": v for arm, v in seconds.items()})
    out.update({f"{arm}_cpu_seconds_all": v for arm, v in cpu.items()})
    out.update(bit_identical=identical, scenarios=len(scenarios), seeds=len(seeds), batch=len(scenarios) * len(seeds),
               days=days, prefix_steps=prefix["steps"] if prefix and prefix["shared"] else 0,
               prefix_reason=prefix["reason"] if prefix else None)
    for arm in arms[1:]:
        out[f"speedup_{arms[0]}_vs_{arm}"] = out[f"{arm}_seconds"] / out[f"{arms[0]}_seconds"]
        out[f"cpu_speedup_{arms[0]}_vs_{arm}"] = out[f"{arm}_cpu_seconds"] / out[f"{arms[0]}_cpu_seconds"]
    return out


def worker_timing(cfg: dict) -> dict:
    from agenttensor.scenarios import load_run_params, load_scenarios

    model, population, base, population_seconds = setup(cfg)
    out: dict = dict(population_seconds=population_seconds)
    if cfg.get("scenario_file"):
        sset = load_scenarios(cfg["scenario_file"])
        if sset.params:
            base = load_run_params(model, sset.params, sset.start_date)
        t0 = time.perf_counter()
        env = model.setup(population, base.as_tensors("cpu"), "cpu")
        out["setup_seconds"] = time.perf_counter() - t0
        seeds = list(range(cfg["seeds"] or sset.seeds or 8))
        out["file"] = timing_case(model, env, base, sset.scenarios, seeds, cfg.get("days") or sset.days,
                                  sset.start_date, cfg["repeats"], ("shared", "unshared", "separate"))
        out["file"]["scenario_file"] = cfg["scenario_file"]
        return out
    t0 = time.perf_counter()
    env = model.setup(population, base.as_tensors("cpu"), "cpu")
    out["setup_seconds"] = time.perf_counter() - t0
    scenarios, per = scenarios_day0(cfg["batch"], base)
    out["day0"] = timing_case(model, env, base, scenarios, list(range(per)), cfg["days"], None, cfg["repeats"],
                              ("batched", "separate"))
    scenarios, per = scenarios_midrun(cfg["batch"], base, cfg["branch_day"])
    out["midrun"] = timing_case(model, env, base, scenarios, list(range(per)), cfg["days"], None, cfg["repeats"],
                                ("shared", "unshared", "separate"))
    out["midrun"]["branch_day"] = cfg["branch_day"]
    return out


def worker_ceiling(cfg: dict) -> dict:
    """Seconds per step (min of 3 runs of `steps` steps after a warm-up) at growing N, B = 1 and B."""
    from agenttensor import simulate, synthetic

    model, _, base, _ = setup(dict(cfg, agents=1_000))
    sizes = [n for n in (1_000, 10_000, 100_000, 1_000_000, cfg["agents"]) if n <= cfg["agents"]]
    sizes = sorted(set(sizes))
    rows = []
    for n in sizes:
        params = base.replace(initial_infected=max(10, n // 1_000)) if "initial_infected" in base.spec() else base
        env = model.setup(synthetic(n, seed=0), params.as_tensors("cpu"), "cpu")
        for b in (1, cfg["batch"]):
            steps = 10 if n >= 1_000_000 else 20
            simulate(model, None, params, steps=2, seeds=list(range(b)), env=env, progress=False)  # warm-up
            times, cpu = [], []
            for _ in range(3):
                c0 = time.process_time()
                r = simulate(model, None, params, steps=steps, seeds=list(range(b)), env=env, progress=False)
                cpu.append((time.process_time() - c0) / steps)
                times.append(r.timing["run_seconds"] / steps)
            rows.append(dict(agents=n, batch=b, wall_seconds_per_step=min(times), wall_seconds_per_step_all=times,
                             seconds_per_step=min(cpu), seconds_per_step_all=cpu,
                             seconds_per_element_step=min(cpu) / b))
        del env
    # CPU time per step (one torch thread; wall-clock in the rows too): robust to the other jobs on the machine
    t = {(r["agents"], r["batch"]): r["seconds_per_step"] for r in rows}
    n, B = max(sizes), cfg["batch"]
    overhead = t[(min(sizes), 1)]
    share = overhead / t[(n, 1)]
    predicted = B * t[(n, 1)] / (overhead + B * (t[(n, 1)] - overhead))
    return dict(rows=rows, agents=n, batch=B, overhead_seconds_per_step=overhead, overhead_share=share,
                max_batching_gain=1 / (1 - share), predicted_gain_at_batch=predicted,
                measured_gain_at_batch=B * t[(n, 1)] / t[(n, B)])


def worker_memory(cfg: dict) -> dict:
    from agenttensor.scenarios import run_scenarios

    model, population, base, _ = setup(cfg)
    env = model.setup(population, base.as_tensors("cpu"), "cpu")
    scenarios, per = scenarios_day0(cfg["batch"], base)
    run_scenarios(model, None, scenarios, seeds=list(range(per)), steps=cfg["days"], params=base, env=env,
                  progress=False)
    return dict(batch=len(scenarios) * per, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_worker(mode: str, cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows) -> None:
    width = max(len(str(k)) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--days", type=int, default=None, help="days (default 15; with --scenario-file: [run].days)")
    ap.add_argument("--branch-day", type=int, default=8, help="midrun case: scenarios branch on this day")
    ap.add_argument("--model", default="models/seir")
    ap.add_argument("--scenario-file", default=None, help="time a real scenario file instead (shared/unshared/separate)")
    ap.add_argument("--seeds", type=int, default=None, help="with --scenario-file: seeds (default [run].seeds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "CONFIG_JSON"))
    args = ap.parse_args()
    if args.worker:
        mode, cfg = args.worker[0], json.loads(args.worker[1])
        fn = {"timing": worker_timing, "ceiling": worker_ceiling, "memory": worker_memory}[mode]
        print(json.dumps(fn(cfg)))
        return
    args.days = args.days or (None if args.scenario_file else 15)
    name = "scenario_batch" if not args.scenario_file else "scenario_batch_" + Path(args.scenario_file).stem
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}.json"
    cfg = dict(model=args.model, agents=args.agents, batch=args.batch, days=args.days, branch_day=args.branch_day,
               scenario_file=args.scenario_file, seeds=args.seeds, threads=args.threads, repeats=args.repeats)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result: dict = dict(model=args.model, agents=args.agents, threads=args.threads, cpu_count=os.cpu_count(),
                        load_average_before=load_before)
    result.update(run_worker("timing", cfg))
    if not args.scenario_file and not args.skip_ceiling:
        result["ceiling"] = run_worker("ceiling", cfg)
    if not args.scenario_file and not args.skip_memory:
        memory = dict(cfg, days=min(args.days, 3))
        batched = run_worker("memory", memory)
        single = run_worker("memory", dict(memory, batch=1))
        per_element = (batched["peak_rss_bytes"] - single["peak_rss_bytes"]) / max(batched["batch"] - 1, 1)
        result.update(peak_rss_bytes_batch=batched["peak_rss_bytes"], peak_rss_bytes_single=single["peak_rss_bytes"],
                      memory_per_element_bytes=per_element, memory_per_agent_per_element_bytes=per_element / args.agents)
    import torch

    result.update(load_average_after=os.getloadavg(), benchmark_seconds=time.perf_counter() - t0,
                  platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                  written_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if "day0" in result:  # top-level keys kept from earlier versions of this benchmark
        d0 = result["day0"]
        result.update(batch=d0["batch"], days=args.days, batched_run_seconds=d0["batched_seconds"],
                      separate_run_seconds=d0["separate_seconds"],
                      speedup_run_only=d0["speedup_batched_vs_separate"], bit_identical=d0["bit_identical"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))

    rows = [("model", args.model), ("agents", f"{args.agents:,}"), ("torch threads", args.threads)]
    for case, label in (("day0", "scenarios differ from day 0"), ("midrun", f"branch on day {args.branch_day}"),
                        ("file", args.scenario_file)):
        if case not in result:
            continue
        c = result[case]
        first = "batched" if case == "day0" else "shared"
        rows.append((f"[{case}] {label}", f"B = {c['batch']} ({c['scenarios']} scenarios × {c['seeds']} seeds), "
                                           f"{c['days']} days, shared prefix {c['prefix_steps']} days"))
        rows.append((f"[{case}] one pass ({first}): wall / CPU s",
                     f"{c[first + '_seconds']:.2f} / {c[first + '_cpu_seconds']:.2f}"))
        for arm in ("unshared", "separate"):
            if f"{arm}_seconds" in c:
                label_arm = "one pass, share_prefix=False" if arm == "unshared" else f"{c['batch']} separate runs"
                rows.append((f"[{case}] {label_arm}: wall / CPU s",
                             f"{c[arm + '_seconds']:.2f} / {c[arm + '_cpu_seconds']:.2f}  (one pass is "
                             f"{c[f'speedup_{first}_vs_{arm}']:.2f}× / {c[f'cpu_speedup_{first}_vs_{arm}']:.2f}× faster)"))
        rows.append((f"[{case}] bit-identical", c["bit_identical"]))
    if "ceiling" in result:
        ce = result["ceiling"]
        for r in ce["rows"]:
            rows.append((f"[ceiling] N = {r['agents']:,}, B = {r['batch']}",
                         f"{r['seconds_per_step'] * 1e3:.2f} CPU ms/step, {r['seconds_per_element_step'] * 1e3:.2f} ms "
                         f"per element-step (wall {r['wall_seconds_per_step'] * 1e3:.2f} ms/step)"))
        rows.append(("[ceiling] fixed cost per step (N = 1,000, B = 1)", f"{ce['overhead_seconds_per_step'] * 1e3:.2f} ms"))
        rows.append((f"[ceiling] overhead share at N = {ce['agents']:,}", f"{ce['overhead_share']:.1%}"))
        rows.append(("[ceiling] max batching gain 1/(1 − share)", f"{ce['max_batching_gain']:.3f}×"))
        rows.append((f"[ceiling] predicted / measured gain at B = {ce['batch']}",
                     f"{ce['predicted_gain_at_batch']:.3f}× / {ce['measured_gain_at_batch']:.3f}×"))
    if "memory_per_element_bytes" in result:
        pe = result["memory_per_element_bytes"]
        rows.append(("memory per batch element", f"{pe / 2**20:.1f} MiB ({pe / args.agents:.1f} B/agent)"))
    rows.append(("load average before/after (1 min)", f"{load_before[0]:.2f} / {result['load_average_after'][0]:.2f}"))
    table(rows)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

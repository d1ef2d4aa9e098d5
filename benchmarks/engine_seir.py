"""Engine benchmark: layered SEIR step time and memory at 1M and 8.5M agents.

Each configuration runs in its own subprocess so peak-memory readings do not mix.
Prints a table and writes benchmarks/results/engine_seir.json (engine_seir_cuda.json with --device cuda).

    python benchmarks/engine_seir.py [--sizes 1000000,8500000] [--steps 20] [--device cuda] [--out PATH]

On CUDA the memory columns are torch's allocator peak (run: peak allocated minus allocated after setup).
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


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(n: int, steps: int, mode: str, device: str = "cpu") -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    import agenttensor as at
    from models.seir import MODEL, SEIRParams

    t0 = time.perf_counter()
    population = at.synthetic(n, seed=0)
    build_s = time.perf_counter() - t0
    params = SEIRParams(R0=3.0, initial_infected=max(10, n // 10_000))
    on_gpu = device.startswith("cuda")
    env = MODEL.setup(population, params.as_tensors(device), device)
    del population
    base = torch.cuda.memory_allocated() / 2**20 if on_gpu else rss_mb()
    sampler = at.Hard() if mode == "forward" else at.StraightThrough()
    if on_gpu:  # first CUDA uses (kernel loading, the checkpoint machinery) cost seconds: warm up outside the timing
        R0 = torch.tensor(3.0, requires_grad=mode != "forward", device=device)
        warm = at.simulate(MODEL, None, params.as_tensors(device).replace(R0=R0), steps=3, seeds=[0], env=env,
                           sampler=sampler, progress=False, device=device,
                           grad_checkpoint_every=None if mode == "forward" else 10)  # as timed below
        if mode != "forward":
            warm["new_infections"].sum().backward()
        del warm
        torch.cuda.synchronize()
    if mode == "forward":
        t1 = time.perf_counter()
        r = at.simulate(MODEL, None, params, steps=steps, seeds=[0], env=env, progress=False, device=device)
        seconds = time.perf_counter() - t1
    else:
        R0 = torch.tensor(3.0, requires_grad=True, device=device)
        p = params.as_tensors(device).replace(R0=R0)
        t1 = time.perf_counter()
        r = at.simulate(MODEL, None, p, steps=steps, seeds=[0], env=env, sampler=sampler, progress=False,
                        grad_checkpoint_every=10, device=device)
        r["new_infections"].sum().backward()
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(agents=n, mode=mode, device=torch.cuda.get_device_name() if on_gpu else "cpu", steps=steps, seconds_per_step=seconds / steps,
                agent_steps_per_second=n * steps / seconds, run_peak_bytes_per_agent=(peak - base) * 2**20 / n,
                process_peak_mb=peak, population_build_seconds=build_s,
                attack_so_far=float(r["R"][-1, 0] + r["I"][-1, 0]) / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,8500000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="forward,forward+backward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="default benchmarks/results/engine_seir.json (_cuda.json on CUDA)")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), int(args.one[1]), args.one[2], args.one[3])))
        return
    rows = []
    for n in [int(float(x)) for x in args.sizes.split(",")]:
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", str(n), str(args.steps), mode, args.device],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                rows.append(dict(agents=n, mode=mode, error=out.stderr.strip().splitlines()[-1]))
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'agents':>10} {'mode':>17} {'s/step':>8} {'agent-steps/s':>14} {'run B/agent':>12} {'peak MB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['agents']:>10} {r['mode']:>17} ERROR {r['error']}")
            continue
        print(f"{r['agents']:>10,} {r['mode']:>17} {r['seconds_per_step']:>8.3f} {r['agent_steps_per_second']:>14,.0f} "
              f"{r['run_peak_bytes_per_agent']:>12.1f} {r['process_peak_mb']:>8.0f}")
    meta = dict(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
                command=" ".join(sys.argv), when=time.strftime("%Y-%m-%d %H:%M"))
    path = Path(args.out or ROOT / "benchmarks" / "results" /
                ("engine_seir_cuda.json" if args.device.startswith("cuda") else "engine_seir.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

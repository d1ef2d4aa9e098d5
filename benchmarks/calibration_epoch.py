"""One calibration epoch (forward + backward, 120 days) of the SEIR model (layered, straight-through),
with and without gradient checkpointing over time, at several population sizes.

Each configuration runs in a fresh subprocess; memory is the peak resident set size during the
epoch minus the resident size just before it (after setup), reported as bytes per agent per step.

    python benchmarks/calibration_epoch.py [--sizes 100000,1000000] [--steps 120] [--every 10]

Prints a table and writes benchmarks/results/calibration_epoch.json.
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(agents: int, steps: int, every: int | None) -> dict:
    import torch

    from agenttensor import StraightThrough, simulate
    from agenttensor.population import synthetic
    from models.seir.model import MODEL, SEIRParams

    pop = synthetic(agents, seed=0)
    params = SEIRParams(initial_infected=max(10, agents // 10_000))
    env = MODEL.setup(pop, params.as_tensors("cpu"), "cpu")
    del pop
    m = torch.ones(steps // 7 + 1, requires_grad=True)
    R0 = torch.tensor(2.5, requires_grad=True)
    base = _rss_bytes()
    t0 = time.perf_counter()
    res = simulate(MODEL, None, params.replace(R0=R0, transmission_multiplier=m.repeat_interleave(7)), steps=steps,
                   seeds=[0], sampler=StraightThrough(), env=env, progress=False, grad_checkpoint_every=every)
    loss = torch.log1p(res["new_infections_by_borough"].sum(0)).sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(agents=agents, steps=steps, grad_checkpoint_every=every, forward_s=t1 - t0, backward_s=t2 - t1,
                epoch_s=t2 - t0, peak_rss_gb=peak / 1e9, autograd_bytes=peak - base,
                bytes_per_agent_step=(peak - base) / (agents * steps), grad_nonzero=bool(m.grad.abs().sum() > 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--checkpoint-only-above", type=int, default=2_000_000,
                    help="sizes above this run only with checkpointing (no-checkpoint would not fit in memory)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        agents, steps, every = int(args.one[0]), int(args.one[1]), int(args.one[2]) or None
        print(json.dumps(one(agents, steps, every)))
        return
    rows = []
    for agents in [int(float(x)) for x in args.sizes.split(",")]:
        for every in ((args.every,) if agents > args.checkpoint_only_above else (0, args.every)):
            proc = subprocess.run([sys.executable, __file__, "--one", str(agents), str(args.steps), str(every)],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if proc.returncode != 0:
                rows.append(dict(agents=agents, grad_checkpoint_every=every or None, error=proc.stderr.strip()[-300:]))
                print(rows[-1])
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['agents']:>10,d} agents  ckpt={str(r['grad_checkpoint_every']):>4s}  epoch {r['epoch_s']:7.1f} s "
                  f"(fwd {r['forward_s']:.1f} + bwd {r['backward_s']:.1f})  {r['bytes_per_agent_step']:6.1f} B/agent/step  "
                  f"peak {r['peak_rss_gb']:.2f} GB", flush=True)
    load = os.getloadavg()
    out = dict(rows=rows, model="seir (layered, straight-through)", machine=dict(cpus=os.cpu_count(),
               python=platform.python_version(), load_average_1_5_15=load,
               note="shared 2-core machine; other jobs were running (see load average), so times are upper bounds"))
    path = Path(__file__).parent / "results" / "calibration_epoch.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

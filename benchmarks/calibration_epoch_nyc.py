"""One real calibration epoch of the NYC COVID-19 model at full scale (8.7M agents), through
`agenttensor.calibrate`: forward (StraightThrough) + backward over 120 days against the DOHMH weekly
reported cases by borough, learning 18 weekly transmission multipliers and the detection rate,
with gradient checkpointing over time.

    python benchmarks/calibration_epoch_nyc.py [--scale 1] [--days 120] [--every 10] [--epochs 1] [--device cuda]

Memory: peak resident set size of the process, and the peak during the epoch minus the resident
size before it (after population build and setup), per agent per step; on CUDA the same from torch's
allocator (peak allocated during the epoch minus allocated before it).
Prints a table and writes benchmarks/results/calibration_epoch_nyc.json (_cuda.json on CUDA; --out to change).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from agenttensor import _cpu_cache
from agenttensor.calibration import Learn, Observe, Sigmoid, calibrate
from agenttensor.calibration_cli import auto_target_scale
from agenttensor.observed import load_targets

ROOT = Path(__file__).resolve().parent.parent
START = dt.date(2020, 3, 1)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--days", type=int, default=120)
    ap.add_argument("--every", type=int, default=10, help="gradient checkpoint segment length (days)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/calibration_epoch_nyc.json (_cuda.json on CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.covid.model import MODEL
    from populations.nyc import load_or_build

    t0 = time.perf_counter()
    population = load_or_build(f"populations/built/nyc_scale{args.scale:g}", scale=args.scale)
    params = MODEL.params_type()
    env = MODEL.setup(population, params.as_tensors(device), device)
    del population
    setup_s = time.perf_counter() - t0
    window = (START, START + dt.timedelta(days=args.days - 1))
    weeks = (args.days + 6) // 7
    learn = [Learn("transmission_multiplier", init=1.0, size=weeks, period=7),
             Learn("detection_rate", init=0.3, transform=Sigmoid(0.02, 0.98))]
    targets = load_targets("nyc-cases-weekly", metrics=["cases"])
    base = torch.cuda.memory_allocated(device) if on_gpu else _rss()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    epoch_times: list[float] = []
    last = [time.perf_counter()]

    def tick(epoch, loss, values):
        now = time.perf_counter()
        epoch_times.append(now - last[0])
        last[0] = now
        print(f"epoch {epoch + 1}: {epoch_times[-1]:.1f} s, loss {loss:.4f}", flush=True)

    last[0] = time.perf_counter()
    result = calibrate(MODEL, None, targets, learn, observe=[Observe("cases", "reported_cases_by_borough")],
                       window=window, epochs=args.epochs, lr=0.05, params=params, env=env,
                       target_scale=auto_target_scale(env, list(env.group_labels)),
                       grad_checkpoint_every=args.every or None, callback=tick, device=args.device)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = torch.cuda.max_memory_allocated(device) if on_gpu else peak_rss
    N = env.num_agents
    row = dict(agents=N, nyc_scale=args.scale, days=args.days, grad_checkpoint_every=args.every or None,
               learned_parameters=weeks + 1, epoch_seconds=epoch_times, seconds_per_epoch=min(epoch_times),
               seconds_per_day=min(epoch_times) / args.days, population_and_setup_seconds=setup_s,
               peak_rss_gb=peak_rss / 1e9, epoch_extra_bytes=peak - base,
               bytes_per_agent_step=(peak - base) / (N * args.days), final_loss=result.info["final_loss"],
               threads=torch.get_num_threads(), cpu_cache=_cpu_cache.stats(), device=str(device))
    if on_gpu:
        row.update(gpu=torch.cuda.get_device_name(device), peak_gpu_gb=peak / 1e9)
    out = dict(row=row, machine=dict(cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                                     load_average_1_5_15=os.getloadavg()))
    path = Path(args.out or ROOT / "benchmarks" / "results" /
                ("calibration_epoch_nyc_cuda.json" if on_gpu else "calibration_epoch_nyc.json"))
    path.write_text(json.dumps(out, indent=2))
    print(f"{N:,} agents, {args.days} days, checkpoint every {args.every}: epoch {row['seconds_per_epoch']:.0f} s "
          f"({row['seconds_per_day']:.2f} s/day fwd+bwd), peak {'GPU memory' if on_gpu else 'RSS'} {peak / 1e9:.1f} GB, "
          f"{row['bytes_per_agent_step']:.1f} B/agent/step above setup; load {os.getloadavg()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

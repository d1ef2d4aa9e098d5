"""A hard day of the NYC COVID model on the code path a GPU runs, standard against sync-free (``simulate(...,
sync_free=True)``, `StepContext.sync_free`), side by side in one process.

    python benchmarks/device_path_day.py [--small 2000] [--large 1000000] [--nyc] [--pairs 5] [--device cpu|cuda]

On CPU the native kernels are switched off and `CovidEnv.memo` computes its values (as it does off the CPU), so the
operations are the ones a GPU runs. Per mode, over 28-day runs with the benchmark scenario (covid_step.py's):

- operations a day: aten operations dispatched (views left out); on a GPU each is a kernel launch;
- host reads a day: operations whose result the host must read (`agenttensor.host_reads`: nonzero, item, bool,
  ...); on a GPU each waits until the device has run everything queued before it, so the host cannot queue the
  next kernels meanwhile and a day costs the host's time plus the device's instead of the larger of the two;
- bytes a day per agent: what each operation's tensors hold (inputs and outputs; a broadcast input counted once), summed
  over the day's operations: the memory traffic of unfused kernels, which bounds a GPU's device time from below at
  its memory bandwidth (an H100 SXM's ~3.35 TB/s: 8.7M agents × 1,000 bytes in 2.6 ms);
- host ms a day at ``--small`` agents, one thread: the kernels take next to nothing, so this is Python and dispatch,
  the floor of one run on a GPU driven by a host as fast as this one (a CUDA launch costs more than a CPU op);
- s a day at ``--large`` agents (and at full NYC with ``--nyc``) on the device;
- bytes per agent that a day's allocations hold at their peak (`PeakLive`: its temporaries and outputs), the largest
  day's: what a CUDA graph of the day keeps in its memory pool, per kind of day;
- on CUDA also ms a day with the sync-free days as CUDA graphs (`agenttensor.graphs`: each kind of day captured once,
  replayed on the others; the weekly decision days eager), the captures made in a run before the timed ones.

Times are the median of ``--pairs`` pairs of runs, the two modes back to back in each. Prints a table and writes
benchmarks/results/device_path_day.json (device_path_day_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import agenttensor as at  # noqa: E402
from agenttensor import Hard, Randomness, StepContext  # noqa: E402
from agenttensor.graphs import DayGraphs  # noqa: E402
from agenttensor.host_reads import HostReads  # noqa: E402
from agenttensor.interventions import compile_schedule  # noqa: E402
from covid_step import SCENARIO, START, synchronize  # noqa: E402
from models.covid import model as covid  # noqa: E402
from models.covid.model import MODEL, CovidParams  # noqa: E402

DAYS = 28
VIEWS = {"view", "_unsafe_view", "as_strided", "t", "expand", "unsqueeze", "squeeze", "select", "slice", "alias",
         "detach", "permute", "transpose", "lift_fresh", "_reshape_alias", "split", "unbind", "view_as_real"}


class Dispatched(HostReads):
    """Counts aten operations (views left out), host reads (`HostReads`: ``counts``) and the bytes of the operations'
    tensors (inputs and outputs, each at most its storage's size: an expanded input counts once) while active."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    fused = 0  # > 0 while a fused kernel's own operations run (`fused_hash`): not counted one by one

    def seen(self, name: str, args: tuple, kwargs: dict, out) -> None:
        if name in VIEWS or self.fused:
            return
        super().seen(name, args, kwargs, out)
        self.ops += 1
        self.bytes += sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
                          for t in _tensors((*args, *kwargs.values(), out)))

    def count(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """One fused kernel that reads and writes ``tensors`` (each at most its storage's size)."""
        self.ops += 1
        self.bytes += sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for t in tensors)


class PeakLive(TorchDispatchMode):
    """The most bytes held at once by tensors that a day's operations allocated (outputs that alias no input), the
    largest day's (``peak``) after each day is begun with `new_day`: what a CUDA graph of the day keeps in its private
    memory pool (its temporaries and outputs; the state copied in lives outside it). Device-independent: freed
    tensors are found by their storages' weak references."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.bytes = self.peak = 0

    def new_day(self) -> None:
        self.live, self.bytes = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):  # freshly allocated outputs
            for t in _tensors(out):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live and not self.live[key][0].expired():
                    continue
                self.bytes += storage.nbytes() - (self.live[key][1] if key in self.live else 0)
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.bytes -= self.live.pop(key)[1]
        self.peak = max(self.peak, self.bytes)
        return out


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for v in x for t in _tensors(v)] if isinstance(x, (list, tuple)) else []


def fused_hash(mode: Dispatched):
    """While active, the functions that ``AGENTTENSOR_COMPILE=1`` compiles (`fused.on_request`) count as the one
    kernel each that torch.compile makes of them (a Triton kernel on a GPU; the same bits, tests/test_rng.py and
    tests/test_sync_free.py): their inputs read and their outputs written once. They are found by name in every
    loaded module of the project that holds them: the random numbers' hash (`rng.uniform_kernel`: ~14 elementwise
    operations over [..., N] int32) and hard events (`rng.hard_events`, `rng.hard_hazard_events`), the force of the
    group layers (`transmission.force_of_layers`), and in the sync-free day the split of infections by layer
    (`layer_shares`), the exits and transition (`dense_exits`: the hash of six streams, the draws, flows, countdowns
    and memberships), the new infections' countdowns (`dense_countdowns`) and the infectiousness (`dense_iotas`)."""
    modules = [m for name, m in list(sys.modules.items()) if name.split(".")[0] in ("agenttensor", "models")]
    marked = [(module, name, value) for module in modules for name, value in list(vars(module).items())
              if callable(value) and hasattr(value, "eager") and hasattr(value, "calls")]

    def counted(fn):
        def run(*args):
            mode.fused += 1
            try:
                out = fn(*args)
            finally:
                mode.fused -= 1
            if not mode.fused:  # (the outermost: one inside another is part of its kernel)
                mode.count(tuple(_tensors(args) + _tensors(out)))
            return out
        return run

    class Swap:
        def __enter__(self):
            for module, name, value in marked:
                setattr(module, name, counted(value.eager))

        def __exit__(self, *exc):
            for module, name, value in marked:
                setattr(module, name, value)
            return False

    return Swap()


def days(env, params, sync_free: bool, count: str | None = None, graphs=None) -> tuple[float, Dispatched | None]:
    """Init, then ``DAYS`` hard days (seed 0, the scenario): (wall seconds of the days, the counts over them; ``count``
    "eager" or "fused": the hash as its eager operations or as one kernel, `fused_hash`; "peak": `PeakLive`). ``graphs``: a
    `agenttensor.graphs.DayGraphs` that runs the (sync-free) days, kept from run to run (its captures)."""
    device = env.agent_ids.device
    rng = Randomness.for_agents([0], env.agent_ids).to(device)
    schedule = compile_schedule([SCENARIO], levers=MODEL.levers, steps=DAYS, start_date=START,
                                group_labels=env.group_labels, age_band_edges=MODEL.age_band_edges).to(device)
    owner = object()

    def context(t: int) -> StepContext:
        return StepContext(step=t, env=env, rng=rng, sampler=Hard(), start_date=START, schedule=schedule, donate=owner,
                           sync_free=sync_free)

    state = MODEL.init(env, params, context(0))
    records = []
    mode = (PeakLive() if count == "peak" else Dispatched()) if count else None
    synchronize(device)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if mode is not None:
            stack.enter_context(mode)
            if count == "fused":
                stack.enter_context(fused_hash(mode))
        for t in range(DAYS):
            if count == "peak":
                mode.new_day()
            state, record = MODEL.step(state, params, context(t)) if graphs is None else \
                graphs.step(state, context(t))
            records.append(record)
    synchronize(device)
    return time.perf_counter() - t0, mode


def row(name: str, population, device: str, pairs: int, count: bool) -> dict:
    env = MODEL.setup(population, CovidParams().as_tensors(device), device)
    params = CovidParams(initial_prevalence=1e-3).as_tensors(device)
    out = dict(population=name, agents=env.num_agents)
    for sync_free in (False, True):
        days(env, params, sync_free)  # warm-up (first-use layouts, caches)
        key = "sync_free" if sync_free else "standard"
        _, fused = days(env, params, sync_free, count="fused")
        _, mode = days(env, params, sync_free, count="eager")
        out[f"{key}_bytes_per_agent_per_day"] = round(mode.bytes / DAYS / env.num_agents, 1)
        out[f"{key}_bytes_per_agent_per_day_fused_hash"] = round(fused.bytes / DAYS / env.num_agents, 1)
        out[f"{key}_ops_per_day_fused_hash"] = round(fused.ops / DAYS, 1)
        out[f"{key}_day_peak_bytes_per_agent"] = round(days(env, params, sync_free, count="peak")[1].peak
                                                        / env.num_agents, 1)
        if count:
            out[f"{key}_ops_per_day"] = round(mode.ops / DAYS, 1)
            out[f"{key}_host_reads_per_day"] = round(sum(mode.counts.values()) / DAYS, 2)
            out[f"{key}_host_reads"] = dict(mode.counts)
    walls = {False: [], True: [], "graphs": []}
    graphs = DayGraphs(MODEL, params, "cuda") if torch.device(device).type == "cuda" else None
    if graphs is not None:
        reserved = torch.cuda.memory_reserved(device)
        days(env, params, True, graphs=graphs)  # the captures
        out.update(graphs_reserved_bytes_per_agent=round((torch.cuda.memory_reserved(device) - reserved)
                                                         / env.num_agents, 1))  # (the graphs' pools, and the run's)
    for _ in range(pairs):
        for sync_free in (False, True):
            walls[sync_free].append(days(env, params, sync_free)[0] / DAYS)
        if graphs is not None:
            walls["graphs"].append(days(env, params, True, graphs=graphs)[0] / DAYS)
    if graphs is not None:
        out.update(graphs_ms_per_day=round(1e3 * statistics.median(walls["graphs"]), 3),
                   graphs_runs_ms=[round(1e3 * w, 3) for w in walls["graphs"]], graphs_stats=dict(graphs.stats),
                   graphs_off=graphs.off)
    out.update(standard_ms_per_day=round(1e3 * statistics.median(walls[False]), 3),
               sync_free_ms_per_day=round(1e3 * statistics.median(walls[True]), 3),
               standard_runs_ms=[round(1e3 * w, 3) for w in walls[False]],
               sync_free_runs_ms=[round(1e3 * w, 3) for w in walls[True]],
               pair_ratios=[round(b / a, 3) for a, b in zip(walls[False], walls[True])])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=2000, help="agents of the host-cost run (one thread)")
    parser.add_argument("--large", type=int, default=1_000_000, help="agents of the larger run (0: none)")
    parser.add_argument("--nyc", action="store_true", help="also full NYC (builds populations/built/nyc_scale1 once)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["AGENTTENSOR_NATIVE_KERNELS"] = "0"  # the torch ops, as on a GPU
        covid.CovidEnv.memo = lambda self, key, inputs, compute, values_only=False: compute()  # as off the CPU
    threads = torch.get_num_threads()
    rows = []
    torch.set_num_threads(1)
    rows.append(dict(row(f"synthetic {args.small}", at.synthetic(args.small, seed=0), args.device, args.pairs, True),
                     threads=1))
    torch.set_num_threads(threads)
    if args.large:
        rows.append(dict(row(f"synthetic {args.large}", at.synthetic(args.large, seed=0), args.device, args.pairs,
                             False), threads=threads))
    if args.nyc:
        from populations.nyc import load_or_build

        nyc = load_or_build("populations/built/nyc_scale1", scale=1.0, boroughs=None, seed=0)
        rows.append(dict(row("NYC", nyc, args.device, args.pairs, False), threads=threads))
    header = f"{'population':>20} {'threads':>7} {'ops/day std → sync-free':>24} {'host reads/day':>15} " \
             f"{'bytes/agent/day':>17} {'day peak B/agent':>17} {'ms/day std → sync-free':>24} {'ratio':>6}"
    print(header)
    for r in rows:
        ops = f"{r['standard_ops_per_day']} → {r['sync_free_ops_per_day']}" if "standard_ops_per_day" in r else ""
        reads = f"{r['standard_host_reads_per_day']} → {r['sync_free_host_reads_per_day']}" \
            if "standard_host_reads_per_day" in r else ""
        traffic = f"{r['standard_bytes_per_agent_per_day']:.0f} → {r['sync_free_bytes_per_agent_per_day']:.0f}"
        peak = f"{r['standard_day_peak_bytes_per_agent']:.0f} → {r['sync_free_day_peak_bytes_per_agent']:.0f}"
        print(f"{r['population']:>20} {r['threads']:>7} {ops:>24} {reads:>15} {traffic:>17} {peak:>17} "
              f"{r['standard_ms_per_day']:>10} → {r['sync_free_ms_per_day']:<11} "
              f"{statistics.median(r['pair_ratios']):>6}" +
              (f"   graphs {r['graphs_ms_per_day']} ms/day {r['graphs_stats']}" if "graphs_ms_per_day" in r else ""))
    result = dict(benchmark="device_path_day", date=dt.datetime.now().isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                  or platform.machine(), torch=torch.__version__, days=DAYS, pairs=args.pairs,
                  code_path="torch ops (native kernels off, memo computing)" if device.type == "cpu" else "cuda",
                  rows=rows)
    out = Path(args.out or Path(__file__).parent / "results" /
               ("device_path_day.json" if device.type == "cpu" else f"device_path_day_{device.type}.json"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

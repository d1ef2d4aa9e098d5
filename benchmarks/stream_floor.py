"""This machine's streaming speed for passes shaped like the gradient kernels', and the floor it sets under them.

    python benchmarks/stream_floor.py [--agents 8736047] [--threads 2] [--tiles 256,2048]

A native loop (benchmarks/csrc/stream_floor.cpp, built as the kernels are) reads `inputs` float arrays and writes
`outputs` of N agents in tiles, each array streamed through the tile by a loop of its own, with trivial arithmetic: only
the memory traffic is left. Bytes moved per agent: 4 per input, 8 per output (a written line is read first). The arrays
start at staggered offsets (equal offsets put the same agent of every array into one set of the 8-way L1 cache: a
24-array loop over 2 MB-aligned arrays ran 4-5x slower in a C microbenchmark on the AMD EPYC VM).

The table gives GB/s by the number of arrays a pass streams at once (a plain copy is 2) and by tile. Then a **floor per
gradient-kernel pass**: its bytes moved per agent at full NYC (`PASSES`: the arrays each pass reads and writes in
`covid_step.py`'s gradient loss, counted from the kernels' argument lists) divided by the measured speed at its number
of arrays. A pass that takes much longer than its floor is bound by something else (arithmetic, latency); one near it
can only get faster by moving fewer bytes. At full NYC the three passes are then also timed in this process (one
backward of a 7-day gradient window, torch's profiler; `--passes-days 0`: not), so that floor and time are measured in
the same stretch of this VM.

Prints the table and writes benchmarks/results/stream_floor.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agenttensor import native  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "csrc" / "stream_floor.cpp"
FULL_NYC_AGENTS = 8_736_047
FULL_NYC_HOUSEHOLDS = 3_254_458
STAGGER_FLOATS = 528  # 2,112 bytes: 33 cache lines, so consecutive arrays fall 33 lines apart mod 64 (L1's sets)

# The gradient kernels' passes at full NYC in the benchmark's gradient loss (new infections + reported cases + hospital
# admissions; straight-through draws; no levers with per-agent values but the community transmission reduction): the
# arrays each reads and writes per agent, from the kernels' argument lists (models/covid/shadow_native.py,
# contributions_native.py; agenttensor/_group_kernels.py). In place: an incoming gradient's buffer written over (its
# read counted among the inputs, its write-back here). Household tables [H] are per household: H / N of a stream each.
_H = FULL_NYC_HOUSEHOLDS / FULL_NYC_AGENTS
SCHOOL_MEMBERS, WORKPLACE_MEMBERS = 0.236, 0.477  # shares of the agents in a school, a workplace (a school day's
# member lists: the force's backward reads them in place of the slots of all agents)
PASSES = {
    "transition backward (shadow_kernel.cpp, fused)": dict(node="_TransitionBackward",
        read={"6 incoming gradients (S, E, I_sym, I_asym, exposure, latent)": 24, "exp(-lambda)": 4,
              "flags (S, timed)": 1, "age group": 1, "household slot": 4, "infection mask": 1},
        written_in_place={"6 outgoing gradients over the incoming": 24},
        written_fresh={"d lambda": 4, "4 household tables (S, q_sym, q_asym sums, force weights)": 4 * 4 * _H},
        arrays=6 + 5 + 1 + 4),
    "own contributions backward (contributions_kernel.cpp)": dict(node="_OwnContributionsBackward",
        read={"4 group slots (household, school, workplace, community)": 16, "presences (school, work)": 8,
              "community kept share": 4, "isolate_prob": 4, "flags (I_sym, I_asym, isolating, timed)": 1,
              "d lambda": 4, "age group (sigma)": 1, "3 incoming gradients (I_sym, I_asym, isolating)": 12},
        written_in_place={"3 outgoing gradients": 12},
        written_fresh={},
        arrays=4 + 2 + 1 + 1 + 1 + 1 + 1 + 3),
    "force backward (group_kernels.cpp)": dict(node="_LayeredForceBackward",
        read={"d lambda": 4, "age group (sigma)": 1, "community slot": 4, "community kept share": 4,
              "presences (school, work)": 8,
              "school and workplace members' indices and slots": 8 * (SCHOOL_MEMBERS + WORKPLACE_MEMBERS)},
        written_in_place={},
        written_fresh={},
        arrays=1 + 1 + 2 + 2 + 4),
}


def measured_passes(days: int, threads: int) -> dict[str, float]:
    """ms per call of each pass's autograd node in one backward of a `days`-day full-NYC gradient window (after a
    warm-up window), the benchmark's loss (`covid_step.py`), from torch's profiler (a node's wall time: its kernel's
    threads run inside it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from covid_step import MODEL, CovidParams, timed_steps  # noqa: PLC0415

    from agenttensor import StraightThrough, _cpu_cache  # noqa: PLC0415
    from populations.nyc import load_or_build  # noqa: PLC0415

    torch.set_num_threads(threads)
    population = load_or_build(str(ROOT / "populations" / "built" / "nyc_scale1"), scale=1.0)
    env = MODEL.setup(population, CovidParams().as_tensors("cpu"), torch.device("cpu"))
    del population
    _cpu_cache.enable_for(env.num_agents, "cpu")  # as `simulate` does for gradient runs
    names = ("transmission_scale", "transmission_multiplier", "household_weight", "community_weight", "detection_rate")
    learn = CovidParams(initial_prevalence=1e-3, transmission_multiplier=torch.ones(max(1, days // 7 + 1)))
    learn = learn.as_tensors("cpu", learn=names)

    def window(profile: bool):
        for name in names:
            getattr(learn, name).grad = None
        _, _, (_, records) = timed_steps(env, learn, StraightThrough(), days)
        loss = sum(r["new_infections"].sum() + r["reported_cases"].sum() + r["hospital_admissions"].sum()
                   for r in records)
        if not profile:
            loss.backward()
            return None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            loss.backward()
        return {e.key: (e.self_cpu_time_total, e.count) for e in profiler.key_averages()}

    window(False)
    events = window(True)
    out = {}
    for name, p in PASSES.items():
        total_us, count = events.get(p["node"], (0.0, 0))
        out[name] = total_us / 1e3 / count if count else float("nan")
    return out


def bytes_moved(p: dict) -> float:
    """Bytes per agent: reads, write-backs, and fresh writes twice (the line read before it is written)."""
    return sum(p["read"].values()) + sum(p["written_in_place"].values()) + 2 * sum(p["written_fresh"].values())


def load() -> ctypes.CDLL:
    library = ctypes.CDLL(str(native.build(SOURCE, "agenttensor_stream_floor", flags=("-O3", *native.vector_flags()))))
    f = library.agenttensor_stream_pass
    f.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64,
                  ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_double
    return library


def split(arrays: int) -> tuple[int, int]:
    """(inputs, outputs) for a pass of `arrays` arrays: about two reads per write, at least one of each."""
    outputs = max(1, arrays // 3)
    return max(1, arrays - outputs), outputs


def measure(library: ctypes.CDLL, n: int, arrays: int, tile: int, threads: int, repeats: int,
            pool: list[torch.Tensor]) -> dict:
    inputs, outputs = split(arrays)
    views = [pool[k][k * STAGGER_FLOATS:k * STAGGER_FLOATS + n] for k in range(inputs + outputs)]
    pointers = [v.data_ptr() for v in views]
    ins = (ctypes.c_void_p * inputs)(*pointers[:inputs])
    outs = (ctypes.c_void_p * outputs)(*pointers[inputs:])
    seconds = library.agenttensor_stream_pass(n, inputs, ins, outputs, outs, tile, threads, repeats)
    moved = 4 * inputs + 8 * outputs
    return dict(arrays=inputs + outputs, inputs=inputs, outputs=outputs, tile=tile, threads=threads,
                bytes_per_agent=moved, ms=seconds * 1e3, gb_per_s=moved * n / seconds / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=FULL_NYC_AGENTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arrays", default="2,4,8,12,16,20,24,32", help="arrays streamed at once (comma-separated)")
    ap.add_argument("--tiles", default="256,2048", help="agents per tile (comma-separated)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per case (the fastest is kept)")
    ap.add_argument("--passes-days", type=int, default=7,
                    help="also time the three passes in a full-NYC gradient window of this many days, in this process "
                         "(0: not; only with --agents at full NYC)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "stream_floor.json")
    args = ap.parse_args()
    n = args.agents
    arrays = sorted({int(a) for a in args.arrays.split(",")})
    tiles = [int(t) for t in args.tiles.split(",")]
    if n < 1 or not arrays or min(arrays) < 2 or not tiles or min(tiles) < 1:
        ap.error("--agents >= 1, --arrays >= 2 each, --tiles >= 1 each")
    library = load()
    pool = [torch.rand(n + STAGGER_FLOATS * (max(arrays) + 1)) for _ in range(max(arrays))]  # touched: no page faults
    rows = []
    print(f"{n:,} agents, {args.threads} threads, best of {args.repeats}")
    print(f"{'arrays':>6} {'in':>3} {'out':>3} {'B/agent':>8} " + " ".join(f"{f'tile {t}':>18}" for t in tiles))
    for a in arrays:
        found = [measure(library, n, a, t, args.threads, args.repeats, pool) for t in tiles]
        rows += found
        first = found[0]
        print(f"{first['arrays']:>6} {first['inputs']:>3} {first['outputs']:>3} {first['bytes_per_agent']:>8} "
              + " ".join(f"{r['ms']:7.1f} ms {r['gb_per_s']:5.1f} GB/s" for r in found))

    def speed(count: int) -> float:  # GB/s of the best tile at the nearest measured number of arrays (fewer on a tie)
        nearest = min(arrays, key=lambda a: (abs(a - count), a))
        return max(r["gb_per_s"] for r in rows if r["arrays"] == nearest)

    floors = {}
    print(f"\nfloors at {n:,} agents (bytes moved per agent / speed at the pass's number of arrays, best tile):")
    for name, p in PASSES.items():
        moved = bytes_moved(p)
        gbs = speed(p["arrays"])
        floors[name] = dict(p, bytes_per_agent=moved, gb_per_s=gbs, floor_ms=moved * n / gbs / 1e6)
        print(f"  {name}: {moved:.1f} B/agent, {p['arrays']} arrays, {gbs:.1f} GB/s -> "
              f"{floors[name]['floor_ms']:.1f} ms")
    total = sum(f["floor_ms"] for f in floors.values())
    print(f"  the three together: {total:.1f} ms per day")
    if args.passes_days > 0 and n == FULL_NYC_AGENTS:
        del pool
        print(f"\nthe passes, timed in a {args.passes_days}-day full-NYC gradient window (torch profiler, ms per "
              "call):")
        for name, ms in measured_passes(args.passes_days, args.threads).items():
            floors[name].update(measured_ms=ms, measured_over_floor=ms / floors[name]["floor_ms"])
            print(f"  {name}: {ms:.1f} ms, {ms / floors[name]['floor_ms']:.2f}x its floor")
    result = dict(agents=n, threads=args.threads, repeats=args.repeats, passes_days=args.passes_days, cases=rows,
                  floors=floors,
                  floors_total_ms=total, machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  vector_flags=list(native.vector_flags()), load_average=os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

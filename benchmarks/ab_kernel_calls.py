"""Two versions of one native kernel source, compared call by call inside the same full-NYC gradient runs.

    git show HEAD~1:models/covid/csrc/shadow_kernel.cpp > /tmp/before.cpp
    python benchmarks/ab_kernel_calls.py --module models.covid.shadow_native --entry backward \
        --a /tmp/before.cpp --b models/covid/csrc/shadow_kernel.cpp --runs 8

This VM's speed moves by up to 40 % within minutes, so two whole 28-day runs, one per version, cannot resolve a
change of a few percent. Here each version is built (`agenttensor.native.build`, the module's flags and the CPU's vector
flags, as `native.load` builds it) and the module's `_library` is switched on every call of its Python entry point
(``--entry``, e.g. `shadow_native.backward`): within one backward pass odd days run one version and even days the other,
the parity swapped from run to run, so both versions see the same days and the same stretch of the machine. Each
run's figure is a version's mean time per call (the entry point's wall clock: the kernel and its Python glue); the
table gives every run and the median of the per-run differences, then the same over pairs of consecutive runs (the
mean of a pair's two differences: B ran on odd days in one and on even days in the other, so a cost that differs
between odd and even days cancels; the transition's per-run differences alternated in sign by ~±5 ms). The outputs
are the caller's to compare: a version that changes numbers changes the gradients at the end (printed for both
parities' last runs).

``--hard`` runs hard-mode forward windows instead (no backward pass), for the hard forward's kernels (e.g.
``--module models.covid.hard_native --entry hard_force``): the per-day figure is then the forward's, and the runs' daily
new infections are compared across parities in place of the gradients.

The two sources must share the module's ctypes declarations (`_declare`): a change to an argument struct cannot be
compared this way (switch a Python-side constant with a module attribute instead). Both are built against the working
tree's shared headers (agenttensor/csrc/*.h): a header's change is compared through a source that includes it, built
in two trees.

Prints a table and writes benchmarks/results/ab_kernel_calls.json (--out).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agenttensor import Hard, StraightThrough, _cpu_cache, native  # noqa: E402
from covid_step import MODEL, CovidParams, timed_steps  # noqa: E402

NAMES = ("transmission_scale", "transmission_multiplier", "household_weight", "community_weight", "detection_rate")


def built(module, source: Path, tag: str, vector_flags: tuple[str, ...] | None = None) -> ctypes.CDLL:
    """``source`` built as ``module``'s kernel library is (its FLAGS, default -O3, and the vector flags: this CPU's,
    `native.vector_flags`, unless given)."""
    vector = native.vector_flags() if vector_flags is None else vector_flags
    flags = (*getattr(module, "FLAGS", ("-O3",)), *vector)
    library = ctypes.CDLL(str(native.build(source, f"ab_{tag}_{source.stem}", flags=flags)))
    module._declare(library)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", required=True, help="the kernel's Python module, e.g. models.covid.shadow_native")
    parser.add_argument("--entry", required=True, help="the module's function whose calls run the kernel")
    parser.add_argument("--a", type=Path, required=True, help="version A's source")
    parser.add_argument("--b", type=Path, required=True, help="version B's source")
    parser.add_argument("--b-flags", default=None,
                        help="version B's vector flags in place of this CPU's (`native.vector_flags`), e.g. "
                             "\"-mavx2 -mfma\" with --b the same source as --a: the source's AVX2 paths against its "
                             "AVX-512 ones on an AVX-512 CPU")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--scale", type=float, default=1.0, help="the NYC population's scale (1: full NYC)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hard", action="store_true",
                        help="hard-mode forward windows (no backward), for the hard forward's kernels: the runs' daily "
                             "new infections are compared across parities in place of the gradients")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ab_kernel_calls.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    module = importlib.import_module(args.module)
    b_flags = None if args.b_flags is None else tuple(args.b_flags.split())
    libraries = [built(module, args.a, "a"), built(module, args.b, "b", b_flags)]
    entry = getattr(module, args.entry)
    state = {"calls": 0, "parity": 0}
    times: list[list[float]] = [[], []]

    def alternating(*a, **kw):
        version = (state["calls"] + state["parity"]) % 2
        state["calls"] += 1
        module._library = lambda: libraries[version]
        t0 = time.perf_counter()
        out = entry(*a, **kw)
        times[version].append(time.perf_counter() - t0)
        return out

    setattr(module, args.entry, alternating)

    from populations.nyc import load_or_build

    built_dir = Path(__file__).resolve().parent.parent / "populations" / "built"
    population = load_or_build(built_dir / f"nyc_scale{args.scale:g}", scale=args.scale, boroughs=None, seed=0)
    env = MODEL.setup(population, CovidParams().as_tensors("cpu"), "cpu")
    learn = CovidParams(initial_prevalence=1e-3, transmission_multiplier=torch.ones(args.days // 7 + 1)).as_tensors(
        "cpu", learn=NAMES)
    _cpu_cache.enable_for(env.num_agents, "cpu")

    hard_params = CovidParams(initial_prevalence=1e-3).as_tensors("cpu")

    def run() -> tuple[float, torch.Tensor]:
        if args.hard:  # (the forward's time per day; its outputs for the comparison)
            wall, _, (_, records) = timed_steps(env, hard_params, Hard(), args.days)
            return wall / args.days, torch.stack([r["new_infections"] for r in records])
        _, _, (_, records) = timed_steps(env, learn, StraightThrough(), args.days)
        loss = sum(r["new_infections"].sum() + r["reported_cases"].sum() + r["hospital_admissions"].sum()
                   for r in records)
        t0 = time.perf_counter()
        loss.backward()
        backward = (time.perf_counter() - t0) / args.days
        gradients = torch.cat([getattr(learn, name).grad.flatten().clone() for name in NAMES])
        for name in NAMES:
            getattr(learn, name).grad = None
        return backward, gradients

    run()  # warm-up: both versions built and loaded, the caching allocator filled
    rows, last = [], {}
    for r in range(args.runs):
        state["calls"], state["parity"] = 0, r % 2
        before = [len(t) for t in times]
        backward, gradients = run()
        means = [1e3 * statistics.fmean(t[n:]) for t, n in zip(times, before)]
        rows.append(dict(run=r, a_ms_per_call=round(means[0], 3), b_ms_per_call=round(means[1], 3),
                         b_minus_a=round(means[1] - means[0], 3), backward_ms_per_day=round(1e3 * backward, 2)))
        last[r % 2] = gradients
        print(f"run {r}: A {means[0]:.2f}  B {means[1]:.2f} ms per call  (B - A {means[1] - means[0]:+.2f}; "
              f"{'forward' if args.hard else 'backward'} {1e3 * backward:.1f} ms/day)")
    differences = [row["b_minus_a"] for row in rows]
    # runs 2k and 2k + 1 give B the other parity of days: their mean difference cancels a cost that differs between odd
    # and even days (the transition's per-run differences have alternated in sign by ~±5 ms, its version effect ~3)
    pairs = [round((differences[k] + differences[k + 1]) / 2, 3) for k in range(0, len(differences) - 1, 2)]
    summary = dict(a_median=statistics.median(r["a_ms_per_call"] for r in rows),
                   b_median=statistics.median(r["b_ms_per_call"] for r in rows),
                   median_b_minus_a=statistics.median(differences), b_faster_runs=sum(d < 0 for d in differences),
                   pair_b_minus_a=pairs, median_pair_b_minus_a=statistics.median(pairs) if pairs else None,
                   b_faster_pairs=sum(d < 0 for d in pairs),
                   runs=len(rows), gradients_equal_across_parities=bool(torch.equal(last[0], last[1]))
                   if len(last) == 2 else None)
    print(f"{args.module}.{args.entry}: A median {summary['a_median']:.2f}, B median {summary['b_median']:.2f} ms per "
          f"call; median B - A {summary['median_b_minus_a']:+.2f}, B faster in {summary['b_faster_runs']} of "
          f"{len(rows)} runs; gradients equal across parities: {summary['gradients_equal_across_parities']}")
    if pairs:
        print(f"pairs of runs with the days' parity swapped: B - A {', '.join(f'{d:+.2f}' for d in pairs)}; median "
              f"{summary['median_pair_b_minus_a']:+.2f}, B faster in {summary['b_faster_pairs']} of {len(pairs)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(benchmark="ab_kernel_calls", module=args.module, entry=args.entry,
                                        a=str(args.a), b=str(args.b), b_flags=args.b_flags,
                                        vector_flags=list(native.vector_flags()), days=args.days, scale=args.scale,
                                        threads=args.threads, rows=rows, summary=summary,
                                        torch=torch.__version__), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Time per archetype decision step at 0.1M, 1M and 8.5M agents.

Phases: grouping (mixed-radix keys → archetype_of), prompting (template per occupied archetype),
answers (cache look-up + LLM), broadcast (gather to agents). LLM time is measured separately:
one cold step runs the real embedded model (SmolLM2-135M-Instruct, CPU) on all occupied
archetypes; for every N a cold step with an empty cache counts the calls the engine makes (the
backend replays the model's answers from memory so the model is not rerun per N), then warm
steps (every answer cached: zero LLM calls) time everything else.

    python benchmarks/archetype_step.py [--sizes 100000 1000000 8500000] [--repeats 3]

Prints a table and writes benchmarks/results/archetype_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from agenttensor.archetypes import ArchetypeEngine, example_spec
from agenttensor.llm.backends import EmbeddedBackend
from agenttensor.llm.cache import AnswerCache

ENV = {"cases": torch.tensor([1234.0, 5000.0, 300.0, 20.0, 7.0]), "unemployment_rate": 4.5}


class ReplayBackend:
    """Counts the prompts the engine sends and answers them from a memo of real model answers."""

    def __init__(self, inner: EmbeddedBackend, memo: dict[str, np.ndarray]):
        self.inner, self.memo = inner, memo
        self.model_id, self.settings = inner.model_id, inner.settings
        self.last_errors: list[str | None] = []
        self.calls = 0

    def option_probabilities(self, prompts, options):
        self.calls += len(prompts)
        self.last_errors = [None] * len(prompts)
        return np.stack([self.memo[p] for p in prompts])


def random_attributes(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "age_band": torch.randint(0, 9, (n,), generator=g, dtype=torch.int8),
        "sex": torch.randint(0, 2, (n,), generator=g, dtype=torch.int8),
        "borough": torch.randint(0, 5, (n,), generator=g, dtype=torch.int8),
        "employment": torch.randint(0, 3, (n,), generator=g, dtype=torch.int8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 8_500_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "archetype_step.json"))
    args = parser.parse_args()
    spec = example_spec()
    tmp = Path(tempfile.mkdtemp(prefix="archetype_bench_"))

    # 1. Real LLM time: one cold step with the embedded model.
    embedded = EmbeddedBackend(batch_size=args.batch_size)
    t0 = time.perf_counter()
    embedded.option_probabilities(["Warm-up. Answer Yes or No."], ["Yes", "No"])  # loads the model
    load_s = time.perf_counter() - t0
    engine = ArchetypeEngine(spec, backend=embedded, cache=AnswerCache(tmp / "llm.sqlite"))
    engine.decide(random_attributes(args.sizes[0]), ENV)
    llm = dict(engine.last_step)
    memo = dict(zip(engine.last_prompts, engine.last_option_probabilities.numpy()))
    p_yes = engine.last_option_probabilities[:, 0].numpy()
    llm_result = {
        "model": embedded.model_id,
        "model_load_s": load_s,
        "prompts": llm["calls"],
        "batch_size": args.batch_size,
        "llm_seconds": llm["llm_seconds"],
        "seconds_per_prompt": llm["llm_seconds"] / max(llm["calls"], 1),
        "seconds_per_batch": llm["llm_seconds"] / max(1, -(-llm["calls"] // args.batch_size)),
        "p_yes_min": float(p_yes.min()), "p_yes_median": float(np.median(p_yes)), "p_yes_max": float(p_yes.max()),
    }
    print(f"embedded LLM: {llm['calls']} prompts in {llm['llm_seconds']:.1f} s "
          f"({llm_result['seconds_per_batch']:.2f} s per batch of {args.batch_size}); model load {load_s:.1f} s; "
          f"P(Yes) range {p_yes.min():.3f}–{p_yes.max():.3f}")

    # 2. Per N: calls on a cold cache, then warm-cache step times.
    rows = []
    for n in args.sizes:
        attrs = random_attributes(n)
        replay = ReplayBackend(embedded, memo)
        engine = ArchetypeEngine(spec, backend=replay, cache=AnswerCache(tmp / f"n{n}.sqlite"))
        engine.decide(attrs, ENV)
        cold_calls = engine.last_step["calls"]
        phases = []
        for _ in range(args.repeats):
            attrs = {k: v.clone() for k, v in attrs.items()}  # fresh tensors: time the full grouping
            t0 = time.perf_counter()
            engine.decide(attrs, ENV)
            total = time.perf_counter() - t0
            s = engine.last_step
            phases.append((total, s["grouping_s"], s.get("prompting_s", 0.0), s["answers_s"] - s.get("prompting_s", 0.0) - s["llm_seconds"], s["broadcast_s"], s["calls"]))
        best = min(phases)
        t0 = time.perf_counter()
        engine.decide(attrs, ENV)  # same tensors again: grouping reused
        reused_s = time.perf_counter() - t0
        assert engine.last_step["grouping_reused"]
        rows.append({
            "agents": n, "archetypes": engine.last_step["archetypes"], "llm_calls_cold_step": cold_calls,
            "llm_calls_warm_step": best[5], "step_s_excluding_llm": best[0], "grouping_s": best[1],
            "prompting_s": best[2], "cache_s": best[3], "broadcast_s": best[4],
            "step_s_grouping_reused": reused_s,
            "step_s_with_llm_estimate": best[0] + llm_result["seconds_per_prompt"] * cold_calls,
        })
    header = f"{'agents':>10} {'archetypes':>10} {'calls':>6} {'step s':>8} {'reuse s':>8} {'group s':>8} {'prompt s':>8} {'cache s':>8} {'bcast s':>8} {'+LLM s':>8}"
    print(header)
    for r in rows:
        print(f"{r['agents']:>10,} {r['archetypes']:>10} {r['llm_calls_cold_step']:>6} {r['step_s_excluding_llm']:>8.3f} {r['step_s_grouping_reused']:>8.3f} "
              f"{r['grouping_s']:>8.3f} {r['prompting_s']:>8.4f} {r['cache_s']:>8.4f} {r['broadcast_s']:>8.3f} "
              f"{r['step_s_with_llm_estimate']:>8.1f}")
    result = {
        "benchmark": "archetype_step",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "spec": spec.to_dict(), "embedded_llm": llm_result, "steps": rows,
        "note": "step_s_excluding_llm is the best of the warm-cache repeats; calls = prompts sent to the LLM",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

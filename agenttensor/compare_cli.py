"""``agenttensor compare MODEL_DIR --population PATH --scenarios FILE.toml [--seeds N] [--days D] [--out DIR]``."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from .errors import ConfigError


def _seeds(text: str | None, default: int | None) -> list[int]:
    if text is None:
        return list(range(default or 8))
    try:
        if ":" in text:
            a, b = text.split(":")
            seeds = list(range(int(a), int(b)))
        elif "," in text:
            seeds = [int(x) for x in text.split(",")]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds expects a count N, a list '0,1,2' or a range '0:8', got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r} gives no seeds")
    return seeds


def _date_arg(text: str, flag: str) -> dt.date | int:
    try:
        return int(text) if text.strip().lstrip("-").isdigit() else dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{flag} expects a date YYYY-MM-DD (or a step number), got {text!r}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    from .cli import _parse_sets, configure_model, load_population_arg
    from .loading import load_model
    from .run import resolve_device
    from .sampling import sampler_named
    from .scenarios import load_run_params, load_scenarios, run_scenarios

    scenario_set = load_scenarios(args.scenarios)
    model = configure_model(load_model(args.model_dir), args)
    device = resolve_device(args.device)
    seeds = _seeds(args.seeds, scenario_set.seeds)
    days = args.days if args.days is not None else scenario_set.days
    if days is None or days <= 0:
        raise ConfigError(f"--days must be a positive integer (or set [run].days in {args.scenarios}), got {days}")
    start = dt.date.fromisoformat(args.start_date) if args.start_date else scenario_set.start_date
    if scenario_set.days and days < scenario_set.days:  # a shorter window: interventions starting later cannot act
        file_days = scenario_set.days
        scenario_set, dropped = scenario_set.shortened(days, start)
        if dropped:
            print(f"note: --days {days} is shorter than [run].days = {file_days}; left out "
                  f"{len(dropped)} intervention(s) starting after the run: " + "; ".join(dropped[:6])
                  + (" ..." if len(dropped) > 6 else ""), file=sys.stderr)
    params_file = args.params or scenario_set.params
    base = load_run_params(model, params_file, start, args.scenarios) if params_file else model.params_type()
    params = base.with_overrides(_parse_sets(args.set))
    report_from = _date_arg(args.report_from, "--report-from") if args.report_from else scenario_set.report_from
    if args.memory_budget <= 0:
        raise ConfigError(f"--memory-budget must be positive (GB), got {args.memory_budget}")
    population = load_population_arg(args.population)
    t0 = time.perf_counter()
    results = run_scenarios(model, population, scenario_set, seeds=seeds, steps=days, start_date=start, params=params,
                            sampler=sampler_named(args.mode), device=device, memory_budget=args.memory_budget * 1e9,
                            max_batch=args.max_batch, progress=not args.no_progress,
                            share_prefix=not args.no_share_prefix, report_from=report_from)
    if model.run_info is not None:  # e.g. the behaviour source and its LLM call statistics
        results.info.update(model.run_info())
    out = Path(args.out)
    paths = results.save(out)
    table = results.compare()
    head = table.filter(table["metric"].str.starts_with("total_")).select(
        "scenario", "metric", "mean", "lo", "hi", "diff", "diff_lo", "diff_hi")
    print(f"{model.name}: {len(results.names)} scenarios × {len(seeds)} seeds, {days} days, "
          f"{time.perf_counter() - t0:.1f} s ({len(results.info['chunks'])} chunk(s))")
    for entry in results.info.get("prefix", []):
        if entry["shared"]:
            print(f"shared prefix: steps {entry['from_step']}..{entry['to_step'] - 1} ran once per seed for "
                  f"{len(entry['scenarios'])} scenarios ({entry['seconds']:.1f} s; ~{entry['estimated_seconds_saved']:.1f} s "
                  f"saved; then {entry['limited_by'] or 'nothing differs'})")
        elif len(entry["scenarios"]) > 1:
            print(f"shared prefix: off ({entry['reason']})")
    if params_file:
        print(f"parameters: {params_file}" + (f" + --set {', '.join(args.set)}" if args.set else ""))
    if "report_from" in results.info:
        print(f"compared from {results.info['report_from']} (step {results.first_step}) to the end of the run")
    if head.height:
        import polars as pl

        with pl.Config(tbl_width_chars=140, fmt_str_lengths=40, tbl_rows=60, tbl_hide_dataframe_shape=True):
            print(head.with_columns(pl.col(pl.Float64).round(2)))
    llm = results.info.get("llm")
    if llm:
        print(f"LLM behaviour: {llm['calls']:,} calls, {llm['cache_hits']:,} cache hits, {llm['failures']} failures, "
              f"{llm['fallbacks']} fallbacks, {llm['llm_seconds']:.0f} s in the LLM")
    print(f"wrote {out}/" + ", ".join(sorted(p.name for p in paths.values())))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="run scenarios × seeds in one batch and compare them with the baseline")
    p.add_argument("model_dir", help="model directory containing model.py (e.g. models/covid)")
    p.add_argument("--population", help="population directory, or synthetic:N (default: the model's)")
    p.add_argument("--scenarios", required=True, help="scenario TOML file ([run] + [[scenario]] tables)")
    p.add_argument("--seeds", default=None, help="number of seeds N (seeds 0..N-1), a list '0,1,2' or a range '0:8' "
                                                 "(default: [run].seeds or 8)")
    p.add_argument("--days", type=int, default=None, help="days to simulate (default: [run].days)")
    p.add_argument("--start-date", default=None, help="date of day 0, YYYY-MM-DD (default: [run].start_date)")
    p.add_argument("--params", default=None, metavar="FILE.json",
                   help="base parameters from JSON (calibrate's params.json or a plain object; default: [run].params); "
                        "--set applies on top")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a base parameter")
    p.add_argument("--report-from", default=None, metavar="YYYY-MM-DD",
                   help="compare and plot only from this date (default: [run].report_from; e.g. the projection start)")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="run every scenario from step 0 instead of running the steps all scenarios share once per seed "
                        "(results are identical either way)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="hard", help="hard | straight-through | relaxed")
    p.add_argument("--memory-budget", type=float, default=8.0, help="GB per batch chunk (default 8)")
    p.add_argument("--max-batch", type=int, default=None, help="at most this many scenario×seed runs per chunk")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/compare")
    from .cli import _add_model_specific_options

    _add_model_specific_options(p)  # --behavior, --llm-url, --llm-model, --scale (models with a configure hook)
    p.set_defaults(func=cmd_compare)
    return p

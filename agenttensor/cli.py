"""Command line: ``agenttensor run | population | calibrate | compare``.

Errors from bad input are printed as one line (``error: ...``) with exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import AgentTensorError, ConfigError


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects name=value, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = value.strip()
    return out


def _parse_seeds(text: str) -> list[int]:
    try:
        if ":" in text:
            a, b = text.split(":")
            return list(range(int(a), int(b)))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seed expects an integer, a list '0,1,2' or a range '0:4', got {text!r}") from None


def load_population_arg(text: str | None):
    """``None`` → model default; ``synthetic:N`` → generated; otherwise a population directory."""
    from .population import Population, synthetic

    if text is None:
        return None
    if text.startswith("synthetic:"):
        try:
            n = int(float(text.split(":", 1)[1]))
        except ValueError:
            raise ConfigError(f"--population synthetic:N needs an integer N, got {text!r}") from None
        return synthetic(n, seed=0)
    return Population.load(text)


def cmd_run(args: argparse.Namespace) -> int:
    from .loading import load_model
    from .run import resolve_device, simulate
    from .sampling import sampler_named

    model = load_model(args.model_dir)
    device = resolve_device(args.device)
    params = model.params_type().with_overrides(_parse_sets(args.set))
    seeds = _parse_seeds(args.seed)
    if args.steps <= 0:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    model = configure_model(model, args)
    population = load_population_arg(args.population)
    start = dt.date.fromisoformat(args.start_date) if args.start_date else None
    t0 = time.perf_counter()
    results = simulate(model, population, params, steps=args.steps, seeds=seeds, sampler=sampler_named(args.mode),
                       device=device, start_date=start, progress=not args.no_progress,
                       checkpoint_every=args.checkpoint_every,
                       checkpoint_path=(Path(args.out) / "checkpoint.pt") if args.checkpoint_every or args.resume else None,
                       resume=args.resume, sync_free=args.sync_free, cuda_graphs=args.cuda_graphs)
    out = Path(args.out)
    extra = dict(population=args.population or "model default", seeds=seeds,
                 wall_seconds=time.perf_counter() - t0, command=" ".join(sys.argv))
    if model.run_info is not None:
        extra.update(model.run_info())
    results.save(out, extra_summary=extra)
    _print_summary(results, out)
    return 0


def configure_model(model, args: argparse.Namespace):
    """Apply the model-specific options (--behavior, --llm-url, --llm-model, --scale) through
    ``model.configure``; an error names the options a model without ``configure`` cannot take."""
    options = {k: getattr(args, k, None) for k in ("behavior", "llm_url", "llm_model", "scale")}
    if not any(v is not None for v in options.values()):
        return model
    if model.configure is None:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
        raise ConfigError(f"model {model.name} does not take {', '.join(given)}")
    return model.configure(options)


def _print_summary(results, out: Path) -> None:
    table = results.to_polars()
    last = table.filter(table["step"] == table["step"].max())
    print(f"{results.model_name}: {results.steps} steps, seeds {results.seeds}, "
          f"{results.timing.get('seconds_per_step', 0):.4f} s/step")
    print(last)
    print(f"wrote {out}/results.parquet, summary.json, plot.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agenttensor", description="City-scale agent-based simulation as tensors.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a model and write results")
    run.add_argument("model_dir", help="model directory containing model.py (e.g. models/seir)")
    run.add_argument("--population", help="population directory, or synthetic:N (default: the model's)")
    run.add_argument("--steps", type=int, default=120)
    run.add_argument("--seed", default="0", help="seed, list '0,1,2' or range '0:4' (batched in one pass)")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    run.add_argument("--device", default="cpu")
    run.add_argument("--mode", default="hard", help="hard | straight-through | relaxed")
    run.add_argument("--start-date", help="calendar date of step 0 (YYYY-MM-DD)")
    run.add_argument("--checkpoint-every", type=int, default=None, help="save a resumable checkpoint every k steps")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--out", default="runs/latest")
    run.add_argument("--sync-free", action="store_true",
                     help="hard mode: steps that read nothing back on the host (a GPU's host queues ahead; same numbers)")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="hard mode on CUDA: each kind of day captured as a CUDA graph once, replayed on the others")
    _add_model_specific_options(run)
    run.set_defaults(func=cmd_run)

    for register in _plugin_registrars():
        register(sub)
    return parser


def _add_model_specific_options(run: argparse.ArgumentParser) -> None:
    """Options used by the behaviour engine of models that have one (ignored by others)."""
    run.add_argument("--behavior", default=None, help="embedded | openai | vllm | heuristic (models with behaviour)")
    run.add_argument("--llm-url", default=None, help="OpenAI-compatible server base URL (--behavior openai)")
    run.add_argument("--llm-model", default=None, help="model name for the LLM backend")
    run.add_argument("--scale", type=float, default=None, help="population scale for models that build one")


def _plugin_registrars() -> list[Callable]:
    """Sub-commands implemented outside this module (population builders, calibration, comparison)."""
    registrars = []
    for module, name in (("populations.nyc.cli", "add_population_parser"), ("agenttensor.calibration_cli", "add_parser"),
                         ("agenttensor.compare_cli", "add_parser")):
        try:
            mod = __import__(module, fromlist=[name])
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        registrars.append(getattr(mod, name))
    return registrars


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AgentTensorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``agenttensor calibrate MODEL_DIR --population PATH --targets FILE_OR_NAME --window START:END ...``

Writes params.json, loss.png, fit.png and fit.parquet into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from .errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit parameters to observed targets by gradient descent")
    p.add_argument("model_dir", help="model directory containing model.py (e.g. models/seir)")
    p.add_argument("--population", help="population directory, or synthetic:N (default: the model's)")
    p.add_argument("--targets", required=True,
                   help="CSV/Parquet with date,borough,metric,value or a bundled name (nyc-cases-weekly, ...)")
    p.add_argument("--window", required=True, help="training dates START:END (YYYY-MM-DD:YYYY-MM-DD, inclusive)")
    p.add_argument("--learn", default=None,
                   help="comma-separated NAME[=TRANSFORM][@SIZE[/PERIOD]], e.g. "
                        "'R0=softplus,transmission_multiplier@13/7,detection_rate=sigmoid@5' "
                        "(default: the model's time-varying parameters weekly + a detection rate)")
    p.add_argument("--metric", action="append", default=[], metavar="TARGET=MODEL_METRIC[*SCALE]",
                   help="map a target metric to a model metric, optionally times a learned observation "
                        "parameter, e.g. cases=new_infections_by_borough*detection_rate (repeatable)")
    p.add_argument("--loss", default="mse_log", help="mse | mse_log | mse_sqrt | poisson | negative_binomial[:R]")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", default="0", help="seed(s) averaged each epoch: '0', '0,1' or '0:4'")
    p.add_argument("--start-date", help="first simulated day (default: window start; earlier = burn-in)")
    p.add_argument("--forecast-days", type=int, default=0, help="simulate this many days after the window")
    p.add_argument("--target-scale", default="auto",
                   help="observed -> simulated units: a number, or 'auto' = agents / real population per borough")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    p.add_argument("--grad-checkpoint-every", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/calibrate")
    p.set_defaults(func=cmd_calibrate)


def _parse_window(text: str) -> tuple[dt.date, dt.date]:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = dt.date.fromisoformat(parts[0]), dt.date.fromisoformat(parts[1])
    except ValueError:
        raise ConfigError(f"--window expects START:END dates (YYYY-MM-DD:YYYY-MM-DD), got {text!r}") from None
    if b < a:
        raise ConfigError(f"--window end {b} is before its start {a}")
    return a, b


def parse_learn(text: str, params, weeks: int):
    """'R0=softplus,transmission_multiplier@13/7,detection_rate=sigmoid@5' -> [Learn]."""
    from .calibration import Learn, Softplus, transform_named

    specs = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        size = period = None
        if "@" in item:
            item, shape = item.split("@", 1)
            try:
                if "/" in shape:
                    size_text, period_text = shape.split("/", 1)
                    period = int(period_text)
                    size = int(size_text) if size_text else None
                else:
                    size = int(shape)
            except ValueError:
                raise ConfigError(f"--learn {item}@{shape}: expected @SIZE or @SIZE/PERIOD") from None
        name, _, transform = item.partition("=")
        meta = params.spec()[name].metadata if name in params.spec() else {}
        if meta.get("time_varying") and size is None:
            size, period = weeks, period or 7
        specs.append(Learn(name, transform=transform_named(transform) if transform else Softplus(), size=size,
                           period=period))
    if not specs:
        raise ConfigError("--learn is empty")
    return specs


def parse_metric(text: str):
    from .calibration import Observe

    if "=" not in text:
        raise ConfigError(f"--metric expects TARGET=MODEL_METRIC[*SCALE], got {text!r}")
    target, rhs = text.split("=", 1)
    metric, _, scale = rhs.partition("*")
    return Observe(target.strip(), metric.strip(), scale.strip() or None)


# 2020 Census, persons by borough (used to scale observed counts to a smaller simulated population).
BOROUGH_POPULATION_2020 = {"Bronx": 1_472_654, "Brooklyn": 2_736_074, "Manhattan": 1_694_251, "Queens": 2_405_464,
                           "Staten Island": 495_747}


def auto_target_scale(env, labels: list[str]) -> dict[str, float]:
    """Simulated agents per real resident, by borough (matching labels by name or by order B0..B4)."""
    import torch

    from .population import BOROUGHS

    counts = torch.bincount(env.borough.cpu(), minlength=len(labels)).tolist() if hasattr(env, "borough") else None
    if counts is None or len(counts) != len(BOROUGHS):
        total = float(getattr(env, "num_agents", 0)) / sum(BOROUGH_POPULATION_2020.values())
        return {b: total for b in BOROUGH_POPULATION_2020} | {"NYC": total}
    scale = {name: counts[i] / BOROUGH_POPULATION_2020[name] for i, name in enumerate(BOROUGHS)}
    scale["NYC"] = sum(counts) / sum(BOROUGH_POPULATION_2020.values())
    return scale


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import Learn, Observe, Sigmoid, calibrate
    from .cli import _parse_seeds, _parse_sets, load_population_arg
    from .loading import load_model
    from .observed import load_targets
    from .run import resolve_device

    model = load_model(args.model_dir)
    device = resolve_device(args.device)
    params = model.params_type().with_overrides(_parse_sets(args.set))
    window = _parse_window(args.window)
    start = dt.date.fromisoformat(args.start_date) if args.start_date else window[0]
    if args.epochs < 0:
        raise ConfigError(f"--epochs must be >= 0, got {args.epochs}")
    targets = load_targets(args.targets)
    weeks = ((window[1] - start).days + 1 + args.forecast_days + 6) // 7
    observe = [parse_metric(m) for m in args.metric]
    if not observe:
        names = _metric_names(model)
        metric = "reported_cases_by_borough" if "reported_cases_by_borough" in names else "new_infections_by_borough"
        first = sorted(targets["metric"].unique().to_list())
        target = "cases" if "cases" in first else first[0]
        scale = None if metric.startswith("reported") else "detection_rate"
        observe = [Observe(target, metric, scale)]
    targets = targets.filter(targets["metric"].is_in([o.target for o in observe]))
    if args.learn:
        learn = parse_learn(args.learn, params, weeks)
    else:
        learn = [Learn(n, size=weeks, period=7) for n, f in params.spec().items() if f.metadata.get("time_varying")]
        boroughs = targets["borough"].n_unique()
        learn += [Learn(o.scale, init=0.3, transform=Sigmoid(0.0, 1.0), size=boroughs) for o in observe if o.scale]
    population = load_population_arg(args.population)
    if population is None and model.default_population is not None:
        population = model.default_population()
    env = model.setup(population, params.as_tensors(device), device)
    labels = list(getattr(env, "group_labels", []) or ["all"])
    if args.target_scale == "auto":
        target_scale = auto_target_scale(env, labels)
    else:
        try:
            target_scale = float(args.target_scale)
        except ValueError:
            raise ConfigError(f"--target-scale must be a number or 'auto', got {args.target_scale!r}") from None
    seeds = _parse_seeds(args.seed)

    def report(epoch, loss, values):
        if epoch % max(args.epochs // 10, 1) == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:4d}/{args.epochs}  loss {loss:.5f}", flush=True)

    result = calibrate(model, None, targets, learn, observe=observe, window=window, loss=args.loss, epochs=args.epochs,
                       lr=args.lr, params=params, start_date=start, forecast_days=args.forecast_days, seeds=seeds,
                       device=str(device), grad_checkpoint_every=args.grad_checkpoint_every,
                       target_scale=target_scale, env=env, callback=report)
    out = result.save(Path(args.out))
    print(json.dumps(result.errors(), indent=1))
    print(f"wrote {out}/params.json, loss.png, fit.png, fit.parquet")
    return 0


def _metric_names(model) -> set[str]:
    """Metric names of a model, from a 1-step hard run on a tiny synthetic population."""
    from .population import synthetic
    from .run import simulate

    try:
        return set(simulate(model, synthetic(500, seed=0), steps=1, progress=False).metrics)
    except Exception:
        return set()

"""Calibration: fit model parameters to observed targets by gradient descent through the simulation.

One entry point, `calibrate`, in the spirit of GradABM: every epoch runs the model forward in a
gradient mode (`StraightThrough` by default: the forward pass *is* hard sampling), compares the
simulated metrics, aggregated onto the targets' dates, with the observations, and back-propagates
the loss to unconstrained raw parameters that transforms map into their bounds.

- `Learn` names what to learn: a model parameter (scalar, or one value per week for a
  time-varying one such as ``transmission_multiplier``) or an *observation* parameter (e.g. a
  per-borough ``detection_rate`` linking true infections to reported cases).
- `Observe` links a target metric (``cases``) to a model metric (``new_infections_by_borough``)
  and, optionally, an observation parameter that scales it.
- Losses: ``mse_log``, ``mse_sqrt``, ``mse``, ``poisson``, ``negative_binomial`` (or any callable).
- `CovariateNet` maps weekly covariates (subway entries, COVID-like-illness ED visits) to weekly
  multipliers (GradABM's CalibNN idea); pass it in ``networks=``.
- `sensitivities`: one backward pass, d(outcome)/d(each parameter and intervention lever), as a
  polars table with a finite-difference spot check on common random numbers.

Calendar: the run starts at ``start_date`` (default: the window start); daily metrics are summed
over each target row's period (day, week ending on ``date``, or calendar month ending on ``date``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import polars as pl
import torch
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .model import Model, Substep
from .observed import parse_date
from .params import Params
from .population import BOROUGH_CODES, BOROUGHS
from .results import Results
from .run import simulate
from .sampling import Hard, Sampler, StraightThrough

# ---------------------------------------------------------------------------------------------
# transforms: unconstrained raw value  <->  parameter value within its bounds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """A bijection from the real line onto a parameter's range (``forward``) and its inverse."""

    def forward(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, value: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Identity(Transform):
    def forward(self, raw: Tensor) -> Tensor:
        return raw

    def inverse(self, value: Tensor) -> Tensor:
        return value


@dataclass(frozen=True)
class Softplus(Transform):
    """(0, ∞): value = softplus(raw) (+ ``low``)."""

    low: float = 0.0

    def forward(self, raw: Tensor) -> Tensor:
        return nn.functional.softplus(raw) + self.low

    def inverse(self, value: Tensor) -> Tensor:
        v = (value - self.low).clamp_min(1e-8)
        return v + torch.log(-torch.expm1(-v))


@dataclass(frozen=True)
class Exp(Transform):
    """(0, ∞): value = exp(raw); steps are relative changes (good for scales spanning decades)."""

    def forward(self, raw: Tensor) -> Tensor:
        return torch.exp(raw)

    def inverse(self, value: Tensor) -> Tensor:
        return torch.log(value.clamp_min(1e-12))


@dataclass(frozen=True)
class Sigmoid(Transform):
    """(low, high): value = low + (high - low) · sigmoid(raw)."""

    low: float = 0.0
    high: float = 1.0

    def forward(self, raw: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(raw)

    def inverse(self, value: Tensor) -> Tensor:
        p = ((value - self.low) / (self.high - self.low)).clamp(1e-6, 1 - 1e-6)
        return torch.logit(p)


def transform_named(text: str) -> Transform:
    """'softplus' | 'exp' | 'identity' | 'sigmoid' (0..1) | 'sigmoid:LOW:HIGH' (CLI helper)."""
    parts = text.split(":")
    try:
        if parts[0] == "sigmoid":
            return Sigmoid(float(parts[1]), float(parts[2])) if len(parts) == 3 else Sigmoid()
        table = {"softplus": Softplus(), "exp": Exp(), "identity": Identity()}
        return table[parts[0]]
    except (KeyError, ValueError, IndexError):
        raise ConfigError(f"unknown transform {text!r}; use softplus, exp, identity, sigmoid or sigmoid:LOW:HIGH") from None


# ---------------------------------------------------------------------------------------------
# what to learn and how targets map to metrics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Learn:
    """A parameter to learn.

    name: a model parameter, or any other name for an observation parameter used by an `Observe`.
    init: starting value(s) in the parameter's own units (default: the model's current value, 1 for
    observation parameters). size: number of values (e.g. weeks for a weekly multiplier, 5 for a
    per-borough detection rate); default 1 (scalar). period: steps each value covers for a
    time-varying model parameter (7 = weekly); the values are expanded to the parameter's own period.
    anchor: keep the first value fixed at its init (a reference week, so that a learned scale such as
    R0 and the weekly multipliers are jointly identifiable).
    hold: for a time-varying model parameter, the value used after the learned ones (e.g. in a
    forecast) is the mean of the last ``hold`` learned values; None (default): the parameter's own
    rule, the last learned value repeats.
    """

    name: str
    init: float | Sequence[float] | Tensor | None = None
    transform: Transform = Softplus()
    size: int | None = None
    period: int | None = None
    anchor: bool = False
    hold: int | None = None

    def value(self, raw: Tensor, anchor_value: Tensor | None = None) -> Tensor:
        """Parameter value(s) from the raw tensor (with the anchored first value prepended)."""
        value = self.transform.forward(raw)
        return torch.cat([anchor_value.reshape(1).to(value), value]) if self.anchor else value


@dataclass(frozen=True)
class Observe:
    """Target metric ``target`` is model metric ``metric`` (× observation parameter ``scale``).

    aggregate: "sum" for flows (cases per week), "mean" for stocks (a rate over a month)."""

    target: str
    metric: str
    scale: str | None = None
    aggregate: str = "sum"


# ---------------------------------------------------------------------------------------------
# losses: (predicted, observed) [D, G] in simulation units -> scalar
# ---------------------------------------------------------------------------------------------


def mse(pred: Tensor, obs: Tensor) -> Tensor:
    return ((pred - obs) ** 2).mean()


def mse_log(pred: Tensor, obs: Tensor) -> Tensor:
    """Mean squared error of log(1 + counts): relative errors, robust across epidemic phases."""
    return ((torch.log1p(pred.clamp_min(0)) - torch.log1p(obs)) ** 2).mean()


def mse_sqrt(pred: Tensor, obs: Tensor) -> Tensor:
    """Mean squared error of square-root counts (variance-stabilising for Poisson counts)."""
    return ((torch.sqrt(pred.clamp_min(0) + 1e-8) - torch.sqrt(obs)) ** 2).mean()


def poisson(pred: Tensor, obs: Tensor) -> Tensor:
    """Poisson negative log-likelihood per observation (up to a constant)."""
    mu = pred.clamp_min(1e-6)
    return (mu - obs * torch.log(mu)).mean()


def negative_binomial(dispersion: float = 10.0) -> Callable[[Tensor, Tensor], Tensor]:
    """Negative-binomial NLL per observation, mean μ = pred and size r = ``dispersion``
    (variance μ + μ²/r; r → ∞ is Poisson)."""

    def nb(pred: Tensor, obs: Tensor) -> Tensor:
        mu = pred.clamp_min(1e-6)
        r = torch.as_tensor(dispersion, dtype=mu.dtype)
        ll = (torch.lgamma(obs + r) - torch.lgamma(r) - torch.lgamma(obs + 1)
              + r * torch.log(r / (r + mu)) + obs * torch.log(mu / (r + mu)))
        return -ll.mean()

    nb.__name__ = f"negative_binomial({dispersion:g})"
    return nb


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": mse, "mse_log": mse_log, "mse_sqrt": mse_sqrt, "poisson": poisson, "negative_binomial": negative_binomial(),
}


def loss_named(name: str | Callable) -> Callable[[Tensor, Tensor], Tensor]:
    """A loss by name; 'negative_binomial:R' sets the dispersion."""
    if callable(name):
        return name
    if name.startswith("negative_binomial:"):
        try:
            return negative_binomial(float(name.split(":", 1)[1]))
        except ValueError:
            raise ConfigError(f"loss {name!r}: dispersion must be a number") from None
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)} (or negative_binomial:R)")
    return LOSSES[name]


def random_walk_penalty(name: str, weight: float, *, log: bool = True,
                        skip_first: int = 0) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """A smoothness penalty for `calibrate(penalty=...)`: ``weight · Σ_k (x_{k+1} − x_k)²`` over the
    learned values ``x`` of ``name`` (their logs when ``log``, i.e. relative week-to-week changes),
    starting at index ``skip_first``.

    As a prior: a Gaussian random walk with step sd σ on log values, combined with a data loss that
    is the mean of n squared log errors with noise sd s (``mse_log``), gives ``weight = s² / (n σ²)``
    (both sides divided by the data term's n / (2 s²)).
    """
    if weight < 0:
        raise ConfigError(f"random_walk_penalty({name}): weight must be >= 0, got {weight}")

    def penalty(values: Mapping[str, Tensor]) -> Tensor:
        if name not in values:
            raise ConfigError(f"random_walk_penalty: {name!r} is not learned; learned: {sorted(values)}")
        x = values[name].reshape(-1)[skip_first:]
        x = torch.log(x.clamp_min(1e-12)) if log else x
        return weight * ((x[1:] - x[:-1]) ** 2).sum()

    penalty.__name__ = f"random_walk_penalty({name}, {weight:g})"
    return penalty


# ---------------------------------------------------------------------------------------------
# CalibNN-style covariate network
# ---------------------------------------------------------------------------------------------


class CovariateNet(nn.Module):
    """Weekly covariates [W, K] -> weekly multipliers [W] in (low, high).

    A small GRU over the weeks (so a week's multiplier can depend on recent weeks) followed by a
    linear read-out and a scaled sigmoid, as in GradABM's CalibNN. Initialised so every output is
    ``init`` (the read-out weights start at zero).
    """

    def __init__(self, num_covariates: int, hidden: int = 16, low: float = 0.1, high: float = 3.0, init: float = 1.0):
        super().__init__()
        self.low, self.high = low, high
        self.encoder = nn.GRU(num_covariates, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)
        nn.init.zeros_(self.readout.weight)
        with torch.no_grad():
            self.readout.bias.fill_(float(Sigmoid(low, high).inverse(torch.tensor(init))))

    def forward(self, covariates: Tensor) -> Tensor:
        h, _ = self.encoder(covariates.unsqueeze(0))
        return self.low + (self.high - self.low) * torch.sigmoid(self.readout(h[0]).squeeze(-1))


# ---------------------------------------------------------------------------------------------
# target alignment
# ---------------------------------------------------------------------------------------------


@dataclass
class _Block:
    """One target metric aligned to the simulation: obs [D, G], agg [D, T], borough columns."""

    observe: Observe
    dates: list[dt.date]
    boroughs: list[str]
    observed: Tensor  # [D, G] in target units
    scale: Tensor  # [G] target units -> simulation units
    aggregation: Tensor  # [D, T]
    columns: list[int | None]  # model group index per borough (None = citywide total)
    train: Tensor  # [D] bool: inside the training window


def _period(dates: list[dt.date]) -> str:
    if len(dates) < 2:
        return "day"
    gap = min((b - a).days for a, b in zip(dates, dates[1:]))
    return "day" if gap == 1 else "week" if gap == 7 else "month" if gap >= 28 else "day"


def _span(date: dt.date, period: str) -> tuple[dt.date, dt.date]:
    if period == "week":
        return date - dt.timedelta(days=6), date
    if period == "month":
        return date.replace(day=1), date
    return date, date


def _borough_column(name: str, labels: list[str]) -> int | None:
    if name.lower() in ("nyc", "all", "citywide", "total"):
        return None
    lower = [label.lower() for label in labels]
    if name.lower() in lower:
        return lower.index(name.lower())
    for code, full in zip(BOROUGH_CODES, BOROUGHS):
        if name.lower() in (code.lower(), full.lower()) and (full.lower() in lower or code.lower() in lower):
            return lower.index(full.lower()) if full.lower() in lower else lower.index(code.lower())
    if len(labels) == len(BOROUGHS) and name in BOROUGHS:  # synthetic populations: boroughs B0..B4 in order
        return BOROUGHS.index(name)
    raise InputError(f"target borough {name!r} is not a group of this population (groups: {labels}); "
                     "use a borough name, a code, or NYC for the citywide total")


def _align(targets: pl.DataFrame, observe: Sequence[Observe], start_date: dt.date, steps: int,
           train_window: tuple[dt.date, dt.date], labels: list[str], target_scale) -> list[_Block]:
    blocks = []
    for ob in observe:
        table = targets.filter(pl.col("metric") == ob.target)
        if table.height == 0:
            raise InputError(f"no target rows for metric {ob.target!r}; targets have {sorted(targets['metric'].unique())}")
        all_dates = sorted(table["date"].unique().to_list())
        period = _period(all_dates)
        end = start_date + dt.timedelta(days=steps - 1)
        dates = [d for d in all_dates if _span(d, period)[0] >= start_date and d <= end]
        if not dates:
            raise InputError(f"targets for {ob.target!r} ({all_dates[0]}..{all_dates[-1]}) lie outside the simulated "
                             f"period {start_date}..{end}")
        boroughs = sorted(table["borough"].unique().to_list(), key=lambda b: (BOROUGHS + (b,)).index(b))
        wide = (table.filter(pl.col("date").is_in(dates)).pivot(on="borough", index="date", values="value")
                .sort("date"))
        if wide.height != len(dates) or wide.select(boroughs).null_count().sum_horizontal().item():
            raise InputError(f"targets for {ob.target!r}: every date needs a value for every borough {boroughs}")
        observed = torch.tensor(wide.select(boroughs).to_numpy(), dtype=torch.float32)
        aggregation = torch.zeros(len(dates), steps)
        for i, d in enumerate(dates):
            a, b = _span(d, period)
            aggregation[i, (a - start_date).days: (b - start_date).days + 1] = 1.0
        if ob.aggregate == "mean":
            aggregation = aggregation / aggregation.sum(1, keepdim=True)
        elif ob.aggregate != "sum":
            raise ConfigError(f"Observe({ob.target}).aggregate must be 'sum' or 'mean', got {ob.aggregate!r}")
        if isinstance(target_scale, Mapping):
            missing = [b for b in boroughs if b not in target_scale]
            if missing:
                raise ConfigError(f"target_scale has no entry for borough(s) {missing}")
            scale = torch.tensor([float(target_scale[b]) for b in boroughs])
        else:
            scale = torch.full((len(boroughs),), float(target_scale))
        train = torch.tensor([train_window[0] <= _span(d, period)[0] and d <= train_window[1] for d in dates])
        blocks.append(_Block(ob, dates, boroughs, observed, scale, aggregation,
                             [_borough_column(b, labels) for b in boroughs], train))
    return blocks


def _predict(block: _Block, results: Results, observation: Mapping[str, Tensor]) -> Tensor:
    """Simulated values on the block's dates, [D, G] in simulation units (mean over seeds)."""
    if block.observe.metric not in results.metrics:
        raise ConfigError(f"model {results.model_name} has no metric {block.observe.metric!r}; "
                          f"metrics: {sorted(results.metrics)}")
    series = results.metrics[block.observe.metric].to(torch.float32)  # [T, B] or [T, B, G]
    series = series.mean(1)  # over seeds
    if series.dim() == 1:
        if any(c is not None for c in block.columns):
            raise ConfigError(f"metric {block.observe.metric!r} is citywide; target {block.observe.target!r} is per "
                              "borough. Map it to a per-group metric (e.g. new_infections_by_borough)")
        columns = series[:, None].expand(-1, len(block.columns))
    else:
        total = series.sum(1)
        columns = torch.stack([total if c is None else series[:, c] for c in block.columns], 1)  # [T, G]
    pred = block.aggregation.to(columns.device) @ columns
    if block.observe.scale is not None:
        s = observation[block.observe.scale]
        if s.dim() == 1 and s.numel() > 1:
            if s.numel() != len(block.columns):
                raise ConfigError(f"observation parameter {block.observe.scale} has {s.numel()} values for "
                                  f"{len(block.columns)} boroughs")
        pred = pred * s
    return pred


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """What `calibrate` returns.

    values: learned values by name (floats or lists); params: the model `Params` with learned values
    (detached); observation: learned observation parameters; loss_history: per-epoch loss;
    fit: long table (date, borough, metric, observed, fitted, split) with split = train | test
    (test = target rows after the training window, i.e. the forecast); results: the final run.
    """

    values: dict[str, Any]
    params: Params
    observation: dict[str, Tensor]
    loss_history: list[float]
    fit: pl.DataFrame
    results: Results
    info: dict[str, Any] = field(default_factory=dict)

    def errors(self) -> dict[str, dict[str, float]]:
        """MAE, RMSE and normalised deviation (Σ|err| / Σ|obs|) for train and test rows."""
        return {split: fit_errors(self.fit.filter(pl.col("split") == split))
                for split in ("train", "test") if self.fit.filter(pl.col("split") == split).height}

    def save(self, directory: str | Path) -> Path:
        """params.json (values, model params, info, errors), loss.png, fit.png, fit.parquet."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = dict(learned=self.values, params=self.params.to_dict(), loss_history=self.loss_history,
                       errors=self.errors(), info=self.info)
        (directory / "params.json").write_text(json.dumps(payload, indent=2, default=str))
        self.fit.write_parquet(directory / "fit.parquet", statistics=False)
        plot_loss(self.loss_history, directory / "loss.png")
        plot_fit(self.fit, directory / "fit.png")
        return directory


def fit_errors(fit: pl.DataFrame, predicted: str = "fitted") -> dict[str, float]:
    err = (fit[predicted] - fit["observed"]).to_numpy()
    obs = fit["observed"].to_numpy()
    return dict(mae=float(abs(err).mean()), rmse=float((err ** 2).mean() ** 0.5),
                nd=float(abs(err).sum() / max(abs(obs).sum(), 1e-12)), rows=int(len(err)))


def _initial_raw(spec: Learn, params: Params) -> Tensor:
    if spec.init is not None:
        value = torch.as_tensor(spec.init, dtype=torch.float32).detach().clone()
    elif spec.name in params.spec():
        current = getattr(params, spec.name)
        value = torch.as_tensor(current, dtype=torch.float32).detach().clone().reshape(-1)
        value = value[:1] if spec.size and value.numel() != spec.size else value
    else:
        value = torch.ones(1)
    size = spec.size or value.numel()
    if value.numel() == 1 and size > 1:
        value = value.reshape(1).expand(size).clone()
    if value.numel() != size:
        raise ConfigError(f"learn {spec.name}: init has {value.numel()} values but size is {size}")
    raw = spec.transform.inverse(value.reshape(size))
    if not torch.isfinite(raw).all():
        raise ConfigError(f"learn {spec.name}: init {value.tolist()} lies outside the transform's range {spec.transform}")
    return raw


def _model_value(spec: Learn, value: Tensor, params: Params) -> Tensor:
    """Shape a learned value for the model: scalar, or expanded to the parameter's period."""
    meta = params.spec()[spec.name].metadata
    if value.numel() == 1 and not meta.get("time_varying"):
        return value.reshape(())
    if meta.get("time_varying") and spec.period:
        own = meta.get("period", 1) or 1
        if spec.period % own:
            raise ConfigError(f"learn {spec.name}: period {spec.period} is not a multiple of the parameter's period {own}")
        if spec.hold:
            value = torch.cat([value, value[-spec.hold:].mean().reshape(1)])
        value = value.repeat_interleave(spec.period // own)
    elif meta.get("time_varying") and spec.hold:
        value = torch.cat([value.reshape(-1), value.reshape(-1)[-spec.hold:].mean().reshape(1)])
    return value


def apply_learned(params: Params, learn: Sequence[Learn], values: Mapping[str, Tensor]) -> tuple[Params, dict[str, Tensor]]:
    """Put learned values into the model params; return (params, observation parameters)."""
    changes, observation = {}, {}
    for spec in learn:
        if spec.name in params.spec():
            changes[spec.name] = _model_value(spec, values[spec.name], params)
        else:
            observation[spec.name] = values[spec.name]
    return (params.replace(**changes) if changes else params), observation


def calibrate(model: Model, population: Any, targets: pl.DataFrame, learn: Sequence[Learn], *,
              observe: Sequence[Observe], window: tuple[dt.date | str, dt.date | str],
              loss: str | Callable = "mse_log", epochs: int = 50, lr: float = 0.05,
              optimiser: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
              params: Params | None = None, start_date: dt.date | str | None = None, forecast_days: int = 0,
              seeds: Sequence[int] = (0,), sampler: Sampler = StraightThrough(), device: str = "cpu",
              grad_checkpoint_every: int | None = None, target_scale: float | Mapping[str, float] = 1.0,
              networks: Mapping[str, tuple[nn.Module, Tensor, int]] | None = None, env: Any = None,
              lr_decay: float = 1.0, clip: float | None = 10.0,
              penalty: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
              callback: Callable[[int, float, dict], None] | None = None) -> Calibration:
    """Fit ``learn`` (and ``networks``) so the model's metrics match ``targets`` in ``window``.

    targets: polars (date, borough, metric, value) (see `agenttensor.observed`). window: inclusive
    training dates; target rows whose period lies in it are fitted. The run starts at
    ``start_date`` (default window start; earlier = burn-in) and lasts to the window end plus
    ``forecast_days`` (rows after the window are reported as ``test``). target_scale: multiplies
    observations into simulation units (e.g. simulated/real population, per borough).
    networks: {param_name: (module, covariates [W, K], period)}: the module's output [W] becomes
    the time-varying model parameter (each value covering ``period`` steps).
    seeds: several seeds average the simulated metrics (lower-variance gradients).
    penalty: a regulariser ``fn(values) -> scalar`` on the learned values ({name: tensor in the
    parameter's own units}, the same dict `Calibration.values` reports, network outputs included),
    added to the data loss every epoch (e.g. `random_walk_penalty` for smooth weekly multipliers,
    i.e. a prior). ``loss_history`` is the total (data + penalty), ``info["penalty_history"]`` the
    penalty part; ``info["final_loss"]`` is the data loss of the final hard run.
    """
    params = (params if params is not None else model.params_type()).validate()
    window = (parse_date(window[0], error=ConfigError, what="window start"),
              parse_date(window[1], error=ConfigError, what="window end"))
    if window[1] < window[0]:
        raise ConfigError(f"window end {window[1]} is before its start {window[0]}")
    start = parse_date(start_date, error=ConfigError, what="start_date") if start_date is not None else window[0]
    if start > window[0]:
        raise ConfigError(f"start_date {start} is after the window start {window[0]}")
    steps = (window[1] - start).days + 1 + int(forecast_days)
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    if not learn and not networks:
        raise ConfigError("nothing to learn: give at least one Learn(...) or a network")
    observation_names = {o.scale for o in observe if o.scale}
    for spec in learn:
        if spec.name not in params.spec() and spec.name not in observation_names:
            raise ConfigError(f"learn {spec.name!r}: not a parameter of {model.name} and not used as an Observe scale; "
                              f"model parameters: {', '.join(params.spec())}")
    for spec in learn:
        if spec.hold is not None:
            meta = params.spec()[spec.name].metadata if spec.name in params.spec() else {}
            size = spec.size or 1
            if not meta.get("time_varying"):
                raise ConfigError(f"learn {spec.name!r}: hold= applies to time-varying model parameters only")
            if not 1 <= spec.hold <= size:
                raise ConfigError(f"learn {spec.name!r}: hold={spec.hold} must be between 1 and size={size}")
    if penalty is not None and not callable(penalty):
        raise ConfigError(f"penalty must be a callable fn(values) -> scalar tensor, got {type(penalty).__name__}")
    for name in observation_names:
        if name not in {s.name for s in learn}:
            raise ConfigError(f"observation parameter {name!r} is used by an Observe but not learned; add Learn({name!r})")
    loss_fn = loss_named(loss)
    dev = torch.device(device)
    if env is None:
        if population is None:
            population = model.default_population() if model.default_population else None
        env = model.setup(population, params.as_tensors(dev), dev)
    labels = list(getattr(env, "group_labels", []) or ["all"])
    blocks = _align(targets, observe, start, steps, window, labels, target_scale)
    if not any(bool(b.train.any()) for b in blocks):
        raise InputError(f"no target rows fall inside the window {window[0]}..{window[1]}")

    raw, anchors = {}, {}
    for spec in learn:
        initial = _initial_raw(spec, params).to(dev)
        if spec.anchor:
            anchors[spec.name] = spec.transform.forward(initial[:1]).detach()
            initial = initial[1:]
        raw[spec.name] = initial.clone().requires_grad_(True)
    trainable = list(raw.values())
    for module, _, _ in (networks or {}).values():
        trainable += list(module.parameters())
    opt = optimiser(trainable, lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)

    def forward(run_sampler: Sampler) -> tuple[Tensor, Results, Params, dict[str, Tensor], dict[str, Tensor]]:
        values = {spec.name: spec.value(raw[spec.name], anchors.get(spec.name)) for spec in learn}
        run_params, observation = apply_learned(params, learn, values)
        for name, (module, covariates, period) in (networks or {}).items():
            weekly = module(covariates.to(dev))
            own = run_params.spec()[name].metadata.get("period", 1) or 1
            values[name] = weekly
            run_params = run_params.replace(**{name: weekly.repeat_interleave(max(period // own, 1))})
        results = simulate(model, None, run_params, steps=steps, seeds=seeds, sampler=run_sampler, device=dev, env=env,
                           start_date=start, progress=False, grad_checkpoint_every=grad_checkpoint_every)
        total = torch.zeros((), device=dev)
        for block in blocks:
            pred = _predict(block, results, observation)
            obs = block.observed.to(dev) * block.scale.to(dev)
            total = total + loss_fn(pred[block.train], obs[block.train])
        return total, results, run_params, observation, values

    def regulariser(values: Mapping[str, Tensor]) -> Tensor:
        if penalty is None:
            return torch.zeros((), device=dev)
        value = penalty(values)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ConfigError("penalty must return a scalar tensor")
        return value.reshape(()).to(dev)

    history: list[float] = []
    penalty_history: list[float] = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        opt.zero_grad(set_to_none=True)
        total, _, _, _, values = forward(sampler)
        reg = regulariser(values)
        total = total + reg
        penalty_history.append(float(reg.detach()))
        total.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        scheduler.step()
        history.append(float(total.detach()))
        if callback is not None:
            callback(epoch, history[-1], {k: v.detach() for k, v in values.items()})
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        final_loss, results, run_params, observation, values = forward(Hard())
        final_penalty = float(regulariser(values))
    fit = _fit_table(blocks, results, observation, window)
    learned = {k: (v.detach().cpu().reshape(-1).tolist() if v.numel() > 1 else float(v.detach().reshape(())))
               for k, v in values.items()}
    info = dict(model=model.name, window=[str(window[0]), str(window[1])], start_date=str(start), steps=steps,
                forecast_days=forecast_days, epochs=epochs, lr=lr, seeds=list(seeds), sampler=type(sampler).__name__,
                loss=getattr(loss_fn, "__name__", str(loss)), final_loss=float(final_loss),
                final_penalty=final_penalty, penalty_history=penalty_history,
                train_seconds=train_seconds, seconds_per_epoch=train_seconds / max(epochs, 1),
                num_agents=int(getattr(env, "num_agents", 0)), grad_checkpoint_every=grad_checkpoint_every)
    return Calibration(learned, _detached(run_params), {k: v.detach() for k, v in observation.items()}, history, fit,
                       results, info)


def _fit_table(blocks: list[_Block], results: Results, observation, window) -> pl.DataFrame:
    frames = []
    for block in blocks:
        pred = _predict(block, results, observation).cpu() / block.scale
        D, G = block.observed.shape
        frames.append(pl.DataFrame({
            "date": [d for d in block.dates for _ in range(G)],
            "borough": block.boroughs * D,
            "metric": [block.observe.target] * (D * G),
            "observed": block.observed.reshape(-1).double().numpy(),
            "fitted": pred.reshape(-1).double().numpy(),
            "split": ["train" if bool(block.train[i]) else ("test" if block.dates[i] > window[1] else "before")
                      for i in range(D) for _ in range(G)],
        }))
    return pl.concat(frames)


def _detached(params: Params) -> Params:
    changes = {n: v.detach() for n, v in params.learnable().items()}
    for name in params.spec():
        v = getattr(params, name)
        if isinstance(v, Tensor) and v.grad_fn is not None:
            changes[name] = v.detach()
    return dataclasses.replace(params, **changes) if changes else params


def persistence_forecast(fit: pl.DataFrame) -> pl.DataFrame:
    """Baseline for the ``test`` rows: each borough/metric's last ``train`` observation carried forward.
    Returns the test rows with a ``persistence`` column."""
    last = (fit.filter(pl.col("split") == "train").sort("date").group_by("borough", "metric")
            .agg(pl.col("observed").last().alias("persistence")))
    return fit.filter(pl.col("split") == "test").join(last, on=["borough", "metric"], how="left")


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def plot_loss(history: Sequence[float], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(history) + 1), history)
    ax.set_yscale("log" if history and min(history) > 0 else "linear")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_fit(fit: pl.DataFrame, path: str | Path, title: str | None = None, baseline: pl.DataFrame | None = None) -> Path:
    """One panel per borough: observed (dots), fitted (line, solid in the window, dashed forecast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boroughs = list(dict.fromkeys(fit["borough"].to_list()))
    metrics = list(dict.fromkeys(fit["metric"].to_list()))
    fig, axes = plt.subplots(len(metrics), len(boroughs), figsize=(3.0 * len(boroughs), 2.6 * len(metrics)), dpi=90,
                             squeeze=False)
    for i, metric in enumerate(metrics):
        for j, borough in enumerate(boroughs):
            ax = axes[i][j]
            rows = fit.filter((pl.col("borough") == borough) & (pl.col("metric") == metric)).sort("date")
            ax.plot(rows["date"].to_list(), rows["observed"].to_list(), "o", ms=3, color="k", label="observed")
            for split, style in (("train", "-"), ("test", "--")):
                part = rows.filter(pl.col("split") == split)
                if part.height:
                    ax.plot(part["date"].to_list(), part["fitted"].to_list(), style, color="C0",
                            label="fit" if split == "train" else "forecast")
            if baseline is not None:
                part = baseline.filter((pl.col("borough") == borough) & (pl.col("metric") == metric)).sort("date")
                if part.height:
                    ax.plot(part["date"].to_list(), part["persistence"].to_list(), ":", color="C3", label="persistence")
            ax.set_title(f"{borough}: {metric}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# sensitivities
# ---------------------------------------------------------------------------------------------


def _with_schedule(model: Model, schedule: Any) -> Model:
    """The model with ``ctx.schedule`` replaced by ``schedule`` (tensors that may require grad)."""

    def wrap(fn):
        return lambda state, params, ctx: fn(state, params, dataclasses.replace(ctx, schedule=schedule))

    substeps = tuple(Substep(s.name, s.kind, wrap(s.fn)) for s in model.substeps)
    metrics = model.metrics
    return dataclasses.replace(model, substeps=substeps,
                               metrics=lambda prev, state, params, ctx: metrics(prev, state, params,
                                                                                dataclasses.replace(ctx, schedule=schedule)))


def sensitivities(model: Model, population: Any, params: Params | None = None, *,
                  outcomes: Mapping[str, str | Callable[[Results], Tensor]], wrt: Sequence[str] = (),
                  interventions: Sequence[Any] = (), steps: int, seeds: Sequence[int] = (0,),
                  sampler: Sampler = StraightThrough(), start_date: dt.date | None = None,
                  fd_check: Sequence[str] | bool = True, fd_rel_step: float = 0.05,
                  fd_steps: Mapping[str, float] | None = None, fd_length_days: float = 3.5, env: Any = None,
                  device: str = "cpu", grad_checkpoint_every: int | None = None) -> pl.DataFrame:
    """d(outcome)/d(parameter or lever) from one forward pass and one backward pass per outcome.

    outcomes: {name: metric name (summed over steps, mean over seeds) or fn(Results) -> scalar}.
    wrt: model parameter names. A scalar gives d/d(value); a vector or time-varying one gives the
    derivative w.r.t. a uniform scaling, per unit of its mean (Σ_t ∂/∂m_t · m_t / m̄).
    interventions: `Intervention` s; each yields two rows. ``<label>.intensity``: d/d(intensity)
    (its intensity is a tensor that requires grad). ``<label>.length``: per day of length; with
    ``ramp > 0`` it is d/d(end) of the smooth fade-out (the end is a tensor that requires grad: the
    effect of shifting the end by a day, averaged over the ramp's days), with ``ramp = 0`` the
    linearised effect of one more day at its intensity (the gradient at the day after its end).
    fd_check: names to spot-check (True = all) by finite differences in hard mode with the same
    seeds (common random numbers; the outcome is the mean over ``seeds``): central ±h with h =
    ``fd_steps[name]`` if given, else ``fd_rel_step`` relative to the value (absolute for a value of
    0; intensities: min(fd_rel_step, intensity, 1 − intensity)); lengths ±``fd_length_days`` with a
    ramp, +1 day without.

    Returns polars: outcome, wrt, value, outcome_value, gradient, elasticity, fd_step, fd_gradient,
    rel_diff (|gradient − fd| / |fd|).
    """
    from .interventions import compile_schedule

    params = (params if params is not None else model.params_type()).validate()
    dev = torch.device(device)
    fd_steps = dict(fd_steps or {})
    if env is None:
        env = model.setup(population if population is not None else model.default_population(), params.as_tensors(dev), dev)
    for name in wrt:
        if name not in params.spec():
            raise ConfigError(f"sensitivity w.r.t. {name!r}: not a parameter of {model.name}")
    labels = list(getattr(env, "group_labels", []) or ["all"])
    interventions = list(interventions)
    if len({iv.label for iv in interventions}) != len(interventions):
        raise ConfigError("sensitivities: interventions need distinct labels (set name=...)")

    def schedule_for(ivs):
        if not ivs:
            return None
        return compile_schedule([list(ivs)] * len(seeds), levers=model.levers, steps=steps, start_date=start_date,
                                group_labels=labels, age_band_edges=model.age_band_edges).to(dev)

    def outcome_values(results: Results) -> dict[str, Tensor]:
        out = {}
        for name, how in outcomes.items():
            if callable(how):
                out[name] = how(results)
            else:
                if how not in results.metrics:
                    raise ConfigError(f"outcome {name}: model has no metric {how!r}; metrics: {sorted(results.metrics)}")
                v = results.metrics[how].to(torch.float32)
                out[name] = v.sum(0).mean(0).sum()
        return out

    def run(p: Params, ivs, differentiable: bool, schedule=None) -> dict[str, Tensor]:
        sched = schedule if schedule is not None else schedule_for(ivs)
        m = _with_schedule(model, sched) if sched is not None else model
        res = simulate(m, None, p, steps=steps, seeds=seeds, sampler=sampler if differentiable else Hard(), env=env,
                       device=dev, start_date=start_date, progress=False,
                       grad_checkpoint_every=grad_checkpoint_every if differentiable else None)
        return outcome_values(res)

    # one forward with every parameter, intensity and (ramped) end requiring grad
    leaves: dict[str, Tensor] = {}
    changes = {}
    for name in wrt:
        base = torch.as_tensor(getattr(params, name), dtype=torch.float32).to(dev)
        if base.numel() == 1:  # additive shift: d/d(shift) = d/d(value), also at a value of 0
            leaves[name] = torch.zeros((), device=dev, requires_grad=True)
            changes[name] = base + leaves[name]
        else:  # uniform scaling: d/d(scale) / mean = derivative per unit of the mean
            leaves[name] = torch.ones((), device=dev, requires_grad=True)
            changes[name] = base * leaves[name]
    grad_params = params.replace(**changes) if changes else params
    differentiable_ivs = []
    for iv in interventions:
        change = dict(intensity=torch.tensor(float(iv.intensity), device=dev, requires_grad=True))
        leaves[f"{iv.label}.intensity"] = change["intensity"]
        if iv.ramp > 0:
            change["end"] = torch.tensor(float(iv.end_position(start_date)), device=dev, requires_grad=True)
            leaves[f"{iv.label}.length"] = change["end"]
        differentiable_ivs.append(dataclasses.replace(iv, **change))
    schedule = schedule_for(differentiable_ivs)
    cells = dict(schedule.values) if schedule is not None else {}  # non-leaf [B, T, G, A], for ramp-free lengths
    values = run(grad_params, None, True, schedule)
    inputs = list(leaves.values()) + list(cells.values())
    rows = []
    for out_name, value in values.items():
        if not value.requires_grad:
            raise ConfigError(f"outcome {out_name} does not depend on anything differentiable")
        grads = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
        outcome_value = float(value.detach())
        g = {k: (0.0 if x is None else x) for k, x in zip(list(leaves) + list(cells), grads)}
        for name in wrt:
            base = torch.as_tensor(getattr(params, name), dtype=torch.float32)
            mean_value = float(base.mean())
            grad = float(g[name])
            if base.numel() > 1:
                grad = grad / mean_value if mean_value else float("nan")
            rows.append(dict(outcome=out_name, wrt=name, value=mean_value, outcome_value=outcome_value, gradient=grad))
        for iv in interventions:
            rows.append(dict(outcome=out_name, wrt=f"{iv.label}.intensity", value=float(iv.intensity),
                             outcome_value=outcome_value, gradient=float(g[f"{iv.label}.intensity"])))
            a, e = iv.step_range(start_date, steps)
            if iv.ramp > 0:
                d_length = float(g[f"{iv.label}.length"])
            elif e + 1 < steps:
                cell_grad = g[(iv.lever, iv.layer)]
                cell_grad = torch.zeros_like(cells[(iv.lever, iv.layer)]) if isinstance(cell_grad, float) else cell_grad
                covered = (cells[(iv.lever, iv.layer)].detach()[:, a: a + 1] > 0).to(cell_grad.dtype)
                d_length = float((cell_grad[:, e + 1: e + 2] * covered).sum()) * float(iv.intensity)
            else:
                d_length = float("nan")
            rows.append(dict(outcome=out_name, wrt=f"{iv.label}.length", value=float(e - a + 1),
                             outcome_value=outcome_value, gradient=d_length))
    table = pl.DataFrame(rows)
    check = (set(wrt) | {f"{iv.label}.{k}" for iv in interventions for k in ("intensity", "length")}
             if fd_check is True else set(fd_check or ()))
    fd, fd_step = {}, {}

    def central(key: str, up: dict, down: dict, width: float) -> None:
        fd_step[key] = width / 2
        for out_name in outcomes:
            fd[(out_name, key)] = float(up[out_name] - down[out_name]) / width

    with torch.no_grad():
        for name in wrt:
            if name not in check:
                continue
            base = torch.as_tensor(getattr(params, name), dtype=torch.float32)
            mean_value = float(base.mean())
            if base.numel() == 1:
                h = fd_steps.get(name) or (fd_rel_step * abs(mean_value) or fd_rel_step)
                up, down = (run(params.replace(**{name: base + s * h}), interventions, False) for s in (1, -1))
            else:
                h = fd_steps.get(name) or fd_rel_step * abs(mean_value)
                up, down = (run(params.replace(**{name: base * (1 + s * h / mean_value)}), interventions, False)
                            for s in (1, -1))
            central(name, up, down, 2 * h)
        for k, iv in enumerate(interventions):
            key = f"{iv.label}.intensity"
            if key in check:
                I = float(iv.intensity)
                step = fd_steps.get(key) or min(fd_rel_step, I, 1 - I) or fd_rel_step
                hi, lo = min(I + step, 1.0), max(I - step, 0.0)
                up, down = (run(params, [dataclasses.replace(x, intensity=v) if j == k else x
                                         for j, x in enumerate(interventions)], False) for v in (hi, lo))
                central(key, up, down, hi - lo)
            key = f"{iv.label}.length"
            if key in check:
                if iv.ramp > 0:
                    h = fd_steps.get(key) or fd_length_days
                    end = iv.end_position(start_date)
                    up, down = (run(params, [dataclasses.replace(x, end=end + s * h) if j == k else x
                                             for j, x in enumerate(interventions)], False) for s in (1, -1))
                    central(key, up, down, 2 * h)
                elif iv.step_range(start_date, steps)[1] + 1 >= steps:  # already lasts to the end of the run
                    fd[(next(iter(outcomes)), key)] = None
                else:
                    end = iv.end + dt.timedelta(days=1) if isinstance(iv.end, dt.date) else iv.end + 1
                    longer = [dataclasses.replace(x, end=end) if j == k else x for j, x in enumerate(interventions)]
                    up, base_run = run(params, longer, False), run(params, interventions, False)
                    central(key, up, base_run, 1.0)
                    fd_step[key] = 1.0
    fd_col = [fd.get((r["outcome"], r["wrt"])) for r in table.iter_rows(named=True)]
    step_col = [fd_step.get(r["wrt"]) for r in table.iter_rows(named=True)]
    table = table.with_columns(
        (pl.col("gradient") * pl.col("value") / pl.col("outcome_value")).alias("elasticity"),
        pl.Series("fd_step", step_col, dtype=pl.Float64), pl.Series("fd_gradient", fd_col, dtype=pl.Float64))
    return table.with_columns(((pl.col("gradient") - pl.col("fd_gradient")).abs()
                               / pl.col("fd_gradient").abs()).alias("rel_diff"))

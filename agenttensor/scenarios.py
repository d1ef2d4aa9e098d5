"""Scenarios: a baseline plus named "what if" variants, run as one batch on common random numbers.

A `Scenario` is a name, a list of typed `Intervention` s and parameter overrides. `run_scenarios`
lays scenarios × seeds out along the leading batch dim (element ``b = scenario · S + seed_index``),
so every scenario sees the same random numbers for the same seed (keyed by seed, step, stream and
agent id) and differences between scenarios are *paired*. Scalar float overrides become ``[B, 1]``
tensors, time-varying ones ``[B, T]``; overrides that cannot vary inside a batch (ints, strings,
booleans — e.g. ``initial_infected``, ``mixing``) split the scenarios into separate passes. The
batch is cut into chunks when the estimated memory (bytes per agent per batch element × N × B)
exceeds ``memory_budget``; chunking never changes the numbers.

`ScenarioResults.compare` gives, per scenario and outcome, the mean over seeds, a percentile
interval across seeds and the paired difference to the baseline with a t-interval for its mean
(method in `METHOD`). Scenario files are TOML::

    [run]
    days = 120
    start_date = "2020-03-01"
    seeds = 8

    [[scenario]]
    name = "baseline"

    [[scenario]]
    name = "schools open"
    overrides = { R0 = 2.0 }
    [[scenario.intervention]]
    lever = "school_closure"
    start = "2020-03-16"
    end = "2020-06-26"
    intensity = 1.0
    boroughs = ["Brooklyn"]
    ages = [5, 17]
    layer = "school"

    [[scenario]]
    name = "schools open, masks"
    extends = "schools open"        # its interventions and overrides, then this scenario's own
    remove = ["school_closure"]     # drop inherited interventions by name (unnamed: by lever)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import polars as pl
import torch
from torch import Tensor

from .errors import ConfigError, InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from .interventions import Intervention, compile_schedule
from .model import Model
from .params import Params
from .sampling import Hard, Sampler

log = logging.getLogger(__name__)
DEFAULT_MEMORY_BUDGET = 8e9  # bytes
INTERVENTION_FIELDS = ("lever", "start", "end", "intensity", "boroughs", "ages", "layer", "name")
SCENARIO_FIELDS = ("name", "description", "extends", "remove", "overrides", "intervention")
METHOD = ("mean over seeds; interval = {lo:g}–{hi:g} % percentiles across seeds (linear interpolation); "
          "paired difference d_s = scenario_s − baseline_s on the same seed s (common random numbers); "
          "its interval is a {level:g} % Student-t interval for the mean difference, mean(d) ± t·sd(d)/√S "
          "(zero width when all seeds give the same difference)")


# ---- scenario definitions ---------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """A named what-if: interventions in force and parameter overrides (name → value)."""

    name: str
    interventions: tuple[Intervention, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.overrides:
            out["overrides"] = {k: (v.tolist() if isinstance(v, Tensor) else list(v) if isinstance(v, tuple) else v)
                                for k, v in self.overrides.items()}
        if self.interventions:
            out["intervention"] = [_intervention_to_dict(iv) for iv in self.interventions]
        return out


@dataclass(frozen=True)
class ScenarioSet:
    """Scenarios plus run settings. The first scenario (or the one named ``baseline``) is the baseline."""

    scenarios: tuple[Scenario, ...]
    days: int | None = None
    start_date: dt.date | None = None
    seeds: int | None = None
    baseline: str | None = None
    description: str = ""
    source: str = "<python>"
    params: str | None = None  # [run].params: a parameter JSON file (resolved against the TOML's folder)
    report_from: dt.date | int | None = None  # [run].report_from: compare/plot only from this date (or step)

    @property
    def baseline_name(self) -> str:
        if self.baseline:
            return self.baseline
        names = [s.name for s in self.scenarios]
        return "baseline" if "baseline" in names else names[0]

    def shortened(self, days: int, start_date: dt.date | None = None) -> tuple["ScenarioSet", list[str]]:
        """The set for a shorter run of ``days`` days from ``start_date`` (default ``self.start_date``):
        interventions that start after its last day are left out, so a file can be run over its first
        weeks (those that only extend past the end are clipped as usual). Returns the set and the
        left-out interventions as ``"scenario: label (start)"``."""
        start_date = start_date or self.start_date
        dropped: list[str] = []

        def inside(scenario: Scenario, iv: Intervention) -> bool:
            if isinstance(iv.start, dt.date):
                if start_date is None:
                    return True  # validation reports the missing start date
                first = (iv.start - start_date).days
            else:
                first = int(iv.start)
            if first < days:
                return True
            dropped.append(f"{scenario.name}: {iv.label} ({iv.start})")
            return False

        scenarios = tuple(dataclasses.replace(s, interventions=tuple(iv for iv in s.interventions if inside(s, iv)))
                          for s in self.scenarios)
        return dataclasses.replace(self, scenarios=scenarios, days=days), dropped

    def to_dict(self) -> dict[str, Any]:
        run: dict[str, Any] = {}
        for key in ("days", "start_date", "seeds", "baseline", "description", "params", "report_from"):
            value = getattr(self, key)
            if value not in (None, ""):
                run[key] = value
        return {"run": run, "scenario": [s.to_dict() for s in self.scenarios]}


def _intervention_to_dict(iv: Intervention) -> dict[str, Any]:
    out: dict[str, Any] = {"lever": iv.lever, "start": iv.start, "end": iv.end, "intensity": float(iv.intensity)}
    if iv.boroughs is not None:
        out["boroughs"] = list(iv.boroughs)
    if iv.ages is not None:
        out["ages"] = list(iv.ages)
    if iv.layer is not None:
        out["layer"] = iv.layer
    if iv.name:
        out["name"] = iv.name
    return out


def _date(value: Any, where: str) -> dt.date | int:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, bool):
        raise InputError(f"{where}: expected a date YYYY-MM-DD or a step number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise InputError(f"{where}: expected a date YYYY-MM-DD or a step number, got {value!r}")


def _intervention_from_dict(data: Mapping[str, Any], where: str) -> Intervention:
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a table with keys {list(INTERVENTION_FIELDS)}, got {data!r}")
    unknown = sorted(set(data) - set(INTERVENTION_FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}; allowed: {list(INTERVENTION_FIELDS)}")
    for key in ("lever", "start", "end"):
        if key not in data:
            raise InputError(f"{where}.{key}: missing (every intervention needs lever, start and end)")
    if not isinstance(data["lever"], str):
        raise InputError(f"{where}.lever: expected a lever name, got {data['lever']!r}")
    intensity = data.get("intensity", 1.0)
    if isinstance(intensity, bool) or not isinstance(intensity, (int, float)):
        raise InputError(f"{where}.intensity: expected a number in [0, 1], got {intensity!r}")
    boroughs = data.get("boroughs")
    if isinstance(boroughs, str):
        boroughs = [boroughs]
    if boroughs is not None and (not isinstance(boroughs, list) or not all(isinstance(b, str) for b in boroughs)):
        raise InputError(f"{where}.boroughs: expected a list of borough names, got {boroughs!r}")
    ages = data.get("ages")
    if ages is not None:
        if (not isinstance(ages, list) or len(ages) != 2 or not all(isinstance(a, int) and not isinstance(a, bool)
                                                                    for a in ages)):
            raise InputError(f"{where}.ages: expected [min_age, max_age] in whole years, got {ages!r}")
    layer = data.get("layer")
    if layer is not None and not isinstance(layer, str):
        raise InputError(f"{where}.layer: expected a layer name, got {layer!r}")
    return Intervention(lever=data["lever"], start=_date(data["start"], f"{where}.start"),
                        end=_date(data["end"], f"{where}.end"), intensity=float(intensity),
                        boroughs=tuple(boroughs) if boroughs is not None else None,
                        ages=tuple(ages) if ages is not None else None, layer=layer, name=str(data.get("name", "")))


def scenarios_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> ScenarioSet:
    """Parse the TOML structure (``[run]`` + ``[[scenario]]``); errors name the scenario and field."""
    unknown = sorted(set(data) - {"run", "scenario"})
    if unknown:
        raise InputError(f"{source}: unknown top-level key {unknown[0]!r}; expected [run] and [[scenario]]")
    run = data.get("run", {})
    if not isinstance(run, Mapping):
        raise InputError(f"{source}: [run] must be a table")
    allowed_run = {"days", "start_date", "seeds", "baseline", "description", "params", "report_from"}
    bad = sorted(set(run) - allowed_run)
    if bad:
        raise InputError(f"{source}: [run].{bad[0]} is not a known setting; allowed: {sorted(allowed_run)}")
    for key in ("days", "seeds"):
        if key in run and (isinstance(run[key], bool) or not isinstance(run[key], int) or run[key] <= 0):
            raise InputError(f"{source}: [run].{key} must be a positive integer, got {run[key]!r}")
    start = run.get("start_date")
    if start is not None:
        start = _date(start, f"{source}: [run].start_date")
        if isinstance(start, int):
            raise InputError(f"{source}: [run].start_date must be a date YYYY-MM-DD, got {start!r}")
    params_file = run.get("params")
    if params_file is not None and (not isinstance(params_file, str) or not params_file.strip()):
        raise InputError(f"{source}: [run].params must be the path of a parameter JSON file, got {params_file!r}")
    report_from = run.get("report_from")
    if report_from is not None:
        report_from = _date(report_from, f"{source}: [run].report_from")
    raw = data.get("scenario", [])
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{source}: no scenarios; add at least one [[scenario]] table with a name")
    own: list[tuple[Scenario, str | None, tuple[str, ...]]] = []  # (as written, extends, remove)
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise InputError(f"{source}: scenario #{i + 1} must be a table")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{source}: scenario #{i + 1}: field 'name' is missing or empty")
        where = f"{source}: scenario {name!r}"
        bad = sorted(set(entry) - set(SCENARIO_FIELDS))
        if bad:
            raise InputError(f"{where}: unknown field {bad[0]!r}; allowed: {', '.join(SCENARIO_FIELDS)}")
        overrides = entry.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise InputError(f"{where}: overrides must be a table of parameter = value")
        ivs = entry.get("intervention", [])
        if isinstance(ivs, Mapping):
            ivs = [ivs]
        interventions = tuple(_intervention_from_dict(iv, f"{where} intervention[{k}]") for k, iv in enumerate(ivs))
        extends = entry.get("extends")
        if extends is not None and (not isinstance(extends, str) or not extends.strip()):
            raise InputError(f"{where} field 'extends': expected the name of another scenario, got {extends!r}")
        remove = entry.get("remove", [])
        if isinstance(remove, str):
            remove = [remove]
        if not isinstance(remove, list) or not all(isinstance(r, str) for r in remove):
            raise InputError(f"{where} field 'remove': expected a list of intervention names, got {remove!r}")
        if remove and extends is None:
            raise InputError(f"{where} field 'remove': only a scenario that extends another can remove "
                             "inherited interventions; add extends = \"<scenario name>\"")
        own.append((Scenario(name=name, interventions=interventions, overrides=dict(overrides),
                             description=str(entry.get("description", ""))), extends, tuple(remove)))
    names = [s.name for s, _, _ in own]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{source}: scenario name {dup[0]!r} is used more than once; names must be unique")
    scenarios = _resolve_extends(own, source)
    baseline = run.get("baseline")
    if baseline is not None and baseline not in names:
        raise InputError(f"{source}: [run].baseline = {baseline!r} is not a scenario name; scenarios: {names}")
    return ScenarioSet(tuple(scenarios), days=run.get("days"), start_date=start, seeds=run.get("seeds"),
                       baseline=baseline, description=str(run.get("description", "")), source=source,
                       params=params_file, report_from=report_from)


def _resolve_extends(own: Sequence[tuple[Scenario, str | None, tuple[str, ...]]], source: str) -> list[Scenario]:
    """Scenarios with ``extends``: the parent's (resolved) interventions minus those named in
    ``remove``, then the scenario's own; overrides merged, the scenario's own winning. Parents may
    come later in the file and extend others in turn; unknown parents, cycles and removal names that
    match no inherited intervention are errors naming the scenario and the field."""
    by_name = {s.name: (s, extends, remove) for s, extends, remove in own}
    resolved: dict[str, Scenario] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Scenario:
        if name in resolved:
            return resolved[name]
        scenario, parent, remove = by_name[name]
        where = f"{source}: scenario {name!r}"
        if parent is None:
            resolved[name] = scenario
            return scenario
        if parent not in by_name:
            raise InputError(f"{where} field 'extends': unknown scenario {parent!r}; scenarios: {list(by_name)}")
        if parent == name or parent in chain:
            cycle = " -> ".join((*chain[chain.index(parent):], name, parent) if parent in chain else (name, name))
            raise InputError(f"{where} field 'extends': scenarios extend each other in a cycle ({cycle})")
        base = resolve(parent, (*chain, name))
        inherited = base.interventions
        labels = [iv.label for iv in inherited]
        for r in remove:
            if r not in labels:
                raise InputError(f"{where} field 'remove': {parent!r} has no intervention named {r!r}; "
                                 f"inherited: {list(dict.fromkeys(labels))}")
        kept = tuple(iv for iv in inherited if iv.label not in set(remove))
        resolved[name] = dataclasses.replace(scenario, interventions=kept + scenario.interventions,
                                             overrides={**base.overrides, **scenario.overrides})
        return resolved[name]

    return [resolve(s.name, ()) for s, _, _ in own]


def load_scenarios(path: str | Path) -> ScenarioSet:
    """Read a scenario TOML file (see the module docstring for the schema)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"scenario file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    sset = scenarios_from_dict(data, source=str(path))
    if sset.params and not Path(sset.params).is_absolute():  # relative to the scenario file
        sset = dataclasses.replace(sset, params=str(path.parent / sset.params))
    return sset


def load_run_params(model: Model, path: str | Path, start_date: dt.date | None = None, source: str = "") -> Params:
    """The model's parameters from a JSON file (`agenttensor.params.load_params_file`: calibrate's
    params.json or a plain object). If the file records the start date of its calendar and a
    time-varying series in it has more than one value, the run must start on that date (weekly
    multipliers are indexed from step 0)."""
    from .params import load_params_file

    params, meta = load_params_file(model.params_type, path)
    aligned = meta.get("start_date")
    if aligned and start_date is not None and str(start_date) != str(aligned):
        series = [n for n, f in params.spec().items() if f.metadata.get("time_varying")
                  and torch.as_tensor(getattr(params, n)).numel() > 1]
        if series:
            raise ConfigError(f"{source + ': ' if source else ''}{path}: time-varying parameter {series[0]} follows "
                              f"a calendar starting {aligned} (step 0), but the run starts {start_date}; "
                              f"set the start date to {aligned}")
    return params


def save_scenarios(scenarios: ScenarioSet | Sequence[Scenario], path: str | Path) -> Path:
    """Write scenarios as TOML (round-trips through `load_scenarios`)."""
    import tomli_w

    if not isinstance(scenarios, ScenarioSet):
        scenarios = ScenarioSet(tuple(scenarios))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(scenarios.to_dict()))
    return path


# ---- validation against a model and a run -----------------------------------------------------

def _override_value(params: Params, name: str, value: Any, where: str) -> Any:
    spec = params.spec()
    if name not in spec:
        raise ConfigError(f"{where}: overrides.{name}: unknown parameter; known: {', '.join(spec)}")
    current = getattr(params, name)
    if isinstance(value, str) and not isinstance(current, str):
        try:
            return params._parse(name, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: overrides.{name}: {e}") from None
    if isinstance(current, Tensor) or spec[name].metadata.get("time_varying"):
        if isinstance(value, (list, tuple)):
            return torch.tensor([float(x) for x in value], dtype=torch.float32)
    return value


def scenario_params(base: Params, scenario: Scenario, where: str = "") -> Params:
    """``base`` with the scenario's overrides applied and validated (errors name scenario and field)."""
    where = where or f"scenario {scenario.name!r}"
    changes = {k: _override_value(base, k, v, where) for k, v in scenario.overrides.items()}
    try:
        return base.replace(**changes)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: overrides: {e}") from None


def _field_of(message: str) -> str:
    text = message.lower()
    for needle, name in (("unknown lever", "lever"), ("intensity", "intensity"), ("layer", "layer"),
                         ("borough", "boroughs"), ("age range", "ages"), ("is before start", "end"),
                         ("outside the run", "start/end"), ("no start date", "start/end")):
        if needle in text:
            return name
    return "intervention"


def validate_scenarios(model: Model, scenarios: Sequence[Scenario], *, steps: int, start_date: dt.date | None,
                       group_labels: Sequence[str], base_params: Params | None = None, source: str = "") -> None:
    """Check every scenario against the model: levers, layers, dates inside the run, boroughs,
    age ranges, parameter overrides. Raises ConfigError naming the scenario and the field."""
    base = base_params if base_params is not None else model.params_type()
    prefix = f"{source}: " if source else ""
    for scenario in scenarios:
        where = f"{prefix}scenario {scenario.name!r}"
        scenario_params(base, scenario, where)
        for k, iv in enumerate(scenario.interventions):
            try:
                compile_schedule([[iv]], levers=model.levers, steps=steps, start_date=start_date,
                                 group_labels=list(group_labels) or ["all"], age_band_edges=model.age_band_edges,
                                 context="")
            except ConfigError as e:
                field_name = _field_of(str(e))
                detail = str(e).split(": ", 1)[-1]
                raise ConfigError(f"{where} intervention[{k}] ({iv.label}) field {field_name!r}: {detail}") from None


# ---- batched execution ------------------------------------------------------------------------

def _batchable(params: Params, name: str) -> bool:
    value = getattr(params, name)
    if isinstance(value, (bool, str)) or value is None:
        return False
    time_varying = params.spec()[name].metadata.get("time_varying")
    if isinstance(value, int) and not time_varying:
        return False
    if not time_varying and (isinstance(value, (list, tuple)) or (isinstance(value, Tensor) and value.numel() > 1)):
        return False  # vector/matrix parameters (per age group, mixing matrices): one value per pass
    return True


def _structural_key(params: Params, base: Params) -> tuple:
    """Overrides that cannot vary inside one batch (ints, strings, booleans, vector/matrix
    parameters): scenarios sharing them run in the same pass."""
    return tuple((n, repr(getattr(params, n))) for n in params.spec()
                 if not _batchable(params, n) and not _same(getattr(params, n), getattr(base, n)))


def batch_params(per_element: Sequence[Params]) -> Params:
    """One `Params` for a batch: fields that differ between elements become ``[B, 1]`` tensors
    (time-varying ones ``[B, T]``, shorter series padded with their last value); equal fields stay as they are."""
    first = per_element[0]
    changes: dict[str, Any] = {}
    for name, f in first.spec().items():
        values = [getattr(p, name) for p in per_element]
        if all(_same(v, values[0]) for v in values[1:]):
            continue
        if not _batchable(first, name):
            raise ConfigError(f"parameter {name} differs inside one batch but is not numeric-float; "
                              "run these scenarios in separate passes")
        if f.metadata.get("time_varying"):
            series = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in values]
            if any(s.numel() == 0 for s in series):
                raise ConfigError(f"parameter {name}: an empty series cannot be batched")
            length = max(s.numel() for s in series)
            changes[name] = torch.stack([torch.cat([s, s[-1:].expand(length - s.numel())]) for s in series])
        else:
            changes[name] = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in values])[:, None]
    return dataclasses.replace(first, **changes)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and bool(torch.equal(a.float(), b.float()))
    return a == b


def estimate_bytes_per_element(model: Model, env: Any, params: Params, *, overhead: float = 6.0,
                               sampler: Sampler = Hard(), device: str | torch.device = "cpu") -> float:
    """Bytes per batch element: the initial state of one element × ``overhead`` (a working-set
    allowance for per-step temporaries: uniforms, pressures, event masks). Measured: layered SEIR
    holds 8 B/agent of state and peaks at ~44 B/agent per element (SCENARIOS.md), hence 6×."""
    from .model import StepContext
    from .rng import Randomness

    rng = Randomness.for_agents([0], env.agent_ids).to(device)
    ctx = StepContext(step=0, env=env, rng=rng, sampler=sampler)
    state = model.init(env, params.as_tensors(device), ctx)
    return float(state.nbytes()) * overhead


@dataclass
class ScenarioResults:
    """Metrics of every scenario × seed: ``metrics[scenario][name]`` is [T, S] (totals) or [T, S, G].

    Row k is step ``first_step + k`` (``first_step`` > 0 after `since` / ``report_from`` or a run
    started from a given state); ``start_date`` is the date of step 0. ``params``: the base parameters.
    """

    scenarios: tuple[Scenario, ...]
    seeds: list[int]
    metrics: dict[str, dict[str, Tensor]]
    baseline: str
    model_name: str = ""
    start_date: dt.date | None = None
    group_labels: list[str] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    first_step: int = 0
    params: Any = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.scenarios]

    @property
    def steps(self) -> int:
        first = next(iter(self.metrics.values()))
        return next(iter(first.values())).shape[0]

    def totals(self, scenario: str) -> dict[str, Tensor]:
        return {k: v for k, v in self.metrics[scenario].items() if v.dim() == 2}

    def to_polars(self) -> pl.DataFrame:
        """Long table: one row per (scenario, seed, step) with every total metric."""
        frames = []
        T, S = self.steps, len(self.seeds)
        for name in self.names:
            cols: dict[str, Any] = {"scenario": [name] * (T * S),
                                    "seed": torch.tensor(self.seeds).repeat(T).numpy(),
                                    "step": torch.arange(self.first_step, self.first_step + T)
                                    .repeat_interleave(S).numpy().astype("int32")}
            if self.start_date is not None:
                cols["date"] = [self.start_date + dt.timedelta(days=int(t)) for t in cols["step"]]
            for k, v in self.totals(name).items():
                cols[k] = v.detach().cpu().reshape(-1).to(torch.float64).numpy()
            frames.append(pl.DataFrame(cols))
        return pl.concat(frames)

    def step_of(self, when: dt.date | int) -> int:
        """A date (or a step number) as a step index (step 0 = ``start_date``)."""
        if isinstance(when, dt.date):
            if self.start_date is None:
                raise ConfigError(f"report_from {when} is a date but the run has no start date")
            return (when - self.start_date).days
        return int(when)

    def since(self, when: dt.date | int) -> "ScenarioResults":
        """The same results restricted to steps from ``when`` (a date or step) to the end: the
        comparison, outcomes (totals, peaks), trajectories and plots then cover that period only."""
        k = self.step_of(when)
        last = self.first_step + self.steps - 1
        if not self.first_step <= k <= last:
            span = (f"{self.start_date + dt.timedelta(days=self.first_step)}..{self.start_date + dt.timedelta(days=last)}"
                    if self.start_date else f"steps {self.first_step}..{last}")
            raise ConfigError(f"report_from {when} is outside the results ({span})")
        cut = k - self.first_step
        metrics = {name: {m: v[cut:] for m, v in ms.items()} for name, ms in self.metrics.items()}
        info = dict(self.info, report_from=str(when), report_from_step=k)
        return dataclasses.replace(self, metrics=metrics, first_step=k, info=info)

    def outcomes(self, scenario: str) -> dict[str, Tensor]:
        """Scalar outcomes per seed, [S]: ``total_X`` (sum over the run) and ``peak_X`` for daily
        flows (``new_*``, ``*cases``, ``*admissions``, ``*deaths``, ``*infections``); ``peak_X`` and ``final_X`` for stocks."""
        out = {}
        for k, v in self.totals(scenario).items():
            v = v.detach().to(torch.float64)
            if _is_flow(k):
                out[f"total_{k}"] = v.sum(0)
                out[f"peak_{k}"] = v.max(0).values
            else:
                out[f"peak_{k}"] = v.max(0).values
                out[f"final_{k}"] = v[-1]
        return out

    def compare(self, interval: tuple[float, float] = (5.0, 95.0), level: float = 90.0) -> pl.DataFrame:
        """Per scenario × outcome: mean, percentile interval across seeds, paired difference to the
        baseline (mean and Student-t interval), relative difference. Method: `METHOD`."""
        base = self.outcomes(self.baseline)
        S = len(self.seeds)
        tq = t_quantile(0.5 + level / 200.0, S - 1) if S > 1 else float("nan")
        rows = []
        for name in self.names:
            outcomes = self.outcomes(name)
            for metric, x in outcomes.items():
                d = x - base[metric]
                lo, hi = torch.quantile(x, torch.tensor([interval[0] / 100, interval[1] / 100], dtype=x.dtype)).tolist()
                dmean = float(d.mean())
                half = tq * float(d.std(unbiased=True)) / math.sqrt(S) if S > 1 else float("nan")
                bmean = float(base[metric].mean())
                rows.append(dict(scenario=name, metric=metric, mean=float(x.mean()), lo=lo, hi=hi,
                                 diff=dmean, diff_lo=dmean - half, diff_hi=dmean + half,
                                 rel_diff=dmean / bmean if bmean else float("nan"),
                                 seeds=S, is_baseline=name == self.baseline))
        return pl.DataFrame(rows)

    def save(self, directory: str | Path, *, plots: bool = True, report: bool = True,
             interval: tuple[float, float] = (5.0, 95.0), level: float = 90.0) -> dict[str, Path]:
        """Write compare.parquet + compare.csv (the comparison), trajectories.parquet (per scenario,
        seed, step), scenarios.toml (what ran), summary.json, plots and report.html."""
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = self.compare(interval, level)
        paths = {"compare.parquet": directory / "compare.parquet", "compare.csv": directory / "compare.csv",
                 "trajectories.parquet": directory / "trajectories.parquet",
                 "scenarios.toml": directory / "scenarios.toml", "summary.json": directory / "summary.json"}
        table.write_parquet(paths["compare.parquet"])
        table.write_csv(paths["compare.csv"])
        self.to_polars().write_parquet(paths["trajectories.parquet"])
        params_file = None
        if self.params is not None and hasattr(self.params, "to_json"):
            params_file = "params.json"
            paths["params.json"] = directory / params_file
            paths["params.json"].write_text(self.params.to_json())
        report_from = self.info.get("report_from_step") if "report_from" in self.info else None
        if report_from is not None and self.start_date is not None:
            report_from = self.start_date + dt.timedelta(days=int(report_from))
        save_scenarios(ScenarioSet(self.scenarios, days=self.first_step + self.steps, start_date=self.start_date,
                                   seeds=len(self.seeds), baseline=self.baseline, params=params_file,
                                   report_from=report_from), paths["scenarios.toml"])
        summary = dict(model=self.model_name, scenarios=self.names, baseline=self.baseline, seeds=self.seeds,
                       steps=self.steps, first_step=self.first_step, start_date=self.start_date,
                       timing=self.timing, info=self.info,
                       method=METHOD.format(lo=interval[0], hi=interval[1], level=level))
        paths["summary.json"].write_text(json.dumps(summary, indent=2, default=str))
        if plots or report:
            from .report import write_plots, write_report

            plot_paths = write_plots(self, table, directory, interval=interval)
            paths.update(plot_paths)
            if report:
                paths["report.html"] = write_report(self, table, directory / "report.html", plot_paths,
                                                    interval=interval, level=level)
        return paths


FLOW_SUFFIXES = ("cases", "admissions", "deaths", "infections")


def _is_flow(name: str) -> bool:
    """Daily counts (summed into ``total_*``): ``new_*`` and names ending in cases/admissions/deaths/infections."""
    return name.startswith("new_") or name.endswith(FLOW_SUFFIXES)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on a numerically integrated CDF)."""
    if df <= 0:
        return float("nan")
    if df > 200:
        return math.sqrt(2) * torch.special.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = torch.linspace(0, 60, 600_001, dtype=torch.float64)
    pdf = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(x * x / df))
    cdf = 0.5 + torch.cumulative_trapezoid(pdf, x, dim=0)
    i = int(torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64)))
    return float(x[min(i + 1, x.numel() - 1)])


def run_scenarios(model: Model, population: Any, scenarios: Sequence[Scenario] | ScenarioSet, *,
                  seeds: Sequence[int] | int | None = None, steps: int | None = None,
                  start_date: dt.date | None = None, params: Params | None = None, sampler: Sampler = Hard(),
                  device: str | torch.device = "cpu", memory_budget: float = DEFAULT_MEMORY_BUDGET,
                  bytes_per_element: float | None = None, max_batch: int | None = None, baseline: str | None = None,
                  progress: bool | None = None, env: Any = None, simulate_kwargs: Mapping[str, Any] | None = None,
                  share_prefix: bool = True,
                  initial_state: Any = None, first_step: int = 0,
                  report_from: dt.date | int | None = None) -> ScenarioResults:
    """Run every scenario on every seed as one batch (element ``b = scenario · S + seed_index``).

    seeds: a list, or an int S meaning seeds 0..S-1 (the same seeds for every scenario: common
    random numbers); default ``[run].seeds`` of a ScenarioSet, else 8. Chunks of at most ``memory_budget / (bytes_per_element)`` elements (or
    ``max_batch``) run one after another; the environment is built once per distinct set of
    structural overrides. Per batch element, the model sees its scenario's interventions through
    ``ctx.lever`` and its parameters through ``[B, 1]``/``[B, T]`` tensors.

    share_prefix (default on): the steps on which all scenarios of a pass have identical inputs
    (`agenttensor.prefix.shared_prefix_steps`: parameters, time-varying ``[T]`` values and compiled
    ``[B, T, G, A]`` lever schedules) run once per seed (batch S); the state is then expanded to
    scenarios × seeds and continued — bit-identical to running every element from the start.
    Turned off, with the reason in ``info["prefix"]`` and the log, where it cannot be exact
    (`agenttensor.prefix.sharing_blocker`: gradients, checkpointing, a behaviour source not declared
    ``stateless``). initial_state / first_step: start every scenario from this state at step
    ``first_step`` ([S, N], one row per seed, or [1, N]; see `simulate`). report_from: keep only the
    steps from this date (or step) on — the comparison period (default: ``[run].report_from``).
    params: base parameters (default: ``[run].params`` of a ScenarioSet, else the model's defaults).
    """
    from .prefix import select_schedule, shared_prefix_steps, sharing_blocker
    from .run import resolve_device, simulate

    source = ""
    params_file = None
    if isinstance(scenarios, ScenarioSet):
        sset = scenarios
        steps = steps if steps is not None else sset.days
        start_date = start_date if start_date is not None else sset.start_date
        baseline = baseline or sset.baseline_name
        source = sset.source
        report_from = report_from if report_from is not None else sset.report_from
        params_file = sset.params
        seeds = seeds if seeds is not None else sset.seeds
        scenarios = sset.scenarios
    scenarios = tuple(scenarios)
    if not scenarios:
        raise ConfigError("no scenarios to run")
    if steps is None or steps <= 0:
        raise ConfigError(f"the number of days must be a positive integer, got {steps}")
    seeds = 8 if seeds is None else seeds
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("at least one seed is required")
    names = [s.name for s in scenarios]
    baseline = baseline or ("baseline" if "baseline" in names else names[0])
    if baseline not in names:
        raise ConfigError(f"baseline {baseline!r} is not a scenario; scenarios: {names}")
    S = len(seeds)
    extra = dict(simulate_kwargs or {})
    if "initial_state" in extra or "first_step" in extra:
        raise ConfigError("pass initial_state/first_step to run_scenarios itself, not in simulate_kwargs")
    if isinstance(first_step, bool) or not isinstance(first_step, int) or not 0 <= first_step < steps:
        raise ConfigError(f"first_step must be a step in 0..{steps - 1}, got {first_step!r}")
    if initial_state is not None and getattr(initial_state, "batch_size", None) not in (1, S):
        raise ConfigError(f"initial_state has batch size {getattr(initial_state, 'batch_size', '?')}; expected {S} "
                          "(one row per seed, in the order of seeds) or 1")
    if initial_state is None and first_step:
        raise ConfigError(f"first_step={first_step} needs initial_state= (the model state at that step)")
    dev = resolve_device(device)
    if params is None and params_file:
        params = load_run_params(model, params_file, start_date, source)
    base = (params if params is not None else model.params_type()).validate()
    t0 = time.perf_counter()
    per_scenario = {s.name: scenario_params(base, s, f"{source + ': ' if source else ''}scenario {s.name!r}")
                    for s in scenarios}
    # Passes: scenarios that share structural overrides (and so one environment).
    passes: dict[tuple, list[Scenario]] = {}
    for s in scenarios:
        passes.setdefault(_structural_key(per_scenario[s.name], base), []).append(s)
    if population is None and env is None:
        if model.default_population is None:
            raise ConfigError(f"model {model.name} needs a population (pass --population PATH)")
        population = model.default_population()
    results: dict[str, dict[str, list[Tensor]]] = {s.name: {} for s in scenarios}
    chunk_log: list[dict[str, Any]] = []
    prefix_log: list[dict[str, Any]] = []
    group_labels = None
    total_elements = len(scenarios) * S
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total_elements, desc=f"{model.name} scenarios×seeds", unit="run", position=0)
    setup_seconds = 0.0
    run_seconds = 0.0

    def start_rows(rows: list[int]) -> Any:
        """initial_state for the seeds at ``rows`` (None, the [1, N] state, or its rows)."""
        if initial_state is None or initial_state.batch_size == 1:
            return initial_state
        return initial_state.select_batch(torch.tensor(rows, dtype=torch.int64, device=_state_device(initial_state)))

    for key, members in passes.items():
        pass_params = per_scenario[members[0].name]
        ts = time.perf_counter()
        if env is not None and key and population is None:
            raise ConfigError(f"scenarios {[m.name for m in members]} override {[k for k, _ in key]}, which change the "
                              "model's environment; pass the population (not only a prebuilt env)")
        pass_env = env if (env is not None and not key) else model.setup(population, pass_params.as_tensors(dev), dev)
        setup_seconds += time.perf_counter() - ts
        group_labels = list(getattr(pass_env, "group_labels", []) or [])
        if not chunk_log and not prefix_log:  # before any work: every scenario, so a bad one fails fast
            validate_scenarios(model, scenarios, steps=steps, start_date=start_date, group_labels=group_labels,
                               base_params=base, source=source)
        per_elem = bytes_per_element or estimate_bytes_per_element(model, pass_env, pass_params, sampler=sampler,
                                                                   device=dev)
        num_agents = int(getattr(pass_env, "num_agents", 0) or pass_env.agent_ids.numel())
        limit = max(1, int(memory_budget // max(per_elem, 1.0)))
        if max_batch:
            limit = min(limit, max_batch)
        # One schedule row per scenario of the pass ([n, T, G, A] per lever); chunks select their rows.
        member_params = [per_scenario[s.name] for s in members]
        row_of = {s.name: r for r, s in enumerate(members)}
        schedule = None
        if any(s.interventions for s in members):
            schedule = compile_schedule([list(s.interventions) for s in members], levers=model.levers, steps=steps,
                                        start_date=start_date, group_labels=group_labels or ["all"],
                                        age_band_edges=model.age_band_edges)
        # Shared prefix: steps first_step..d-1 once per seed.
        d, what = shared_prefix_steps(member_params, schedule, steps)
        reason = None
        if not share_prefix:
            reason = "share_prefix=False"
        elif len(members) == 1:
            reason = "one scenario in this pass"
        elif d <= first_step:
            reason = f"scenarios differ from step {d} ({what})" + (f", not after the first step {first_step}"
                                                                    if first_step else "")
        else:
            reason = sharing_blocker(env=pass_env, sampler=sampler, per_scenario=member_params, schedule=schedule,
                                     simulate_kwargs=extra)
            if reason is not None:
                log.info("%s: shared-prefix execution off for scenarios %s: %s", model.name,
                         [m.name for m in members], reason)
        prefix_metrics: dict[str, Tensor] = {}
        prefix_state = None
        prefix_entry: dict[str, Any] = dict(scenarios=[m.name for m in members], identical_until_step=d,
                                            limited_by=what or None, shared=reason is None, reason=reason)
        if reason is None:
            tr = time.perf_counter()
            states, parts = [], []
            for c in range(0, S, limit):  # the prefix: batch = seeds (chunked by the same memory limit)
                rows = list(range(c, min(S, c + limit)))
                res = simulate(model, None, member_params[0], steps=d, seeds=[seeds[i] for i in rows],
                               sampler=sampler, device=dev, env=pass_env, start_date=start_date, progress=show,
                               interventions=select_schedule(schedule, [0] * len(rows)),
                               initial_state=start_rows(rows), first_step=first_step, **extra)
                states.append(res.final_state)
                parts.append(res.metrics)
            prefix_state = states[0] if len(states) == 1 else type(states[0]).concat(states)
            prefix_metrics = {k: torch.cat([p[k] for p in parts], 1) for k in parts[0]}  # [d - first_step, S, ...]
            seconds = time.perf_counter() - tr
            run_seconds += seconds
            prefix_entry.update(steps=d - first_step, from_step=first_step, to_step=d, seconds=seconds,
                                estimated_seconds_saved=seconds * (len(members) - 1),
                                saved_element_steps=(d - first_step) * (len(members) - 1) * S)
            log.info("%s: %d scenarios share steps %d..%d (%s); ran once per seed in %.1f s", model.name,
                     len(members), first_step, d - 1, f"then {what}" if what else "the whole run", seconds)
        prefix_log.append(prefix_entry)
        start = d if reason is None else first_step
        elements = [(s, i) for s in members for i in range(S)]
        for c in range(0, len(elements), limit):
            chunk = elements[c: c + limit]
            tr = time.perf_counter()
            res = None
            if start < steps:
                rows = [i for _, i in chunk]
                if prefix_state is not None:
                    begin = prefix_state.select_batch(torch.tensor(rows, dtype=torch.int64,
                                                                   device=_state_device(prefix_state)))
                else:
                    begin = start_rows(rows)
                res = simulate(model, None, batch_params([per_scenario[s.name] for s, _ in chunk]), steps=steps,
                               seeds=[seeds[i] for i in rows], sampler=sampler, device=dev, env=pass_env,
                               start_date=start_date, progress=show,
                               interventions=select_schedule(schedule, [row_of[s.name] for s, _ in chunk]),
                               initial_state=begin, first_step=start, **extra)
            run_seconds += time.perf_counter() - tr
            chunk_log.append(dict(elements=len(chunk), seconds=time.perf_counter() - tr, first_step=start))
            keys = list(res.metrics) if res is not None else list(prefix_metrics)
            for b, (s, i) in enumerate(chunk):
                for k in keys:
                    pieces = ([prefix_metrics[k][:, i]] if prefix_metrics else []) + \
                        ([res.metrics[k][:, b]] if res is not None else [])
                    results[s.name].setdefault(k, [None] * S)[i] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    metrics = {name: {k: torch.stack(v, 1) for k, v in ms.items()} for name, ms in results.items()}
    shared = [p for p in prefix_log if p["shared"]]
    out = ScenarioResults(scenarios, seeds, metrics, baseline, model_name=model.name, start_date=start_date,
                          group_labels=group_labels,
                          timing=dict(setup_seconds=setup_seconds, run_seconds=run_seconds,
                                      wall_seconds=time.perf_counter() - t0,
                                      prefix_seconds=sum(p["seconds"] for p in shared),
                                      estimated_seconds_saved=sum(p["estimated_seconds_saved"] for p in shared)),
                          info=dict(passes=len(passes), chunks=chunk_log, bytes_per_element=per_elem,
                                    num_agents=num_agents, memory_budget=memory_budget,
                                    batch_layout="b = scenario_index * len(seeds) + seed_index",
                                    prefix=prefix_log, prefix_steps=max((p["steps"] for p in shared), default=0),
                                    params_file=params_file),
                          first_step=first_step, params=base)
    return out.since(report_from) if report_from is not None else out


def _state_device(state: Any) -> torch.device:
    return next(iter(state.tensors().values())).device


def policy_in_force(ctx: Any, levers: Sequence[Any], batch_index: int) -> dict[str, float]:
    """The policy context one batch element lives in at ``ctx.step``: {lever[/layer]: mean intensity
    over boroughs and age bands} for every lever (0 when unused). For behaviour models (LLM
    archetypes) that must see their own scenario's world: call per batch element."""
    out = {}
    for spec in levers:
        for layer in (None, *getattr(spec, "layers", ())):
            value = ctx.lever(spec.name, layer)
            label = spec.name if layer is None else f"{spec.name}/{layer}"
            out[label] = 0.0 if value is None else float(value[batch_index].float().mean())
    return out

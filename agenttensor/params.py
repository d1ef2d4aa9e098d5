"""Typed model parameters: defaults, units, bounds, validation, overrides and (de)serialisation.

A model's parameters are a frozen dataclass subclassing `Params`, each field declared with
`param(...)`. A value is a Python number or a tensor: a 0-dim tensor (scalar), ``[B, 1]`` (one
value per batch element, for scenario batches) or, for ``time_varying`` fields, ``[T]`` / ``[B, T]``
(one value per step, or per week with ``period=7``). Calibratable parameters are tensors that
require grad (`Params.learnable`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import ConfigError


def param(default: Any, *, unit: str = "", doc: str = "", min: float | None = None, max: float | None = None,
          time_varying: bool = False, period: int = 1, choices: tuple | None = None) -> Any:
    """Declare a parameter field. ``period`` is the number of steps each element of a time-varying
    parameter covers (7 = weekly)."""
    meta = dict(unit=unit, doc=doc, min=min, max=max, time_varying=time_varying, period=period, choices=choices)
    if isinstance(default, (list, tuple, dict)) or isinstance(default, Tensor):
        value = default
        return dataclasses.field(default_factory=lambda: value.clone() if isinstance(value, Tensor) else type(value)(value),
                                 metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _values(v: Any) -> list[float]:
    if isinstance(v, Tensor):
        return v.detach().reshape(-1).double().tolist()
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return []
    return [float(v)]


@dataclasses.dataclass(frozen=True)
class Params:
    """Base class for parameter sets."""

    # ---- introspection -------------------------------------------------------------------------
    @classmethod
    def spec(cls) -> Mapping[str, dataclasses.Field]:
        """The fields by name (read-only; built once per class: `at_step` reads it every step)."""
        spec = cls.__dict__.get("_spec_cache")
        if spec is None:
            spec = types.MappingProxyType({f.name: f for f in dataclasses.fields(cls)})
            setattr(cls, "_spec_cache", spec)
        return spec

    def replace(self, **changes: Any) -> "Params":
        unknown = set(changes) - set(self.spec())
        if unknown:
            raise ConfigError(self._unknown_message(sorted(unknown)[0]))
        return dataclasses.replace(self, **changes).validate()

    def _unknown_message(self, name: str) -> str:
        names = ", ".join(self.spec())
        return f"unknown parameter {name!r} for {type(self).__name__}; known parameters: {names}"

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "Params":
        """Raise ConfigError naming the parameter if a value is NaN/inf or out of bounds."""
        for name, f in self.spec().items():
            value = getattr(self, name)
            meta = f.metadata
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise ConfigError(f"parameter {name}={value!r} is not one of {list(meta['choices'])}")
            for x in _values(value):
                if math.isnan(x) or math.isinf(x):
                    raise ConfigError(f"parameter {name} is {x}; it must be a finite number"
                                      + (f" ({meta['doc']})" if meta.get("doc") else ""))
                if meta.get("min") is not None and x < meta["min"]:
                    raise ConfigError(f"parameter {name}={x:g} is below its minimum {meta['min']:g}"
                                      + (f" [{meta['unit']}]" if meta.get("unit") else ""))
                if meta.get("max") is not None and x > meta["max"]:
                    raise ConfigError(f"parameter {name}={x:g} is above its maximum {meta['max']:g}"
                                      + (f" [{meta['unit']}]" if meta.get("unit") else ""))
        return self

    def __post_init__(self) -> None:
        self.validate()

    # ---- overrides from strings (CLI --set) ----------------------------------------------------
    def with_overrides(self, overrides: Mapping[str, str]) -> "Params":
        """Parse ``name=value`` strings against the field types; errors name the parameter."""
        changes: dict[str, Any] = {}
        for name, text in overrides.items():
            if name not in self.spec():
                raise ConfigError(self._unknown_message(name))
            changes[name] = self._parse(name, text)
        return self.replace(**changes)

    def _parse(self, name: str, text: str) -> Any:
        current = getattr(self, name)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if isinstance(current, str):
                return text
            if isinstance(current, int) and not isinstance(current, bool):
                return int(text)
            if isinstance(current, (list, tuple)) or (isinstance(current, Tensor) and current.dim() > 0):
                values = [float(x) for x in text.split(",")]
                return torch.tensor(values, dtype=torch.float32) if isinstance(current, Tensor) else type(current)(values)
            return float(text)
        except ValueError:
            kind = type(current).__name__
            raise ConfigError(f"parameter {name}: cannot read {text!r} as {kind}"
                              + (" (comma-separated numbers)" if isinstance(current, (list, tuple, Tensor)) else "")) from None

    # ---- tensors, devices, learning ------------------------------------------------------------
    def as_tensors(self, device: str | torch.device = "cpu", learn: tuple[str, ...] = ()) -> "Params":
        """Every numeric value as a float32 tensor on ``device``; names in ``learn`` require grad."""
        changes = {}
        for name in self.spec():
            v = getattr(self, name)
            if isinstance(v, bool) or isinstance(v, str) or v is None:
                if name in learn:
                    raise ConfigError(f"parameter {name} is not numeric and cannot be learned")
                continue
            if isinstance(v, int) and name not in learn and not self.spec()[name].metadata.get("time_varying"):
                continue  # counts stay Python ints
            t = v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float32)
            t = t.to(device=device, dtype=torch.float32)  # differentiable: keeps a caller's graph
            if name in learn and not t.requires_grad:
                t = t.detach().clone().requires_grad_(True)
            changes[name] = t
        unknown = set(learn) - set(self.spec())
        if unknown:
            raise ConfigError(self._unknown_message(sorted(unknown)[0]))
        return dataclasses.replace(self, **changes)

    def learnable(self) -> dict[str, Tensor]:
        """Tensor parameters that require grad, by name."""
        return {n: getattr(self, n) for n in self.spec()
                if isinstance(getattr(self, n), Tensor) and getattr(self, n).requires_grad}

    def at_step(self, name: str, step: int | Tensor) -> Tensor | float:
        """Value of a parameter at a step: time-varying ones are indexed (clamped to the last element). ``step`` may be
        a 0-dim integer tensor on the parameter's device (`StepContext.clock`): the same value, indexed there."""
        value = getattr(self, name)
        meta = self.spec()[name].metadata
        if not meta.get("time_varying"):
            return value
        if not isinstance(value, Tensor):
            value = torch.tensor(value, dtype=torch.float32)
        if value.dim() == 0:
            return value
        if isinstance(step, Tensor):
            i = torch.div(step.to(torch.int64), meta.get("period", 1), rounding_mode="floor")
            i = i.clamp(0, value.shape[-1] - 1)
            picked = value.index_select(-1, i.view(1))
            return picked.squeeze(-1) if value.dim() == 1 else picked
        i = min(step // meta.get("period", 1), value.shape[-1] - 1)
        return value[..., i] if value.dim() == 1 else value[..., i: i + 1]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name in self.spec():
            v = getattr(self, name)
            if isinstance(v, Tensor):
                v = v.detach().cpu()
                v = v.item() if v.dim() == 0 else v.tolist()
            elif isinstance(v, tuple):
                v = list(v)
            out[name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Params":
        unknown = set(data) - set(cls.spec())
        if unknown:
            raise ConfigError(cls()._unknown_message(sorted(unknown)[0]))
        kwargs = {}
        for name, v in data.items():
            default = getattr(cls(), name)
            if isinstance(v, list):
                v = torch.tensor(v, dtype=torch.float32) if isinstance(default, Tensor) else type(default)(v) if isinstance(default, (list, tuple)) else torch.tensor(v)
            kwargs[name] = v
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def describe(self) -> list[dict[str, Any]]:
        """One row per parameter: name, value, unit, bounds, doc (for README tables and --help)."""
        rows = []
        for name, f in self.spec().items():
            m = f.metadata
            rows.append(dict(name=name, value=self.to_dict()[name], unit=m.get("unit", ""), min=m.get("min"),
                             max=m.get("max"), doc=m.get("doc", "")))
        return rows


PARAMS_FILE_META = ("provenance", "start_date", "description")


def load_params_file(params_type: type[Params], path: Any) -> tuple[Params, dict[str, Any]]:
    """Parameters from JSON: ``agenttensor calibrate``'s params.json (``{"params": {...}, "learned": ...,
    "info": {"start_date": ...}}``) or a plain ``{name: value}`` object (`Params.to_json`); names not
    in the file keep their defaults. Optional top-level keys: ``provenance``, ``description`` and
    ``start_date`` (the date of step 0 of the calendar the file's time-varying series follow; for a
    calibrate file, ``info.start_date``). Returns (params, meta) with meta = {path, start_date or None}.
    """
    from pathlib import Path

    from .errors import InputError

    path = Path(path)
    if not path.exists():
        raise InputError(f"parameter file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of parameters (or calibrate's params.json)")
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    start = data.get("start_date") or (info.get("start_date") if "params" in data else None)
    values = data["params"] if "params" in data else {k: v for k, v in data.items() if k not in PARAMS_FILE_META}
    if not isinstance(values, dict):
        raise InputError(f"{path}: 'params' must be an object of name: value")
    try:
        params = params_type.from_dict(values)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return params, {"path": str(path), "start_date": start}

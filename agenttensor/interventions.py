"""Typed interventions (policy levers) and their compilation into per-step tensors.

An `Intervention` sets a lever (e.g. ``school_closure``) to an intensity in [0, 1] from ``start``
to ``end`` (inclusive, dates or step numbers), optionally only in some boroughs, age bands and one
contact layer. `compile_schedule` turns one list of interventions per batch element into, for each
(lever, layer), a tensor ``[B, T, G, A]`` (batch, step, borough group, age band); overlapping
interventions on the same lever take the maximum intensity. Models read the value at the current
step with ``ctx.lever(name, layer)`` → ``[B, G, A]`` and gather it per agent.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .errors import ConfigError


@dataclass(frozen=True)
class LeverSpec:
    """A lever a model understands: its name, the layers it may target (empty = none), its meaning."""

    name: str
    doc: str = ""
    layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Intervention:
    lever: str
    start: dt.date | int
    end: dt.date | int
    intensity: float = 1.0
    boroughs: tuple[str, ...] | None = None  # None = everywhere
    ages: tuple[int, int] | None = None  # inclusive age range in years; None = all ages
    layer: str | None = None
    name: str = ""

    def step_range(self, start_date: dt.date | None, steps: int) -> tuple[int, int]:
        def to_step(x, what):
            if isinstance(x, dt.date):
                if start_date is None:
                    raise ConfigError(f"intervention {self.label}: {what} is a date but the run has no start date")
                return (x - start_date).days
            return int(x)

        a, b = to_step(self.start, "start"), to_step(self.end, "end")
        if b < a:
            raise ConfigError(f"intervention {self.label}: end {self.end} is before start {self.start}")
        if b < 0 or a >= steps:
            raise ConfigError(f"intervention {self.label}: dates {self.start}..{self.end} lie outside the run "
                              f"(steps 0..{steps - 1}" + (f", {start_date}..{start_date + dt.timedelta(days=steps - 1)}"
                                                          if start_date else "") + ")")
        return max(a, 0), min(b, steps - 1)

    @property
    def label(self) -> str:
        return self.name or self.lever


@dataclass
class Schedule:
    """Compiled interventions: ``values[(lever, layer)]`` is [B, T, G, A] in [0, 1]."""

    values: dict[tuple[str, str | None], Tensor] = field(default_factory=dict)
    batch: int = 1
    groups: int = 1
    age_bands: int = 1

    def at(self, lever: str, step: int, layer: str | None = None) -> Tensor | None:
        """Intensity at a step: [B, G, A], or None when no intervention uses this lever/layer."""
        v = self.values.get((lever, layer))
        if v is None:
            return None
        return v[:, min(step, v.shape[1] - 1)]

    def to(self, device) -> "Schedule":
        return Schedule({k: v.to(device) for k, v in self.values.items()}, self.batch, self.groups, self.age_bands)


def compile_schedule(per_batch: Sequence[Sequence[Intervention]], *, levers: Sequence[LeverSpec], steps: int,
                     start_date: dt.date | None, group_labels: Sequence[str], age_band_edges: Sequence[int],
                     context: str = "scenario") -> Schedule:
    """Compile one intervention list per batch element. age_band_edges: lower edges, e.g. (0, 5, 18, 65)."""
    spec = {lever.name: lever for lever in levers}
    labels = {label.lower(): i for i, label in enumerate(group_labels)}
    from .population import BOROUGH_CODES, BOROUGHS

    for i, (code, name) in enumerate(zip(BOROUGH_CODES, BOROUGHS)):
        if name.lower() in labels:
            labels.setdefault(code.lower(), labels[name.lower()])
    B, G, A = len(per_batch), max(len(group_labels), 1), len(age_band_edges)
    edges = list(age_band_edges) + [10_000]
    values: dict[tuple[str, str | None], Tensor] = {}
    for b, interventions in enumerate(per_batch):
        for iv in interventions:
            where = f"{context} intervention {iv.label!r}"
            if iv.lever not in spec:
                raise ConfigError(f"{where}: unknown lever {iv.lever!r}; known levers: {sorted(spec)}")
            if not (0.0 <= float(iv.intensity) <= 1.0):
                raise ConfigError(f"{where}: intensity {iv.intensity} must be in [0, 1]")
            if iv.layer is not None and iv.layer not in spec[iv.lever].layers:
                raise ConfigError(f"{where}: lever {iv.lever} cannot target layer {iv.layer!r}; "
                                  f"allowed: {list(spec[iv.lever].layers) or 'none'}")
            a, e = iv.step_range(start_date, steps)
            gmask = torch.ones(G, dtype=torch.bool)
            if iv.boroughs is not None:
                gmask = torch.zeros(G, dtype=torch.bool)
                for name in iv.boroughs:
                    if name.lower() not in labels:
                        raise ConfigError(f"{where}: unknown borough {name!r}; known: {list(group_labels)}")
                    gmask[labels[name.lower()]] = True
            amask = torch.ones(A, dtype=torch.bool)
            if iv.ages is not None:
                lo, hi = iv.ages
                if lo > hi or lo < 0:
                    raise ConfigError(f"{where}: bad age range {iv.ages}")
                amask = torch.tensor([edges[k] <= hi and edges[k + 1] - 1 >= lo for k in range(A)])
            key = (iv.lever, iv.layer)
            if key not in values:
                values[key] = torch.zeros(B, steps, G, A)
            block = values[key][b, a: e + 1]
            sel = gmask[:, None] & amask[None, :]
            block[:, sel] = torch.clamp_min(block[:, sel], float(iv.intensity))
    return Schedule(values, B, G, A)

"""Typed interventions (policy levers) and their compilation into per-step tensors.

An `Intervention` sets a lever (e.g. ``school_closure``) to an intensity in [0, 1] from ``start``
to ``end`` (inclusive, dates or step numbers), optionally only in some boroughs, age bands and one
contact layer. `compile_schedule` turns one list of interventions per batch element into, for each
(lever, layer), a tensor ``[B, T, G, A]`` (batch, step, borough group, age band); overlapping
interventions on the same lever take the maximum intensity. Models read the value at the current
step with ``ctx.lever(name, layer)`` → ``[B, G, A]`` and gather it per agent.

Differentiable levers: ``intensity`` may be a 0-dim tensor that requires grad (the compiled
schedule then carries its graph, so d(outcome)/d(intensity) comes from one backward pass), and an
intervention with ``ramp > 0`` fades out smoothly around its end, ``intensity · σ((end + ½ − t) /
ramp)`` on day t ≥ start, so that its end (a step number that may be a float or a tensor requiring
grad) — i.e. its length — is differentiable too. The ramp keeps the intensity-days of the hard
version (Σ_t σ(·) ≈ end − start + 1 away from the run's ends); ``ramp=0`` is the hard window.
"""

from __future__ import annotations

import datetime as dt
import math
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
    ramp: float = 0.0  # days; > 0: logistic fade-out around `end` (differentiable end), see module docs

    def step_range(self, start_date: dt.date | None, steps: int) -> tuple[int, int]:
        def to_step(x, what):
            if isinstance(x, dt.date):
                if start_date is None:
                    raise ConfigError(f"intervention {self.label}: {what} is a date but the run has no start date")
                return (x - start_date).days
            return int(math.floor(float(x.detach() if isinstance(x, Tensor) else x)))

        a, b = to_step(self.start, "start"), to_step(self.end, "end")
        if b < a:
            raise ConfigError(f"intervention {self.label}: end {self.end} is before start {self.start}")
        if b < 0 or a >= steps:
            raise ConfigError(f"intervention {self.label}: dates {self.start}..{self.end} lie outside the run "
                              f"(steps 0..{steps - 1}" + (f", {start_date}..{start_date + dt.timedelta(days=steps - 1)}"
                                                          if start_date else "") + ")")
        return max(a, 0), min(b, steps - 1)

    def end_position(self, start_date: dt.date | None) -> Tensor | float:
        """The end as a step number, kept differentiable when ``end`` is a tensor."""
        if isinstance(self.end, dt.date):
            if start_date is None:
                raise ConfigError(f"intervention {self.label}: end is a date but the run has no start date")
            return float((self.end - start_date).days)
        return self.end if isinstance(self.end, Tensor) else float(self.end)

    def profile(self, start_date: dt.date | None, steps: int) -> tuple[int, int, Tensor]:
        """(first step, last step, intensity per step [last − first + 1]) — differentiable in
        ``intensity`` and, with a ramp, in ``end``."""
        a, e = self.step_range(start_date, steps)
        intensity = self.intensity if isinstance(self.intensity, Tensor) else torch.tensor(float(self.intensity))
        intensity = intensity.to(torch.float32).reshape(())
        if self.ramp and self.ramp > 0:
            end = self.end_position(start_date)
            t = torch.arange(a, steps, dtype=torch.float32)
            return a, steps - 1, intensity * torch.sigmoid((end + 0.5 - t) / float(self.ramp))
        return a, e, intensity.expand(e - a + 1)

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

    _steps: dict = field(default_factory=dict, repr=False, compare=False)  # see `at`

    def at(self, lever: str, step: int, layer: str | None = None) -> Tensor | None:
        """Intensity at a step: [B, G, A], or None when no intervention uses this lever/layer. Steps with the values of
        the step before get the same tensor (a cache keyed by identity, e.g. `CovidEnv.memo`, then skips comparing
        the values)."""
        key = (lever, layer)
        v = self.values.get(key)
        if v is None:
            return None
        if isinstance(step, Tensor):  # a step's number on the device (`StepContext.clock`): read there
            return v.index_select(1, step.to(torch.int64).clamp(0, v.shape[1] - 1).view(1)).squeeze(1)
        views = self._steps.get(key)
        if views is None or views[0] is not v:
            same = (v[:, 1:] == v[:, :-1]).flatten(2).all(2).all(0).tolist() if v.shape[1] > 1 else []
            steps = [v[:, 0]] if v.shape[1] else []
            for t, unchanged in enumerate(same, start=1):
                steps.append(steps[-1] if unchanged else v[:, t])
            views = self._steps[key] = (v, steps)
        return views[1][min(step, len(views[1]) - 1)]

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
            if isinstance(iv.intensity, Tensor) and iv.intensity.numel() != 1:
                raise ConfigError(f"{where}: intensity must be a number (or a one-element tensor), "
                                  f"got a tensor of shape {tuple(iv.intensity.shape)}")
            if float(iv.ramp) < 0 or not math.isfinite(float(iv.ramp)):
                raise ConfigError(f"{where}: ramp {iv.ramp} must be a finite number of days >= 0")
            if not (0.0 <= float(torch.as_tensor(iv.intensity).detach()) <= 1.0):
                raise ConfigError(f"{where}: intensity {iv.intensity} must be in [0, 1]")
            if iv.layer is not None and iv.layer not in spec[iv.lever].layers:
                raise ConfigError(f"{where}: lever {iv.lever} cannot target layer {iv.layer!r}; "
                                  f"allowed: {list(spec[iv.lever].layers) or 'none'}")
            a, e, profile = iv.profile(start_date, steps)
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
            sel = (gmask[:, None] & amask[None, :]).to(torch.float32)  # [G, A]
            block = values[key][b, a: e + 1].clone()  # [L, G, A]; overlapping interventions: the maximum
            merged = torch.maximum(block, profile[:, None, None].to(block.dtype))
            values[key][b, a: e + 1] = torch.where(sel > 0, merged, block)
    return Schedule(values, B, G, A)

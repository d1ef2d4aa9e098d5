"""Results of a run: per-step metrics with `.to_polars()`, `.plot()` and `.save(dir)`."""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import Tensor


@dataclass
class Results:
    """Recorded metrics: ``metrics[name]`` is [T, B] (totals) or [T, B, G] (per group).

    Row k is step ``first_step + k`` (``first_step`` > 0 for a run started from a given state);
    ``start_date`` is the date of step 0, so row k is dated ``start_date + first_step + k`` days.
    Tensors keep their autograd graph in gradient modes, so ``results["new_infections"].sum()``
    can be differentiated w.r.t. learnable parameters.
    """

    metrics: dict[str, Tensor]
    model_name: str
    params: Any
    seeds: list[int]
    group_labels: list[str] | None = None
    final_state: Any = None
    start_date: dt.date | None = None
    timing: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    first_step: int = 0

    @classmethod
    def from_history(cls, history: list[dict[str, Tensor]] | dict[str, Tensor], *, model_name: str, params: Any, seeds: list[int], env: Any,
                     final_state: Any, start_date: dt.date | None, timing: dict[str, float], first_step: int = 0,
                     **info) -> "Results":
        if isinstance(history, dict):  # already stacked: {name: [T, ...]}
            metrics = dict(history)
        else:
            metrics = {k: torch.stack([h[k] for h in history]) for k in (history[0] if history else {})}
        return cls(metrics, model_name, params, seeds, getattr(env, "group_labels", None), final_state, start_date,
                   timing, info, first_step)

    def __getitem__(self, name: str) -> Tensor:
        return self.metrics[name]

    @property
    def steps(self) -> int:
        return next(iter(self.metrics.values())).shape[0] if self.metrics else 0

    def totals(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.metrics.items() if v.dim() == 2}

    def by_group(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.metrics.items() if v.dim() == 3}

    def _index_columns(self, steps: int, batch: int) -> dict[str, Any]:
        step = torch.arange(self.first_step, self.first_step + steps).repeat_interleave(batch)
        cols: dict[str, Any] = {"step": step.numpy().astype("int32"),
                                "seed": torch.tensor(self.seeds * steps).numpy() if len(self.seeds) == batch else
                                torch.arange(batch).repeat(steps).numpy()}
        if self.start_date is not None:
            cols["date"] = [self.start_date + dt.timedelta(days=int(s)) for s in step]
        return cols

    def to_polars(self, by_group: bool = False) -> pl.DataFrame:
        """Long table: one row per (step, seed) — or per (step, seed, group) with a ``group`` column."""
        tables = self.by_group() if by_group else self.totals()
        if not tables:
            return pl.DataFrame()
        first = next(iter(tables.values()))
        T, B = first.shape[:2]
        if not by_group:
            cols = self._index_columns(T, B)
            for k, v in tables.items():
                cols[k] = v.detach().cpu().reshape(-1).numpy()
            return pl.DataFrame(cols)
        G = first.shape[2]
        base = self._index_columns(T, B)
        cols = {k: [x for x in v for _ in range(G)] if isinstance(v, list) else v.repeat(G) for k, v in base.items()}
        labels = self.group_labels or [str(g) for g in range(G)]
        cols["group"] = labels * (T * B)
        for k, v in tables.items():
            cols[k] = v.detach().cpu().reshape(-1).numpy()
        return pl.DataFrame(cols)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model_name, "seeds": self.seeds, "steps": self.steps}
        if self.first_step:
            out["first_step"] = self.first_step
        for k, v in self.totals().items():
            out[f"final_{k}_mean"] = float(v[-1].detach().float().mean()) if self.steps else None
        return out

    def plot(self, path: str | Path, metrics: list[str] | None = None, title: str | None = None) -> Path:
        """Line plot of total metrics over steps (mean over seeds, band = min..max). Writes a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        totals = self.totals()
        names = metrics or list(totals)
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        x = torch.arange(self.first_step, self.first_step + self.steps).numpy()
        for name in names:
            v = totals[name].detach().float().cpu()
            ax.plot(x, v.mean(1).numpy(), label=name)
            if v.shape[1] > 1:
                ax.fill_between(x, v.min(1).values.numpy(), v.max(1).values.numpy(), alpha=0.2)
        ax.set_xlabel("step (day)")
        ax.set_ylabel("agents")
        ax.set_title(title or f"{self.model_name}: seeds {self.seeds}")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def save(self, directory: str | Path, extra_summary: dict[str, Any] | None = None,
             plot_metrics: list[str] | None = None) -> Path:
        """Write results.parquet (per step × seed), results_by_group.parquet (if any group metrics),
        summary.json (parameters, seeds, runtime, versions) and plot.png."""
        from . import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_polars().write_parquet(directory / "results.parquet", statistics=False)
        if self.by_group():
            self.to_polars(by_group=True).write_parquet(directory / "results_by_group.parquet", statistics=False)
        summary = dict(self.summary(), params=self.params.to_dict() if hasattr(self.params, "to_dict") else None,
                       timing=self.timing, info=self.info, agenttensor_version=__version__,
                       torch_version=torch.__version__, python=platform.python_version(),
                       written_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if extra_summary:
            summary.update(extra_summary)
        (directory / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self.plot(directory / "plot.png", plot_metrics)
        return directory

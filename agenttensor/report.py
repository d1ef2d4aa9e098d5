"""Comparison plots and a self-contained HTML report for `ScenarioResults`.

- ``trajectories_<metric>.png``: per scenario, the mean over seeds and a percentile band across seeds.
- ``differences_<outcome>.png``: per scenario, the mean paired difference to the baseline with its
  interval (bar chart).
- ``report.html``: both kinds of plot inlined as base64 PNGs, the comparison table and the method.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import polars as pl
import torch

if TYPE_CHECKING:
    from .scenarios import ScenarioResults


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _default_metrics(results: "ScenarioResults") -> list[str]:
    names = list(results.totals(results.baseline))
    preferred = [m for m in ("new_infections", "I", "hospital_admissions", "H", "deaths") if m in names]
    return preferred or names[:2]


def plot_trajectories(results: "ScenarioResults", metric: str, path: str | Path,
                      interval: tuple[float, float] = (5.0, 95.0)) -> Path:
    """Mean over seeds (line) and the ``interval`` percentile band across seeds, one colour per scenario."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    T, first = results.steps, getattr(results, "first_step", 0)
    if results.start_date is not None:
        x = [results.start_date + dt.timedelta(days=first + t) for t in range(T)]
    else:
        x = list(range(first, first + T))
    q = torch.tensor([interval[0] / 100, interval[1] / 100], dtype=torch.float64)
    for name in results.names:
        v = results.metrics[name][metric].detach().to(torch.float64).cpu()  # [T, S]
        line, = ax.plot(x, v.mean(1).numpy(), label=name, lw=2 if name == results.baseline else 1.4,
                        ls="-" if name == results.baseline else "-")
        if v.shape[1] > 1:
            lo, hi = torch.quantile(v, q, dim=1)
            ax.fill_between(x, lo.numpy(), hi.numpy(), alpha=0.15, color=line.get_color(), lw=0)
    ax.set_xlabel("date" if results.start_date else "day")
    ax.set_ylabel(metric)
    ax.set_title(f"{results.model_name}: {metric} (mean; band {interval[0]:g}–{interval[1]:g} % over "
                 f"{len(results.seeds)} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _prefix_note(results: "ScenarioResults") -> str:
    """Report text: the comparison period and the shared prefix, when they apply."""
    notes = []
    if results.first_step and "report_from" in results.info:
        notes.append(f"compared from {results.info['report_from']} (the projection period; earlier steps ran but are "
                     "not compared)")
    steps = results.info.get("prefix_steps", 0)
    if steps:
        notes.append(f"the first {steps} simulated days were identical in every scenario and ran once per seed")
    return "".join(f" ({html.escape(n)})" for n in notes)


def plot_differences(table: pl.DataFrame, outcome: str, path: str | Path, baseline: str | None = None) -> Path:
    """Horizontal bars: mean paired difference to the baseline per scenario, with its interval."""
    plt = _pyplot()
    rows = table.filter((pl.col("metric") == outcome) & ~pl.col("is_baseline"))
    names = rows["scenario"].to_list()
    diff = rows["diff"].to_numpy()
    lo = diff - rows["diff_lo"].to_numpy()
    hi = rows["diff_hi"].to_numpy() - diff
    fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(names) + 1.6), dpi=110)
    colors = ["#2b7bba" if d < 0 else "#d1495b" for d in diff]
    y = list(range(len(names)))
    ax.barh(y, diff, color=colors, alpha=0.85)
    ax.errorbar(diff, y, xerr=[abs(lo), abs(hi)], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"difference in {outcome} vs {baseline or 'baseline'} (paired, same seeds)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(results: "ScenarioResults", table: pl.DataFrame, directory: str | Path,
                metrics: Sequence[str] | None = None, interval: tuple[float, float] = (5.0, 95.0)) -> dict[str, Path]:
    """Trajectory plots for ``metrics`` (default: infections-like metrics) and difference bars for
    their headline outcomes. Returns {file name: path}."""
    directory = Path(directory)
    out = {}
    for metric in metrics or _default_metrics(results):
        p = plot_trajectories(results, metric, directory / f"trajectories_{metric}.png", interval)
        out[p.name] = p
    if len(results.names) > 1:
        for outcome in _headline_outcomes(table):
            p = plot_differences(table, outcome, directory / f"differences_{outcome}.png", results.baseline)
            out[p.name] = p
    return out


def _headline_outcomes(table: pl.DataFrame) -> list[str]:
    metrics = table["metric"].unique(maintain_order=True).to_list()
    preferred = ["total_new_infections", "total_hospital_admissions", "total_deaths"]
    head = [m for m in preferred if m in metrics] or [m for m in metrics if m.startswith("total_")][:3]
    return head or metrics[:1]


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _fmt(x: float) -> str:
    if x != x:  # NaN
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.3g}"


def table_html(table: pl.DataFrame, outcomes: Sequence[str] | None = None) -> str:
    outcomes = outcomes or table["metric"].unique(maintain_order=True).to_list()
    rows = ["<tr><th>scenario</th><th>outcome</th><th>mean</th><th>interval across seeds</th>"
            "<th>difference vs baseline</th><th>interval of the difference</th><th>relative</th></tr>"]
    for r in table.filter(pl.col("metric").is_in(list(outcomes))).iter_rows(named=True):
        base = r["is_baseline"]
        css = ' class="base"' if base else ""
        rows.append(
            f"<tr{css}><td>{html.escape(r['scenario'])}</td><td>{html.escape(r['metric'])}</td>"
            f"<td>{_fmt(r['mean'])}</td><td>{_fmt(r['lo'])} – {_fmt(r['hi'])}</td>"
            + ("<td colspan=3>baseline</td>" if base else
               f"<td>{_fmt(r['diff'])}</td><td>{_fmt(r['diff_lo'])} – {_fmt(r['diff_hi'])}</td>"
               f"<td>{r['rel_diff'] * 100:+.1f} %</td>") + "</tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def write_report(results: "ScenarioResults", table: pl.DataFrame, path: str | Path, plots: dict[str, Path],
                 interval: tuple[float, float] = (5.0, 95.0), level: float = 90.0, title: str | None = None) -> Path:
    """One HTML file with everything inlined (no external files or scripts)."""
    from .scenarios import METHOD

    path = Path(path)
    title = title or f"Scenario comparison: {results.model_name}"
    scen_rows = []
    for s in results.scenarios:
        ivs = "<br>".join(html.escape(f"{iv.lever} {iv.start}→{iv.end} ×{iv.intensity:g}"
                                      + (f" boroughs={list(iv.boroughs)}" if iv.boroughs else "")
                                      + (f" ages={list(iv.ages)}" if iv.ages else "")
                                      + (f" layer={iv.layer}" if iv.layer else "")) for iv in s.interventions) or "–"
        ov = html.escape(", ".join(f"{k}={v}" for k, v in s.overrides.items())) or "–"
        scen_rows.append(f"<tr><td>{html.escape(s.name)}</td><td>{html.escape(s.description) or ''}</td>"
                         f"<td>{ivs}</td><td>{ov}</td></tr>")
    headline = _headline_outcomes(table)
    timing = results.timing
    info = results.info
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}
td:first-child,td:nth-child(2),th{{text-align:left}}tr.base{{background:#f3f3f3}}img{{max-width:100%}}
.small{{color:#555;font-size:12px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(results.names)} scenarios × {len(results.seeds)} seeds (seeds {results.seeds[0]}…{results.seeds[-1]}, shared by every
scenario: common random numbers), {results.steps} days{f' from {results.start_date + dt.timedelta(days=results.first_step)}' if results.start_date else ''}{_prefix_note(results)};
baseline <b>{html.escape(results.baseline)}</b>; {info.get('num_agents', '?'):,} agents.
Run time {timing.get('wall_seconds', 0):.1f} s in {len(info.get('chunks', []))} batch chunk(s).</p>
<p class="small">Method: {html.escape(METHOD.format(lo=interval[0], hi=interval[1], level=level))}.</p>
<h2>Headline outcomes</h2>
{table_html(table, headline)}
<h2>Trajectories</h2>
{''.join(_img(p) for n, p in plots.items() if n.startswith('trajectories_'))}
<h2>Differences to the baseline</h2>
{''.join(_img(p) for n, p in plots.items() if n.startswith('differences_'))}
<h2>Scenarios</h2>
<table><tr><th>name</th><th>description</th><th>interventions</th><th>overrides</th></tr>{''.join(scen_rows)}</table>
<h2>All outcomes</h2>
{table_html(table)}
<p class="small">Generated by agenttensor compare. Tables: compare.parquet / compare.csv; per-step trajectories: trajectories.parquet.</p>
</body></html>"""
    path.write_text(body)
    return path

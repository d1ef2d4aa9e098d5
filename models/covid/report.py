"""Weekly aggregates, per-borough plots against observed NYC data, and a summary table for a covid run.

    python -m models.covid.report RUN_DIR     # RUN_DIR written by `agenttensor run models/covid ... --out RUN_DIR`

Writes RUN_DIR/weekly.parquet, RUN_DIR/weekly_by_borough.parquet, RUN_DIR/covid_report.png and prints
the summary table. Observed series (NYC DOHMH cases/hospitalisations/deaths by borough, BLS LAUS
unemployment by borough) are read from ``shared/data/nyc`` (``$AGENTTENSOR_SHARED_DATA`` or
``../shared/data`` next to the repository) when present; rates are per 100,000 residents so runs of
any population scale compare directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import polars as pl

FLOWS = ("new_infections", "reported_cases", "hospital_admissions", "deaths")
STOCKS = ("S", "E", "I_asym", "I_sym", "H", "R", "D")
RATES = ("isolating_share", "unemployment_rate", "on_site_share")
LAYERS = ("infections_household", "infections_school", "infections_workplace", "infections_community")
BOROUGH_PREFIX = {"Bronx": "BX", "Brooklyn": "BK", "Manhattan": "MN", "Queens": "QN", "Staten Island": "SI"}


def weekly(frame: pl.DataFrame, by: tuple[str, ...] = ("seed",)) -> pl.DataFrame:
    """Daily results (a `Results.to_polars()` frame, with a ``date`` column) -> weeks starting Monday:
    flows and layer splits summed, stocks at the end of the week, rates averaged."""
    if "date" not in frame.columns:
        raise ValueError("weekly aggregates need dates: run with --start-date / start_date=")
    frame = frame.with_columns(pl.col("date").dt.truncate("1w").alias("week"))
    present = set(frame.columns)
    aggs = [pl.col(c).sum() for c in FLOWS + LAYERS if c in present]
    aggs += [pl.col(c).sort_by("date").last() for c in STOCKS if c in present]
    aggs += [pl.col(c).mean() for c in RATES if c in present]
    aggs.append(pl.len().alias("days"))
    return frame.group_by(["week", *by]).agg(aggs).sort(["week", *by])


def shared_data() -> Path:
    env = os.environ.get("AGENTTENSOR_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def observed_weekly() -> pl.DataFrame | None:
    """Observed weekly cases, admissions and deaths per borough (NYC DOHMH trends), or None."""
    root = shared_data() / "nyc" / "covid" / "trends"
    if not (root / "cases-by-day.csv").exists():
        return None
    frames = []
    for file, column, name in (("cases-by-day.csv", "CASE_COUNT", "reported_cases"),
                               ("hosp-by-day.csv", "HOSPITALIZED_COUNT", "hospital_admissions"),
                               ("deaths-by-day.csv", "DEATH_COUNT", "deaths")):
        raw = pl.read_csv(root / file, infer_schema_length=0)
        date = pl.col("date_of_interest").str.strptime(pl.Date, "%m/%d/%Y")
        for borough, prefix in BOROUGH_PREFIX.items():
            frames.append(raw.select(date.alias("date"), pl.lit(borough).alias("group"), pl.lit(name).alias("metric"),
                                     pl.col(f"{prefix}_{column}").cast(pl.Float64).alias("value")))
    daily = pl.concat(frames)
    return (daily.with_columns(pl.col("date").dt.truncate("1w").alias("week"))
            .group_by(["week", "group", "metric"]).agg(pl.col("value").sum()).sort("week"))


def observed_unemployment() -> pl.DataFrame | None:
    path = shared_data() / "nyc" / "economy" / "laus_nyc_boroughs_monthly_2019_2023.csv"
    if not path.exists():
        return None
    laus = pl.read_csv(path)
    return laus.select(pl.date(pl.col("year"), pl.col("month"), 15).alias("date"), pl.col("borough").alias("group"),
                       (pl.col("unemployment_rate_pct") / 100).alias("unemployment_rate"))


def summary_table(by_borough: pl.DataFrame) -> pl.DataFrame:
    """Per borough and citywide (mean over seeds): residents, infections, reported cases, admissions,
    deaths (totals over the run) and the peak unemployment rate."""
    first = by_borough.filter(pl.col("step") == 0)
    population = first.group_by(["group", "seed"]).agg(pl.sum_horizontal([pl.col(s) for s in STOCKS]).sum().alias("residents"))
    totals = by_borough.group_by(["group", "seed"]).agg([pl.col(c).sum() for c in FLOWS] +
                                                        [pl.col("unemployment_rate").cast(pl.Float64).max().alias("peak_unemployment")])
    table = totals.join(population, on=["group", "seed"]).group_by("group").agg(pl.all().exclude("seed").mean())
    city = table.select([pl.lit("NYC").alias("group")] + [pl.col(c).sum() for c in ("residents",) + FLOWS] +
                        [(pl.col("peak_unemployment") * pl.col("residents")).sum() / pl.col("residents").sum()])
    table = pl.concat([table.select(city.columns), city], how="vertical_relaxed")
    order = {name: k for k, name in enumerate([*BOROUGH_PREFIX, "NYC"])}
    table = table.sort(pl.col("group").replace_strict(order, default=len(order)))
    return table.with_columns((pl.col("new_infections") / pl.col("residents") * 100).round(2).alias("infected_%"),
                              (pl.col("deaths") / pl.col("residents") * 1e5).round(1).alias("deaths_per_100k"),
                              pl.col("peak_unemployment").round(4))


def plot(run_dir: Path, by_borough: pl.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    week = weekly(by_borough, by=("seed", "group"))
    residents = (by_borough.filter(pl.col("step") == 0)
                 .select("group", "seed", pl.sum_horizontal([pl.col(s) for s in STOCKS]).alias("residents")))
    week = week.join(residents, on=["group", "seed"]).group_by(["week", "group"]).agg(pl.all().exclude("seed").mean()).sort("week")
    observed = observed_weekly()
    laus = observed_unemployment()
    start, end = week["week"].min(), week["week"].max()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    colors = dict(zip(BOROUGH_PREFIX, ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple")))
    for ax, metric, title in zip(axes.flat[:3], ("reported_cases", "hospital_admissions", "deaths"),
                                 ("reported cases", "hospital admissions", "deaths")):
        for borough, color in colors.items():
            part = week.filter(pl.col("group") == borough)
            if part.height:
                ax.plot(part["week"], part[metric] / part["residents"] * 1e5, color=color, label=f"{borough} (model)")
            if observed is not None:
                obs = observed.filter((pl.col("group") == borough) & (pl.col("metric") == metric)
                                      & pl.col("week").is_between(start, end))
                ax.plot(obs["week"], obs["value"] / POPULATION_2020[borough] * 1e5, color=color, ls="--", alpha=0.7)
        ax.set_title(f"weekly {title} per 100k (dashed: NYC DOHMH)")
    ax = axes.flat[3]
    for borough, color in colors.items():
        part = by_borough.filter(pl.col("group") == borough).group_by("date").agg(pl.col("unemployment_rate").mean()).sort("date")
        ax.plot(part["date"], part["unemployment_rate"] * 100, color=color, label=borough)
        if laus is not None:
            obs = laus.filter((pl.col("group") == borough) & pl.col("date").is_between(start, end))
            ax.plot(obs["date"], obs["unemployment_rate"] * 100, color=color, ls="--", marker="o", ms=3, alpha=0.7)
    ax.set_title("unemployment rate % (dashed: BLS LAUS)")
    ax.legend(fontsize=7)
    city = weekly(pl.read_parquet(run_dir / "results.parquet")).group_by("week").agg(pl.all().exclude("seed").mean()).sort("week")
    ax = axes.flat[4]
    for stage in ("E", "I_asym", "I_sym", "H"):
        ax.plot(city["week"], city[stage], label=stage)
    ax.set_title("prevalence by stage (end of week, agents)")
    ax.legend(fontsize=7)
    ax = axes.flat[5]
    for layer in LAYERS:
        if layer in city.columns:
            ax.plot(city["week"], city[layer], label=layer.removeprefix("infections_"))
    ax.set_title("weekly infections by layer (agents)")
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# Borough populations, 2020 Census (P1 total population), for observed per-100k rates.
POPULATION_2020 = {"Bronx": 1_472_654, "Brooklyn": 2_736_074, "Manhattan": 1_694_251, "Queens": 2_405_464,
                   "Staten Island": 495_747}


def write_report(run_dir: str | Path) -> pl.DataFrame:
    run_dir = Path(run_dir)
    daily = pl.read_parquet(run_dir / "results.parquet")
    by_borough = pl.read_parquet(run_dir / "results_by_group.parquet")
    by_borough = by_borough.rename({c: c.removesuffix("_by_borough") for c in by_borough.columns})
    weekly(daily).write_parquet(run_dir / "weekly.parquet")
    weekly(by_borough, by=("seed", "group")).write_parquet(run_dir / "weekly_by_borough.parquet")
    plot(run_dir, by_borough, run_dir / "covid_report.png")
    table = summary_table(by_borough)
    table.write_csv(run_dir / "summary_table.csv")
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m models.covid.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        table = write_report(argv[0])
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with pl.Config(tbl_cols=-1, tbl_width_chars=200):
        print(table)
    print(f"wrote {argv[0]}/weekly.parquet, weekly_by_borough.parquet, covid_report.png, summary_table.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

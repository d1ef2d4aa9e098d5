"""Observed targets and covariates for calibration, as long polars tables.

Targets are ``(date, borough, metric, value)``: ``date`` a `pl.Date` (for weekly rows the *last*
day of the week, for monthly rows the last day of the month), ``borough`` a full borough name
(``Bronx`` … ``Staten Island``) or ``NYC`` for citywide rows, ``metric`` a name such as ``cases``,
``value`` a float (persons, or percent for ``unemployment_rate``).

Bundled series (compact copies in ``agenttensor/data/nyc/``, provenance in its PROVENANCE.md):

| name | metrics | grain |
|---|---|---|
| ``nyc-cases-daily`` | cases (confirmed), probable_cases, all_cases, hospitalisations, deaths | daily, 2020-02-29..2022-12-31 |
| ``nyc-cases-weekly`` | the same, summed over weeks ending Saturday (DOHMH/MMWR weeks) | weekly |
| ``nyc-unemployment-monthly`` | unemployment_rate (%), unemployed, labor_force (BLS LAUS) | monthly, 2019-01..2023-12 |

`weekly` re-aggregates a daily table onto the simulation calendar (weeks that start on the
simulation's start date), so week k of the targets is days 7k..7k+6 of the run.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import torch

from .errors import InputError
from .population import BOROUGHS, BOROUGH_CODES

DATA = Path(__file__).parent / "data" / "nyc"
COLUMNS = ("date", "borough", "metric", "value")
_DAILY_METRICS = {"cases": "cases", "probable_cases": "probable", "hospitalisations": "hosp", "deaths": "deaths"}
NAMES = ("nyc-cases-daily", "nyc-cases-weekly", "nyc-unemployment-monthly")


def load_targets(name_or_path: str | Path, *, metrics: list[str] | None = None) -> pl.DataFrame:
    """A bundled series by name (see module docs) or a CSV/Parquet file with columns
    date, borough, metric, value. ``metrics`` keeps only those metrics."""
    text = str(name_or_path)
    if text == "nyc-cases-daily":
        table = nyc_daily()
    elif text == "nyc-cases-weekly":
        table = weekly(nyc_daily(), week_ending="saturday")
    elif text == "nyc-unemployment-monthly":
        table = nyc_unemployment()
    else:
        table = _read_table(Path(text))
    if metrics is not None:
        missing = sorted(set(metrics) - set(table["metric"].unique().to_list()))
        if missing:
            raise InputError(f"targets {text}: no metric(s) {missing}; available: "
                             f"{sorted(table['metric'].unique().to_list())}")
        table = table.filter(pl.col("metric").is_in(metrics))
    return table


def _read_table(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise InputError(f"targets {path}: no such file, and not a bundled name (one of {', '.join(NAMES)})")
    try:
        table = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, try_parse_dates=True)
    except Exception as e:
        raise InputError(f"targets {path}: cannot read ({str(e).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"targets {path}: missing column(s) {missing}; need date, borough, metric, value")
    try:
        table = table.select(pl.col("date").cast(pl.Date), pl.col("borough").cast(pl.Utf8),
                             pl.col("metric").cast(pl.Utf8), pl.col("value").cast(pl.Float64))
    except Exception:
        raise InputError(f"targets {path}: date must be YYYY-MM-DD and value numeric") from None
    if table.null_count().sum_horizontal().item():
        raise InputError(f"targets {path}: missing values in rows; drop or fill them")
    return table.sort("metric", "borough", "date")


def nyc_daily() -> pl.DataFrame:
    """DOHMH daily counts by borough (date of diagnosis / admission / death), long format."""
    wide = pl.read_csv(DATA / "covid_daily.csv", try_parse_dates=True)
    frames = []
    for code, name in zip(BOROUGH_CODES, BOROUGHS):
        for metric, suffix in _DAILY_METRICS.items():
            frames.append(wide.select("date", pl.lit(name).alias("borough"), pl.lit(metric).alias("metric"),
                                      pl.col(f"{code}_{suffix}").cast(pl.Float64).alias("value")))
        frames.append(wide.select("date", pl.lit(name).alias("borough"), pl.lit("all_cases").alias("metric"),
                                  (pl.col(f"{code}_cases") + pl.col(f"{code}_probable")).cast(pl.Float64).alias("value")))
    return pl.concat(frames).sort("metric", "borough", "date")


def nyc_unemployment() -> pl.DataFrame:
    """BLS LAUS monthly by borough (not seasonally adjusted); date = last day of the month."""
    laus = pl.read_csv(DATA / "laus_monthly.csv")
    date = (pl.date(pl.col("year"), pl.col("month"), 1).dt.month_end()).alias("date")
    frames = [laus.select(date, "borough", pl.lit(metric).alias("metric"), pl.col(col).cast(pl.Float64).alias("value"))
              for metric, col in (("unemployment_rate", "unemployment_rate_pct"), ("unemployed", "unemployed"),
                                  ("labor_force", "labor_force"))]
    return pl.concat(frames).sort("metric", "borough", "date")


def weekly(daily: pl.DataFrame, *, start_date: dt.date | None = None, week_ending: str | None = None) -> pl.DataFrame:
    """Sum a daily table over 7-day weeks. Either weeks aligned to the simulation calendar
    (``start_date``: week k = start + 7k .. start + 7k + 6) or calendar weeks ending on
    ``week_ending`` (e.g. "saturday"). ``date`` becomes the week's last day; partial weeks are dropped."""
    if (start_date is None) == (week_ending is None):
        raise InputError("weekly(): give exactly one of start_date or week_ending")
    if week_ending is not None:
        days = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        if week_ending.lower() not in days:
            raise InputError(f"week_ending must be a weekday name, got {week_ending!r}")
        end_weekday = days.index(week_ending.lower())  # Monday = 0
        offset = (pl.lit(end_weekday) - (pl.col("date").dt.weekday() - 1)) % 7
        week_end = pl.col("date") + pl.duration(days=offset)
    else:
        age = (pl.col("date") - pl.lit(start_date)).dt.total_days()
        week_end = pl.lit(start_date) + pl.duration(days=(age // 7) * 7 + 6)
    table = (daily.with_columns(week_end.alias("week_end"))
             .group_by("week_end", "borough", "metric")
             .agg(pl.col("value").sum(), pl.len().alias("days"))
             .filter(pl.col("days") == 7))
    if start_date is not None:
        table = table.filter(pl.col("week_end") >= pl.lit(start_date))
    return table.select(pl.col("week_end").alias("date"), "borough", "metric", "value").sort("metric", "borough", "date")


def window(table: pl.DataFrame, start: dt.date | str, end: dt.date | str) -> pl.DataFrame:
    """Rows with start <= date <= end (dates inclusive)."""
    start, end = parse_date(start, what="window start"), parse_date(end, what="window end")
    if end < start:
        raise InputError(f"window end {end} is before its start {start}")
    return table.filter(pl.col("date").is_between(start, end))


def parse_date(value: dt.date | str, *, error: type[Exception] = InputError, what: str = "date") -> dt.date:
    """A `datetime.date` from a date or a YYYY-MM-DD string; anything else raises ``error``.

    The one date parser of the calibration code: dates read from target files and tables are input
    errors (`InputError`, the default), dates of a calibration window or start date are configuration
    errors (``error=ConfigError``). ``what`` names the value in the message."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise error(f"{what} {value!r} is not a date (use YYYY-MM-DD)") from None


def load_covariates(start_date: dt.date | str, weeks: int, *, names: tuple[str, ...] = ("subway", "cli")) -> torch.Tensor:
    """Weekly covariates on the simulation calendar, standardised, as a [weeks, K] float32 tensor.

    ``subway``: log of mean daily MTA subway entries (one column, citywide, 2020-02-01..2021-05-14);
    ``cli``: log of COVID-like-illness ED visits per 100,000 (five columns, one per borough).
    Weeks beyond a series' end repeat its last value (stated so, not hidden: see `covariate_coverage`).
    """
    start = parse_date(start_date, what="start_date")
    days = [start + dt.timedelta(days=d) for d in range(7 * weeks)]
    columns = []
    for name in names:
        if name == "subway":
            table = pl.read_csv(DATA / "subway_daily.csv", try_parse_dates=True)
            columns.append(_weekly_series(table, "entries_daily", days))
        elif name == "cli":
            table = pl.read_csv(DATA / "cli_ed_daily.csv", try_parse_dates=True)
            columns += [_weekly_series(table, code, days) for code in BOROUGH_CODES]
        else:
            raise InputError(f"unknown covariate {name!r}; choose from subway, cli")
    x = torch.stack(columns, 1).log1p()
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


def covariate_coverage() -> dict[str, tuple[str, str]]:
    """First and last date of each covariate series."""
    out = {}
    for name, file in (("subway", "subway_daily.csv"), ("cli", "cli_ed_daily.csv")):
        dates = pl.read_csv(DATA / file, try_parse_dates=True)["date"]
        out[name] = (str(dates.min()), str(dates.max()))
    return out


def _weekly_series(table: pl.DataFrame, column: str, days: list[dt.date]) -> torch.Tensor:
    lookup = dict(zip(table["date"].to_list(), table[column].to_list()))
    first, last = table["date"].min(), table["date"].max()
    values = [lookup.get(min(max(d, first), last), float("nan")) for d in days]
    x = torch.tensor(values, dtype=torch.float32).reshape(-1, 7)
    return torch.nanmean(x, 1)

"""Rebuild the compact CSVs in this folder from the shared raw copies (run once; see PROVENANCE.md).

    python agenttensor/data/nyc/make_compact.py ../shared/data/nyc
"""

import sys
from pathlib import Path

import polars as pl

CODES = ("BX", "BK", "MN", "QN", "SI")
NAMES = ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
FIRST, LAST = "2020-02-29", "2022-12-31"


def main(src: Path, dst: Path) -> None:
    trends = src / "covid" / "trends"
    date = pl.col("date_of_interest").str.strptime(pl.Date, "%m/%d/%Y").alias("date")
    cases = pl.read_csv(trends / "cases-by-day.csv", infer_schema_length=0)
    hosp = pl.read_csv(trends / "hosp-by-day.csv", infer_schema_length=0)
    deaths = pl.read_csv(trends / "deaths-by-day.csv", infer_schema_length=0)
    cols = []
    for c in CODES:
        cols += [pl.col(f"{c}_CASE_COUNT").cast(pl.Int32).alias(f"{c}_cases"),
                 pl.col(f"{c}_PROBABLE_CASE_COUNT").cast(pl.Int32).alias(f"{c}_probable")]
    table = cases.select(date, *cols)
    table = table.join(hosp.select(date, *[pl.col(f"{c}_HOSPITALIZED_COUNT").cast(pl.Int32).alias(f"{c}_hosp") for c in CODES]),
                       on="date").join(
        deaths.select(date, *[pl.col(f"{c}_DEATH_COUNT").cast(pl.Int32).alias(f"{c}_deaths") for c in CODES]), on="date")
    table = table.filter(pl.col("date").is_between(pl.lit(FIRST).str.to_date(), pl.lit(LAST).str.to_date())).sort("date")
    table.write_csv(dst / "covid_daily.csv")

    laus = pl.read_csv(src / "economy" / "laus_nyc_boroughs_monthly_2019_2023.csv")
    laus.select("borough", "year", "month", "labor_force", "unemployed", "unemployment_rate_pct").write_csv(
        dst / "laus_monthly.csv")

    pl.read_csv(src / "mobility" / "daily_mta_subway_turnstile_entries_2020_2021.csv").write_csv(dst / "subway_daily.csv")

    cli = pl.read_csv(trends / "covid-like-illness-by-boro.csv", infer_schema_length=10000)
    cli = cli.filter(pl.col("Borough").is_in(list(NAMES))).select(
        pl.col("Date").str.to_date().alias("date"), pl.col("Borough").alias("borough"),
        pl.col("Visit_All_ages").round(3).alias("visits_per_100k"))
    cli = cli.filter(pl.col("date") <= pl.lit(LAST).str.to_date())
    wide = cli.pivot(on="borough", index="date", values="visits_per_100k").sort("date")
    wide.select("date", *[pl.col(n).alias(c) for n, c in zip(NAMES, CODES)]).write_csv(dst / "cli_ed_daily.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).parent)

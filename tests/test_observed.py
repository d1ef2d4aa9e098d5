import datetime as dt

import polars as pl
import pytest
import torch

from agenttensor.errors import InputError
from agenttensor.observed import covariate_coverage, load_covariates, load_targets, weekly, window
from agenttensor.population import BOROUGHS


def test_daily_cases_by_borough():
    daily = load_targets("nyc-cases-daily")
    assert daily.columns == ["date", "borough", "metric", "value"]
    assert sorted(daily["borough"].unique()) == sorted(BOROUGHS)
    assert {"cases", "all_cases", "hospitalisations", "deaths", "probable_cases"} <= set(daily["metric"].unique())
    cases = daily.filter(pl.col("metric") == "cases")
    assert cases["date"].min() == dt.date(2020, 2, 29) and cases["date"].max() == dt.date(2022, 12, 31)
    assert cases.height == 5 * ((dt.date(2022, 12, 31) - dt.date(2020, 2, 29)).days + 1)
    assert daily["value"].min() >= 0 and daily.null_count().sum_horizontal().item() == 0


def test_weekly_saturday_weeks_match_dohmh_sum():
    w = load_targets("nyc-cases-weekly", metrics=["cases"])
    assert all(d.weekday() == 5 for d in w["date"].unique().to_list())  # Saturdays
    daily = load_targets("nyc-cases-daily", metrics=["cases"])
    bk = daily.filter((pl.col("borough") == "Brooklyn") & pl.col("date").is_between(dt.date(2020, 9, 27), dt.date(2020, 10, 3)))
    row = w.filter((pl.col("borough") == "Brooklyn") & (pl.col("date") == dt.date(2020, 10, 3)))
    assert row["value"].item() == bk["value"].sum() == 1655


def test_weekly_aligned_to_simulation_calendar():
    daily = window(load_targets("nyc-cases-daily", metrics=["deaths"]), "2020-04-01", "2020-06-30")
    start = dt.date(2020, 4, 3)
    w = weekly(daily, start_date=start)
    dates = sorted(w["date"].unique().to_list())
    assert dates[0] == start + dt.timedelta(days=6)
    assert all((b - a).days == 7 for a, b in zip(dates, dates[1:]))
    full = daily.filter(pl.col("date").is_between(start, dates[-1]))
    assert w["value"].sum() == pytest.approx(full["value"].sum())


def test_unemployment_monthly():
    u = load_targets("nyc-unemployment-monthly", metrics=["unemployment_rate"])
    assert u.height == 300
    bronx = u.filter((pl.col("borough") == "Bronx") & (pl.col("date") == dt.date(2020, 4, 30)))
    feb = u.filter((pl.col("borough") == "Bronx") & (pl.col("date") == dt.date(2020, 2, 29)))
    assert bronx["value"].item() > 2 * feb["value"].item()  # the April 2020 jump


def test_custom_targets_file_and_errors(tmp_path):
    good = tmp_path / "t.csv"
    pl.DataFrame({"date": ["2020-10-03"], "borough": ["Bronx"], "metric": ["cases"], "value": [3.0]}).write_csv(good)
    assert load_targets(good)["date"].dtype == pl.Date
    bad = tmp_path / "bad.csv"
    pl.DataFrame({"date": ["2020-10-03"], "value": [3.0]}).write_csv(bad)
    with pytest.raises(InputError, match="missing column"):
        load_targets(bad)
    with pytest.raises(InputError, match="bundled name"):
        load_targets(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="no metric"):
        load_targets("nyc-cases-weekly", metrics=["nonsense"])


def test_covariates_weekly_standardised():
    x = load_covariates("2020-10-04", 10)
    assert x.shape == (10, 6) and torch.isfinite(x).all()
    assert x.mean(0).abs().max() < 1e-4
    assert covariate_coverage()["subway"] == ("2020-02-01", "2021-05-14")

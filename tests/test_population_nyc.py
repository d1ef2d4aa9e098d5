"""NYC population builder on small subsets: accuracy against the ACS inputs, composition, determinism, errors."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from agenttensor.errors import ConfigError, InputError
from agenttensor.population import REQUIRED, Population
from populations.nyc import build_nyc, load_or_build
from populations.nyc.builder import AGE_BANDS, DATA_DIR, ENROLMENT, RACE_COLUMNS

NTA = pl.read_csv(DATA_DIR / "nta_profile.csv")


@pytest.fixture(scope="module")
def staten_island():
    """Staten Island at full scale (~493k agents, a few seconds): accuracy checks need scale 1."""
    return build_nyc(scale=1.0, boroughs="SI", seed=0)


@pytest.fixture(scope="module")
def brooklyn_small():
    return build_nyc(scale=0.01, boroughs=["BK"], seed=0)


def _nta_table(pop):
    p = pop.persons.with_columns(band=pl.min_horizontal(pl.col("age").cast(pl.Int32) // 5, pl.lit(17)))
    codes = pop.meta["ntas"]
    return p, codes


def test_schema_and_codes(brooklyn_small):
    p = brooklyn_small.persons
    for col, dtype in REQUIRED.items():
        assert p[col].dtype == dtype, col
    assert p["cd"].dtype == pl.Int16 and p["industry"].dtype == pl.Int8 and p["occupation"].dtype == pl.Int8
    assert set(p["borough"].unique()) == {1}
    assert p["sex"].is_between(0, 1).all() and p["race"].is_between(0, 4).all() and p["age"].is_between(0, 100).all()
    assert (p["cd"] // 100 == 3).all()  # DCP code: Brooklyn CDs are 3xx
    assert p["agent_id"].to_list() == list(range(p.height))
    assert ((p["industry"] >= 0) == (p["employment"] == 1)).all()
    assert len(brooklyn_small.meta["codes"]["industry"]) == 13 and len(brooklyn_small.meta["codes"]["occupation"]) == 5
    assert abs(p.height - round(2_712_360 * 0.01)) <= 60  # per-NTA rounding


def test_nta_marginals_within_one_percent(staten_island):
    p, codes = _nta_table(staten_island)
    acs = NTA.filter(pl.col("borough") == "SI").with_columns(idx=pl.col("nta").replace_strict({c: i for i, c in enumerate(codes)}))
    for name, col, levels in (("band", AGE_BANDS, 18), ("sex", ["female", "male"], 2), ("race", RACE_COLUMNS, 5)):
        got = p.group_by("nta", name).len().pivot(on=name, index="nta", values="len").fill_null(0)
        got = acs.select("idx").join(got, left_on="idx", right_on="nta", how="left").fill_null(0)
        sim = got.select([pl.col(str(i)) if str(i) in got.columns else pl.lit(0) for i in range(levels)]).to_numpy()
        target = acs.select(col).to_numpy()
        assert np.all(np.abs(sim - target) <= np.maximum(0.01 * target, 0.5)), name
    assert abs(p.height - 493_194) / 493_194 < 0.005


def test_households_and_composition(staten_island):
    pop = staten_island
    hh = pop.groups["households"]
    regular = hh.filter(pl.col("kind") == 0)
    target = NTA.filter(pl.col("borough") == "SI")["households"].sum()
    assert abs(regular.height - target) / target < 0.02
    p = pop.persons.join(hh.select("household_id", "kind", "size"), on="household_id")
    # sizes in the table match membership
    counts = p.group_by("household_id").len()
    assert counts.join(hh, on="household_id").filter(pl.col("len") != pl.col("size")).height == 0
    # every child lives in a household with an adult; no child in group quarters
    per_hh = p.group_by("household_id").agg(children=(pl.col("age") < 18).sum(), adults=(pl.col("age") >= 18).sum(),
                                            kind=pl.col("kind").first())
    assert per_hh.filter((pl.col("children") > 0) & (pl.col("adults") == 0)).height == 0
    assert per_hh.filter((pl.col("kind") == 1) & (pl.col("children") > 0)).height == 0
    # 65+ living alone per the tables
    alone65 = p.filter((pl.col("size") == 1) & (pl.col("kind") == 0) & (pl.col("age") >= 65)).height
    want = NTA.filter(pl.col("borough") == "SI")["living_alone_65plus"].sum()
    assert abs(alone65 - want) / want < 0.02
    # group-quarters population = population - household population
    gq = p.filter(pl.col("kind") == 1).height
    want_gq = (NTA.filter(pl.col("borough") == "SI")["pop"] - NTA.filter(pl.col("borough") == "SI")["household_pop"]).sum()
    assert abs(gq - want_gq) <= 20


def test_school_enrolment_matches_tables(staten_island):
    pop = staten_island
    p = pop.persons.join(pop.groups["schools"].select("school_id", "level"), on="school_id", how="left")
    si = NTA.filter(pl.col("borough") == "SI")
    enrolled = p.filter(pl.col("school_id") >= 0)
    k12 = enrolled.filter(pl.col("level") == 1).height
    want_k12 = si["enrol_k"].sum() + si["enrol_g1_8"].sum()
    assert abs(k12 - want_k12) / want_k12 < 0.01
    hs = enrolled.filter(pl.col("level") == 2).height
    assert abs(hs - si["enrol_g9_12"].sum()) / si["enrol_g9_12"].sum() < 0.01
    assert abs(enrolled.height - si.select(ENROLMENT).sum().sum_horizontal()[0]) / enrolled.height < 0.01
    # school-age children: nearly all 6-13 enrolled (ACS enrolment is close to universal)
    kids = p.filter(pl.col("age").is_between(6, 13))
    assert (kids["school_id"] >= 0).mean() > 0.85
    # K-8 schools are within one NTA; sizes are realistic
    sch = pop.groups["schools"]
    assert sch.filter(pl.col("level") == 1)["size"].median() > 150
    assert p.filter(pl.col("level") == 1).group_by("school_id").agg(pl.col("nta").n_unique())["nta"].max() == 1


def test_employment_and_workplaces(staten_island):
    p = staten_island.persons
    si = NTA.filter(pl.col("borough") == "SI")
    assert abs((p["employment"] == 1).sum() - si["employed"].sum()) <= 5
    assert abs((p["employment"] == 2).sum() - si["unemployed"].sum()) <= 5
    assert p.filter(pl.col("employment") > 0)["age"].min() >= 16
    workers = p.filter(pl.col("employment") == 1)
    assert (workers["workplace_id"] >= 0).all() and (p.filter(pl.col("employment") != 1)["workplace_id"] == -1).all()
    wp = staten_island.groups["workplaces"]
    stay = workers.join(wp.select("workplace_id", pl.col("borough").alias("work_borough")), on="workplace_id")
    share = (stay["work_borough"] == 4).mean()
    assert 0.50 < share < 0.60  # default Commute.stay_share 0.55


def test_same_seed_identical_files_different_seed_differs(tmp_path, brooklyn_small):
    a = brooklyn_small.save(tmp_path / "a")
    b = build_nyc(scale=0.01, boroughs="BK", seed=0).save(tmp_path / "b")
    c = build_nyc(scale=0.01, boroughs="BK", seed=1).save(tmp_path / "c")

    def digest(d):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(d).iterdir())}

    assert digest(a) == digest(b)
    assert digest(a)["persons.parquet"] != digest(c)["persons.parquet"]
    other = Population.load(c)
    # equally valid: NTA totals identical, composition different
    assert other.persons.group_by("nta").len().sort("nta").equals(brooklyn_small.persons.group_by("nta").len().sort("nta"))


def test_subset_tensors_and_networkx(brooklyn_small):
    nta = int(brooklyn_small.persons["nta"][0])
    sub = brooklyn_small.subset(ntas=[nta])
    assert 0 < len(sub) < len(brooklyn_small)
    t = sub.tensors()
    assert t["age"].shape == (len(sub),)
    g = sub.to_networkx()
    assert g.number_of_nodes() == len(sub) and g.number_of_edges() > 0


def test_load_or_build_caches(tmp_path):
    path = tmp_path / "si"
    first = load_or_build(path, scale=0.005, boroughs="SI", seed=2)
    stamp = (path / "persons.parquet").stat().st_mtime_ns
    second = load_or_build(path, scale=0.005, boroughs="SI", seed=2)
    assert (path / "persons.parquet").stat().st_mtime_ns == stamp
    assert second.persons.equals(first.persons)


@pytest.mark.parametrize("bad", [0, -1, 1.5, float("nan")])
def test_bad_scale(bad):
    with pytest.raises(ConfigError, match="scale"):
        build_nyc(scale=bad, boroughs="SI")


def test_unknown_borough():
    with pytest.raises(ConfigError, match="'XX'"):
        build_nyc(scale=0.01, boroughs="SI,XX")


def _copy_data(tmp_path):
    d = tmp_path / "data"
    shutil.copytree(DATA_DIR, d)
    return d


def test_missing_column_names_file_and_column(tmp_path):
    d = _copy_data(tmp_path)
    pl.read_csv(d / "nta_profile.csv").drop("households").write_csv(d / "nta_profile.csv")
    with pytest.raises(InputError, match=r"nta_profile\.csv.*households"):
        build_nyc(scale=0.01, boroughs="SI", data_dir=d)


def test_corrupt_value_names_file_column_value(tmp_path):
    d = _copy_data(tmp_path)
    f = pl.read_csv(d / "nta_profile.csv", infer_schema_length=0)
    f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("n/a")).otherwise(pl.col("employed")).alias("employed")) \
        .write_csv(d / "nta_profile.csv")
    with pytest.raises(InputError, match=r"nta_profile\.csv.*'employed'.*'n/a'"):
        build_nyc(scale=0.01, boroughs="SI", data_dir=d)
    pl.read_csv(DATA_DIR / "borough_household_size.csv").with_columns(pl.col("households") * -1) \
        .write_csv(d / "borough_household_size.csv")
    shutil.copy(DATA_DIR / "nta_profile.csv", d / "nta_profile.csv")
    with pytest.raises(InputError, match=r"borough_household_size\.csv.*negative"):
        build_nyc(scale=0.01, boroughs="SI", data_dir=d)


def test_unknown_borough_code_in_data(tmp_path):
    d = _copy_data(tmp_path)
    f = pl.read_csv(d / "nta_profile.csv", infer_schema_length=0)
    f.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("ZZ")).otherwise(pl.col("borough")).alias("borough")) \
        .write_csv(d / "nta_profile.csv")
    with pytest.raises(InputError, match=r"nta_profile\.csv.*'borough'.*'ZZ'"):
        build_nyc(scale=0.01, boroughs="SI", data_dir=d)
    (d / "cd_age_sex_pct.csv").unlink()
    shutil.copy(DATA_DIR / "nta_profile.csv", d / "nta_profile.csv")
    with pytest.raises(InputError, match=r"cd_age_sex_pct\.csv.*not found"):
        build_nyc(scale=0.01, boroughs="SI", data_dir=d)


def test_cli_build_describe_and_errors(tmp_path, capsys):
    from agenttensor.cli import main

    out = tmp_path / "pop"
    assert main(["population", "build", "nyc", "--out", str(out), "--boroughs", "SI", "--scale", "0.01", "--seed", "3"]) == 0
    assert Population.load(out).meta["seed"] == 3
    assert main(["population", "describe", str(out)]) == 0
    assert (out / "age_pyramid.png").stat().st_size > 1000
    assert "SI" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["population", "build", "nyc", "--out", str(bad), "--scale", "-0.5"]) == 2
    assert main(["population", "build", "nyc", "--out", str(bad), "--boroughs", "BK,XX"]) == 2
    assert main(["population", "build", "paris", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "-0.5" in err and "'XX'" in err and "paris" in err
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-pop")]

"""Regenerate the compact inputs in ``populations/nyc/data/`` from the shared census copies.

Run once (``python -m populations.nyc.prepare_data [SHARED_CENSUS_DIR]``); the outputs are committed, so
building a population never needs the shared folder. See ``PROVENANCE.md`` for sources and column mapping.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

HERE = Path(__file__).parent / "data"
DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "nyc" / "census"

AGE_CODES = ["PopU5", "Pop5t9", "Pop10t14", "Pop15t19", "Pop20t24", "Pop25t29", "Pop30t34", "Pop35t39", "Pop40t44",
             "Pop45t49", "Pop50t54", "Pop55t59", "Pop60t64", "Pop65t69", "Pop70t74", "Pop75t79", "Pop80t84", "Pop85pl"]
AGE_NAMES = ["age_0_4", "age_5_9", "age_10_14", "age_15_19", "age_20_24", "age_25_29", "age_30_34", "age_35_39",
             "age_40_44", "age_45_49", "age_50_54", "age_55_59", "age_60_64", "age_65_69", "age_70_74", "age_75_79",
             "age_80_84", "age_85_plus"]
# output column -> DCP code(s) (estimate columns, suffix E); several codes are summed
NTA_COLUMNS: dict[str, tuple[str, list[str]]] = {
    "pop": ("demographic", ["Pop_1"]), "male": ("demographic", ["Male"]), "female": ("demographic", ["Fem"]),
    **{n: ("demographic", [c]) for n, c in zip(AGE_NAMES, AGE_CODES)},
    "hispanic": ("demographic", ["Hsp1"]), "white_nh": ("demographic", ["WtNH"]), "black_nh": ("demographic", ["BlNH"]),
    "asian_nh": ("demographic", ["AsnNH"]), "other_nh": ("demographic", ["AIANNH", "NHPINH", "OthNH", "Rc2plNH"]),
    "households": ("social", ["HH1"]), "household_pop": ("social", ["HHPop"]), "living_alone": ("social", ["NFamA"]),
    "living_alone_65plus": ("social", ["NFamA65pl"]), "households_with_u18": ("social", ["HH1plU18"]),
    "enrol_prek": ("social", ["SE_NScPSc"]), "enrol_k": ("social", ["SE_Kndgtn"]), "enrol_g1_8": ("social", ["SE_G1t8"]),
    "enrol_g9_12": ("social", ["SE_G9t12"]), "enrol_college": ("social", ["SE_ClgGSc"]),
    "pop16plus": ("economic", ["Pop16pl"]), "employed": ("economic", ["CvEm16pl1", "LFArmdF"]),
    "unemployed": ("economic", ["CvLFUEm1"]),
    "occ_management_business_science_arts": ("economic", ["MgBSciArt"]), "occ_service": ("economic", ["Srvc"]),
    "occ_sales_office": ("economic", ["SalesOff"]), "occ_natural_resources_construction_maintenance": ("economic", ["NRCnstMnt"]),
    "occ_production_transportation_material_moving": ("economic", ["PrdTrnsMM"]),
    "ind_agriculture_mining": ("economic", ["AgFFHM"]), "ind_construction": ("economic", ["Constctn"]),
    "ind_manufacturing": ("economic", ["Mnfctrng"]), "ind_wholesale": ("economic", ["Whlsale"]),
    "ind_retail": ("economic", ["Retail"]), "ind_transport_warehousing_utilities": ("economic", ["TrWHUt"]),
    "ind_information": ("economic", ["Info"]), "ind_finance_insurance_real_estate": ("economic", ["FIRE"]),
    "ind_professional_management_admin": ("economic", ["PrfSMgAWM"]), "ind_education_health_social": ("economic", ["EdHlthCSA"]),
    "ind_arts_recreation_accommodation_food": ("economic", ["ArtEnRAFS"]), "ind_other_services": ("economic", ["OthnotPA"]),
    "ind_public_administration": ("economic", ["PubAdmin"]),
}
BOROUGH_CODE = {"Bronx": "BX", "Brooklyn": "BK", "Manhattan": "MN", "Queens": "QN", "Staten Island": "SI"}


def main(source: Path = DEFAULT_SOURCE) -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    tables = {k: pl.read_csv(source / "nta_acs2017_2021" / f"{k}_acs2017_2021_nta.csv", infer_schema_length=0)
              for k in ("demographic", "social", "economic")}
    base = tables["demographic"].select(nta=pl.col("GeoID"), name=pl.col("GeogName"),
                                       borough=pl.col("Borough").replace_strict(BOROUGH_CODE),
                                       nta_type=pl.col("NTAType").cast(pl.Int8))
    geo = (pl.read_csv(source / "geography" / "nyc2020census_tract_nta_cdta_relationships.csv", infer_schema_length=0)
           .select(nta="NTACode", cdta="CDTACode").unique("nta"))
    base = base.join(geo, on="nta", how="left")
    for name, (table, codes) in NTA_COLUMNS.items():
        t = tables[table]
        assert t["GeoID"].equals(base["nta"]), table
        base = base.with_columns(pl.sum_horizontal([t[c + "E"].cast(pl.Float64).fill_null(0) for c in codes])
                                 .round().cast(pl.Int64).alias(name))
    base.write_csv(HERE / "nta_profile.csv")

    cd = pl.read_csv(source / "community_district_profile" / "cd_acs_profile_output.csv", infer_schema_length=0)
    cells = [f"{s}_{a}" for s in ("female", "male") for a in ["under_5", "5_9", "10_14", "15_19", "20_24", "25_29",
             "30_34", "35_39", "40_44", "45_49", "50_54", "55_59", "60_64", "65_69", "70_74", "75_79", "80_84", "85_over"]]
    cd = (cd.filter(pl.col("census_geoid").str.len_chars() == 3)
          .select(pl.col("census_geoid").cast(pl.Int16).alias("cd"), pl.col("pop_acs").cast(pl.Float64).round().cast(pl.Int64),
                  *[pl.col(c).cast(pl.Float64) for c in cells])
          .drop_nulls()  # joint-interest areas (parks, airports) have no profile
          .sort("cd"))
    cd.write_csv(HERE / "cd_age_sex_pct.csv")

    hh = pl.read_csv(source / "county_acs2016_2020" / "county_household_size_distribution_acs2016_2020.csv")
    hh = hh.select(borough=pl.col("borough").replace_strict(BOROUGH_CODE), size=pl.col("Household Size").cast(pl.Int8),
                   households=pl.col("Number").cast(pl.Int64))
    hh.write_csv(HERE / "borough_household_size.csv")
    print(f"wrote {HERE}: nta_profile {base.shape}, cd_age_sex_pct {cd.shape}, borough_household_size {hh.shape}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE)

"""New York City synthetic population from ACS tables (NTA profiles 2017-2021, CD age x sex, borough household sizes).

``build_nyc(scale, boroughs, seed, commute)`` runs these steps, in this order:

1. **Inputs.** Read and validate ``data/*.csv`` (errors name the file, column and value).
2. **Joint demographics.** Per NTA, fit a [18 age bands x 2 sexes x 5 race groups] table by IPF to the NTA's
   age, sex and race marginals (scaled by ``scale``); the seed is the community district's age x sex shape
   (the only sub-borough age x sex cross-tab), so the age-sex interaction comes from real data. Integerise
   with truncate-replicate-sample plus a repair that meets all three marginals exactly.
3. **Persons.** Expand cells to agents; single-year ages uniform within 5-year bands, 85+ decaying to 100.
4. **Households.** Per NTA: group-quarters residents (population minus household population) in units of
   ~50; ``living_alone`` one-person households, ``living_alone_65plus`` of them 65+; the other households get
   sizes 2..10 from the borough size distribution (ACS B11016), exponentially tilted so that the NTA's
   household population is matched exactly; each has an adult householder; children (<18) are placed in
   ``households_with_u18`` households (larger ones preferred) and never without an adult.
5. **Schools.** Per NTA and level, the ACS enrolment counts are filled from age-eligible residents; pre-K
   centres (~60) and K-8 schools (~500) within the NTA, high schools (~900) within the community district,
   colleges (~3000) within the borough.
6. **Work.** Per NTA, employed and unemployed counts (ACS DP03) are drawn from residents 16+ with age-specific
   propensities; industry (13 sectors) and occupation (5 groups) follow the NTA's distributions (independently);
   the work borough follows ``commute`` (an explicit assumption, the inputs have no commuting flows); workplaces
   are heavy-tailed (log-normal, median 8) groups within (work borough, industry).
7. **Assemble** a ``Population`` with codes and provenance in ``meta``.

No Python loop runs over agents: loops run over NTAs (262), boroughs, levels or (borough, industry) pools.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from agenttensor.errors import ConfigError, InputError
from agenttensor.ipf import integerise, ipf
from agenttensor.population import BOROUGH_CODES, BOROUGHS, Population

BUILDER_VERSION = "nyc-1.0"
DATA_DIR = Path(__file__).parent / "data"

AGE_BANDS = ["age_0_4", "age_5_9", "age_10_14", "age_15_19", "age_20_24", "age_25_29", "age_30_34", "age_35_39",
             "age_40_44", "age_45_49", "age_50_54", "age_55_59", "age_60_64", "age_65_69", "age_70_74", "age_75_79",
             "age_80_84", "age_85_plus"]
RACE_COLUMNS = ["hispanic", "white_nh", "black_nh", "asian_nh", "other_nh"]  # = population.CODES["race"] order
OCCUPATIONS = ["occ_management_business_science_arts", "occ_service", "occ_sales_office",
               "occ_natural_resources_construction_maintenance", "occ_production_transportation_material_moving"]
INDUSTRIES = ["ind_agriculture_mining", "ind_construction", "ind_manufacturing", "ind_wholesale", "ind_retail",
              "ind_transport_warehousing_utilities", "ind_information", "ind_finance_insurance_real_estate",
              "ind_professional_management_admin", "ind_education_health_social",
              "ind_arts_recreation_accommodation_food", "ind_other_services", "ind_public_administration"]
ENROLMENT = ["enrol_prek", "enrol_k", "enrol_g1_8", "enrol_g9_12", "enrol_college"]
NTA_NUMERIC = (["pop", "male", "female", *AGE_BANDS, *RACE_COLUMNS, "households", "household_pop", "living_alone",
                "living_alone_65plus", "households_with_u18", *ENROLMENT, "pop16plus", "employed", "unemployed",
                *OCCUPATIONS, *INDUSTRIES])
CD_CELLS = [f"{s}_{a}" for s in ("female", "male") for a in
            ["under_5", "5_9", "10_14", "15_19", "20_24", "25_29", "30_34", "35_39", "40_44", "45_49", "50_54",
             "55_59", "60_64", "65_69", "70_74", "75_79", "80_84", "85_over"]]
# DCP borough digit of community district codes (101 = Manhattan CD 1): MN 1, BX 2, BK 3, QN 4, SI 5
DCP_BORO_DIGIT = {"MN": 1, "BX": 2, "BK": 3, "QN": 4, "SI": 5}
SCHOOL_LEVELS = ("pre-K", "K-8", "high school", "college")
SCHOOL_SIZE = {0: 60, 1: 500, 2: 900, 3: 3000}  # target mean size per level
HOUSEHOLD_KINDS = ("household", "group quarters")
GROUP_QUARTERS_SIZE = 50


@dataclass(frozen=True)
class Commute:
    """Residence borough -> work borough (the inputs have no commuting flows; this is an explicit assumption).

    A worker living in borough b works in b with probability ``stay_share`` (``manhattan_stay_share`` for
    Manhattan residents); otherwise in another borough drawn with weights ``attraction`` (BX, BK, MN, QN, SI),
    a Manhattan-centred job geography. ``matrix`` (5x5, rows = home borough in code order, rows sum to 1)
    overrides both, e.g. with ACS county-to-county flows when available. Defaults are rough, not calibrated:
    order-of-magnitude values consistent with the common picture of NYC commuting (most outer-borough
    cross-borough commuters go to Manhattan; most Manhattan residents work in Manhattan). Work outside NYC is
    not modelled (those workers are kept in their home borough).
    """

    stay_share: float = 0.55
    manhattan_stay_share: float = 0.85
    attraction: tuple[float, float, float, float, float] = (0.06, 0.12, 0.64, 0.15, 0.03)
    matrix: tuple[tuple[float, ...], ...] | None = None

    def to_matrix(self) -> np.ndarray:
        if self.matrix is not None:
            m = np.asarray(self.matrix, dtype=np.float64)
            if m.shape != (5, 5) or (m < 0).any() or not np.allclose(m.sum(1), 1.0, atol=1e-6):
                raise ConfigError(f"commute.matrix must be 5x5, non-negative, rows summing to 1; got {m.tolist()}")
            return m
        for name in ("stay_share", "manhattan_stay_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"commute.{name} must be in [0, 1], got {v}")
        a = np.asarray(self.attraction, dtype=np.float64)
        if a.shape != (5,) or (a < 0).any() or a.sum() <= 0:
            raise ConfigError(f"commute.attraction needs 5 non-negative weights (BX,BK,MN,QN,SI), got {self.attraction}")
        m = np.zeros((5, 5))
        for b in range(5):
            stay = self.manhattan_stay_share if b == 2 else self.stay_share
            w = a.copy()
            w[b] = 0.0
            m[b] = (1 - stay) * w / w.sum()
            m[b, b] = stay
        return m


def commute_from(value) -> Commute:
    if isinstance(value, Commute):
        return value
    if value == "home" or value is None:
        return Commute(stay_share=1.0, manhattan_stay_share=1.0)
    if isinstance(value, (int, float)):
        return Commute(stay_share=float(value))
    raise ConfigError(f"commute must be a Commute, 'home' or a stay share in [0, 1]; got {value!r}")


# ---- 1. inputs ---------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    nta: pl.DataFrame
    cd: pl.DataFrame
    household_size: pl.DataFrame
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256


def _read(path: Path, required: Sequence[str], numeric: Sequence[str]) -> pl.DataFrame:
    if not path.exists():
        raise InputError(f"{path}: input file not found (regenerate with `python -m populations.nyc.prepare_data`)")
    try:
        frame = pl.read_csv(path, infer_schema_length=0)
    except Exception as e:
        raise InputError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}")
    casts = []
    for c in numeric:
        bad = frame.filter(pl.col(c).is_null() | pl.col(c).cast(pl.Float64, strict=False).is_null())
        if bad.height:
            row = bad.row(0, named=True)
            raise InputError(f"{path}: column {c!r} has a missing or non-numeric value {row[c]!r} "
                             f"(row {frame.with_row_index().filter(pl.col(c).is_null() | pl.col(c).cast(pl.Float64, strict=False).is_null())['index'][0] + 2})")
        casts.append(pl.col(c).cast(pl.Float64))
    frame = frame.with_columns(casts)
    for c in numeric:
        neg = frame.filter(pl.col(c) < 0)
        if neg.height:
            raise InputError(f"{path}: column {c!r} has negative value {neg[c][0]} (first key {neg.row(0)[0]!r})")
    return frame


def load_inputs(data_dir: str | Path = DATA_DIR) -> Inputs:
    """Read and validate the three compact input tables."""
    data_dir = Path(data_dir)
    nta_path = data_dir / "nta_profile.csv"
    nta = _read(nta_path, ["nta", "name", "borough", "nta_type", "cdta", *NTA_NUMERIC], NTA_NUMERIC)
    bad = nta.filter(~pl.col("borough").is_in(list(BOROUGH_CODES)))
    if bad.height:
        raise InputError(f"{nta_path}: column 'borough' has unknown code {bad['borough'][0]!r} for NTA "
                         f"{bad['nta'][0]!r}; expected one of {list(BOROUGH_CODES)}")
    if nta["nta"].n_unique() != nta.height:
        raise InputError(f"{nta_path}: column 'nta' has duplicate codes")
    for group, cols in (("age bands", AGE_BANDS), ("sex", ["female", "male"]), ("race", RACE_COLUMNS)):
        diff = nta.filter(pl.sum_horizontal(cols) != pl.col("pop"))
        if diff.height:
            raise InputError(f"{nta_path}: {group} columns {cols} do not sum to 'pop' for NTA {diff['nta'][0]!r} "
                             f"({diff.select(pl.sum_horizontal(cols))[0, 0]:.0f} vs {diff['pop'][0]:.0f})")
    over = nta.filter(pl.col("household_pop") > pl.col("pop"))
    if over.height:
        raise InputError(f"{nta_path}: column 'household_pop' exceeds 'pop' for NTA {over['nta'][0]!r}")
    cd_path = data_dir / "cd_age_sex_pct.csv"
    cd = _read(cd_path, ["cd", "pop_acs", *CD_CELLS], ["cd", *CD_CELLS])
    hh_path = data_dir / "borough_household_size.csv"
    hh = _read(hh_path, ["borough", "size", "households"], ["size", "households"])
    bad = hh.filter(~pl.col("borough").is_in(list(BOROUGH_CODES)))
    if bad.height:
        raise InputError(f"{hh_path}: column 'borough' has unknown code {bad['borough'][0]!r}")
    for b in BOROUGH_CODES:
        sizes = sorted(hh.filter(pl.col("borough") == b)["size"].to_list())
        if sizes != [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
            raise InputError(f"{hh_path}: borough {b!r} needs household sizes 1..6 (6 = 6 or more), got {sizes}")
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in (nta_path, cd_path, hh_path)}
    return Inputs(nta, cd, hh, files)


def parse_boroughs(boroughs) -> list[int]:
    """None -> all; accepts codes ('BK'), names ('Brooklyn') or ints 0..4, as a list or comma string."""
    if boroughs is None:
        return list(range(5))
    if isinstance(boroughs, str):
        boroughs = [b for b in boroughs.split(",") if b.strip()]
    out = []
    for b in boroughs:
        if isinstance(b, (int, np.integer)) and 0 <= int(b) < 5:
            out.append(int(b))
            continue
        text = str(b).strip()
        if text.upper() in BOROUGH_CODES:
            out.append(BOROUGH_CODES.index(text.upper()))
        elif text.title() in BOROUGHS:
            out.append(BOROUGHS.index(text.title()))
        else:
            raise ConfigError(f"unknown borough {b!r}; use codes {','.join(BOROUGH_CODES)} or names {list(BOROUGHS)}")
    if not out:
        raise ConfigError("empty borough list; use codes like BK,QN")
    return sorted(set(out))


def _check_scale(scale) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"scale must be a number in (0, 1], got {scale!r}") from None
    if not math.isfinite(scale) or scale <= 0 or scale > 1:
        raise ConfigError(f"scale must be in (0, 1] (fraction of the real population), got {scale}")
    return scale


# ---- helpers -------------------------------------------------------------------------------------------------------
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys]))


def _scale_counts(counts: np.ndarray, scale: float, seed: int, stage: int, totals: np.ndarray | None = None) -> np.ndarray:
    """Integer counts [B, k] scaled by ``scale`` with row totals round(total x scale) (or ``totals``)."""
    if scale == 1.0 and totals is None:
        return counts.astype(np.int64)
    gen = torch.Generator().manual_seed(int(seed) * 1000 + stage)
    row = counts.sum(1)
    if totals is None:
        totals = np.round(row * scale)
    return integerise(torch.from_numpy(counts * scale), generator=gen, totals=torch.from_numpy(totals.astype(np.float64))).numpy()


def _round_scaled(values: np.ndarray, scale: float) -> np.ndarray:
    return np.round(values * scale).astype(np.int64)


def _top_k_per_group(group: np.ndarray, keys: np.ndarray, k_per_group: np.ndarray) -> np.ndarray:
    """Boolean mask: in each group g, the ``k_per_group[g]`` items with the largest keys (keys = -inf never)."""
    eligible = np.flatnonzero(np.isfinite(keys))
    order = eligible[np.lexsort((-keys[eligible], group[eligible]))]
    g_sorted = group[order]
    starts = np.searchsorted(g_sorted, np.arange(len(k_per_group)))
    rank = np.arange(len(order)) - starts[g_sorted]
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[rank < k_per_group[g_sorted]]] = True
    return mask


def _gumbel_keys(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(weights > 0, np.log(weights) - np.log(-np.log(rng.random(len(weights)) + 1e-300)), -np.inf)


# ---- 2. joint demographics -----------------------------------------------------------------------------------------
def _cd_codes(nta: pl.DataFrame) -> np.ndarray:
    digit = nta["borough"].replace_strict(DCP_BORO_DIGIT).to_numpy()
    number = nta["cdta"].str.slice(2, 2).cast(pl.Int64, strict=False).fill_null(0).to_numpy()
    return (digit * 100 + number).astype(np.int16)


def _age_sex_seed(inputs: Inputs, cd_codes: np.ndarray) -> np.ndarray:
    """[B, 18, 2] age x sex shares from the community-district profile; borough average where the CD is missing."""
    cd = inputs.cd.filter(pl.col("pop_acs").cast(pl.Float64, strict=False).fill_null(0) > 0)
    pct = cd.select(CD_CELLS).to_numpy().reshape(-1, 2, 18).transpose(0, 2, 1)  # [C, age, sex]
    codes = cd["cd"].to_numpy().astype(np.int64)
    pop = cd["pop_acs"].cast(pl.Float64).to_numpy()
    lookup = {int(c): i for i, c in enumerate(codes)}
    boro_avg = {}
    for digit in range(1, 6):
        sel = (codes // 100 == digit) & (codes % 100 <= 18)
        boro_avg[digit] = (pct[sel] * pop[sel, None, None]).sum(0) / pop[sel].sum()
    seed = np.stack([pct[lookup[int(c)]] if int(c) in lookup else boro_avg[int(c) // 100] for c in cd_codes])
    return seed + 1e-3  # no structural zeros: a cell rounded to 0.0 % may still exist


def fit_joint(inputs: Inputs, rows: np.ndarray, scale: float, seed: int) -> tuple[np.ndarray, dict]:
    """Integer joint counts [B, 18 age bands, 2 sexes, 5 races] per NTA (rows of the NTA table), scaled."""
    nta = inputs.nta[rows.tolist()] if len(rows) != inputs.nta.height else inputs.nta
    age = nta.select(AGE_BANDS).to_numpy()
    sex = nta.select(["female", "male"]).to_numpy()
    race = nta.select(RACE_COLUMNS).to_numpy()
    totals = np.round(nta["pop"].to_numpy() * scale)
    age_s = _scale_counts(age, scale, seed, 1, totals)
    sex_s = _scale_counts(sex, scale, seed, 2, totals)
    race_s = _scale_counts(race, scale, seed, 3, totals)
    seed_table = _age_sex_seed(inputs, _cd_codes(nta))[:, :, :, None] * np.ones((1, 1, 1, 5))
    margs = [((0,), torch.from_numpy(age_s).double()), ((1,), torch.from_numpy(sex_s).double()),
             ((2,), torch.from_numpy(race_s).double())]
    fit = ipf(torch.from_numpy(seed_table), margs, tol=1e-10, max_iter=1000)
    gen = torch.Generator().manual_seed(int(seed) * 1000 + 4)
    counts = integerise(fit.table, generator=gen, totals=torch.from_numpy(totals), marginals=margs)
    return counts.numpy(), dict(iterations=fit.iterations, max_error=fit.max_error, converged=fit.converged)


# ---- 3.-6. -------------------------------------------------------------------------------------------------------
def _single_year_ages(band: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    age = band.astype(np.int64) * 5 + rng.integers(0, 5, len(band))
    top = band == 17
    if top.any():
        w = 0.82 ** np.arange(16)
        age[top] = 85 + np.searchsorted(np.cumsum(w) / w.sum(), rng.random(int(top.sum())))
    return np.minimum(age, 100).astype(np.int8)


def _household_sizes(m: int, seats: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``m`` household sizes >= 2 summing to ``seats``: borough shape of sizes 2..10, tilted to the mean."""
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    sizes = np.arange(2, 11)
    base = np.concatenate([shares[1:5], shares[5] * (0.45 * 0.55 ** np.arange(5)) / (0.45 * 0.55 ** np.arange(5)).sum()])
    target = seats / m
    lo, hi = -5.0, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        p = base * np.exp(mid * sizes)
        if (p * sizes).sum() / p.sum() < target:
            lo = mid
        else:
            hi = mid
    p = base * np.exp(lo * sizes)
    p /= p.sum()
    draw = np.repeat(sizes, np.floor(p * m).astype(np.int64))
    extra = m - len(draw)
    if extra > 0:
        draw = np.concatenate([draw, rng.choice(sizes, size=extra, p=p)])
    draw = rng.permutation(draw)
    diff = seats - int(draw.sum())
    while diff != 0:
        if diff > 0:
            idx = rng.choice(m, size=min(diff, m), replace=False)
            draw[idx] += 1
            diff -= len(idx)
        else:
            eligible = np.flatnonzero(draw > 2)
            if len(eligible) == 0:
                break
            idx = rng.choice(eligible, size=min(-diff, len(eligible)), replace=False)
            draw[idx] -= 1
            diff += len(idx)
    return draw


def _households_for_nta(age: np.ndarray, row: dict, scale: float, shares: np.ndarray, rng: np.random.Generator):
    """Households for one NTA's persons (``age`` [n]). Returns (order [n] local person index by household,
    household local id per ordered person, sizes [H], kinds [H], householder flag per ordered person)."""
    n = len(age)
    idx = rng.permutation(n)
    a = age[idx]
    child, senior = a < 18, a >= 65
    adult_idx = idx[~child]
    n_children = int(child.sum())
    reserve = 1 if n_children else 0
    # group quarters: adults, with dorm (18-24) and nursing-home (75+) ages more likely
    gq = min(int(round(max(row["pop"] - row["household_pop"], 0) * scale)), max(len(adult_idx) - reserve, 0))
    aa = age[adult_idx]
    w = np.where((aa >= 18) & (aa < 25), 3.0, np.where(aa >= 75, 3.0, 1.0))
    keys = np.log(w) - np.log(-np.log(rng.random(len(adult_idx)) + 1e-300))
    gq_pick = np.argsort(-keys, kind="stable")[:gq]
    is_gq = np.zeros(len(adult_idx), dtype=bool)
    is_gq[gq_pick] = True
    gq_people = adult_idx[is_gq]
    rest_adults = adult_idx[~is_gq]
    ra = age[rest_adults]
    seniors, working = rest_adults[ra >= 65], rest_adults[ra < 65]
    # one-person households
    n_alone = int(round(row["living_alone"] * scale))
    n_alone = min(n_alone, max(len(rest_adults) - reserve, 0))
    n_alone65 = min(int(round(row["living_alone_65plus"] * scale)), n_alone, len(seniors))
    alone = np.concatenate([seniors[:n_alone65], working[:n_alone - n_alone65]])
    if len(alone) < n_alone:
        alone = np.concatenate([alone, seniors[n_alone65:n_alone65 + n_alone - len(alone)]])
    used = np.zeros(n, dtype=bool)
    used[gq_people] = True
    used[alone] = True
    remaining_adults = rest_adults[~used[rest_adults]]
    children = idx[child]
    n_rest = len(remaining_adults) + n_children
    households = int(round(row["households"] * scale))
    m = min(max(households - len(alone), 0), len(remaining_adults), n_rest // 2)
    if m == 0 and n_rest == 1 and len(remaining_adults) == 1:  # a lone leftover adult lives alone
        alone = np.concatenate([alone, remaining_adults])
        remaining_adults = remaining_adults[:0]
        n_rest = 0
    elif m == 0 and n_rest:
        m = 1  # households budget used up (rounding at small scale): one more household
    if m and len(remaining_adults) == 0:  # only at tiny scales: an NTA with children and no adult at all
        remaining_adults, children, n_children = children[:1], children[1:], n_children - 1
    if m == 1 and n_rest == 1:  # single child left alone at tiny scale
        m = 0
        alone = np.concatenate([alone, remaining_adults])
        remaining_adults = remaining_adults[:0]
        n_rest = 0
    sizes = _household_sizes(m, n_rest, shares, rng) if m else np.zeros(0, dtype=np.int64)
    # slot layout: householder first (adult), then other members
    heads = remaining_adults[:m]
    others_adults = remaining_adults[m:]
    with_children = min(int(round(row["households_with_u18"] * scale)), m)
    if n_children and with_children == 0 and m:
        with_children = 1
    host_keys = np.log(np.maximum(sizes - 1, 1e-9) ** 2) - np.log(-np.log(rng.random(m) + 1e-300))
    host = np.zeros(m, dtype=bool)
    host[np.argsort(-host_keys, kind="stable")[:with_children]] = True
    slot_household = np.repeat(np.arange(m), np.maximum(sizes - 1, 0))
    slot_priority = np.where(host[slot_household], 0, 1) + rng.random(len(slot_household))
    slot_order = np.argsort(slot_priority, kind="stable")
    fill = np.concatenate([children, rng.permutation(others_adults)])
    member_of_slot = np.empty(len(slot_household), dtype=np.int64)
    member_of_slot[slot_order] = fill
    # order persons: GQ units, singles, multi-person households (head then members)
    n_gq_units = int(math.ceil(len(gq_people) / GROUP_QUARTERS_SIZE)) if len(gq_people) else 0
    gq_hh = (np.arange(len(gq_people)) * n_gq_units // max(len(gq_people), 1)) if len(gq_people) else np.zeros(0, np.int64)
    gq_sizes = np.bincount(gq_hh, minlength=n_gq_units)
    multi_members = np.concatenate([heads, member_of_slot])
    multi_hh = np.concatenate([np.arange(m), slot_household])
    o = np.lexsort((np.concatenate([np.zeros(m), np.ones(len(slot_household))]), multi_hh))
    order = np.concatenate([gq_people, alone, multi_members[o]])
    base1 = n_gq_units
    base2 = n_gq_units + len(alone)
    hh_local = np.concatenate([gq_hh, base1 + np.arange(len(alone)), base2 + multi_hh[o]])
    all_sizes = np.concatenate([gq_sizes, np.ones(len(alone), dtype=np.int64), sizes])
    kinds = np.concatenate([np.ones(n_gq_units, np.int8), np.zeros(len(alone) + m, np.int8)])
    if len(order) != n:
        raise RuntimeError(f"household assembly lost persons ({len(order)} of {n}); please report")
    return order, hh_local, all_sizes, kinds


@dataclass
class _Persons:
    nta: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    race: np.ndarray


def build_nyc(scale: float = 1.0, boroughs=None, seed: int = 0, commute=Commute(), *, data_dir: str | Path = DATA_DIR,
              timings: dict[str, float] | None = None) -> Population:
    """Build the NYC population (``scale`` x ACS 2017-2021 residents) for ``boroughs`` (default all five).

    ``commute``: a ``Commute``, ``'home'`` (everyone works in their home borough) or a stay share in [0, 1].
    ``timings``, if given, is filled with seconds per step. Same arguments give identical output; NTA-level steps use per-NTA random streams, so a borough subset gets
    the same demographics and households as those boroughs in the full build.
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    scale = _check_scale(scale)
    borough_list = parse_boroughs(boroughs)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise ConfigError(f"seed must be an integer, got {seed!r}") from None
    commute = commute_from(commute)
    commute_matrix = commute.to_matrix()
    inputs = load_inputs(data_dir)
    nta_all = inputs.nta
    borough_of_nta = np.array([BOROUGH_CODES.index(b) for b in nta_all["borough"].to_list()], dtype=np.int8)
    rows = np.flatnonzero(np.isin(borough_of_nta, borough_list))
    nta = nta_all[rows.tolist()]
    cd_codes_all = _cd_codes(nta_all)
    timings["inputs"] = time.perf_counter() - t0

    # 2. joint demographics
    t = time.perf_counter()
    joint, ipf_info = fit_joint(inputs, rows, scale, seed)
    timings["ipf"] = time.perf_counter() - t

    # 3. persons
    t = time.perf_counter()
    b, n_age, n_sex, n_race = joint.shape
    flat = joint.reshape(-1)
    cell = np.repeat(np.arange(flat.size), flat)
    local_nta, rem = np.divmod(cell, n_age * n_sex * n_race)
    band, rem = np.divmod(rem, n_sex * n_race)
    sex, race = np.divmod(rem, n_race)
    rng = _rng(seed, 3)
    age = _single_year_ages(band, rng)
    n_total = len(cell)
    nta_start = np.concatenate([[0], np.cumsum(joint.reshape(b, -1).sum(1))])
    timings["persons"] = time.perf_counter() - t

    # 4. households (loop over NTAs; vectorised within each)
    t = time.perf_counter()
    shares_by_boro = {}
    for bcode in BOROUGH_CODES:
        hh = inputs.household_size.filter(pl.col("borough") == bcode).sort("size")["households"].to_numpy()
        shares_by_boro[bcode] = hh / hh.sum()
    perm = np.empty(n_total, dtype=np.int64)
    household_id = np.empty(n_total, dtype=np.int32)
    hh_sizes, hh_kinds, hh_nta = [], [], []
    next_id = 0
    nta_records = nta.to_dicts()
    for i in range(b):
        s, e = nta_start[i], nta_start[i + 1]
        if e == s:
            continue
        order, hh_local, sizes, kinds = _households_for_nta(age[s:e], nta_records[i], scale,
                                                            shares_by_boro[nta_records[i]["borough"]],
                                                            _rng(seed, 4, int(rows[i])))
        perm[s:e] = s + order
        household_id[s:e] = next_id + hh_local
        next_id += len(sizes)
        hh_sizes.append(sizes)
        hh_kinds.append(kinds)
        hh_nta.append(np.full(len(sizes), rows[i], dtype=np.int16))
    # reorder persons by household
    local_nta, age, sex, race = local_nta[perm], age[perm], sex[perm], race[perm]
    nta_index = rows[local_nta].astype(np.int16)
    borough = borough_of_nta[nta_index]
    cd = cd_codes_all[nta_index]
    hh_sizes = np.concatenate(hh_sizes) if hh_sizes else np.zeros(0, np.int64)
    hh_kinds = np.concatenate(hh_kinds) if hh_kinds else np.zeros(0, np.int8)
    hh_nta = np.concatenate(hh_nta) if hh_nta else np.zeros(0, np.int16)
    timings["households"] = time.perf_counter() - t

    # 5. schools
    t = time.perf_counter()
    rng = _rng(seed, 5)
    enrol_targets = _round_scaled(nta.select(ENROLMENT).to_numpy(), scale)  # [b, 5]
    a = age.astype(np.int64)
    level_weights = [
        np.select([a == 3, a == 4], [1.0, 1.5], 0.0),                                        # nursery / pre-K
        np.select([a == 5, a == 4, a == 6], [1.0, 0.1, 0.2], 0.0),                           # kindergarten
        np.select([(a >= 6) & (a <= 13), a == 14, a == 5], [1.0, 0.2, 0.05], 0.0),           # grades 1-8
        np.select([(a >= 14) & (a <= 17), a == 18, a == 19, a == 13], [1.0, 0.3, 0.1, 0.05], 0.0),  # grades 9-12
        np.select([(a >= 18) & (a <= 24), (a >= 25) & (a <= 29), (a >= 30) & (a <= 34), (a >= 35) & (a <= 64),
                   a == 17], [1.0, 0.4, 0.15, 0.03, 0.1], 0.0),                              # college
    ]
    enrol_level = np.full(n_total, -1, dtype=np.int8)
    shortfall = {}
    for lvl, w in enumerate(level_weights):
        w = np.where(enrol_level < 0, w, 0.0)
        keys = _gumbel_keys(rng, w)
        chosen = _top_k_per_group(local_nta, keys, enrol_targets[:, lvl])
        enrol_level[chosen] = lvl
        got = np.bincount(local_nta[chosen], minlength=b)
        short = int((enrol_targets[:, lvl] - got).clip(0).sum())
        if short:
            shortfall[ENROLMENT[lvl]] = short
    # school level: 0 pre-K, 1 K-8, 2 high school, 3 college; pools: NTA, NTA, community district, borough
    school_level = np.array([-1, 0, 1, 1, 2, 3], dtype=np.int8)[enrol_level + 1]
    school_id = np.full(n_total, -1, dtype=np.int32)
    school_rows = []
    next_school = 0
    for lvl in range(4):
        members = np.flatnonzero(school_level == lvl)
        if not len(members):
            continue
        pool = {0: nta_index, 1: nta_index, 2: cd, 3: borough}[lvl][members].astype(np.int64)
        order = np.lexsort((rng.random(len(members)), pool))
        members, pool = members[order], pool[order]
        pools, starts, counts = np.unique(pool, return_index=True, return_counts=True)
        n_schools = np.maximum(1, np.round(counts / SCHOOL_SIZE[lvl])).astype(np.int64)
        rank = np.arange(len(members)) - np.repeat(starts, counts)
        local = rank * np.repeat(n_schools, counts) // np.repeat(counts, counts)
        offsets = next_school + np.concatenate([[0], np.cumsum(n_schools)[:-1]])
        school_id[members] = (np.repeat(offsets, counts) + local).astype(np.int32)
        ids = np.arange(next_school, next_school + n_schools.sum())
        pool_of_school = np.repeat(pools, n_schools)
        school_rows.append(pl.DataFrame({
            "school_id": ids.astype(np.int32), "level": np.full(len(ids), lvl, np.int8),
            "borough": np.repeat(borough[members[starts]], n_schools).astype(np.int8),
            "nta": np.where(lvl <= 1, pool_of_school, -1).astype(np.int16),
            "cd": np.repeat(cd[members[starts]], n_schools).astype(np.int16) if lvl <= 2 else np.full(len(ids), -1, np.int16),
        }))
        next_school += int(n_schools.sum())
    schools = (pl.concat(school_rows) if school_rows else
               pl.DataFrame(schema={"school_id": pl.Int32, "level": pl.Int8, "borough": pl.Int8, "nta": pl.Int16, "cd": pl.Int16}))
    sizes_s = np.bincount(school_id[school_id >= 0], minlength=next_school)
    schools = schools.with_columns(pl.Series("size", sizes_s.astype(np.int32)))
    timings["schools"] = time.perf_counter() - t

    # 6. employment, industry, occupation, workplaces
    t = time.perf_counter()
    rng = _rng(seed, 6)
    in_gq = hh_kinds[household_id] == 1 if len(hh_kinds) else np.zeros(n_total, bool)
    w_emp = np.select([a < 16, a < 18, a < 20, a < 25, a < 55, a < 62, a < 65, a < 70, a < 75],
                      [0.0, 0.15, 0.4, 0.7, 1.0, 0.85, 0.6, 0.3, 0.15], 0.04)
    w_emp = w_emp * np.where(school_level == 3, 0.5, 1.0) * np.where(in_gq, 0.2, 1.0)
    employed = _top_k_per_group(local_nta, _gumbel_keys(rng, w_emp), _round_scaled(nta["employed"].to_numpy(), scale))
    w_unemp = np.where(employed | (a < 16) | (a >= 65), 0.0, np.where(a < 25, 1.5, 1.0))
    unemployed = _top_k_per_group(local_nta, _gumbel_keys(rng, w_unemp), _round_scaled(nta["unemployed"].to_numpy(), scale))
    employment = np.where(employed, 1, np.where(unemployed, 2, 0)).astype(np.int8)
    industry = np.full(n_total, -1, dtype=np.int8)
    occupation = np.full(n_total, -1, dtype=np.int8)
    workers = np.flatnonzero(employed)
    order = np.lexsort((rng.random(len(workers)), local_nta[workers]))
    workers = workers[order]
    w_nta = local_nta[workers]
    w_counts = np.bincount(w_nta, minlength=b)
    w_start = np.concatenate([[0], np.cumsum(w_counts)])
    for names, out, stage in ((INDUSTRIES, industry, 7), (OCCUPATIONS, occupation, 8)):
        dist = nta.select(names).to_numpy().astype(np.float64)
        dist = np.where(dist.sum(1, keepdims=True) > 0, dist, 1.0)
        counts = integerise(torch.from_numpy(dist / dist.sum(1, keepdims=True) * w_counts[:, None]),
                            generator=torch.Generator().manual_seed(seed * 1000 + stage),
                            totals=torch.from_numpy(w_counts.astype(np.float64))).numpy()
        for i in range(b):
            seg = workers[w_start[i]:w_start[i + 1]]
            out[rng.permutation(seg)] = np.repeat(np.arange(len(names), dtype=np.int8), counts[i])
    # work borough from the commute matrix (rows = home borough)
    cum = np.cumsum(commute_matrix, axis=1)
    cum[:, -1] = 1.0
    work_borough = np.full(n_total, -1, dtype=np.int8)
    u = rng.random(len(workers))
    work_borough[workers] = (u[:, None] >= cum[borough[workers]]).sum(1).astype(np.int8)
    workplace_id = np.full(n_total, -1, dtype=np.int32)
    pool = work_borough[workers].astype(np.int64) * 16 + industry[workers]
    order = np.lexsort((rng.random(len(workers)), pool))
    wk, pool = workers[order], pool[order]
    pools, starts, counts = np.unique(pool, return_index=True, return_counts=True)
    wp_rows = []
    next_wp = 0
    for p, s, c in zip(pools, starts, counts):
        draws = np.maximum(1, np.round(np.exp(rng.normal(math.log(8.0), 1.2, size=max(8, int(c / 10) + 8)))).astype(np.int64))
        draws = np.minimum(draws, 2000)
        while draws.sum() < c:
            more = np.maximum(1, np.round(np.exp(rng.normal(math.log(8.0), 1.2, size=len(draws))))).astype(np.int64)
            draws = np.concatenate([draws, np.minimum(more, 2000)])
        cs = np.cumsum(draws)
        k = int(np.searchsorted(cs, c)) + 1
        draws = draws[:k]
        draws[-1] -= int(cs[k - 1] - c)
        workplace_id[wk[s:s + c]] = (next_wp + np.repeat(np.arange(k), draws)).astype(np.int32)
        wp_rows.append(pl.DataFrame({"workplace_id": np.arange(next_wp, next_wp + k, dtype=np.int32),
                                     "borough": np.full(k, p // 16, np.int8), "industry": np.full(k, p % 16, np.int8),
                                     "size": draws.astype(np.int32)}))
        next_wp += k
    workplaces = (pl.concat(wp_rows) if wp_rows else pl.DataFrame(schema={"workplace_id": pl.Int32, "borough": pl.Int8,
                                                                          "industry": pl.Int8, "size": pl.Int32}))
    timings["work"] = time.perf_counter() - t

    # 7. assemble
    t = time.perf_counter()
    persons = pl.DataFrame({
        "agent_id": np.arange(n_total, dtype=np.int32), "age": age, "sex": sex.astype(np.int8),
        "race": race.astype(np.int8), "borough": borough, "nta": nta_index, "household_id": household_id,
        "school_id": school_id, "workplace_id": workplace_id, "employment": employment, "cd": cd.astype(np.int16),
        "industry": industry, "occupation": occupation,
    })
    households = pl.DataFrame({
        "household_id": np.arange(len(hh_sizes), dtype=np.int32), "kind": hh_kinds.astype(np.int8),
        "nta": hh_nta, "borough": borough_of_nta[hh_nta] if len(hh_nta) else np.zeros(0, np.int8),
        "size": hh_sizes.astype(np.int16),
    })
    by_borough = np.bincount(borough, minlength=5)
    meta = dict(
        kind="nyc", builder_version=BUILDER_VERSION, seed=seed, scale=scale,
        boroughs=list(BOROUGHS), borough_codes=list(BOROUGH_CODES), built_boroughs=[BOROUGH_CODES[i] for i in borough_list],
        inputs=dict(files=inputs.files, sources="populations/nyc/PROVENANCE.md",
                    tables="DCP NTA profiles ACS 2017-2021; DCP community district profile (ACS ~2014-2018); "
                           "ACS 2016-2020 B11016 household size by borough"),
        ntas=nta_all["nta"].to_list(), nta_names=nta_all["name"].to_list(),
        nta_borough=borough_of_nta.tolist(), nta_cd=cd_codes_all.tolist(),
        cd_codes="DCP community district code: borough digit (1 MN, 2 BX, 3 BK, 4 QN, 5 SI) x 100 + district; "
                 "from the 2020 CDTA of the NTA (joint-interest areas keep their CDTA number, e.g. 226)",
        codes=dict(sex=["female", "male"], race=["Hispanic", "White NH", "Black NH", "Asian NH", "Other NH"],
                   employment=["not in labour force", "employed", "unemployed"],
                   industry=[n.removeprefix("ind_") for n in INDUSTRIES],
                   occupation=[n.removeprefix("occ_") for n in OCCUPATIONS],
                   school_level=list(SCHOOL_LEVELS), household_kind=list(HOUSEHOLD_KINDS)),
        commute=dict(asdict(commute), effective_matrix=commute_matrix.round(6).tolist()),
        ipf=ipf_info, enrolment_shortfall=shortfall,
        totals=dict(persons=int(n_total), households=int((hh_kinds == 0).sum()),
                    group_quarters_units=int((hh_kinds == 1).sum()), schools=int(next_school),
                    workplaces=int(next_wp), employed=int(employed.sum()), unemployed=int(unemployed.sum()),
                    enrolled=int((school_id >= 0).sum()),
                    persons_by_borough={BOROUGH_CODES[i]: int(by_borough[i]) for i in borough_list}),
    )
    pop = Population(persons, {"households": households, "schools": schools, "workplaces": workplaces}, meta)
    timings["assemble"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return pop

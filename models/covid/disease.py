"""Disease natural history: age-specific probabilities from cited data and discrete stage durations.

Age groups are the ten NYC DOHMH reporting groups (0-4, 5-12, 13-17, 18-24, 25-34, 35-44, 45-54,
55-64, 65-74, 75+). Per group ``a``:

    susceptibility_a        relative susceptibility (Davies et al. 2020)
    symptomatic_a           P(symptomatic | infected), the clinical fraction (Davies et al. 2020)
    IHR_a = (hospitalised_a / cases_a) · ascertainment        P(hospitalised | infected)
    IFR_a = (deaths_a / cases_a) · ascertainment              P(death | infected)
    hosp_given_symptomatic_a = min(1, IHR_a / symptomatic_a)
    death_given_hosp_a       = min(1, IFR_a / IHR_a) = deaths_a / hospitalised_a

with cases, hospitalisations and deaths the NYC DOHMH cumulative counts to 2021-09-10 and
``ascertainment`` (reported cases per infection, `CASE_ASCERTAINMENT`) an assumption. All deaths
pass through H (H stands for "severe disease"; deaths outside hospital are folded in).

Stage durations are discrete (whole days ≥ 1), drawn per agent at stage entry by inverse CDF of a
discretised lognormal: ``d = 1 + #{k : u ≥ F_k}`` with ``F_k = P(D ≤ k)`` a table of cumulative
probabilities.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch import Tensor

DATA = Path(__file__).parent / "data"

AGE_GROUPS = ("0-4", "5-12", "13-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65-74", "75+")
AGE_GROUP_EDGES = (0, 5, 13, 18, 25, 35, 45, 55, 65, 75)  # lower edges
CASE_ASCERTAINMENT = 0.25  # assumed reported cases per infection, NYC 2020-21 pooled (see README)
CHILD_DEATHS_PER_CASE = 29 / 135_231  # DOHMH reports deaths for ages 0-17 only together
MAX_DURATION_DAYS = 60


def _read_csv(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def severity_tables(ascertainment: float = CASE_ASCERTAINMENT) -> dict[str, list[float]]:
    """Per DOHMH age group: IHR, IFR per infection and the conditional probabilities the model uses."""
    rows = _read_csv("nyc_severity_by_age.csv")
    clinical = clinical_tables()
    ihr, ifr = [], []
    for row in rows:
        cases = float(row["cases"])
        deaths_per_case = float(row["deaths"]) / cases if row["deaths"] else CHILD_DEATHS_PER_CASE
        ihr.append(float(row["hospitalized"]) / cases * ascertainment)
        ifr.append(deaths_per_case * ascertainment)
    return dict(IHR=ihr, IFR=ifr,
                hosp_given_symptomatic=[min(1.0, h / c) for h, c in zip(ihr, clinical["symptomatic"])],
                death_given_hosp=[min(1.0, f / h) for f, h in zip(ifr, ihr)])


def clinical_tables() -> dict[str, list[float]]:
    """Davies et al. (2020) ten-year-band values averaged over single years of each DOHMH group (to age 89)."""
    rows = _read_csv("clinical_by_age.csv")

    def at_age(age: int, column: str) -> float:
        for row in rows:
            if int(row["age_min"]) <= age <= int(row["age_max"]):
                return float(row[column])
        raise ValueError(age)

    out = {"susceptibility": [], "symptomatic": []}
    edges = list(AGE_GROUP_EDGES) + [90]
    for lo, hi in zip(edges[:-1], edges[1:]):
        ages = range(lo, hi)
        out["susceptibility"].append(round(sum(at_age(a, "relative_susceptibility") for a in ages) / len(ages), 4))
        out["symptomatic"].append(round(sum(at_age(a, "clinical_fraction") for a in ages) / len(ages), 4))
    return out


def age_group_of(age: Tensor) -> Tensor:
    """[N] ages in years -> [N] int64 DOHMH age-group index 0..9."""
    edges = torch.tensor(AGE_GROUP_EDGES[1:], dtype=age.dtype, device=age.device)
    return torch.bucketize(age, edges, right=True)


def lognormal_cdf_table(mean: float, sd: float, shift: float = 0.0) -> Tensor:
    """Cumulative probabilities F_k = P(D ≤ k), k = 1..MAX_DURATION_DAYS, of D = max(1, round(X - shift)),
    X ~ LogNormal with the given mean and sd (days). The last entry is 1. -> [K] float32."""
    sigma2 = math.log(1 + (sd / mean) ** 2)
    mu = math.log(mean) - sigma2 / 2
    return _cdf_table(mu, math.sqrt(sigma2), shift)


def lognormal_cdf_table_median(median: float, sdlog: float, shift: float = 0.0) -> Tensor:
    """As `lognormal_cdf_table`, parameterised by the median and log-sd (e.g. Lauer et al. 2020)."""
    return _cdf_table(math.log(median), sdlog, shift)


def _cdf_table(mu: float, sigma: float, shift: float) -> Tensor:
    def F(x: float) -> float:
        return 0.0 if x <= 0 else 0.5 * (1 + math.erf((math.log(x) - mu) / (sigma * math.sqrt(2))))

    values = [F(k + 0.5 + shift) for k in range(1, MAX_DURATION_DAYS + 1)]
    values[-1] = 1.0
    return torch.tensor(values, dtype=torch.float32)


def draw_duration(cdf: Tensor, u: Tensor) -> Tensor:
    """Inverse CDF: uniforms [M] -> durations [M] int16 in 1..K (days)."""
    return (torch.searchsorted(cdf, u, right=True, out_int32=True) + 1).clamp_max(cdf.shape[0]).to(torch.int16)


def stacked_cdf_keys(cdfs: list[Tensor]) -> Tensor:
    """Search keys of several [K] cumulative tables at once, for `draw_durations`: table k's entries as the bits of
    the (non-negative) float32 values, which order as the values do, plus k · 2^32. -> [len(cdfs) · K] int64."""
    return torch.cat([cdf.view(torch.int32).to(torch.int64) + (k << 32) for k, cdf in enumerate(cdfs)])


def draw_durations_where(cdfs: Tensor, second: Tensor, third: Tensor, u: Tensor) -> Tensor:
    """`draw_duration` from one of three tables per agent, for every agent ([B, N]: no index lists): cdfs [3, K]; the
    third table where ``third`` is non-zero, else the second where ``second`` is, else the first; u float32 in (0, 1).
    A search per table with int32 results, then two selections: the numbers of `draw_durations`, with ~a third of its
    memory traffic over every agent (its int64 keys and arithmetic). -> int32 in 1..K."""
    first, then, last = (torch.searchsorted(cdf, u, right=True, out_int32=True) for cdf in cdfs)
    found = torch.where(third != 0, last, torch.where(second != 0, then, first))
    return found.add_(1).clamp_max_(cdfs.shape[1])


def draw_durations(keys: Tensor, K: int, table: Tensor, u: Tensor) -> Tensor:
    """`draw_duration` with each agent's own table: table [M] int64 picks one of the tables stacked in ``keys``
    (`stacked_cdf_keys`), u [M] float32 in (0, 1). One search for all tables; the same numbers. -> [M] int64 in 1..K."""
    found = torch.searchsorted(keys, u.view(torch.int32).to(torch.int64) + (table << 32), right=True)
    return (found - table * K + 1).clamp_max(K)

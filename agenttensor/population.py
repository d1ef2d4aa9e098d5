"""Populations: one row per agent plus group tables, stored as Parquet through polars.

`Population.persons` columns (compact dtypes; codes in `CODES`):

| column | dtype | meaning |
|---|---|---|
| agent_id | Int32 | stable id (keys the random streams; survives subsetting) |
| age | Int8 | years (0-100, top-coded) |
| sex | Int8 | 0 female, 1 male |
| race | Int8 | 0 Hispanic, 1 White NH, 2 Black NH, 3 Asian NH, 4 other/multiple NH |
| borough | Int8 | 0 Bronx, 1 Brooklyn, 2 Manhattan, 3 Queens, 4 Staten Island (synthetic: 0..B-1) |
| nta | Int16 | neighbourhood index into ``meta["ntas"]`` |
| household_id | Int32 | household group id |
| school_id | Int32 | school id or -1 |
| workplace_id | Int32 | workplace id or -1 |
| employment | Int8 | 0 not in labour force / child, 1 employed, 2 unemployed |

Builders may add columns (community district, industry, occupation); they are kept and exposed.
`groups` holds one table per group kind (``households``, ``schools``, ``workplaces``) whose first
column is the id.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from .errors import InputError

BOROUGHS = ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
BOROUGH_CODES = ("BX", "BK", "MN", "QN", "SI")

CODES: dict[str, tuple[str, ...]] = {
    "sex": ("female", "male"),
    "race": ("Hispanic", "White NH", "Black NH", "Asian NH", "Other NH"),
    "borough": BOROUGHS,
    "employment": ("not in labour force", "employed", "unemployed"),
}

REQUIRED = {
    "agent_id": pl.Int32, "age": pl.Int8, "sex": pl.Int8, "race": pl.Int8, "borough": pl.Int8, "nta": pl.Int16,
    "household_id": pl.Int32, "school_id": pl.Int32, "workplace_id": pl.Int32, "employment": pl.Int8,
}

GROUP_COLUMNS = {"household": "household_id", "school": "school_id", "workplace": "workplace_id",
                 "neighbourhood": "nta", "borough": "borough"}


@dataclass
class Population:
    """Agents as a polars frame (one row each) plus group tables and metadata."""

    persons: pl.DataFrame
    groups: dict[str, pl.DataFrame] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return self.persons.height

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, source: str = "population") -> "Population":
        missing = [c for c in REQUIRED if c not in self.persons.columns]
        if missing:
            raise InputError(f"{source}: persons table lacks column(s) {missing}; required: {list(REQUIRED)}")
        try:
            self.persons = self.persons.with_columns([pl.col(c).cast(t, strict=True) for c, t in REQUIRED.items()])
        except Exception as e:  # polars raises several types for bad casts
            raise InputError(f"{source}: a persons column has values that do not fit its type ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0]})") from None
        nulls = [c for c in REQUIRED if self.persons[c].null_count()]
        if nulls:
            raise InputError(f"{source}: persons column(s) {nulls} contain missing values")
        if self.persons.height and (self.persons["age"].min() < 0 or self.persons["household_id"].min() < 0):
            raise InputError(f"{source}: negative age or household_id in persons table")
        return self

    # ---- storage -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write persons.parquet, <group>.parquet and meta.json atomically (temp dir + rename)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-pop-", dir=directory.parent))
        try:
            self.persons.write_parquet(tmp / "persons.parquet", statistics=False)
            for name, table in self.groups.items():
                table.write_parquet(tmp / f"{name}.parquet", statistics=False)
            meta = dict(self.meta, num_agents=len(self), group_tables=sorted(self.groups))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Population":
        directory = Path(directory)
        persons_file = directory / "persons.parquet"
        if not persons_file.exists():
            raise InputError(f"no population at {directory}: {persons_file.name} not found "
                             "(build one with `agenttensor population build ...`)")
        try:
            persons = pl.read_parquet(persons_file)
        except Exception as e:
            raise InputError(f"{persons_file}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        meta = {}
        if (directory / "meta.json").exists():
            try:
                meta = json.loads((directory / "meta.json").read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{directory / 'meta.json'}: invalid JSON ({e})") from None
        groups = {p.stem: pl.read_parquet(p) for p in sorted(directory.glob("*.parquet")) if p.stem != "persons"}
        pop = cls.__new__(cls)
        pop.persons, pop.groups, pop.meta = persons, groups, meta
        pop.validate(source=str(persons_file))
        return pop

    # ---- views ---------------------------------------------------------------------------------
    def subset(self, mask: pl.Expr | None = None, *, boroughs: list[int] | None = None,
               ntas: list[int] | None = None) -> "Population":
        """Agents matching a polars predicate and/or borough / NTA lists; group tables are filtered
        to groups that still have members. Agent ids are kept (random streams stay the same)."""
        expr = pl.lit(True)
        if mask is not None:
            expr = expr & mask
        if boroughs is not None:
            expr = expr & pl.col("borough").is_in(boroughs)
        if ntas is not None:
            expr = expr & pl.col("nta").is_in(ntas)
        persons = self.persons.filter(expr)
        groups = {}
        for name, table in self.groups.items():
            id_col = table.columns[0]
            if id_col in persons.columns:
                groups[name] = table.filter(pl.col(id_col).is_in(persons[id_col].unique().implode()))
            else:
                groups[name] = table
        return Population(persons, groups, dict(self.meta, subset=True))

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every persons column as a tensor [N] with its compact dtype, plus dense group indices
        ``<kind>_index`` (ids renumbered 0..G-1 in order of first appearance, -1 for none)."""
        out = {}
        for name in self.persons.columns:
            col = self.persons[name]
            if col.dtype.is_numeric():
                out[name] = torch.from_numpy(col.to_numpy().copy()).to(device)
        for kind, col in GROUP_COLUMNS.items():
            if col in out:
                out[f"{kind}_index"] = dense_index(out[col])
        return out

    def to_networkx(self, layers: tuple[str, ...] = ("household", "school", "workplace"), max_agents: int = 50_000):
        """Contact graph of a small population: a clique per group, edge attribute ``layer``."""
        import networkx as nx

        if len(self) > max_agents:
            raise InputError(f"population has {len(self):,} agents; export to networkx only for <= {max_agents:,} "
                             "(take a subset first)")
        graph = nx.Graph()
        ids = self.persons["agent_id"].to_list()
        graph.add_nodes_from(ids)
        for layer in layers:
            col = GROUP_COLUMNS[layer]
            frame = self.persons.select("agent_id", col).filter(pl.col(col) >= 0)
            for members in frame.group_by(col).agg(pl.col("agent_id"))["agent_id"].to_list():
                for i in range(len(members)):
                    for j in range(i + 1, len(members)):
                        graph.add_edge(members[i], members[j], layer=layer)
        return graph

    def describe(self) -> dict[str, Any]:
        by_borough = self.persons.group_by("borough").len().sort("borough")
        return {"agents": len(self), "by_borough": dict(zip(by_borough["borough"].to_list(), by_borough["len"].to_list())),
                "groups": {k: v.height for k, v in self.groups.items()}, "meta": self.meta}


def dense_index(ids: torch.Tensor) -> torch.Tensor:
    """Renumber group ids to 0..G-1 (sorted order); negative ids (no group) stay -1. [N] -> [N] int32."""
    ids64 = ids.to(torch.int64)
    valid = ids64 >= 0
    out = torch.full_like(ids64, -1)
    if valid.any():
        present = ids64[valid]
        top = int(present.max())
        if top < 4 * present.numel() + 1024:  # O(N) rank table instead of a sort (same result)
            seen = torch.zeros(top + 1, dtype=torch.int64, device=ids.device)
            seen[present] = 1
            rank = torch.cumsum(seen, 0) - 1
            out[valid] = rank[present]
        else:
            _, inverse = torch.unique(present, return_inverse=True)
            out[valid] = inverse
    return out.to(torch.int32)


def synthetic(num_agents: int, seed: int = 0, *, num_neighbourhoods: int | None = None, num_boroughs: int = 5,
              mean_workplace_size: float = 15.0, mean_school_size: float = 500.0) -> Population:
    """A generated (not census-based) population for demos, tests and engine benchmarks.

    Households of 1-7 people (NYC-like size distribution), ages by household role, children 5-17
    in schools of ~`mean_school_size` within their neighbourhood, ~60 % of adults 18-64 employed in
    workplaces of ~`mean_workplace_size`. Fully vectorised: 8.5M agents in a few seconds.
    """
    if num_agents <= 0:
        raise InputError(f"num_agents must be positive, got {num_agents}")
    rng = np.random.default_rng(seed)
    # NYC household-size shares (ACS 2016-2020, 1..7+ persons), used only as a plausible shape.
    shares = np.array([0.33, 0.29, 0.16, 0.12, 0.06, 0.025, 0.015])
    mean_size = float((np.arange(1, 8) * shares).sum())
    num_households = int(num_agents / mean_size * 1.2) + 16
    sizes = rng.choice(np.arange(1, 8), size=num_households, p=shares / shares.sum())
    cumulative = np.cumsum(sizes)
    num_households = int(np.searchsorted(cumulative, num_agents) + 1)
    sizes = sizes[:num_households]
    sizes[-1] -= int(cumulative[num_households - 1] - num_agents)
    household_id = np.repeat(np.arange(num_households, dtype=np.int32), sizes)
    position = np.arange(num_agents) - np.repeat(cumulative[:num_households] - sizes, sizes)
    # First two members are adults, others mostly children.
    adult_age = rng.integers(18, 90, num_agents)
    child_age = rng.integers(0, 18, num_agents)
    is_child_slot = (position >= 2) & (rng.random(num_agents) < 0.8)
    age = np.where(is_child_slot, child_age, adult_age).astype(np.int8)
    if num_neighbourhoods is None:
        num_neighbourhoods = max(min(num_boroughs, num_agents), min(262, num_agents // 30_000))
    household_nta = rng.integers(0, num_neighbourhoods, num_households)
    nta = household_nta[household_id].astype(np.int16)
    borough = (nta.astype(np.int64) * num_boroughs // num_neighbourhoods).astype(np.int8)
    employed = (age >= 18) & (age < 65) & (rng.random(num_agents) < 0.6)
    num_workplaces = max(1, int(employed.sum() / mean_workplace_size))
    workplace = np.where(employed, rng.integers(0, num_workplaces, num_agents), -1).astype(np.int32)
    in_school = (age >= 5) & (age < 18)
    schools_per_nta = max(1, int(round(in_school.sum() / max(num_neighbourhoods, 1) / mean_school_size)))
    school = np.where(in_school, nta.astype(np.int64) * schools_per_nta + rng.integers(0, schools_per_nta, num_agents),
                      -1).astype(np.int32)
    persons = pl.DataFrame({
        "agent_id": np.arange(num_agents, dtype=np.int32), "age": age,
        "sex": rng.integers(0, 2, num_agents).astype(np.int8), "race": rng.integers(0, 5, num_agents).astype(np.int8),
        "borough": borough, "nta": nta, "household_id": household_id, "school_id": school,
        "workplace_id": workplace, "employment": np.where(employed, 1, 0).astype(np.int8),
    })
    households = pl.DataFrame({"household_id": np.arange(num_households, dtype=np.int32), "size": sizes.astype(np.int16)})
    meta = dict(kind="synthetic", seed=seed, num_neighbourhoods=num_neighbourhoods, ntas=[f"N{i:03d}" for i in range(num_neighbourhoods)],
                boroughs=[f"B{i}" for i in range(num_boroughs)])
    return Population(persons, {"households": households}, meta)

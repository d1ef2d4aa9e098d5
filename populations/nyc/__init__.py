"""New York City synthetic population (ACS 2017-2021, 262 NTAs). See README.md in this folder."""

from __future__ import annotations

import json
from pathlib import Path

from agenttensor.population import Population

from .builder import BUILDER_VERSION, Commute, build_nyc, load_inputs, parse_boroughs

__all__ = ["build_nyc", "load_or_build", "Commute", "load_inputs", "BUILDER_VERSION"]


def load_or_build(path, scale: float = 1.0, boroughs=None, seed: int = 0, **kwargs) -> Population:
    """Load the population saved at ``path`` if it was built with the same (scale, boroughs, seed, builder
    version); otherwise build it, save it there (atomically) and return it."""
    path = Path(path)
    wanted = dict(scale=float(scale), built_boroughs=[("BX", "BK", "MN", "QN", "SI")[i] for i in parse_boroughs(boroughs)],
                  seed=int(seed), builder_version=BUILDER_VERSION)
    meta_file = path / "meta.json"
    if meta_file.exists() and (path / "persons.parquet").exists():
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            meta = {}
        if all(meta.get(k) == v for k, v in wanted.items()) and not kwargs:
            return Population.load(path)
    pop = build_nyc(scale=scale, boroughs=boroughs, seed=seed, **kwargs)
    pop.save(path)
    return pop

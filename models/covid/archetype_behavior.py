"""LLM archetype behaviour for the covid model: isolation and on-site work decided per archetype.

`ArchetypeBehavior` implements the model's `BehaviorSource` hook with two
`agenttensor.archetypes.ArchetypeEngine` s:

- **isolate** — archetypes = age band × borough × employment status (≤ 60 occupied); asked
  "If you had COVID-19 symptoms, would you stay at home and isolate?"
- **work** — archetypes = age band × borough (≤ 20); asked "Will you go to your workplace in
  person this week?" (the answer is used only for employed agents).

Each prompt carries the agent's own world: last week's reported cases per 100,000 in its borough
(rounded to two significant digits so nearby weeks and scenarios share cached answers), the
borough's unemployment rate and the stay-at-home order in force there. In a batch of scenarios
every batch element is asked with its own context, so behaviour responds to the counterfactual
world; identical prompts are answered once (SQLite cache shared across runs and scenarios).
LLM calls per decision step ≤ 80, whatever the number of agents.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from agenttensor.archetypes import ArchetypeEngine, ArchetypeSpec, Attribute, EnvironmentField
from agenttensor.llm.backends import HeuristicBackend

AGE_BAND_EDGES = (0, 18, 45, 65)
AGE_BANDS = ("0-17", "18-44", "45-64", "65+")
BOROUGH_NAMES = ("the Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
EMPLOYMENT = ("employed", "unemployed", "not working and not looking for work")

CONTEXT = (
    "In the last 7 days there were {cases:,.0f} new reported COVID-19 cases per 100,000 residents in {borough}. "
    "Unemployment in {borough} is {unemployment:.1f}%. "
    "A stay-at-home order is in force at {stay_home:.0f}% strength. "
)

ISOLATE_SPEC = ArchetypeSpec(
    name="isolate",
    attributes=(Attribute("age_band", AGE_BANDS), Attribute("borough", BOROUGH_NAMES), Attribute("employment", EMPLOYMENT)),
    template="You are a {age_band} year old person living in {borough}, New York City; you are {employment}. "
             + CONTEXT + "If you had COVID-19 symptoms, would you stay at home and isolate? Answer Yes or No.",
    environment=(EnvironmentField("cases", "borough"), EnvironmentField("unemployment", "borough"),
                 EnvironmentField("stay_home", "borough")),
)

WORK_SPEC = ArchetypeSpec(
    name="work",
    attributes=(Attribute("age_band", AGE_BANDS), Attribute("borough", BOROUGH_NAMES)),
    template="You are a {age_band} year old employed person living in {borough}, New York City. "
             + CONTEXT + "Will you go to your workplace in person this week? Answer Yes or No.",
    environment=(EnvironmentField("cases", "borough"), EnvironmentField("unemployment", "borough"),
                 EnvironmentField("stay_home", "borough")),
)


def _two_significant(x: Tensor) -> Tensor:
    """Round to two significant digits (0 stays 0): fewer distinct prompts, more cache hits."""
    x = x.double().clamp_min(0)
    magnitude = torch.where(x > 0, torch.floor(torch.log10(x.clamp_min(1e-12))), torch.zeros_like(x))
    scale = torch.pow(10.0, magnitude - 1)
    return torch.round(x / scale) * scale


def _age_mid(codes: Tensor) -> Tensor:
    return torch.tensor([9.0, 31.0, 55.0, 75.0], dtype=torch.float64)[codes]


def heuristic_isolate(codes: dict[str, Tensor], env: dict[str, Tensor]) -> Tensor:
    """Fallback: the covid model's default heuristic, σ(0.3·log(1 + cases) + 0.1·(age − 40)/10)."""
    return torch.sigmoid(0.3 * torch.log1p(env["cases"].double()) + 0.1 * (_age_mid(codes["age_band"]) - 40) / 10)


def heuristic_work(codes: dict[str, Tensor], env: dict[str, Tensor]) -> Tensor:
    """Fallback: σ(3 − 0.35·log(1 + cases) − 0.1·(age − 40)/10 − 2·stay_home)."""
    return torch.sigmoid(3.0 - 0.35 * torch.log1p(env["cases"].double()) - 0.1 * (_age_mid(codes["age_band"]) - 40) / 10
                         - 2.0 * env["stay_home"].double() / 100)


class ArchetypeBehavior:
    """`BehaviorSource` backed by an LLM (embedded, OpenAI-compatible, vLLM) per archetype.

    backend: an `agenttensor.llm` backend; on_failure: "fallback" (default: the heuristic's value,
    counted in `stats`) or "error"; calibrate: learnable logit-affine maps on both behaviours.
    """

    def __init__(self, backend: Any, cache: Any = None, on_failure: str = "fallback", calibrate: bool = False):
        self.isolate = ArchetypeEngine(ISOLATE_SPEC, backend, cache=cache, on_failure=on_failure,
                                       fallback=HeuristicBackend(heuristic_isolate, "heuristic-isolate"),
                                       calibrate=calibrate)
        self.work = ArchetypeEngine(WORK_SPEC, backend, cache=cache, on_failure=on_failure,
                                    fallback=HeuristicBackend(heuristic_work, "heuristic-work"), calibrate=calibrate)
        self._age_band: Tensor | None = None

    @property
    def stats(self) -> dict[str, Any]:
        return {"isolate": dict(self.isolate.stats), "work": dict(self.work.stats),
                "calls": self.isolate.stats["calls"] + self.work.stats["calls"],
                "cache_hits": self.isolate.stats["cache_hits"] + self.work.stats["cache_hits"],
                "failures": self.isolate.stats["failures"] + self.work.stats["failures"],
                "fallbacks": self.isolate.stats["fallbacks"] + self.work.stats["fallbacks"],
                "llm_seconds": self.isolate.stats["llm_seconds"] + self.work.stats["llm_seconds"]}

    def decide(self, env, state, params, ctx, observations) -> dict[str, Tensor]:
        if self._age_band is None or self._age_band.shape[0] != env.num_agents:
            edges = torch.tensor(AGE_BAND_EDGES[1:], dtype=torch.int64, device=env.age.device)
            self._age_band = torch.bucketize(env.age.to(torch.int64), edges, right=True).to(torch.int32)
        borough = env.borough.to(torch.int32)
        cases = _two_significant(observations["cases_per_100k"].detach())  # [B, G]
        unemployment = torch.round(observations["unemployment_rate"].detach().double() * 1000) / 10  # percent, 0.1
        stay = observations["policies"].get("stay_at_home")  # [B, G, A] or None
        stay_home = (stay.detach().amax(-1).double() * 100).round() if stay is not None \
            else torch.zeros_like(cases)
        isolate, work = [], []
        for b in range(cases.shape[0]):  # one decision per batch element (its own scenario context)
            employment = torch.where(state.employed[b] > 0.5, 0, torch.where(state.unemployed[b] > 0.5, 1, 2))
            context = {"cases": cases[b].cpu(), "unemployment": unemployment[b].cpu(), "stay_home": stay_home[b].cpu()}
            isolate.append(self.isolate.decide({"age_band": self._age_band, "borough": borough,
                                                "employment": employment.to(torch.int32)}, context, ctx.step))
            work.append(self.work.decide({"age_band": self._age_band, "borough": borough}, context, ctx.step))
        return {"isolate_prob": torch.stack(isolate), "work_prob": torch.stack(work)}


def make_behavior(name: str, llm_url: str | None = None, llm_model: str | None = None,
                  on_failure: str = "fallback") -> Any:
    """CLI helper: "heuristic" | "embedded" | "openai" | "vllm" -> a behaviour source."""
    from agenttensor.errors import ConfigError

    if name == "heuristic":
        from .behavior import HeuristicBehavior

        return HeuristicBehavior()
    if name == "embedded":
        from agenttensor.llm.backends import EmbeddedBackend

        return ArchetypeBehavior(EmbeddedBackend(), on_failure=on_failure)
    if name == "openai":
        from agenttensor.llm.backends import OpenAIBackend

        if not llm_url:
            raise ConfigError("--behavior openai needs --llm-url (e.g. http://127.0.0.1:8000/v1)")
        return ArchetypeBehavior(OpenAIBackend(llm_url, llm_model or "default"), on_failure=on_failure)
    if name == "vllm":
        from agenttensor.llm.backends import VLLMBackend

        if not llm_model:
            raise ConfigError("--behavior vllm needs --llm-model (a local model path or name vLLM can load)")
        return ArchetypeBehavior(VLLMBackend(llm_model), on_failure=on_failure)
    raise ConfigError(f"unknown --behavior {name!r}; choose embedded, openai, vllm or heuristic")

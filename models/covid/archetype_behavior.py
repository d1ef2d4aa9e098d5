"""LLM archetype behaviour for the covid model: isolation and on-site work decided per archetype.

`ArchetypeBehavior` implements the model's `BehaviorSource` hook with
`agenttensor.archetypes.ArchetypeEngine` s:

- **isolate** — archetypes = age band × borough × employment status (≤ 60 occupied); asked
  "If you had COVID-19 symptoms, would you stay at home and isolate?"
- **work** — archetypes = age band × borough (≤ 20); asked "Will you go to your workplace in
  person this week?" (the answer is used only for employed agents).

Each prompt carries the agent's own world: last week's reported cases per 100,000 in its borough
(rounded to two significant digits so nearby weeks and scenarios share cached answers), the
borough's unemployment rate and the stay-at-home order in force there; when the ``stimulus`` lever
is in force in a batch element, its prompts also say that adults there received a federal economic
impact payment of s × $1,200 (CARES Act) — asked by a second pair of engines, so prompts without a
stimulus stay exactly as before (and keep their cached answers). In a batch of scenarios
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
FULL_PAYMENT_USD = 1200.0  # CARES Act Economic Impact Payment per adult (paid from 2020-04-10): stimulus lever = 1

CONTEXT = (
    "In the last 7 days there were {cases:,.0f} new reported COVID-19 cases per 100,000 residents in {borough}. "
    "Unemployment in {borough} is {unemployment:.1f}%. "
    "A stay-at-home order is in force at {stay_home:.0f}% strength. "
)

STIMULUS_CONTEXT = "Every adult in {borough} has received a federal stimulus payment of ${stimulus_usd:,.0f}. "
ENVIRONMENT = (EnvironmentField("cases", "borough"), EnvironmentField("unemployment", "borough"),
               EnvironmentField("stay_home", "borough"))


def isolate_spec(stimulus: bool = False) -> ArchetypeSpec:
    """Isolation archetypes; ``stimulus=True`` adds the payment sentence (and the ``stimulus_usd`` field)."""
    return ArchetypeSpec(
        name="isolate" + ("+stimulus" if stimulus else ""),
        attributes=(Attribute("age_band", AGE_BANDS), Attribute("borough", BOROUGH_NAMES),
                    Attribute("employment", EMPLOYMENT)),
        template="You are a {age_band} year old person living in {borough}, New York City; you are {employment}. "
                 + CONTEXT + (STIMULUS_CONTEXT if stimulus else "")
                 + "If you had COVID-19 symptoms, would you stay at home and isolate? Answer Yes or No.",
        environment=ENVIRONMENT + ((EnvironmentField("stimulus_usd", "borough"),) if stimulus else ()),
    )


def work_spec(stimulus: bool = False) -> ArchetypeSpec:
    """On-site work archetypes; ``stimulus=True`` adds the payment sentence."""
    return ArchetypeSpec(
        name="work" + ("+stimulus" if stimulus else ""),
        attributes=(Attribute("age_band", AGE_BANDS), Attribute("borough", BOROUGH_NAMES)),
        template="You are a {age_band} year old employed person living in {borough}, New York City. "
                 + CONTEXT + (STIMULUS_CONTEXT if stimulus else "")
                 + "Will you go to your workplace in person this week? Answer Yes or No.",
        environment=ENVIRONMENT + ((EnvironmentField("stimulus_usd", "borough"),) if stimulus else ()),
    )


ISOLATE_SPEC = isolate_spec()
WORK_SPEC = work_spec()


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
    """Fallback: σ(3 − 0.35·log(1 + cases) − 0.1·(age − 40)/10 − 2·stay_home − 0.5·stimulus)."""
    logit = (3.0 - 0.35 * torch.log1p(env["cases"].double()) - 0.1 * (_age_mid(codes["age_band"]) - 40) / 10
             - 2.0 * env["stay_home"].double() / 100)
    if "stimulus_usd" in env:
        logit = logit - 0.5 * env["stimulus_usd"].double() / FULL_PAYMENT_USD
    return torch.sigmoid(logit)


class ArchetypeBehavior:
    """`BehaviorSource` backed by an LLM (embedded, OpenAI-compatible, vLLM) per archetype.

    backend: an `agenttensor.llm` backend; on_failure: "fallback" (default: the heuristic's value,
    counted in `stats`) or "error"; calibrate: learnable logit-affine maps on both behaviours.
    """

    # Answers are a function of the prompt (each element's own context, asked per element every decision
    # step); between steps the engines keep only a grouping memo keyed by tensor identity, statistics and
    # last-step diagnostics — nothing per batch element — so scenario runs may share a prefix.
    stateless = True

    def __init__(self, backend: Any, cache: Any = None, on_failure: str = "fallback", calibrate: bool = False):
        def engine(spec: ArchetypeSpec, fallback) -> ArchetypeEngine:
            return ArchetypeEngine(spec, backend, cache=cache, on_failure=on_failure,
                                   fallback=HeuristicBackend(fallback, f"heuristic-{spec.name}"), calibrate=calibrate)

        self.isolate = engine(ISOLATE_SPEC, heuristic_isolate)
        self.work = engine(WORK_SPEC, heuristic_work)
        # batch elements with a stimulus in force are asked with the payment sentence (own engines; calibrate
        # maps are per engine)
        self.isolate_stimulus = engine(isolate_spec(stimulus=True), heuristic_isolate)
        self.work_stimulus = engine(work_spec(stimulus=True), heuristic_work)
        self._age_band: Tensor | None = None

    @property
    def engines(self) -> dict[str, ArchetypeEngine]:
        return {"isolate": self.isolate, "work": self.work, "isolate+stimulus": self.isolate_stimulus,
                "work+stimulus": self.work_stimulus}

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: dict(e.stats) for name, e in self.engines.items()}
        for key in ("calls", "cache_hits", "failures", "fallbacks", "llm_seconds"):
            out[key] = sum(e.stats[key] for e in self.engines.values())
        return out

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
        stimulus = observations["policies"].get("stimulus")  # [B, G, A] share of a full payment, or None
        stimulus_usd = None if stimulus is None else (stimulus.detach().amax(-1).double() * FULL_PAYMENT_USD).round()
        isolate, work = [], []
        for b in range(cases.shape[0]):  # one decision per batch element (its own scenario context)
            employment = torch.where(state.employed[b] > 0.5, 0, torch.where(state.unemployed[b] > 0.5, 1, 2))
            context = {"cases": cases[b].cpu(), "unemployment": unemployment[b].cpu(), "stay_home": stay_home[b].cpu()}
            isolate_engine, work_engine = self.isolate, self.work
            if stimulus_usd is not None and bool(stimulus_usd[b].max() > 0):
                context["stimulus_usd"] = stimulus_usd[b].cpu()
                isolate_engine, work_engine = self.isolate_stimulus, self.work_stimulus
            isolate.append(isolate_engine.decide({"age_band": self._age_band, "borough": borough,
                                                  "employment": employment.to(torch.int32)}, context, ctx.step))
            work.append(work_engine.decide({"age_band": self._age_band, "borough": borough}, context, ctx.step))
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

"""Behaviour sources: per-agent probabilities to isolate and to go to work, set every decision step.

A behaviour source is any object with

    decide(env, state, params, ctx, observations) -> {"isolate_prob": [B, N], "work_prob": [B, N]}

called every ``params.decision_every`` days (weekly by default) by the model's ``decide`` substep.
A source that keeps no per-batch-element state between calls sets the class attribute
``stateless = True``; scenario runs share the steps on which all scenarios agree only then
(`agenttensor.prefix`), since the batch grows from seeds to scenarios × seeds after that prefix.
``observations`` holds the per-borough environment an agent reacts to:

- ``cases_per_100k`` [B, G]: reported cases in the last 7 days per 100,000 residents, by borough;
- ``unemployment_rate`` [B, G]: unemployed / labour force, by borough;
- ``policies`` {lever name: [B, G, A]}: active intervention intensities (borough × age band);
- ``date``: the calendar date of the decision.

Per-agent attributes are on the env: ``env.age`` [N] (years), ``env.sex`` [N], ``env.race`` [N], ``env.borough`` [N]
(group index of ``env.group_labels``), ``env.has_job`` [N] (employed at step 0), and the current
employment in ``state.employed`` / ``state.unemployed``. An LLM archetype adapter maps these to
archetypes, asks per archetype, and scatters the answers back to [B, N] — the same two outputs.

`HeuristicBehavior` is the default: logistic in the agent's borough incidence and age, with
parameters in `CovidParams` (differentiable, so calibratable):

    isolate_prob_i = σ(a_iso + b_iso · log(1 + c_b(i)) + g_iso · (age_i − 40)/10)
    work_prob_i    = σ(a_work − b_work · log(1 + c_b(i)) − g_work · (age_i − 40)/10 − s_work · stay_home_b(i)
                       − m_work · stimulus_b(i))

where c_b is last week's reported cases per 100k in agent i's borough, stay_home_b the active
stay-at-home order intensity there and stimulus_b the share of a full economic impact payment paid
there (policies the agent reads, as in the archetype prompts); m_work = ``work_stimulus_slope``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from agenttensor.transmission import group_gather, range_broadcast


@runtime_checkable
class BehaviorSource(Protocol):
    def decide(self, env: Any, state: Any, params: Any, ctx: Any, observations: dict[str, Any]) -> dict[str, Tensor]:
        """-> {"isolate_prob": [B, N] in [0, 1], "work_prob": [B, N] in [0, 1]}."""
        ...


def borough_values(env, per_borough: Tensor) -> Tensor:
    """Each agent's borough's value: [B, G] -> [B, N]. Where agents are sorted by borough (``env.borough_slices``, as
    the covid model's setup makes them) one broadcast per borough, whose derivative is one sum per borough (the
    derivative of ``index_select``, an ``index_add`` of every agent into 5 slots, took 475 ms at full NYC: a
    calibration paid it every decision day)."""
    slices = getattr(env, "borough_slices", None)
    if slices is not None:
        return range_broadcast(per_borough, slices)
    return per_borough.index_select(1, env.borough)


def profiles(env) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The agents' (borough, age) profiles, on which the heuristic's probabilities depend: (profile [N] int32, and per
    profile its borough, (age − 40) / 10 and policy cell [P]), once per environment (``env.static``); None where the
    environment has no such cache, or where the cells are not a function of borough and age."""
    static = getattr(env, "static", None)
    if static is None or not all(hasattr(env, name) for name in ("borough", "age_decades_centered", "cell")):
        return None

    def make() -> tuple[Tensor, ...]:
        centred = env.age_decades_centered
        years = (centred * 10 + 40).round().long()  # whole years (the covid setup's ages), else any values
        ages = 1024
        if years.numel() and bool(((years >= 0) & (years < ages)).all()) \
                and torch.equal((years.to(torch.float32) - 40) / 10, centred):  # (the setup's arithmetic: its bits)
            key = env.borough.long() * ages + years  # no sort: present keys by a count, numbered in order
            present = torch.bincount(key, minlength=1) > 0
            keys = torch.nonzero(present).flatten()
            profile = (torch.cumsum(present.long(), 0) - 1).index_select(0, key)
            age_of = (keys % ages).to(torch.float32).sub(40).div(10)
        else:
            age_values, age_index = torch.unique(centred, return_inverse=True)
            ages = age_values.numel()
            keys, profile = torch.unique(env.borough.long() * ages + age_index, return_inverse=True)
            age_of = age_values[keys % ages]
        P = keys.numel()
        cell = env.cell.long()
        low = torch.full((P,), cell.max().item() + 1 if cell.numel() else 0).scatter_reduce(0, profile, cell, "amin")
        high = torch.full((P,), -1).scatter_reduce(0, profile, cell, "amax")
        consistent = bool((low == high).all())  # (a Python bool: no tensor read on the host per decision)
        return profile.to(torch.int32), keys // ages, age_of, low, consistent

    *table, consistent = static("behaviour_profiles", make)
    return tuple(table) if consistent else None


class HeuristicBehavior:
    """Documented parametric heuristic (see module docstring). Its probabilities are a function of the agent's
    (borough, age) profile: computed per profile (~500 at full NYC) and read by each agent (`profiles`; one gather per
    output where the dense form took ~11 passes over [B, N]: full NYC 46 → 9 ms a decision), the same arithmetic."""

    stateless = True  # a pure function of its inputs (scenario runs may share a prefix; agenttensor.prefix)

    def decide(self, env, state, params, ctx, observations) -> dict[str, Tensor]:
        incidence = torch.log1p(observations["cases_per_100k"])  # [B, G]
        table = profiles(env)
        if table is None:  # per agent
            local, age, cell, spread = borough_values(env, incidence), env.age_decades_centered, env.cell, None
        else:  # per profile [B, P], then each agent's
            profile, borough, age, cell = table
            local, spread = incidence.index_select(1, borough), lambda x: group_gather(x, profile)  # noqa: E731
        isolate_logit = params.isolate_intercept + params.isolate_incidence_slope * local + params.isolate_age_slope * age
        work_logit = params.work_intercept - params.work_incidence_slope * local - params.work_age_slope * age
        stay_home = observations["policies"].get("stay_at_home")
        if stay_home is not None:  # [B, G, A] -> per agent (profile)
            work_logit = work_logit - params.work_stay_home_slope * stay_home.flatten(1).index_select(1, cell)
        stimulus = observations["policies"].get("stimulus")
        if stimulus is not None:  # a cash cushion makes staying home affordable
            work_logit = work_logit - params.work_stimulus_slope * stimulus.flatten(1).index_select(1, cell)
        isolate_prob, work_prob = torch.sigmoid(isolate_logit), torch.sigmoid(work_logit)
        if spread is not None:
            isolate_prob, work_prob = spread(isolate_prob), spread(work_prob)
        return {"isolate_prob": isolate_prob, "work_prob": work_prob}

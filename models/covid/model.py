"""COVID-19 in New York City: age-structured SEIR-type disease on household, school, workplace and
community layers, with behaviour, policy levers and employment. One step = one calendar day.

States per agent (memberships 0/1; exactly one of S, E, I_asym, I_sym, H, R, D is 1):

    S → E → I_asym → R
          ↘ I_sym → R
                  ↘ H → R
                      ↘ D

Force of infection on susceptible agent i on day t (all flows use the pre-step state):

    λ_i(t) = β · m(t) · σ_a(i) · (1 − ε_V V_i) · Σ_l w_l · r_l(i, t) · π_l(i, t)
    P(S→E) = 1 − exp(−λ_i(t))

    π_household(i) = Σ_{j∈h(i), j≠i} ι_j / (n_h − 1)                        every day
    π_school(i)    = κ_lev(i) p^s_i Σ_{j∈s(i), j≠i} p^s_j a_j ι_j / (n_s − 1)   school days
    π_workplace(i) = p^w_i Σ_{j∈w(i), j≠i} p^w_j a_j ι_j / (n_w − 1)          work days
    π_community(i) = p^c_i [(1 − ρ) C_{n(i)} + ρ Σ_b' M_{b(i) b'} C_b']        every day

with ι_j = I_sym_j + α I_asym_j (infectiousness), a_j = 1 − η · isolating_j (isolation removes a
share η of non-household contacts), presences p (school open share, on-site work today and not in
a closed workplace, 1 − stay-at-home intensity), C_n / C_b the presence-weighted infectious share of
NTA n / borough b, M the borough mixing matrix (rows normalised), r_l = 1 − transmission reduction
(masks) and σ_a the relative susceptibility of age group a.

Stage exits happen when a per-agent countdown (drawn at stage entry from a discretised lognormal,
`disease.py`) runs out; the branch at each exit is a Bernoulli draw with age-specific probability:
E → I_sym w.p. symptomatic_a, I_sym → H w.p. hosp_given_symptomatic_a (1 − ε_severe V), H → D w.p.
death_given_hosp_a. At I entry an infection is reported w.p. detection (× asymptomatic ratio for
I_asym; testing raises it), and aware agents (symptomatic or reported) isolate w.p. isolate_prob.

Every `decision_every` days the behaviour source sets isolate_prob and work_prob per agent, the
on-site work decision is drawn, and the labour market moves: employed agents lose their job with
weekly probability base + [closed·(1 − remote) + absent·(1 − on_site)(1 − remote)]·(1 − relief·s),
unemployed ones are rehired with weekly probability rehire · (1 − workplace closure). s ∈ [0, 1] is
the `stimulus` lever (the share of a full economic impact payment, $1,200 per adult under the CARES
Act, April 2020): it also lowers the go-to-work logit by work_stimulus_slope · s.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import polars as pl

import torch
import torch.nn.functional as F
from torch import Tensor

from agenttensor import GroupLayer, Model, Params, StepContext, Substep, TensorState, param
from agenttensor import _group_kernels, fused, select
from agenttensor.interventions import LeverSpec
from agenttensor.record import PackedLayout, PackedRecord
from agenttensor.transmission import (ForceTerm, OthersSumProbes, group_gather, group_sum, layer_shares,
                                      layer_shares_at, layered_force, range_sums, scaled_sums, scatter_sum, table_kept)
from agenttensor.rng import hashed
from agenttensor.population import BOROUGHS, Population, dense_index, synthetic

from . import contributions_native, disease, exits_native, hard_native, labour_native, shadow, shadow_native
from .behavior import BehaviorSource, HeuristicBehavior
from .calendar import DEFAULT_START, date_of, is_school_day, is_work_day
from .contributions import OthersSum, own_contributions
from .shadow import gather_exits, transition

log = logging.getLogger(__name__)

LAYERS = ("household", "school", "workplace", "community")
AGE_BAND_EDGES = (0, 5, 11, 14, 18, 25, 45, 65, 75)  # intervention targeting bands (lower edges)
STAGES = ("S", "E", "I_asym", "I_sym", "H", "R", "D")
COUNTED = (*STAGES, "isolating")  # the fields whose per-borough counts the metrics roll forward by the day's changes
# the metrics' flows: name -> the transition's ``ctx.scratch`` key (gradient modes; hard mode: stacked, this order)
METRIC_FLOWS = dict(new_infections="new_infections", reported_cases="reported", hospital_admissions="admissions",
                    deaths="deaths")
_CLINICAL = disease.clinical_tables()
_SEVERITY = disease.severity_tables()

# Community mixing between boroughs (rows: where the susceptible lives; BX, BK, MN, QN, SI). Assumption:
# 70 % of the borough-level community contacts are in one's own borough, Manhattan (the commuting hub)
# receives half of the rest and the other boroughs share the remainder equally (see README).
_MIXING = [[0.70 if r == c else (0.15 if c == 2 else 0.15 / 3) for c in range(5)] for r in range(5)]
for _r in (2,):
    _MIXING[_r] = [0.70 if c == 2 else 0.075 for c in range(5)]


def _t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class CovidParams(Params):
    # ---- transmission ------------------------------------------------------------------------
    transmission_scale: float = param(0.6, unit="per day per unit contact pressure", min=0.0,
                                      doc="β: overall transmission scale (calibratable)")
    transmission_multiplier: Tensor = param(torch.ones(1), min=0.0, time_varying=True, period=7,
                                            doc="m(t): weekly multiplier of β (last value repeats; calibratable)")
    household_weight: float = param(1.0, min=0.0, doc="w_household: contact intensity of the household layer")
    school_weight: float = param(1.0, min=0.0, doc="w_school: contact intensity of the school layer")
    workplace_weight: float = param(0.8, min=0.0, doc="w_workplace: contact intensity of the workplace layer")
    community_weight: float = param(1.5, min=0.0, doc="w_community: contact intensity of the community layer")
    school_level_weights: Tensor = param(_t([1.0, 0.9, 0.8]), min=0.0,
                                         doc="κ: school contact intensity by level (elementary 5-10, middle 11-13, high 14+)")
    community_borough_share: float = param(0.4, min=0.0, max=1.0,
                                           doc="ρ: share of community contacts drawn borough-wide (rest: own NTA)")
    borough_mixing: Tensor = param(_t(_MIXING), min=0.0,
                                   doc="M [5, 5]: borough-to-borough community mixing (rows normalised; assumption)")
    asymptomatic_infectiousness: float = param(0.35, min=0.0, max=1.0,
                                               doc="α: relative infectiousness of asymptomatic infections "
                                                   "(Buitrago-Garcia et al. 2020)")
    isolation_effectiveness: float = param(0.8, min=0.0, max=1.0,
                                           doc="η: share of non-household contacts removed while isolating")
    # ---- natural history (age groups 0-4, 5-12, 13-17, 18-24, 25-34, 35-44, 45-54, 55-64, 65-74, 75+)
    susceptibility: Tensor = param(_t(_CLINICAL["susceptibility"]), min=0.0,
                                   doc="σ_a: relative susceptibility by age group (Davies et al. 2020)")
    symptomatic_fraction: Tensor = param(_t(_CLINICAL["symptomatic"]), min=0.0, max=1.0,
                                         doc="P(symptomatic | infected) by age group (Davies et al. 2020)")
    hosp_given_symptomatic: Tensor = param(_t(_SEVERITY["hosp_given_symptomatic"]), min=0.0, max=1.0,
                                           doc="P(H | symptomatic) by age group (NYC DOHMH totals, ascertainment 0.25)")
    death_given_hosp: Tensor = param(_t(_SEVERITY["death_given_hosp"]), min=0.0, max=1.0,
                                     doc="P(D | H) by age group (NYC DOHMH deaths / hospitalisations)")
    incubation_median: float = param(5.1, unit="days", min=1.0, doc="incubation median (Lauer et al. 2020)")
    incubation_sdlog: float = param(0.418, min=0.01, doc="incubation log-sd (Lauer et al. 2020)")
    presymptomatic_days: float = param(2.0, unit="days", min=0.0,
                                       doc="infectious days before symptom onset; latent = incubation − this (He et al. 2020)")
    asymptomatic_days_mean: float = param(8.0, unit="days", min=1.0, doc="I_asym duration mean (Kerr et al. 2021)")
    asymptomatic_days_sd: float = param(2.0, unit="days", min=0.1, doc="I_asym duration sd")
    symptomatic_days_mean: float = param(7.0, unit="days", min=1.0,
                                         doc="I_sym duration (to recovery or admission) mean (Kerr et al. 2021)")
    symptomatic_days_sd: float = param(3.0, unit="days", min=0.1, doc="I_sym duration sd")
    hospital_days_mean: float = param(10.0, unit="days", min=1.0, doc="H length of stay mean (Rees et al. 2020)")
    hospital_days_sd: float = param(6.0, unit="days", min=0.1, doc="H length of stay sd")
    initial_prevalence: float = param(2e-4, unit="share of agents", min=0.0, max=1.0, doc="agents in E at step 0")
    initial_immunity: float = param(0.0, unit="share of agents", min=0.0, max=1.0,
                                    doc="agents in R at step 0 (e.g. 0.227: NYC seroprevalence late April 2020, "
                                        "Rosenberg et al. 2020)")
    # ---- surveillance ------------------------------------------------------------------------
    detection_rate: float = param(0.3, min=0.0, max=1.0, doc="P(reported | symptomatic infection) (calibratable)")
    asymptomatic_detection_ratio: float = param(0.2, min=0.0, max=1.0,
                                                doc="detection of asymptomatic relative to symptomatic infections")
    # ---- vaccination -------------------------------------------------------------------------
    vaccine_efficacy_infection: float = param(0.7, min=0.0, max=1.0, doc="ε_V: reduction of susceptibility")
    vaccine_efficacy_severe: float = param(0.9, min=0.0, max=1.0, doc="ε_severe: reduction of P(H | symptomatic)")
    # ---- behaviour (HeuristicBehavior; logits) -----------------------------------------------
    decision_every: int = param(7, unit="days", min=1, doc="days between behaviour decisions")
    isolate_intercept: float = param(0.0, doc="isolate logit at 0 cases and age 40")
    isolate_incidence_slope: float = param(0.3, doc="isolate logit per log(1 + weekly cases per 100k)")
    isolate_age_slope: float = param(0.1, doc="isolate logit per decade of age above 40")
    work_intercept: float = param(3.0, doc="go-to-work logit at 0 cases and age 40")
    work_incidence_slope: float = param(0.35, doc="decrease of go-to-work logit per log(1 + weekly cases per 100k)")
    work_age_slope: float = param(0.1, doc="decrease of go-to-work logit per decade of age above 40")
    work_stay_home_slope: float = param(2.0, doc="decrease of go-to-work logit under a full stay-at-home order")
    work_stimulus_slope: float = param(0.5, min=0.0,
                                       doc="decrease of go-to-work logit under a full stimulus payment (stimulus "
                                           "lever at 1 = $1,200 per adult, CARES Act EIP): a cash cushion makes "
                                           "staying home affordable. Size is an assumption; direction from Wright "
                                           "et al. 2020 (J. Econ. Behav. Organ. 180:544: poorer areas complied less "
                                           "with shelter-in-place, CARES Act transfers increased distancing)")
    # ---- economy -----------------------------------------------------------------------------
    remote_work_share: float = param(0.4, min=0.0, max=1.0,
                                     doc="share of jobs that can be done at home (Dingel & Neiman 2020)")
    job_loss_base: float = param(0.001, unit="per week", min=0.0, max=1.0, doc="baseline weekly job-loss probability")
    job_loss_closed: float = param(0.08, unit="per week", min=0.0, max=1.0,
                                   doc="extra weekly job-loss probability when one's workplace is closed (on-site jobs)")
    job_loss_absent: float = param(0.01, unit="per week", min=0.0, max=1.0,
                                   doc="extra weekly job-loss probability when not going to work (on-site jobs)")
    rehire_rate: float = param(0.03, unit="per week", min=0.0, max=1.0, doc="weekly rehiring probability, no closures")
    stimulus_job_loss_relief: float = param(0.1, unit="share of pandemic job-loss probability", min=0.0, max=1.0,
                                            doc="relief r: a full stimulus payment multiplies the pandemic job-loss "
                                                "terms (closed workplace, absence) by (1 − r); demand support. "
                                                "Assumption; small because the April 2020 payments raised spending "
                                                "but little of it reached the firms shedding jobs (Chetty et al. "
                                                "2024, Q. J. Econ. 139:829)")


# Parameters through which gradients flow (the rest shape discrete durations or are counts).
CALIBRATABLE = ("transmission_scale", "transmission_multiplier", "household_weight", "school_weight",
                "workplace_weight", "community_weight", "school_level_weights", "community_borough_share",
                "borough_mixing", "asymptomatic_infectiousness", "isolation_effectiveness", "susceptibility",
                "symptomatic_fraction", "hosp_given_symptomatic", "death_given_hosp", "detection_rate",
                "asymptomatic_detection_ratio", "vaccine_efficacy_infection", "vaccine_efficacy_severe",
                "isolate_intercept", "isolate_incidence_slope", "isolate_age_slope", "work_intercept",
                "work_incidence_slope", "work_age_slope", "work_stay_home_slope", "work_stimulus_slope",
                "remote_work_share", "job_loss_base", "job_loss_closed", "job_loss_absent", "rehire_rate",
                "stimulus_job_loss_relief")


@dataclass(frozen=True)
class CovidState(TensorState):
    """Memberships and flags are [B, N] 0/1 (uint8 in hard mode, float32 in gradient modes)."""

    S: Tensor
    E: Tensor
    I_asym: Tensor
    I_sym: Tensor
    H: Tensor
    R: Tensor
    D: Tensor
    vaccinated: Tensor
    isolating: Tensor
    employed: Tensor
    unemployed: Tensor
    remote: Tensor  # job can be done from home (drawn once)
    on_site: Tensor  # goes to the workplace on work days this week
    stage_end: Tensor  # [B, N] int16: step at which the current timed stage (E, I, H) ends; -1 none
    isolate_prob: Tensor  # [B, N] float32, from the behaviour source
    work_prob: Tensor  # [B, N] float32, from the behaviour source
    reported_recent: Tensor  # [B, 7, G] float32: reported cases of the last 7 days by borough
    # gradient modes (`shadow.py`): derivative mass of infections by household members' untaken infections,
    # before infection and in the latent period; zero-valued [B, N] float32 ([B, 0] in hard mode)
    household_exposure: Tensor
    household_latent: Tensor

    gradient_only = ("household_exposure", "household_latent")


@dataclass
class CovidEnv:
    """Static tensors (agents sorted by borough, NTA, household so borough sums are slices)."""

    agent_ids: Tensor  # [N] int32
    num_agents: int
    age: Tensor  # [N] int8 years
    sex: Tensor  # [N] int8
    race: Tensor  # [N] int8 (codes in agenttensor.population.CODES)
    borough: Tensor  # [N] int32 group index
    age_group: Tensor  # [N] int32 DOHMH age group 0..9
    age_decades_centered: Tensor  # [N] float32 (age − 40) / 10
    cell: Tensor  # [N] int32 borough * A + age band (index into flattened [B, G, A] levers)
    school_level: Tensor  # [N] int32 0 elementary, 1 middle, 2 high
    has_job: Tensor  # [N] bool, employed in the population
    was_unemployed: Tensor  # [N] bool, unemployed in the population
    has_workplace: Tensor  # [N] bool
    workplace_representative: Tensor  # [W] int64: one member agent per workplace (keys its closure draw)
    workplace_of: Tensor  # [N] int64 workplace index (0 for none; mask with has_workplace)
    household: GroupLayer
    school: GroupLayer
    workplace: GroupLayer
    community: GroupLayer  # (borough, NTA) groups
    community_borough: Tensor  # [C] int64
    household_inv_others: Tensor  # [H + 1] float32: 1 / (n_g − 1) per group, 0 for groups of one and the empty slot
    school_inv_others: Tensor  # [S + 1]
    workplace_inv_others: Tensor  # [W + 1]
    school_group_level: Tensor  # [S] int64 level of each (school, level) group
    borough_slices: list[tuple[int, int]]
    borough_size: Tensor  # [G] float32
    group_labels: list[str]
    durations: dict[str, Tensor]  # stage -> cumulative probability table [K]
    exit_duration_keys: Tensor  # [3 K] int64: the I_asym, I_sym and H tables as one search (disease.stacked_cdf_keys)
    exit_durations: Tensor  # [3, K] float32: the I_asym, I_sym and H tables (the native hard transition reads them)
    behavior: Any
    cache: dict = field(default_factory=dict, repr=False)  # see `memo`
    counts: dict = field(default_factory=dict, repr=False)  # see `rolled_counts`
    native: dict = field(default_factory=dict, repr=False)  # the native passes' kept arguments (`hard_native`)

    def memo(self, key: Any, inputs: tuple, compute: Callable[[], Any], values_only: bool = False) -> Any:
        """``compute()``, reused while its inputs are unchanged: small tensors (e.g. a [B, G, A] lever) compared
        by value, anything else (state tensors, random streams) by identity and version (with ``values_only``: by the
        tensor they view, where in it, and its version, so that a view of the same elements matches, `_Viewed`). Only on CPU and without
        gradients, or with ``values_only`` (compute reads its inputs' values only, detached: inputs may require gradients;
        they are held by weak reference, so a run's graph is not kept alive). Interventions change a few times
        per run and the labour market once a week, but their per-agent values cost a [B, N] pass per step (a
        35 MB gather at full NYC). The cache holds one result per key."""
        hit = self.cache.get(key)
        if hit is not None and len(hit[0]) == len(inputs):  # (loops, not generators: ~10 calls a day, most of them hits)
            refresh = False
            for cached, version, x in zip(hit[0], hit[2], inputs):
                if isinstance(x, Tensor):
                    if (x.requires_grad and not values_only) or not x.is_cpu:
                        return compute()
                    if version is not None and version != x._version:  # a large input updated in place
                        break
                if not _same_input(cached, x):
                    break
                refresh = refresh or (type(cached) is _Small and cached.tensor() is not x)
            else:
                if refresh:  # equal by value, another tensor (e.g. the next run's schedule): held from now on, so
                    # that the following steps match by identity (no comparison of values a step)
                    self.cache[key] = (tuple(_Small(weakref.ref(x), x._version, c.values) if type(c) is _Small
                                             else c for c, x in zip(hit[0], inputs)), hit[1], hit[2])
                return hit[1]
        versions = []
        for x in inputs:
            if isinstance(x, Tensor):
                if (x.requires_grad and not values_only) or not x.is_cpu:
                    return compute()
                versions.append(None if x.numel() <= _SMALL else x._version)  # (in-place updates)
            else:
                versions.append(None)
        versions = tuple(versions)
        result = compute()
        self.cache[key] = (tuple(_Small(weakref.ref(x), x._version, x.clone()) if _small(x) else _Viewed.of(x)
                                 if values_only and isinstance(x, Tensor) else x for x in inputs), result, versions)
        return result

    def static(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` once per environment: a value of its static tensors (e.g. clamped group sizes)."""
        hit = self.cache.get(("static", key))
        if hit is None:
            hit = self.cache[("static", key)] = ((), compute(), ())  # `memo`'s form: (inputs, result, versions)
        return hit[1]

    def rolled_counts(self, key: str | tuple[str, ...], before: Tensor | tuple[Tensor, ...], change: Tensor | None
                      ) -> Tensor | None:
        """Today's per-borough sums of a [B, N] state field (``key`` its name: [B, G]) or of several (a tuple of names:
        stacked [K, B, G]) as those of yesterday's tensors `before` plus today's `change`, where their sums were
        recorded (`record_counts`) and none has changed since: no [B, N] pass. None otherwise."""
        hit = self.counts.get(key)
        before = before if isinstance(before, tuple) else (before,)
        if change is None or hit is None or any(ref() is not x or version != x._version
                                                for ref, version, x in zip(hit[0], hit[1], before)):
            return None
        return hit[2] + change

    def carry_counts(self, moved: dict[str, tuple[Tensor, int]]) -> None:
        """Fields updated in place by today's step (a donated state), ``moved``: name -> (its tensor x, the version its
        sums were recorded at): each record moves to x's new version and still holds yesterday's sums, which
        `rolled_counts` adds today's change to (``before`` is x itself)."""
        for key, (refs, versions, counts) in list(self.counts.items()):
            names = key if isinstance(key, tuple) else (key,)
            carried = [moved[name][0]._version if name in moved and _same_memory(ref(), moved[name][0])
                       and version == moved[name][1] else version for name, ref, version in zip(names, refs, versions)]
            if carried != list(versions):
                self.counts[key] = (refs, tuple(carried), counts)

    def record_counts(self, key: str | tuple[str, ...], x: Tensor | tuple[Tensor, ...], counts: Tensor) -> None:
        """Remember the per-borough sums ([B, G], or [K, B, G] for a tuple of K fields) of x [B, N] for the next
        step's `rolled_counts`."""
        xs = x if isinstance(x, tuple) else (x,)
        self.counts[key] = (tuple(weakref.ref(t) for t in xs), tuple(t._version for t in xs),
                            counts.detach() if counts.requires_grad else counts)


def _same_memory(a: Tensor | None, b: Tensor) -> bool:
    """Whether a and b are the same tensor or aliases of the same elements (e.g. a field passed through an autograd
    node as a view: they share the version counter too)."""
    return a is b or (a is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype)


_SMALL = 4096  # a memo input of at most this many elements is compared by value


def _small(x: Any) -> bool:
    return isinstance(x, Tensor) and x.numel() <= _SMALL


class _Small(NamedTuple):
    """A small memo input: the tensor (a weak reference: a graph it is part of stays collectable), its version and a
    copy of its values (`_same_input`)."""
    tensor: weakref.ref
    version: int
    values: Tensor


class _Viewed(NamedTuple):
    """A large memo input read for its values only: the tensor whose memory it views (a weak reference) and where in it,
    so that a view of the same elements matches (e.g. a field passed on from day to day as a view by an autograd node,
    `select.scale_and_pass_on`: it shares its root's version counter, which `memo` compares too)."""
    root: weakref.ref
    offset: int
    shape: tuple
    stride: tuple

    @staticmethod
    def of(x: Tensor) -> "_Viewed":
        return _Viewed(weakref.ref(select.root(x)), x.storage_offset(), tuple(x.shape), x.stride())


def _same_input(cached: Any, x: Any) -> bool:
    if isinstance(cached, weakref.ref):
        return cached() is x
    if isinstance(cached, _Viewed):
        return isinstance(x, Tensor) and cached.root() is select.root(x) \
            and cached[1:] == (x.storage_offset(), tuple(x.shape), x.stride())
    if isinstance(cached, _Small):
        if cached.tensor() is x and cached.version == x._version:  # e.g. a lever's value on a step like the one before
            return True
        cached = cached.values
    if _small(x):
        return _small(cached) and cached.shape == x.shape and cached.dtype == x.dtype and torch.equal(cached, x)
    return cached is x


# ---- helpers ---------------------------------------------------------------------------------

def by_borough(env: CovidEnv, x: Tensor, dtype=None) -> Tensor:
    """Per-borough sums of agent values: [B, N] -> [B, G] (contiguous slices; agents sorted by borough)."""
    return range_sums(x, env.borough_slices, dtype)


def borough_divisor(env: CovidEnv) -> Tensor:
    """[G] agents per borough, at least 1 (a divisor; once per environment)."""
    return env.static("borough_size", lambda: env.borough_size.clamp_min(1))


def lever_per_agent(ctx: StepContext, name: str, layer: str | None = None) -> Tensor | None:
    """Intervention intensity per agent [B, N] (gathered from [B, G, A]), or None when unused; gathered once a day
    (`StepContext.scratch`) and, on the CPU, once while it stays the same (`CovidEnv.memo`)."""
    key = ("lever_per_agent", name, layer, id(ctx.schedule))
    if key not in ctx.scratch:
        value = ctx.lever(name, layer)
        ctx.scratch[key] = None if value is None else ctx.env.memo(
            ("lever", name, layer), (value,), lambda: value.flatten(1).index_select(1, ctx.env.cell))
    return ctx.scratch[key]


class At:
    """Read per-agent tensors densely ([B, N]) or at selected agents (b, i) only — the same numbers."""

    def __init__(self, b: Tensor | None = None, i: Tensor | None = None):
        self.b, self.i = b, i

    def __call__(self, x: Tensor | float) -> Tensor | float:
        """x: a number or 0-dim tensor (as is), [N] per agent, [B, N] or [1, N] per element and agent,
        or a [B, 1] parameter batched over scenarios (one value per element)."""
        if not isinstance(x, Tensor) or x.dim() == 0 or self.i is None:
            return x
        if x.dim() == 1:
            return x.index_select(0, self.i)  # one gather (x[i] takes torch's general index kernel: 2.5x slower)
        if x.shape[1] == 1:  # [B, 1]: each selected agent reads its element's value
            return x[0, 0] if x.shape[0] == 1 else x[self.b, 0]
        if x.shape[0] == 1:
            return x.take(self.i)  # [1, N]: one op where x[0, i] is two
        return x[self.b, self.i]

    def group(self, per_slot: Tensor, slot: Tensor) -> Tensor:
        """Each agent's group value: per_slot [B, G + 1] gathered at the agent's slot [N]."""
        if self.i is None:
            return group_gather(per_slot, slot)
        slots = slot.index_select(0, self.i)
        return per_slot[0].index_select(0, slots) if per_slot.shape[0] == 1 else per_slot[self.b, slots]

    def table(self, values: Tensor, index: Tensor) -> Tensor:
        """values[index] for an age/level table and a per-agent [N] index."""
        return values.index_select(0, index if self.i is None else index.index_select(0, self.i))


def event(ctx: StepContext, where: Tensor, stream: str, probability: Callable[[At], Tensor]) -> Tensor:
    """Events 1[u < p] among agents in ``where`` [B, N]; ``probability(at)`` computes p elementwise.

    Hard mode evaluates p only at the agents in ``where`` when they are few; gradient modes evaluate it
    densely. The forward values are identical either way (same uniforms, same elementwise arithmetic).
    """
    if not ctx.sampler.differentiable and ctx.few(where):
        b, i = select.nonzero(where)
        events = torch.zeros_like(where)
        if b.numel():
            p = probability(At(b, i))
            u = ctx.rng.uniform_at(ctx.step, stream, b, i)
            select.put_at_(events, b, i, (u < p).to(where.dtype))
        return events
    p = probability(At())
    if not isinstance(p, Tensor):
        p = torch.tensor(p, dtype=torch.float32, device=where.device)
    return ctx.dense_bernoulli(p, stream, where)


def enter_stage(stage_end: Tensor, entrants: Tensor | tuple[Tensor, Tensor], cdf: Tensor, ctx: StepContext, stream: str,
                entry_step: int) -> Tensor:
    """Set the countdown of agents entering a timed stage (a [B, N] mask or its (b, i) indices):
    stage_end = entry_step + duration, in place (with `StepContext.sync_free` and a mask: drawn for every agent, and
    a new tensor, ``stage_end``'s values where the mask is not set: `dense_countdowns`)."""
    if ctx.sync_free and not isinstance(entrants, tuple):
        return dense_countdowns(ctx.rng.agent_base, ctx.rng._keys(ctx.now, (stream,)), entrants.detach(), stage_end,
                                cdf, entry_step)
    b, i = entrants if isinstance(entrants, tuple) else select.nonzero(entrants.detach())
    if b.numel():
        u = ctx.rng.uniform_at(ctx.step, stream, b, i)
        select.put_at_(stage_end, b, i, (entry_step + disease.draw_duration(cdf, u).to(torch.int32)).to(torch.int16))
    return stage_end


def exit_outcomes(draw: Callable[[Tensor, str], Tensor], leave_E: Tensor, leave_Ia: Tensor, leave_Is: Tensor,
                  leave_H: Tensor, isolating_before: Tensor, p_symptoms: Tensor, p_hosp: Tensor, p_death: Tensor,
                  detection: Tensor, asymptomatic_ratio: Tensor, testing: Tensor | None, isolate: Tensor
                  ) -> tuple[Tensor, ...]:
    """The day's stage exits, for agents leaving E, I_asym, I_sym or H (the ``leave_*`` memberships, at the exiting
    agents or every agent's masked): E → I_sym w.p. p_symptoms (else I_asym), I_sym → H w.p. p_hosp (else R),
    H → D w.p. p_death (else R); a new I agent is reported w.p. detection · (1 for I_sym, asymptomatic_ratio for
    I_asym), raised by ``testing`` to p + testing (1 − p), and isolates w.p. ``isolate`` once aware (symptoms or a
    report). ``draw(p, stream)``: the sampler's events of that stream's uniforms. -> (to_Ia, to_Is, to_H, to_D, to_R,
    reported, isolating after), in the memberships' dtype."""
    f32, dtype = torch.float32, leave_E.dtype
    to_Is = draw(p_symptoms, "symptoms").to(dtype) * leave_E
    to_Ia = leave_E - to_Is
    to_H = draw(p_hosp, "hospitalisation").to(dtype) * leave_Is
    to_D = draw(p_death, "death").to(dtype) * leave_H
    to_R = leave_Ia + (leave_Is - to_H) + (leave_H - to_D)
    # surveillance and isolation at I entry (the new I agents are among today's E exits)
    p_detect = detection * (to_Is.to(f32) + asymptomatic_ratio * to_Ia.to(f32))
    if testing is not None:
        p_detect = p_detect + testing * (1 - p_detect)
    reported = draw(p_detect, "detection").to(dtype) * (to_Ia + to_Is)
    aware = to_Is + reported - to_Is * reported
    isolate = draw(isolate, "isolation").to(dtype) * aware
    return to_Ia, to_Is, to_H, to_D, to_R, reported, isolating_before * (1 - (leave_Ia + leave_Is)) + isolate


@fused.on_request
def dense_exits(agent_base: Tensor, keys: Tensor, exiting: Tensor, now: int | Tensor, fields: tuple[Tensor, ...],
                age_group: Tensor, by_age: tuple[Tensor, Tensor, Tensor], severe: tuple[Tensor, Tensor] | None,
                others: tuple, exit_durations: Tensor, stage_end: Tensor
                ) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """Hard-mode exits and transition for every agent (`StepContext.sync_free`): today's exiting agents are
    ``exiting`` [B, N] (bool: the countdown ends at ``now``, the step's number); the six exit streams' uniforms hashed
    from ``agent_base`` [N] and ``keys`` [6, B] (`exits_native.STREAMS`' order), their events and flows
    (`exit_outcomes`: its age-specific probabilities read from the ``by_age`` tables (symptoms, hospitalisation,
    death) at ``age_group`` [N], the hospitalisation's scaled by 1 − efficacy · vaccinated where ``severe`` =
    (efficacy, vaccinated [B, N]) is given, ``others`` its other four), and the countdowns of the next stage
    (`disease.draw_durations_where`; −1 where it has none) where exiting, ``stage_end`` [B, N] elsewhere. ``fields``:
    the memberships S, E, I_asym, I_sym, H, R, D, isolating and today's infections new_E, [B, N] each. The numbers of
    the sparse path's, at every agent (zeros where not exiting). -> (the flows [12, B, N]: reported, to_H, to_D (the
    metrics' flows), leave_E, to_Ia, leave_Ia, to_Is, leave_Is, leave_H, to_R, isolating after and before (the stage
    changes that the counts roll forward by), as `progress` sums them by borough;
    the eight memberships after the day: S − new_E, and where exiting each flow's target (E: 0), elsewhere the field
    (E: + new_E); the countdowns [B, N] int16). Pure: compiled into one pass with ``AGENTTENSOR_COMPILE=1``
    (`fused.on_request`; on a GPU ~85 passes over [B, N] fewer; the same bits, tested on the CPU)."""
    S, E, Ia, Is, H, R, D, isolating, new_E = fields
    u = dict(zip(exits_native.STREAMS, hashed(agent_base.view(1, 1, -1), keys.unsqueeze(-1))))
    leave_E, leave_Ia, leave_Is, leave_H, isolating_before = (x * exiting for x in (E, Ia, Is, H, isolating))
    p_symptoms, p_hosp, p_death = (table.index_select(0, age_group) for table in by_age)
    if severe is not None:
        p_hosp = p_hosp * (1 - severe[0] * severe[1].to(torch.float32))
    to_Ia, to_Is, to_H, to_D, to_R, reported, isolating_after = exit_outcomes(
        lambda p, stream: u[stream] < p, leave_E, leave_Ia, leave_Is, leave_H, isolating_before, p_symptoms, p_hosp,
        p_death, *others)
    duration = disease.draw_durations_where(exit_durations, to_Is, to_H, u["duration-exit"])
    ends = torch.where((to_Ia + to_Is + to_H) > 0, (now + duration).to(torch.int16), -1)
    flows = torch.stack([reported, to_H, to_D, leave_E, to_Ia, leave_Ia, to_Is, leave_Is, leave_H, to_R,
                         isolating_after, isolating_before])
    after = (S - new_E, torch.where(exiting, 0, E + new_E), *(torch.where(exiting, flow, x) for x, flow in
             ((Ia, to_Ia), (Is, to_Is), (H, to_H), (R, to_R), (D, to_D), (isolating, isolating_after))))
    return flows, after, torch.where(exiting, ends, stage_end)


def iotas_of(I_sym: Tensor, I_asym: Tensor, isolating: Tensor, alpha: Tensor | float, eta: Tensor | float
             ) -> tuple[Tensor, Tensor]:
    """Infectiousness ι = I_sym + α I_asym, and ι a away from home, with a = 1 − η isolating (α: the asymptomatic
    agents' relative infectiousness, η: isolation's effectiveness). -> two float32 of the memberships' shape."""
    f32 = torch.float32
    iota = I_sym.to(f32) + alpha * I_asym.to(f32)
    return iota, iota * (1 - eta * isolating.to(f32))


# `iotas_of` for every agent (sync-free days: ι is zero where not infectious): one pass over [B, N] compiled with
# AGENTTENSOR_COMPILE=1 (on a GPU six fewer), the same numbers
dense_iotas = fused.on_request(iotas_of)


@fused.on_request
def dense_countdowns(agent_base: Tensor, keys: Tensor, entrants: Tensor, stage_end: Tensor, cdf: Tensor,
                     entry_step: int | Tensor) -> Tensor:
    """`enter_stage` for every agent (`StepContext.sync_free`): the stream's uniforms hashed from ``agent_base`` [N]
    and ``keys`` [1, B], the durations drawn from ``cdf``, and the countdowns ``entry_step`` + duration where
    ``entrants`` [B, N] is set, ``stage_end``'s elsewhere. -> int16 [B, N]. Pure: one pass with
    ``AGENTTENSOR_COMPILE=1`` (`fused.on_request`; on a GPU seven fewer), the same bits."""
    u = hashed(agent_base.unsqueeze(0), keys.view(-1, 1))
    ends = (entry_step + disease.draw_duration(cdf, u).to(torch.int32)).to(torch.int16)
    return torch.where(entrants != 0, ends, stage_end)


def inv_others(layer: GroupLayer) -> Tensor:
    """[G + 1]: 1 / (members − 1) per group; 0 for groups of one and for the non-member slot."""
    others = layer.group_size - 1
    return torch.where(others > 0, 1 / others.clamp_min(1), torch.zeros_like(others))


def group_layer(group_of: Tensor, device, num_groups: int | None = None) -> GroupLayer:
    """A `GroupLayer` (int32 slots) on `device`."""
    return GroupLayer(group_of, num_groups).to(device)


# ---- setup and init --------------------------------------------------------------------------

def setup(population: Population | int, params: CovidParams, device, behavior: BehaviorSource | None = None) -> CovidEnv:
    if isinstance(population, int):
        population = synthetic(population, seed=0)
    persons = population.persons.sort(["borough", "nta", "household_id"])
    G = len(BOROUGHS)
    if persons.height and int(persons["borough"].max()) >= G:
        raise ValueError(f"population has borough codes up to {int(persons['borough'].max())}; the covid model "
                         f"expects 0..{G - 1} ({', '.join(BOROUGHS)})")
    col = {c: torch.from_numpy(persons[c].to_numpy().copy()) for c in persons.columns if persons[c].dtype.is_numeric()}
    age = col["age"].to(torch.int64)
    borough = col["borough"].to(torch.int64)
    N = persons.height
    if "school_level" in col:
        level = col["school_level"].to(torch.int64).clamp(0, 2)
    else:  # derived from age: elementary 5-10, middle 11-13, high 14+
        level = torch.bucketize(age, torch.tensor([11, 14]), right=True)
    school_id = col["school_id"].to(torch.int64)
    school_group = dense_index(torch.where(school_id >= 0, school_id * 4 + level, torch.full_like(school_id, -1)))
    workplace_index = dense_index(col["workplace_id"]).to(torch.int64)
    has_workplace = workplace_index >= 0
    W = int(workplace_index.max()) + 1 if has_workplace.any() else 0
    representative = torch.full((W,), N, dtype=torch.int64)
    representative.scatter_reduce_(0, workplace_index[has_workplace], torch.arange(N)[has_workplace], "amin")
    community_group = dense_index(borough * 65_536 + col["nta"].to(torch.int64)).to(torch.int64)
    C = int(community_group.max()) + 1 if N else 0
    community_borough = torch.zeros(C, dtype=torch.int64).scatter_(0, community_group, borough)
    counts = torch.bincount(borough, minlength=G)
    ends = torch.cumsum(counts, 0).tolist()
    slices = [(e - int(c), e) for e, c in zip(ends, counts.tolist())]
    band = torch.bucketize(age, torch.tensor(AGE_BAND_EDGES[1:]), right=True)
    d = disease
    durations = {
        "E": d.lognormal_cdf_table_median(float(params.incubation_median), float(params.incubation_sdlog),
                                          shift=float(params.presymptomatic_days)),
        "I_asym": d.lognormal_cdf_table(float(params.asymptomatic_days_mean), float(params.asymptomatic_days_sd)),
        "I_sym": d.lognormal_cdf_table(float(params.symptomatic_days_mean), float(params.symptomatic_days_sd)),
        "H": d.lognormal_cdf_table(float(params.hospital_days_mean), float(params.hospital_days_sd)),
    }
    dev = torch.device(device)
    household = group_layer(dense_index(col["household_id"]), dev)
    school = group_layer(school_group, dev)
    workplace = group_layer(workplace_index, dev)
    school_group_level = torch.zeros(school.num_groups, dtype=torch.int64)
    in_school = school_group >= 0
    school_group_level[school_group[in_school].to(torch.int64)] = level[in_school]
    return CovidEnv(
        agent_ids=col["agent_id"].to(torch.int32).to(dev), num_agents=N, age=col["age"].to(dev), sex=col["sex"].to(dev), race=col["race"].to(dev),
        borough=borough.to(torch.int32).to(dev), age_group=disease.age_group_of(age).to(torch.int32).to(dev),
        age_decades_centered=((age.to(torch.float32) - 40) / 10).to(dev),
        cell=(borough * len(AGE_BAND_EDGES) + band).to(torch.int32).to(dev), school_level=level.to(torch.int32).to(dev),
        has_job=(col["employment"] == 1).to(dev), was_unemployed=(col["employment"] == 2).to(dev), has_workplace=has_workplace.to(dev),
        workplace_representative=representative.to(dev), workplace_of=workplace_index.clamp_min(0).to(dev),
        household=household, school=school, workplace=workplace, community=group_layer(community_group, dev, C),
        household_inv_others=inv_others(household), school_inv_others=inv_others(school),
        workplace_inv_others=inv_others(workplace), school_group_level=school_group_level.to(dev),
        community_borough=community_borough.to(dev), borough_slices=slices,
        borough_size=counts.to(torch.float32).to(dev), group_labels=list(BOROUGHS),
        durations={k: v.to(dev) for k, v in durations.items()},
        exit_duration_keys=d.stacked_cdf_keys([durations[k] for k in ("I_asym", "I_sym", "H")]).to(dev),
        exit_durations=torch.stack([durations[k] for k in ("I_asym", "I_sym", "H")]).to(dev),
        behavior=behavior or HeuristicBehavior(),
    )


def init(env: CovidEnv, params: CovidParams, ctx: StepContext) -> CovidState:
    """A share `initial_prevalence` of agents (smallest "seeding" uniforms) start in E and the next
    `initial_immunity` share in R; employment from the population; remote-capable jobs drawn once."""
    u = ctx.uniform("seeding")  # [B, N]
    B, N = u.shape
    dtype = ctx.sampler.dtype
    k = min(int(round(float(params.initial_prevalence) * N)), N)
    k_immune = min(int(round(float(params.initial_immunity) * N)), N - k)
    E = torch.zeros(B, N, dtype=dtype, device=u.device)
    R = torch.zeros(B, N, dtype=dtype, device=u.device)
    if k + k_immune:
        lowest = torch.topk(u, k + k_immune, dim=1, largest=False, sorted=True).indices
        E.scatter_(1, lowest[:, :k], 1)
        R.scatter_(1, lowest[:, k:], 1)
    stage_end = enter_stage(torch.full((B, N), -1, dtype=torch.int16, device=u.device), E, env.durations["E"], ctx,
                            "duration-E", entry_step=-1)
    zeros = torch.zeros_like(E)
    employed = env.has_job.to(dtype).expand(B, N).clone()
    remote = event(ctx, employed, "remote", lambda at: at(params.remote_work_share))
    G = len(env.group_labels)
    own = ctx.own  # fresh tensors: a loop that owns this state (`StepContext.donate`) may update them in place
    return CovidState(S=1 - E - R, E=E, I_asym=own(zeros), I_sym=own(zeros.clone()), H=own(zeros.clone()), R=own(R),
                      D=own(zeros.clone()), vaccinated=zeros.clone(), isolating=own(zeros.clone()), employed=employed,
                      unemployed=env.was_unemployed.to(dtype).expand(B, N).clone(), remote=remote,
                      on_site=employed * env.has_workplace.to(dtype), stage_end=stage_end,
                      isolate_prob=torch.zeros(B, N, device=u.device), work_prob=torch.ones(B, N, device=u.device),
                      reported_recent=torch.zeros(B, 7, G, device=u.device),
                      household_exposure=torch.zeros(B, N if ctx.sampler.differentiable else 0, device=u.device),
                      household_latent=torch.zeros(B, N if ctx.sampler.differentiable else 0, device=u.device))


# ---- substeps --------------------------------------------------------------------------------

def infection_pressure(state: CovidState, params: CovidParams, ctx: StepContext) -> CovidState:
    """observe: λ_i = β m(t) σ_a(i) (1 − ε_V V_i) Σ_l w_l r_l(i) π_l(i), into ``ctx.scratch["force"]`` [B, N].

    Infectious agents are few, so each layer's group sums Σ_j p_j a_j ι_j run over the infectious agents
    only and are scaled per group (by β m w_l / (n_g − 1)); each agent then reads its group's value with
    one gather. The self term of π is left out: λ only matters for susceptible agents, who contribute
    nothing. In gradient modes the derivative of the dense group sums rides on `layered_force` (the others-sum of
    each layer's own contributions, through its probes), so forward values are the same in every mode.
    """
    env: CovidEnv = ctx.env
    date = date_of(ctx.start_date, ctx.step)
    B = state.S.shape[0]
    device, on_cpu = state.S.device, state.S.is_cpu
    multiplier = params.at_step("transmission_multiplier", ctx.now)
    school_day, work_day = is_school_day(date), is_work_day(date)
    names = ("household", *(("school",) if school_day else ()), *(("workplace",) if work_day else ()), "community")
    dense_cache: dict[str, Tensor] = {}  # dense presences: computed once per step

    def once(key: str, at: At, fn: Callable[[], Tensor]) -> Tensor:
        if at.i is not None:
            return fn()
        if key not in dense_cache:
            dense_cache[key] = fn()
        return dense_cache[key]

    def presence_of(lever: str) -> Callable[[At], Tensor] | None:
        value = lever_per_agent(ctx, lever)
        if value is None:
            return None
        dense_presence = lambda: env.memo(("presence", lever), (value,), lambda: 1 - value)  # noqa: E731
        return lambda at: 1 - at(value) if at.i is not None else once(f"presence_{lever}", at, dense_presence)

    # the layers' presences (None: always there), as `At` reads them
    presences: dict[str, Callable[[At], Tensor] | None] = dict(
        household=None, school=presence_of("school_closure") if school_day else None,
        community=presence_of("stay_at_home"))
    closed = closed_workplaces(ctx) if work_day else None
    work_passed = None  # gradient modes, a decision that carries a derivative: the presence, its values kept
    if work_day and closed is not None and ctx.sampler.differentiable and state.on_site.requires_grad:
        # for the week (`select.scale_and_pass_on`: no product made a day; its derivatives into one buffer)
        open_share = env.memo("open_workplaces", (closed,), lambda: 1 - closed)
        kept_presence = env.memo("presence_work_values", (state.on_site, closed),
                                 lambda: state.on_site.detach() * open_share, values_only=True)
        on_site, work_passed = select.scale_and_pass_on(state.on_site, open_share, kept_presence)
        state = state.replace(on_site=on_site)
    if work_day:
        hard = not ctx.sampler.differentiable  # (not `ctx` in the closure: ctx.scratch keeps layer_term, a cycle)

        def p_work(at: At) -> Tensor:
            def value() -> Tensor:
                on_site = at(state.on_site).to(torch.float32)
                return on_site if closed is None else on_site * (1 - at(closed))

            if at.i is None and work_passed is not None:
                return work_passed
            if at.i is None:  # dense: changes with the weekly decision only (gradient modes: reused where on_site
                # carries no derivative, else made once per step where no closure makes it `work_passed`)
                return once("presence_work", at, lambda: env.memo("presence_work", (state.on_site, closed), value,
                                                                  values_only=hard))
            return value()

        presences["workplace"] = p_work
    reduction_all = lever_per_agent(ctx, "transmission_reduction")
    reductions = {name: lever_per_agent(ctx, "transmission_reduction", name) for name in names}
    vaccinated = ctx.lever("vaccination") is not None
    # per layer: (group value per slot [B, G + 1], agent's slot [N], presence of the agent or None)
    layers: dict[str, tuple[Tensor, Tensor, Callable[[At], Tensor] | None]] = {}

    def layer_term(name: str, at: At, per_slot: Tensor | None = None) -> Tensor:
        """w_l r_l(i) π_l(i) (times β m) for agents selected by ``at`` (no derivative of the group members: the
        dense force below carries it); with ``per_slot`` [B | 1, G + 1] in place of the group values (e.g. the
        hazard per unit of one other member's infectiousness)."""
        group_values, slot, presence = layers[name]
        value = at.group(group_values if per_slot is None else per_slot, slot)
        if presence is not None:
            value = value * presence(at)
        if reductions[name] is not None:
            value = value * (1 - at(reductions[name]))
        if reduction_all is not None:
            value = value * (1 - at(reduction_all))
        return value

    def susceptibility(at: At) -> Tensor:
        def by_age() -> Tensor:  # σ = the table at the age groups: the native layered force reads it by age group
            return _group_kernels.by_group(at.table(params.susceptibility, env.age_group), params.susceptibility,
                                           shadow_native.age_group_bytes(env))

        sigma = at.table(params.susceptibility, env.age_group) if at.i is not None else \
            env.memo("susceptibility", (params.susceptibility, env.age_group), by_age)
        if vaccinated:
            sigma = sigma * (1 - at(params.vaccine_efficacy_infection) * at(state.vaccinated).to(torch.float32))
        return sigma

    def kept_share(layer: str, reduction: Tensor | None) -> Tensor | None:  # 1 − r, recomputed when the lever changes
        return None if reduction is None else env.memo(("kept", layer), (reduction,), lambda: 1 - reduction)

    level_weight = env.memo("level_weight", (params.school_level_weights,), lambda: F.pad(
        params.school_level_weights.index_select(0, env.school_group_level), (0, 1))) if school_day else None
    rho = params.community_borough_share
    community_size = env.static("community_size", lambda: env.community.group_size[:-1].clamp_min(1))  # [C]
    mixing = env.memo("mixing", (params.borough_mixing,),
                      lambda: params.borough_mixing / params.borough_mixing.sum(1, keepdim=True))
    dense = At()
    sigma = susceptibility(dense)

    def force_layers() -> tuple:
        """The force's layers as `transmission.force_of_layers` reads them (for the dense split of infections by
        layer, `layer_attribution`), made when asked: (table, slot, presence, factor, factor_all) per layer."""
        return tuple((table, slot, None if presence is None else presence(dense), kept_share(name, reductions[name]),
                      kept_share("all", reduction_all)) for name, (table, slot, presence) in layers.items())

    # hard mode on CPU: the totals, the tables and the force as one native call (`hard_native.hard_force`, the same
    # numbers; where a derivative would reach its inputs, e.g. learnable β under a hard sampler, it declines and the
    # torch ops below carry it)
    if not (ctx.sampler.differentiable or not on_cpu):
        native = native_hard_force(state, params, ctx, multiplier, names, presences, closed, reductions,
                                   kept_share("all", reduction_all), kept_share, level_weight, mixing, community_size,
                                   sigma)
        if native is not None:
            force, tables, native_terms = native
            layers.update({name: (tables[name], getattr(env, name).slot, presences[name]) for name in names})
            ctx.scratch.update(force=force, layer_term=layer_term, layer_names=names, force_terms=native_terms,
                               force_layers=force_layers)
            return state

    beta = params.transmission_scale * multiplier
    # the infectious agents; in gradient modes from the memberships packed for the own contributions (1 byte per agent)
    packed = contributions_native.packed(state.I_sym, state.I_asym, state.isolating, state.stage_end, state.S) \
        if ctx.sampler.differentiable else (None, None)  # (and the countdowns' sign and S: `own_contributions`)
    # (`StepContext.sync_free`: every agent, whose ι is zero where not infectious: no index list, the same sums)
    b, j = (None, None) if ctx.sync_free and not ctx.sampler.differentiable else \
        select.nonzero(state.I_sym.detach(), state.I_asym.detach()) if packed[0] is None else \
        select.nonzero_bits(packed[0], 0b011)
    sources = At(b, j)

    @functools.cache
    def iotas() -> tuple[Tensor, Tensor]:  # at the infectious agents [M] (sync-free: every agent [B, N])
        if b is None:
            return dense_iotas(state.I_sym, state.I_asym, state.isolating, params.asymptomatic_infectiousness,
                               params.isolation_effectiveness)
        return iotas_of(*(sources(x) for x in (state.I_sym, state.I_asym, state.isolating,
                                               params.asymptomatic_infectiousness, params.isolation_effectiveness)))

    def kept_zeros(key: str, slots: int) -> list:
        """The environment's buffer ``key`` of [B · slots] zeros, set back to zeros at the positions written the last
        time: [buffer, None], in which the caller sets the positions it writes (flat, int64)."""
        held = env.static(key, lambda: [torch.zeros(B * slots), None])
        if held[1] is not None:
            held[0].index_fill_(0, held[1], 0.0)
            held[1] = None
        return held

    kept_totals: dict[str, list] = {}  # the reused totals' [buffer, positions] (`kept_zeros`), by name

    def totals_buffer(layer: GroupLayer, reused: str | None) -> Tensor:
        """CPU gradient modes: the [B · (G + 1)] zeros the totals are added into. ``reused`` (totals read right away
        and kept by nobody: `scaled`'s): the environment's buffer of that name (`kept_zeros`: no [B, G + 1] of zeros a
        day, 0.7 ms for full NYC's households); the caller sets the positions it sums at in ``kept_totals``."""
        slots = layer.num_groups + 1
        if reused is None:
            return torch.zeros(B * slots)
        kept_totals[reused] = kept_zeros(f"totals_{reused}_{B}", slots)
        return kept_totals[reused][0]

    def scale_of(name: str, coef: Tensor, per_slot: Tensor) -> Tensor:
        """β m w_l / (n_g − 1) per slot, kept while β m w_l's value is unchanged (the multiplier changes weekly)."""
        def values() -> Tensor:  # (no autograd node: a checkpointed segment's recomputation, which finds the memo
            with torch.no_grad():  # filled, must save the tensors its forward pass saved)
                return coef * per_slot

        return env.memo(("scale", name), (coef, per_slot), values, values_only=True)

    # the layers whose group values are scale · totals (`scaled`): their coefficient and 1 / (n_g − 1) per slot
    scaled_layers = dict(household=(beta * params.household_weight, env.household_inv_others),
                         **(dict(workplace=(beta * params.workplace_weight, env.workplace_inv_others)) if work_day
                            else {}))
    # CPU gradient modes, the memberships packed: every layer's totals in one native pass over the infectious agents
    # (`hard_native.source_totals_at`: the numbers of the torch ops in `group_totals`, none of their [M] gathers), and
    # the scaled layers' values at the slots summed at where those are few (`transmission._product_at`'s)
    summed: dict[str, tuple[Tensor, Tensor | None, Tensor | None]] = {}
    products: dict[str, Tensor] = {}  # the scaled layers' values made with their totals (which are then zeros again)
    reused_values: dict[str, list] = {}  # (buffer, the slots written) of the values made into a kept buffer

    def values_buffer(name: str, slots: int) -> Tensor:
        """[B, G + 1] zeros for a scaled layer's values at the summed slots: for the households, whose table the force
        keeps for no derivative (`table_kept`: no presence, σ and the reductions constant, as in a run or most
        calibrations), the environment's buffer, set back to zeros at the slots written the last time (no [B, H + 1]
        of zeros a day: 13 MB at full NYC); else new zeros."""
        if name != "household" or table_kept(sigma, None, kept_share(name, reductions[name]),
                                             kept_share("all", reduction_all)):
            return torch.zeros(B, slots)
        reused_values[name] = kept_zeros(f"values_{name}_{B}", slots)
        return reused_values[name][0].view(B, slots)

    if packed[0] is not None and on_cpu:
        specs = {}
        for name in names:
            layer = getattr(env, name)
            lever = lever_per_agent(ctx, "school_closure") if name == "school" else \
                lever_per_agent(ctx, "stay_at_home") if name == "community" else None
            work, slots = name == "workplace", layer.num_groups + 1
            product = scale = None
            if name in scaled_layers and b.numel() * 8 <= B * slots and not scaled_layers[name][1].requires_grad:
                scale, product = scale_of(name, *scaled_layers[name]), values_buffer(name, slots)
            specs[name] = hard_native.SourceSpec(layer.slot, totals_buffer(layer, name if name in scaled_layers else
                                                                           None).view(B, -1),
                                                 name != "household", lever, state.on_site if work else None,
                                                 closed if work else None, record=name in scaled_layers,
                                                 product=product, scale=scale)
        recorded = hard_native.source_totals_at(b, j, packed[0], params.asymptomatic_infectiousness,
                                                params.isolation_effectiveness, list(specs.values()))
        if recorded is not None:
            for (name, spec), kept in zip(specs.items(), recorded):
                index, contribution = kept if kept is not None else (None, None)
                if name in scaled_layers:  # (where the kernel made the values, it set the totals back to zeros)
                    kept_totals[name][1] = None if spec.product is not None else index
                if spec.product is not None:
                    products[name] = spec.product
                    if name in reused_values:  # (its zeros to be set back at these slots before the next use)
                        reused_values[name][1] = index
                summed[name] = (spec.out.view(B, -1), index, contribution)

    def group_totals(name: str, contribution: Callable[[], Tensor], reused: str | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """Σ over each group's infectious members of their ``contribution()`` [M]: [B, G + 1] (last slot:
        non-members), with the flat positions b · (G + 1) + slot [M] it summed at and the contributions. Gradient
        modes: no derivative here; every agent's contribution carries it (`own_contributions`, the others-sum through
        `layered_force`'s probes)."""
        if name in summed:
            return summed[name]
        layer: GroupLayer = getattr(env, name)
        slots = layer.num_groups + 1
        if j is None:  # every agent's contribution (`sync_free`): a dense group sum, no positions
            values = contribution().detach().expand(B, -1)
            return group_sum(values, layer.slot, slots), None, values
        index = layer.slot.index_select(0, j)
        index = index if B == 1 and on_cpu else b * slots + index
        values = contribution()
        if ctx.sampler.differentiable and on_cpu:  # values only: into the zeros in place (no copy of
            values = values.detach()  # them: 13 MB per day for full NYC's households), as index_add adds
            buffer = totals_buffer(layer, reused)
            if reused is not None:
                kept_totals[reused][1] = index.long()
            return buffer.index_add_(0, index, values).view(B, slots), index, values
        totals = scatter_sum(torch.zeros(B * slots, device=device), index, values).view(B, slots)
        return (totals.detach(), index, values.detach()) if ctx.sampler.differentiable else (totals, index, values)

    def away(name: str) -> Callable[[], Tensor]:  # ι a times the layer's presence at the infectious agents
        def value() -> Tensor:
            presence, iota_away = presences[name], iotas()[1]
            return iota_away if presence is None else iota_away * presence(sources)
        return value

    own_scale: dict[str, Tensor] = {}  # gradient modes: the per-group scale of each layer's others-sum

    def scaled(name: str, totals: tuple) -> tuple[Tensor, Tensor]:
        """The group values (β m w_l / (n_g − 1)) · totals and their scale (`scale_of`); the derivative of β m w_l read
        at the infectious members."""
        coef, per_slot = scaled_layers[name]
        return scaled_sums(coef, per_slot, *totals, scale=scale_of(name, coef, per_slot), product=products.get(name))

    household, own_scale["household"] = scaled("household", group_totals("household", lambda: iotas()[0],
                                                                         reused="household"))
    layers["household"] = (household, env.household.slot, None)
    if school_day:
        school, _, _ = group_totals("school", away("school"))
        own_scale["school"] = beta * params.school_weight * env.school_inv_others * level_weight
        layers["school"] = (own_scale["school"] * school, env.school.slot, presences["school"])
    if work_day:
        work, own_scale["workplace"] = scaled("workplace", group_totals("workplace", away("workplace"),
                                                                        reused="workplace"))
        layers["workplace"] = (work, env.workplace.slot, presences["workplace"])
    p_community = presences["community"]
    community_all, _, _ = group_totals("community", away("community"))
    own: dict[str, OthersSumProbes] = {}  # gradient modes: the probes of each agent's (zero-valued) contributions
    weight_handoffs: dict[str, dict] = {}  # and where the force hands each layer's weights to them (`ForceTerm`)
    if ctx.sampler.differentiable:
        # own NTA share only (the borough-wide part is O(1 / borough size))
        own_scale["community"] = F.pad(beta * params.community_weight * (1 - rho) / community_size, (0, 1))
        dense_presences = {name: None if presences[name] is None else presences[name](dense) for name in names
                           if name != "household"}
        groups = {name: OthersSum(getattr(env, name).slot, torch.atleast_2d(own_scale[name]),
                                  plain=name == "community") for name in names}
        contributions = own_contributions(state, params, dense_presences, lever_per_agent(ctx, "testing_isolation"),
                                          groups, packed, timed=True)
        own, weight_handoffs = contributions.probes, contributions.weight_handoffs or {}
        # the rest of the step reads I_sym, I_asym and isolating through the node, which adds their derivatives to
        # the contributions' (the exits leave it the buffers it may add into); the aliases are owned as their tensors
        # are, and the transition updates them in place only where the node saved them packed (`shadow.donatable`)
        state = state.replace(**{name: ctx.own(x) if ctx.owns(getattr(state, name)) else x
                                 for name, x in contributions.fields.items()})
        ctx.scratch["fields_packed"] = contributions.packed
        ctx.scratch["live_flags"] = contributions.live_flags  # `shadow.transition` carries them to the next day
        ctx.scratch["timed_flags"] = contributions.timed_flags  # stage_end's sign and S: `progress` may update them in
        # place (the transition saves the flags in their place)
        ctx.scratch["exit_gradients"] = contributions.handoff
        # the borough-wide community mixing carries the dense derivative of the NTA totals
        community_all = community_all + own["community"].plain
    community_all = community_all[:, :-1]  # [B, C]
    community = community_all.detach()  # the NTA part's derivative comes from `layered_force`'s probes
    per_borough = scatter_sum(torch.zeros(B, len(env.group_labels), device=device), env.community_borough,
                              community_all)
    # [B, G]: Σ_b' M_bb' C_b' as an elementwise product and sum (a matmul's float summation order depends on B,
    # which would make a batch element's numbers depend on the batch it runs in)
    mixed = ((per_borough / borough_divisor(env))[:, None, :] * mixing[None]).sum(-1)
    per_community = (1 - rho) * community / community_size + rho * mixed.index_select(1, env.community_borough)
    layers["community"] = (F.pad(beta * params.community_weight * per_community, (0, 1)), env.community.slot, p_community)

    # every agent: one pass over the layers (`layered_force`: the arithmetic of layer_term, one autograd node). In
    # gradient modes each layer also carries the derivative of π_l(i) w.r.t. the memberships of i's *other* group
    # members (``own``). The agent's own term is zero in the forward pass (susceptible agents are not infectious)
    # but not in the backward pass once derivative mass of untaken infections sits in its I stages
    # (`shadow.py`): it is left out, or an agent would "infect itself" in the linearisation.
    native_terms = []  # the force's native form, for `layer_attribution`'s native pass
    made = force_layers()
    force = layered_force(sigma, [ForceTerm(
        table=table, slot=slot, presence=presence, factor=factor, factor_all=factor_all,
        member_probe=own[name].member if name in own else None, group_probe=own[name].group if name in own else None,
        weight_handoff=weight_handoffs.get(name),
        last_slot_constant=True)  # every table's non-member slot is a zero: (coef · 0) · sums, or a zero pad
        for name, (table, slot, presence, factor, factor_all) in zip(layers, made)], keep=native_terms)
    ctx.scratch.update(force=force, layer_term=layer_term, layer_names=tuple(layers), force_terms=native_terms,
                       force_layers=lambda: made)
    if ctx.sampler.differentiable:  # λ_k per unit of one other household member's infectiousness (`shadow.py`),
        # as `layer_term("household", ...)` gives it, factored (multiplied out in the backward pass)
        kept = (kept_share("household", reductions["household"]), kept_share("all", reduction_all))
        ctx.scratch["household_unit_hazard"] = shadow.UnitHazard(
            sigma.detach(), torch.atleast_2d(own_scale["household"]).detach(), env.household.slot,
            tuple(x.detach() for x in kept if x is not None),
            getattr(sigma, _group_kernels.BY_GROUP, (None,))[0])  # σ's table by age group, where it has one
    return state


def native_hard_force(state: CovidState, params: CovidParams, ctx: StepContext, multiplier: Tensor,
                      names: tuple[str, ...], presences: dict, closed: Tensor | None, reductions: dict,
                      kept_all: Tensor | None, kept_share: Callable, level_weight: Tensor | None, mixing: Tensor,
                      community_size: Tensor, sigma: Tensor) -> tuple[Tensor, dict[str, Tensor], tuple] | None:
    """`infection_pressure`'s totals, tables and force in hard mode as one native call on CPU (`hard_native.hard_force`:
    the same numbers as the torch ops below it in `infection_pressure`), or None where it does not apply. ->
    (force [B, N], the tables [B, S] by layer, their native form for `layer_attribution`)."""
    env: CovidEnv = ctx.env
    dense = At()
    weights = dict(household=params.household_weight, school=params.school_weight,
                   workplace=params.workplace_weight, community=params.community_weight)
    inv = dict(household=env.household_inv_others, school=env.school_inv_others,
               workplace=env.workplace_inv_others, community=None)
    scaled, levels, mixed = hard_native.KINDS  # (its own strings: the kept arguments are matched by identity)
    kinds = dict(household=scaled, school=levels, workplace=scaled, community=mixed)
    source_levers = dict(household=None, school=lever_per_agent(ctx, "school_closure") if "school" in names else None,
                         workplace=None, community=lever_per_agent(ctx, "stay_at_home"))
    layers = {}
    for name in names:
        layer: GroupLayer = getattr(env, name)
        presence = presences[name]
        work = name == "workplace"
        layers[name] = hard_native.ForceLayerSpec(
            layer.slot, name != "household", kinds[name], weights[name], inv[name],
            level_weight if name == "school" else None, source_levers[name], state.on_site if work else None,
            closed if work else None, None if presence is None else presence(dense),
            kept_share(name, reductions[name]), kept_all)
    community = hard_native.CommunitySpec(env.community_borough, borough_divisor(env), mixing, community_size,
                                          params.community_borough_share)
    return hard_native.hard_force(env.native, (state.I_sym, state.I_asym, state.isolating),
                                  params.asymptomatic_infectiousness, params.isolation_effectiveness,
                                  params.transmission_scale, multiplier, layers, community, sigma)


def closed_workplaces(ctx: StepContext) -> Tensor | None:
    """[B, N] 1 if the agent's workplace is closed today: workplace w closes when u_w < closure intensity
    (u_w drawn once per seed for w's representative member), so the intensity is the closed share."""
    env: CovidEnv = ctx.env
    lever = ctx.lever("workplace_closure")
    if lever is None:
        return None

    def closed() -> Tensor:
        closure = lever_per_agent(ctx, "workplace_closure")
        B = closure.shape[0]
        W = env.workplace_representative.shape[0]
        b = torch.arange(B, device=closure.device).repeat_interleave(W)
        first = 0 if ctx.clock is None else ctx.clock.new_zeros(())  # (step 0's keys made on the device)
        u_workplace = ctx.rng.uniform_at(first, "workplace-closure", b,
                                         env.workplace_representative.repeat(B)).view(B, W)
        u_agent = group_gather(u_workplace, env.workplace_of)  # one native pass on CPU (index_select: ~35 ms at NYC)
        return ((u_agent < closure) & env.has_workplace).to(torch.float32)

    return env.memo("closed_workplaces", (lever, ctx.rng), closed)


def behaviour(state: CovidState, params: CovidParams, ctx: StepContext) -> CovidState:
    """decide (every `decision_every` days): isolate_prob and work_prob from the behaviour source,
    then this week's on-site work decision."""
    if ctx.step % int(params.decision_every):
        return state
    env: CovidEnv = ctx.env
    slices, f32 = env.borough_slices, torch.float32  # (memoised values; the derivatives of the sums over agents)
    employed, unemployed = (range_sums(x, slices, f32, known=counts) for x, counts in
                            zip((state.employed, state.unemployed), labour_counts(env, state)))
    labour_force = employed + unemployed
    observations = dict(
        cases_per_100k=state.reported_recent.sum(1) / borough_divisor(env) * 1e5,
        unemployment_rate=unemployed / labour_force.clamp_min(1),
        policies={lever.name: ctx.lever(lever.name) for lever in LEVERS if ctx.lever(lever.name) is not None},
        date=date_of(ctx.start_date, ctx.step),
    )
    decided = env.behavior.decide(env, state, params, ctx, observations)
    isolate_prob, work_prob = decided["isolate_prob"], decided["work_prob"]
    can_go = state.employed * has_workplace_as(env, state.employed.dtype)
    on_site = event(ctx, can_go, "work", lambda at: at(work_prob))
    return state.replace(isolate_prob=isolate_prob, work_prob=work_prob, on_site=on_site)


def has_workplace_as(env: CovidEnv, dtype: torch.dtype) -> Tensor:
    """[N] 0/1 in ``dtype`` (the memberships'), once per environment and dtype (a conversion of 35 MB at full NYC in
    float32 a week, otherwise)."""
    return env.static(f"has_workplace_{dtype}", lambda: env.has_workplace.to(dtype))


def labour_counts(env: CovidEnv, state: CovidState) -> tuple[Tensor, Tensor]:
    """The employed and the unemployed per borough [B, G] float32 (values: no derivative), memoised while the fields
    are unchanged: they change once a week, and the behaviour and the metrics read them. Sums of 0/1 values: exact."""
    fields = (state.employed, state.unemployed)
    return env.memo("labour_counts", fields, lambda: tuple(field_counts(env, [x.detach() for x in fields])),
                    values_only=True)


def field_counts(env: CovidEnv, fields: list[Tensor | tuple[Tensor, Tensor]]) -> Tensor:
    """Per-borough sums of K [B, N] fields of one dtype as float32 [K, B, G] (0/1 values: exact); a (field, mask) pair
    counts their product (mask [N] or [B, N]). On CPU one native pass (`select.range_counts`: full NYC's two weekly
    labour fields ~8 → ~2 ms); else, at small N, the fields stacked first (one sum per borough for all of them: fewer
    ops), above 2^16 values each field's own (no [K, B, N] copy: at full NYC 8 uint8 fields are 70 MB)."""
    counts = select.range_counts(fields, env.borough_slices)
    if counts is not None:
        return counts
    fields = [x if isinstance(x, Tensor) else x[0] * x[1] for x in fields]
    if fields[0].numel() > 1 << 16:
        return torch.stack([range_sums(x, env.borough_slices, torch.float32) for x in fields])
    return range_sums(torch.stack(fields).flatten(0, 1), env.borough_slices, torch.float32).view(
        len(fields), -1, len(env.borough_slices))


def progress(state: CovidState, params: CovidParams, ctx: StepContext) -> CovidState:
    """transition: infection (S→E), stage exits when countdowns end (E→I, I→R/H, H→R/D), reporting and
    isolation at I entry, vaccination.

    Stage exits are evaluated only at the agents whose countdown ends today, ``(b, i)``, in every
    sampling mode: values there are gathered (differentiably) and written back with ``index_put``: in place
    where the field is this loop's own (a donated state, `StepContext.owns`), else into a copy.
    """
    env: CovidEnv = ctx.env
    t = ctx.step
    S, E, Ia, Is, H, R, D = state.S, state.E, state.I_asym, state.I_sym, state.H, state.R, state.D
    V = state.vaccinated
    # S → E: ctx.bernoulli(1 − exp(−λ), "infection", where=S); in hard mode drawn for every agent while most are
    # susceptible, at the susceptible agents only once they are few
    # (straight-through: with the derivatives d new_E / d S and d new_E / d λ, which `transition`, new_E's only
    # differentiable consumer, applies)
    force = ctx.scratch["force"]
    if not ctx.sampler.differentiable:  # the draws and the transition as one native pass on CPU
        after = native_hard_progress(state, force, params, ctx)
        if after is not None:
            return after
    versions = {name: getattr(state, name)._version for name in IN_PLACE}  # a donated field's, before its update
    # gradient modes on CPU: the draws and S − new_E, E + new_E in one pass, with the infected agents (no new_E); in
    # place where S and E are the loop's own and the flags hold S (the transition saves them in its place: no node
    # saves S or E), writing at the infected agents only (S − new_E is S elsewhere: no [B, N] written)
    in_place = ctx.scratch.get("timed_flags") is not None and ctx.owns(S) and ctx.owns(E)
    if in_place:
        versions.update(S=S._version, E=E._version)
    moved = ctx.hazard_move_and_derivatives(force, "infection", S, E, in_place=in_place)
    in_place = in_place and moved is not None
    new_E, infection = (None, moved.derivatives) if moved is not None else \
        ctx.hazard_event_and_derivatives(force, "infection", S)

    # agents whose timed stage ends today; hard mode with `StepContext.sync_free`: every agent, the exits a mask
    # (``exiting`` [B, N]; the draws and flows made for every agent and kept where it is set: the same numbers)
    dense = ctx.sync_free and not ctx.sampler.differentiable
    now = ctx.now  # (t, or the step's number on the device where the day may be captured: `StepContext.clock`)
    exiting = state.stage_end == now if dense else None
    b, i = (None, None) if dense else select.equal(state.stage_end, t)
    at = At(b, i)

    # the exits' uniforms in one hash pass: [6, M], rows as the kernel reads them (dense: drawn in `dense_exits`)
    u_exits = None if dense else ctx.rng.uniforms_at(t, exits_native.STREAMS, b, i)
    u_exit = None if dense else dict(zip(exits_native.STREAMS, u_exits))

    def draw(p: Tensor, stream: str) -> Tensor:
        return ctx.sampler.bernoulli(torch.as_tensor(p, dtype=torch.float32), u_exit[stream])

    exits = None if dense else gather_exits(dict(E=E, I_asym=Ia, I_sym=Is, H=H, isolating=state.isolating), b, i,
                                            ctx.sampler.differentiable, made=ctx.scratch.get("exit_gradients"))
    if not dense:
        leave_E, leave_Ia, leave_Is, leave_H, isolating_before = (exits.leaving[name] for name in
                                                                  ("E", "I_asym", "I_sym", "H", "isolating"))

    # countdowns of the agents entering E (dense set → its own index) and I / H (among the exits, below): in place
    # where they are the loop's own and no node saved them (gradient modes: the nodes save their sign in the flags)
    donate = ctx.sampler.differentiable and ctx.scratch.get("timed_flags") is not None and ctx.owns(state.stage_end)
    stage_end = state.stage_end if donate or dense else ctx.own(state.stage_end.clone())  # (dense: made anew below)
    infected_b, infected_i = (None, None) if dense else moved.pairs if moved is not None else \
        select.nonzero(new_E.detach())
    ctx.scratch["infected"] = (infected_b, infected_i)  # (`shadow.transition` carries their countdowns' sign)
    stage_end = enter_stage(stage_end, new_E if dense else (infected_b, infected_i), env.durations["E"], ctx,
                            "duration-E", entry_step=now)

    if dense:  # hard mode, every agent: the draws, the exits' flows and the countdowns as one function (fused by
        # torch.compile with AGENTTENSOR_COMPILE=1: one pass over memory, on a GPU)
        severe = (params.vaccine_efficacy_severe, V) if ctx.lever("vaccination") is not None else None
        flows_at, fields_after, stage_end = dense_exits(
            ctx.rng.agent_base, ctx.rng._keys(now, exits_native.STREAMS), exiting, now,
            (S, E, Ia, Is, H, R, D, state.isolating, new_E), env.age_group,
            (params.symptomatic_fraction, params.hosp_given_symptomatic, params.death_given_hosp), severe,
            (params.detection_rate, params.asymptomatic_detection_ratio, lever_per_agent(ctx, "testing_isolation"),
             state.isolate_prob), env.exit_durations, stage_end)
        stage_end = ctx.own(stage_end)

    # straight-through on CPU: the exits below as one native node (`exits_native`: the same numbers and derivatives)
    native = None
    read = None if dense else (params.detection_rate, params.asymptomatic_detection_ratio,
                               ctx.lever("testing_isolation"), params.vaccine_efficacy_severe, V, state.isolate_prob)
    if not dense and exits_native.supported(ctx.sampler, exits.leaving, u_exits, params, env, stage_end, read):
        testing = lever_per_agent(ctx, "testing_isolation")
        severe = at(params.vaccine_efficacy_severe) * at(V).to(torch.float32) if ctx.lever("vaccination") is not None \
            else None
        isolate_prob, isolate_at = select.read_and_pass_on(state.isolate_prob, b, i)
        native = exits_native.exit_flows(exits.leaving, b, i, u_exits, env, params, at(params.detection_rate),
                                         at(params.asymptomatic_detection_ratio),
                                         None if testing is None else at(testing), severe, isolate_at, stage_end, t)
    elif not dense:  # the exits at the exiting agents' index lists
        group = env.age_group.index_select(0, i)
        p_hosp = params.hosp_given_symptomatic.index_select(0, group)
        if ctx.lever("vaccination") is not None:
            p_hosp = p_hosp * (1 - at(params.vaccine_efficacy_severe) * at(V).to(torch.float32))
        testing = lever_per_agent(ctx, "testing_isolation")
        # (read at the exits and passed on to tomorrow's state: the week's reads' derivatives in one buffer)
        isolate_prob, isolate_at = select.read_and_pass_on(state.isolate_prob, b, i) if ctx.sampler.differentiable \
            else (state.isolate_prob, at(state.isolate_prob))
        probabilities = (params.symptomatic_fraction.index_select(0, group), p_hosp,
                         params.death_given_hosp.index_select(0, group), at(params.detection_rate),
                         at(params.asymptomatic_detection_ratio), None if testing is None else at(testing), isolate_at)
        to_Ia, to_Is, to_H, to_D, to_R, reported, isolating_here = exit_outcomes(
            draw, leave_E, leave_Ia, leave_Is, leave_H, isolating_before, *probabilities)
        if b.numel():  # the next stage's table (I_asym 0, I_sym 1, H 2); no timed stage (R, D): −1
            duration = disease.draw_durations(env.exit_duration_keys, disease.MAX_DURATION_DAYS,
                                              (to_Is.detach() + 2 * to_H.detach()).to(torch.int64),
                                              u_exit["duration-exit"])
            timed = (to_Ia + to_Is + to_H).detach() > 0
            select.put_at_(stage_end, b, i, torch.where(timed, (now + duration).to(torch.int16), -1))

    # vaccination: daily probability = lever intensity, among the unvaccinated not currently ill or dead
    rate = lever_per_agent(ctx, "vaccination")
    if rate is not None:
        eligible = (1 - V) * (S + E + Ia + R)
        V = V + event(ctx, eligible, "vaccination", lambda at: at(rate))

    # today's per-borough flows at the exiting agents: the reported flows (with their derivative) and the stage
    # changes the metrics roll their counts forward by; in hard mode in one index_add, in gradient modes the reported
    # flows apart (a loss on some of them then sends no zero-valued gradients to the others' exiting agents: a
    # dense zero gradient of H, and its shadow flows, every day for a loss without deaths)
    if dense:  # (`dense_exits`' flows, stacked in this order)
        flows = by_borough_at(env, None, None, flows_at, S.shape[0])
        (reported_by_borough, admissions, deaths), flows = flows[:3].unbind(0), flows[3:]
    elif native is not None:
        reported_by_borough, admissions, deaths, flows = native.reported, native.admissions, native.deaths, native.flows
    else:
        changes = [x.detach() for x in (leave_E, to_Ia, leave_Ia, to_Is, leave_Is, leave_H, to_R, isolating_here,
                                        isolating_before)]
        if ctx.sampler.differentiable:
            reported_by_borough, admissions, deaths = (by_borough_at(env, b, i, x, S.shape[0])
                                                       for x in (reported, to_H, to_D))
            flows = by_borough_at(env, b, i, torch.stack(changes), S.shape[0])
        else:
            flows = by_borough_at(env, b, i, torch.stack([reported, to_H, to_D, *changes]), S.shape[0])
            (reported_by_borough, admissions, deaths), flows = flows[:3].unbind(0), flows[3:]
    out_E, in_Ia, out_Ia, in_Is, out_Is, out_H, in_R, isolating_after, isolating_prior = flows.detach().unbind(0)
    in_H, in_D = admissions.detach(), deaths.detach()
    recent = state.reported_recent.clone()
    if ctx.clock is None:
        recent[:, t % 7] = reported_by_borough
    else:
        recent.index_copy_(1, torch.remainder(ctx.clock.to(torch.int64), 7).view(1), reported_by_borough.unsqueeze(1))
    # the counts from the infected agents only (gradient modes: `transition` gives them the derivative of the dense
    # sum, d/dp of every susceptible agent's draw)
    infected_values = new_E.detach() if dense else torch.ones(infected_b.shape) if in_place else \
        select.values_at((S if new_E is None else new_E).detach(), infected_b, infected_i)  # (new_E = 1 · S there;
    new_infections = by_borough_at(env, infected_b, infected_i, infected_values, S.shape[0])  # in place: S was 1)
    infected = new_infections.detach().to(torch.float32)
    stage_count_change = dict(S=-infected, E=infected - out_E, I_asym=in_Ia - out_Ia, I_sym=in_Is - out_Is,
                              H=in_H - out_H, R=in_R, D=in_D, isolating=isolating_after - isolating_prior)
    ctx.scratch["attributed"] = layer_attribution(infected_b, infected_i, B=S.shape[0], ctx=ctx,
                                                  infected=new_E.detach() if dense else None)
    if ctx.sampler.differentiable:
        ctx.scratch.update(new_infections=new_infections, reported=reported_by_borough, admissions=admissions,
                           deaths=deaths, stage_count_change=stage_count_change)
    else:  # stacked, as the native transition gives them: `metrics` reads them with one op each
        ctx.scratch.update(metric_flows=torch.stack([new_infections, reported_by_borough, admissions, deaths]),
                           stage_count_changes=torch.stack([stage_count_change[name] for name in COUNTED]))

    if ctx.sampler.differentiable:  # one node for the memberships' changes and the shadow flows (`shadow.py`)
        changes = native.changes if native is not None else dict(
            E=-leave_E, I_sym=to_Is - leave_Is, I_asym=to_Ia - leave_Ia, H=to_H - leave_H, R=to_R, D=to_D,
            isolating=isolating_here - isolating_before)
        after = state.replace(vaccinated=V, stage_end=stage_end, reported_recent=recent, isolate_prob=isolate_prob)
        donated = shadow.donatable(state, ctx, ctx.scratch.get("fields_packed", False))
        return owned_after_step(state, transition(state, after, exits, new_E, changes, params, ctx, donated,
                                                  infection, force, None if moved is None else
                                                  (moved.source, moved.target)), versions, ctx)

    if dense:  # (the memberships after the day, from `dense_exits`)
        after = state.replace(**dict(zip(("S", "E", "I_asym", "I_sym", "H", "R", "D", "isolating"), fields_after)),
                              vaccinated=V, stage_end=stage_end, reported_recent=recent)
        return owned_after_step(state, after, versions, ctx)

    def put(x: Tensor, values: Tensor | int, fresh: bool = False) -> Tensor:
        """x with values at the exiting agents: in place where x is a fresh temporary or this loop's own (a donated
        state, `StepContext.owns`: a [B, N] copy fewer per field and day)."""
        if not b.numel():
            return x
        values = torch.as_tensor(values, dtype=x.dtype)
        return select.put_at_(x if fresh or ctx.owns(x) else x.clone(), b, i, values)

    # hard mode: an exiting agent was in exactly one timed stage (E, I_asym, I_sym or H; never newly infected today)
    # and is now in exactly the one its flow took it to, so its memberships are the flows themselves
    after = state.replace(
        S=S - new_E, E=put(E + new_E, 0, fresh=True), I_asym=put(Ia, to_Ia), I_sym=put(Is, to_Is), H=put(H, to_H),
        R=put(R, to_R), D=put(D, to_D), vaccinated=V, isolating=put(state.isolating, isolating_here),
        stage_end=stage_end, reported_recent=recent)
    return owned_after_step(state, after, versions, ctx)


IN_PLACE = ("I_asym", "I_sym", "H", "R", "D", "isolating")  # the fields a donated state's step updates in place


def native_hard_progress(state: CovidState, force: Tensor, params: CovidParams, ctx: StepContext
                         ) -> CovidState | None:
    """`progress` in hard mode as one native call on CPU (`hard_native.hard_progress`: the infection draws at rate
    ``force`` [B, N], `StepContext.hazard_event`'s (exp(−λ) made inside the pass), and the transition; the same
    numbers as the torch ops below it in `progress`), or None where it does not apply. The fields are updated in place
    where they are this loop's own (`StepContext.owns`), else in copies."""
    env: CovidEnv = ctx.env
    t = ctx.step
    fields = {name: getattr(state, name) for name in hard_native.FIELDS}
    if not (force.dtype == torch.float32 and force.shape == state.stage_end.shape and not force.requires_grad
            and hard_native.enabled()):
        return None
    B = force.shape[0]
    # vaccination first: its eligibility reads the memberships before today's changes
    V = state.vaccinated
    vaccinating = ctx.lever("vaccination") is not None
    rate = lever_per_agent(ctx, "vaccination")
    if rate is not None:
        eligible = (1 - V) * (state.S + state.E + state.I_asym + state.R)
        V_after = V + event(ctx, eligible, "vaccination", lambda at: at(rate))
    else:
        V_after = V
    versions = {name: x._version for name, x in fields.items()}
    owned = {name: x if ctx.owns(x) else x.clone() for name, x in fields.items()}
    stage_end = state.stage_end if ctx.owns(state.stage_end) else state.stage_end.clone()
    drawn = hard_native.hard_progress(
        owned, stage_end, t, force, ctx.rng._keys(t, hard_native.STREAMS), ctx.rng.agent_base,
        env.age_group, env.borough, len(env.group_labels),
        dict(symptomatic=params.symptomatic_fraction, hosp=params.hosp_given_symptomatic, death=params.death_given_hosp),
        dict(detect=params.detection_rate, detect_asym_ratio=params.asymptomatic_detection_ratio,
             isolate=state.isolate_prob, testing=lever_per_agent(ctx, "testing_isolation"),
             efficacy_severe=params.vaccine_efficacy_severe if vaccinating else None),
        V if vaccinating else None, env.durations["E"], env.exit_durations, cache=env.native)
    if drawn is None:
        return None
    flows, (infected_b, infected_i) = drawn
    recent = state.reported_recent if ctx.owns(state.reported_recent) else ctx.own(state.reported_recent.clone())
    recent.select(1, t % 7).copy_(flows[1])  # reported (in place where the loop's own, as the fields)
    ctx.scratch.update(metric_flows=flows[:len(METRIC_FLOWS)], stage_count_changes=flows[len(hard_native.FLOWS):],
                       attributed=layer_attribution(infected_b, infected_i, B=B, ctx=ctx))
    after = state.replace(**owned, vaccinated=V_after, stage_end=ctx.own(stage_end), reported_recent=recent)
    return owned_after_step(state, after, versions, ctx)


def owned_after_step(before: CovidState, after: CovidState, versions: dict[str, int], ctx: StepContext) -> CovidState:
    """``after``, the transition's new field tensors marked as this loop's (`StepContext.own`; a field passed through
    unchanged is not: it may be the caller's). The fields updated in place (their version moved from ``versions``,
    the step's start; the new field is the tensor or, in gradient modes, an alias of it) keep their per-borough
    counts rolling (`CovidEnv.carry_counts`)."""
    moved = {}
    for name in ("S", "E", *IN_PLACE):
        x, x0 = getattr(after, name), getattr(before, name)
        if x0._version != versions.get(name, x0._version):
            moved[name] = (x0, versions[name])
        if x is not x0:
            ctx.own(x)
    if moved:
        ctx.env.carry_counts(moved)
    return after


RUNS_ABOVE = 1 << 15  # by_borough_at: slice sums over the runs of pairs above this many pairs, a scatter below


def by_borough_at(env: CovidEnv, b: Tensor, i: Tensor, values: Tensor, batch: int) -> Tensor:
    """Per-borough sums of values at agents (b, i): [..., M] -> [..., B, G] float32.

    The pairs come in `select.nonzero`'s row-major order and agents are sorted by borough, so the pairs of one
    (element, borough) are one run of the M values: above `RUNS_ABOVE` pairs, one slice sum per run (its bounds by
    one search), without gathering each agent's borough and scattering (the day's exits and infections at the peak
    of a full-NYC epidemic, ~10^5-10^6 pairs, where the gather and the scatter took 18 ms per day). The values are
    events (0 or 1 each), so their sums are exact in any order: both ways give the same numbers. b and i None: values
    are every agent's, [..., B, N] (`StepContext.sync_free`), summed over the boroughs' slices."""
    G = len(env.group_labels)
    if i is None:
        N = values.shape[-1]
        return by_borough(env, values.reshape(-1, N), torch.float32).view(*values.shape[:-1], G)
    lead, M = values.shape[:-1], values.shape[-1]
    values = values.to(torch.float32)
    if M > RUNS_ABOVE:
        N = env.num_agents
        starts = torch.tensor([row * N + a for row in range(batch) for a, _ in env.borough_slices], device=i.device)
        bounds = torch.searchsorted(i if batch == 1 else b * N + i, starts).tolist() + [M]
        runs = list(zip(bounds[:-1], bounds[1:]))
        return range_sums(values.reshape(-1, M), runs).view(*lead, batch, G)
    out = torch.zeros(*lead, batch * G, dtype=torch.float32, device=values.device)
    return scatter_sum(out, b * G + env.borough.index_select(0, i).to(torch.int64), values).view(*lead, batch, G)


def layer_attribution(b: Tensor | None, i: Tensor | None, B: int, ctx: StepContext, infected: Tensor | None = None
                      ) -> Tensor:
    """Expected split of today's infections (agents (b, i)) by layer: Σ λ_l,i / Σ_l λ_l,i -> [len(LAYERS), B] float32
    (rows in `LAYERS` order; zeros for a layer not active today); on CPU one native pass over the force's terms
    (`layer_shares_at`, the same numbers), in every mode. b and i None: the infected agents as a mask, ``infected``
    [B, N] (`StepContext.sync_free`; sums over every agent, in another order: equal to float rounding)."""
    names = ctx.scratch["layer_names"]
    device = ctx.env.agent_ids.device
    if i is None:  # the force's layer terms, summed over the infected agents (one kernel where compiled)
        shares = layer_shares(ctx.scratch["force_layers"](), infected)
    else:
        shares = layer_shares_at(ctx.scratch.get("force_terms"), b, i)
    if shares is None:
        at = At(b, i)
        parts = [ctx.scratch["layer_term"](name, at).detach().expand(b.shape) for name in names]
        total = sum(parts).clamp_min(1e-30) if parts else None
        shares = torch.stack([scatter_sum(torch.zeros(B, device=b.device), b, part / total) for part in parts]) \
            if parts else torch.zeros(0, B, device=b.device)
    if names == LAYERS:
        return shares
    rows = ctx.env.static(f"layer_rows_{'_'.join(names)}",
                          lambda: torch.tensor([LAYERS.index(name) for name in names], device=device))
    return torch.zeros(len(LAYERS), B, device=device).index_copy_(0, rows, shares)


def labour_market(state: CovidState, params: CovidParams, ctx: StepContext) -> CovidState:
    """transition (every `decision_every` days): job loss and rehiring; the dead leave the labour force. On CPU one
    native pass (`labour_native`, the same numbers and derivatives), else the torch ops of `labour_flows`."""
    if ctx.step % int(params.decision_every):
        return state
    env: CovidEnv = ctx.env
    fields = tuple(getattr(state, name) for name in labour_native.FIELDS)
    rates = tuple(getattr(params, name) for name in labour_native.RATES)
    levers = (closed_workplaces(ctx), lever_per_agent(ctx, "stimulus"), lever_per_agent(ctx, "workplace_closure"))
    has_workplace = has_workplace_as(env, torch.uint8)  # (0/1 bytes)
    moved = labour_native.labour_market(fields, has_workplace, rates, levers, ctx.rng, ctx.step, ctx.sampler,
                                        reference=labour_flows)
    employed, unemployed = moved if moved is not None else labour_flows(ctx, *fields, has_workplace, *rates, *levers)
    return state.replace(employed=employed, unemployed=unemployed)


def labour_flows(ctx: StepContext, employed: Tensor, unemployed: Tensor, on_site: Tensor, remote: Tensor, D: Tensor,
                 has_workplace: Tensor, job_loss_base: Tensor, job_loss_absent: Tensor, job_loss_closed: Tensor,
                 relief_rate: Tensor, rehire_rate: Tensor, closed: Tensor | None, stimulus: Tensor | None,
                 closure: Tensor | None) -> tuple[Tensor, Tensor]:
    """(employed, unemployed) [B, N] after the week's job losses and rehires, in torch ops (`labour_native`'s
    reference): the fields [B, N], has_workplace [N], the rates (`labour_native.RATES`) and the per-agent levers
    [B, N] or None (closed workplaces, stimulus, workplace closure)."""
    on_site_job = (1 - remote.to(torch.float32)) * has_workplace.to(torch.float32)

    def job_loss(at: At):
        """base + [absent (1 − on_site) o + closed · closed_i · o] · (1 − relief · s): a stimulus payment
        relieves the pandemic terms (demand support), not the baseline churn."""
        relief = None if stimulus is None else 1 - at(relief_rate) * at(stimulus)
        absent = at(job_loss_absent) * (1 - at(on_site.to(torch.float32))) * at(on_site_job)
        p = at(job_loss_base) + (absent if relief is None else absent * relief)
        if closed is not None:
            shut = at(job_loss_closed) * at(closed) * at(on_site_job)
            p = p + (shut if relief is None else shut * relief)
        return p

    def rehire(at: At):
        return at(rehire_rate) if closure is None else at(rehire_rate) * (1 - at(closure))

    lost = event(ctx, employed, "job-loss", job_loss)
    hired = event(ctx, unemployed, "rehire", rehire)
    alive = 1 - D
    return (employed - lost + hired) * alive, (unemployed + lost - hired) * alive


# ---- metrics ---------------------------------------------------------------------------------

# hard mode's flows and stage counts as one int64 block [K, B, G] (`PackedRecord`): name_by_borough rows, name totals
COUNT_LAYOUT = PackedLayout([f"{name}_by_borough" for name in (*METRIC_FLOWS, *STAGES)], totals=[*METRIC_FLOWS, *STAGES])
INFECTION_LAYOUT = PackedLayout([f"infections_{name}" for name in LAYERS])  # `layer_attribution`'s rows [B]


def metrics(previous: CovidState, state: CovidState, params: CovidParams, ctx: StepContext) -> Mapping[str, Tensor]:
    """Per day: totals [B] and per-borough [B, G] of flows, stage prevalence, isolating share,
    unemployment rate and on-site work share; plus the expected split of new infections by layer. Hard mode: a
    `PackedRecord` (the flows and stage counts as one block, `COUNT_LAYOUT`); gradient modes: a dict."""
    env: CovidEnv = ctx.env
    out: dict[str, Tensor] = {}
    # flows and stage counts per borough [B, G] and their totals [B]; in hard mode stacked, one op for all of them
    # (gradient modes keep them apart: a loss on some metrics then sends no zero gradients through the others)
    if ctx.sampler.differentiable:
        change = ctx.scratch.get("stage_count_change", {})

        def counts_of(name: str) -> Tensor:
            """[B, G] float32 per-borough count of a 0/1 field (exact below 2^24 agents per borough): yesterday's
            counts rolled forward by today's changes where recorded; the derivative is that of the sum over agents."""
            x = getattr(state, name)
            counts = range_sums(x, env.borough_slices, torch.float32,
                                known=env.rolled_counts(name, getattr(previous, name), change.get(name)))
            env.record_counts(name, x, counts)
            return counts

        per_borough = [ctx.scratch[key].to(torch.float32) for key in METRIC_FLOWS.values()] \
            + [counts_of(stage) for stage in STAGES]
        for name, by in zip([*METRIC_FLOWS, *STAGES], per_borough):
            out[name] = by.sum(1)
            out[f"{name}_by_borough"] = by
        isolating = counts_of("isolating")
    else:  # [8, B, G]: the `COUNTED` fields' counts, yesterday's plus today's changes where recorded
        fields = tuple(getattr(state, name) for name in COUNTED)
        # (a day that may be captured keeps no counts from day to day on the host's side: `StepContext.clock`)
        counts = env.rolled_counts(COUNTED, tuple(getattr(previous, name) for name in COUNTED),
                                   ctx.scratch.get("stage_count_changes")) if ctx.clock is None else None
        if counts is None:  # (the sums of 0/1 values: exact in any order)
            counts = field_counts(env, list(fields))
        if ctx.clock is None:
            env.record_counts(COUNTED, fields, counts)
        packed = torch.cat((ctx.scratch["metric_flows"], counts[:len(STAGES)])).to(torch.int64)  # `COUNT_LAYOUT`'s
        isolating = counts[len(STAGES)]

    has_workplace = has_workplace_as(env, state.employed.dtype)

    def labour() -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values; they change once a week
        employed, on_site = state.employed.detach(), state.on_site.detach()
        return (*labour_counts(env, state), *field_counts(env, [(employed, has_workplace), (on_site, employed)]))

    def shares(employed: Tensor, unemployed: Tensor, with_workplace: Tensor, on_site: Tensor) -> dict[str, Tensor]:
        # on-site work this week: share of employed agents with a workplace who go to it
        return dict(unemployment_rate=unemployed.sum(1) / (employed + unemployed).sum(1).clamp_min(1),
                    unemployment_rate_by_borough=unemployed / (employed + unemployed).clamp_min(1),
                    on_site_share=on_site.sum(1) / with_workplace.sum(1).clamp_min(1),
                    on_site_share_by_borough=on_site / with_workplace.clamp_min(1))

    out["isolating_share"] = isolating.sum(1) / env.num_agents
    out["isolating_share_by_borough"] = isolating / borough_divisor(env)
    labour_inputs = (state.employed, state.unemployed, state.on_site)
    if ctx.sampler.differentiable:  # the derivatives of the sums over agents, on the memoised values
        employed, unemployed, with_workplace, on_site = env.memo("labour_metrics", labour_inputs, labour,
                                                                 values_only=True)
        slices, f32 = env.borough_slices, torch.float32
        out.update(shares(range_sums(state.employed, slices, f32, known=employed),
                          range_sums(state.unemployed, slices, f32, known=unemployed),
                          range_sums(state.employed, slices, f32, known=with_workplace, weight=has_workplace),
                          range_sums(state.on_site, slices, f32, known=on_site, weight=state.employed)))
    else:  # hard mode: the shares too change once a week
        out.update(env.memo("labour_shares", labour_inputs, lambda: shares(*labour()), values_only=True))
    if ctx.sampler.differentiable:
        out.update(zip(INFECTION_LAYOUT.rows, ctx.scratch["attributed"].unbind(0)))
        return out
    return PackedRecord((COUNT_LAYOUT, packed), out, (INFECTION_LAYOUT, ctx.scratch["attributed"]))


# ---- population and model --------------------------------------------------------------------

DEFAULT_POPULATION_PATH = "populations/built/nyc_scale0.05"


def default_population(scale: float = 0.05) -> Population:
    """The NYC synthetic population at `scale` (default 5 %, built on first use under
    populations/built/), or a generated stand-in with a logged warning while the NYC builder
    (`populations.nyc`) is not installed."""
    try:
        from populations.nyc import load_or_build
    except ImportError as e:
        log.warning("populations.nyc is not importable (%s); using a generated 425,000-agent stand-in population "
                    "(agenttensor.synthetic), not the NYC census population", e)
        import sys

        print(f"note: NYC population builder not available ({e}); using synthetic:425000", file=sys.stderr)
        return synthetic(425_000, seed=0)
    path = DEFAULT_POPULATION_PATH if scale == 0.05 else f"populations/built/nyc_scale{scale:g}"
    return load_or_build(path, scale=scale, boroughs=None, seed=0)


LEVERS = (
    LeverSpec("school_closure", "share of school contacts removed (1 = schools closed)"),
    LeverSpec("workplace_closure", "share of workplaces closed (on-site work removed; closed on-site jobs risk loss)"),
    LeverSpec("stay_at_home", "share of community contacts removed; also lowers the go-to-work logit"),
    LeverSpec("transmission_reduction", "share of per-contact transmission removed (masks, distancing)",
              layers=LAYERS),
    LeverSpec("testing_isolation", "extra probability that a new infection is detected (then isolates w.p. isolate_prob)"),
    LeverSpec("vaccination", "daily probability that an eligible unvaccinated agent is vaccinated (target ages for priority)"),
    LeverSpec("stimulus", "share of a full economic impact payment in force ($1,200 per adult, CARES Act, paid from "
                          "2020-04-10): lowers the go-to-work logit and relieves pandemic job loss"),
)


def day_kind(ctx: StepContext, params: CovidParams) -> tuple[bool, bool] | None:
    """Which captured day serves this step (`agenttensor.graphs`): the steps with the same school-day and work-day
    flags take the same branches; decision days (the behaviour and the labour market) run eagerly (None)."""
    if ctx.step % int(params.decision_every) == 0:
        return None
    date = date_of(ctx.start_date, ctx.step)
    return is_school_day(date), is_work_day(date)


def make_model(behavior: BehaviorSource | None = None, scale: float = 0.05) -> Model:
    """The covid model with a behaviour source (default `HeuristicBehavior`) and the scale of its
    default NYC population."""
    behavior = behavior or HeuristicBehavior()

    def configure(options: dict) -> Model:
        """CLI: --behavior embedded|openai|vllm|heuristic, --llm-url, --llm-model, --scale."""
        from .archetype_behavior import make_behavior

        chosen = behavior
        if options.get("behavior"):
            chosen = make_behavior(options["behavior"], options.get("llm_url"), options.get("llm_model"))
        elif options.get("llm_url") or options.get("llm_model"):
            from agenttensor.errors import ConfigError

            raise ConfigError("--llm-url/--llm-model need --behavior openai or vllm")
        new_scale = options.get("scale") or scale
        if not 0 < new_scale <= 1:
            from agenttensor.errors import ConfigError

            raise ConfigError(f"--scale must be in (0, 1], got {new_scale}")
        return make_model(chosen, new_scale)

    def run_info() -> dict:
        info = {"behavior": type(behavior).__name__}
        if hasattr(behavior, "stats"):
            info["llm"] = behavior.stats
        return info

    return Model(
        name="covid",
        params_type=CovidParams,
        setup=functools.partial(setup, behavior=behavior),
        init=init,
        substeps=(
            Substep("infection_pressure", "observe", infection_pressure),
            Substep("behaviour", "decide", behaviour),
            Substep("progress", "transition", progress),
            Substep("labour_market", "transition", labour_market),
        ),
        metrics=metrics,
        default_population=functools.partial(default_population, scale),
        description=__doc__.splitlines()[0],
        levers=LEVERS,
        age_band_edges=AGE_BAND_EDGES,
        configure=configure,
        run_info=run_info,
        day_kind=day_kind,
    )


MODEL = make_model()

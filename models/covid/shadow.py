"""Gradient modes: the derivative of the infections that did *not* happen, carried through the stages.

A straight-through (or relaxed) infection draw gives every susceptible agent d(event)/dp = 1, but only
the agents actually infected get a countdown to their next stage, so the derivative held by the others
would stay in E for ever and a parameter's effect on later generations, reports, admissions and deaths
would be lost (measured on 20,000 agents over 60 days: d(deaths)/dβ at 3 % of the finite difference,
d(reported cases)/dβ at 14 %). The *shadow flows* move that derivative mass, held by agents without a
running countdown (``stage_end < 0`` before the step; ``free`` below), out of E, I_sym, I_asym and H at
the rate r = 1 / (mean of the model's own duration table) and branch it with the same age-specific
probabilities as real exits (f symptomatic; hospitalised, with vaccine protection under the vaccination
lever; died); it is reported at I entry with the detection and testing probabilities:

    out_E = free ∂E r_E,   out_Is = free ∂I_sym r_Is,   out_Ia = free ∂I_asym r_Ia,   out_H = free ∂H r_H
    to_Is = f (out_E + out_latent),   to_Ia = (1 − f)(out_E + out_latent)
    to_H = p_hosp out_Is,   to_D = p_death out_H,   reported = d_sym to_Is + d_asym to_Ia

(∂x: the derivative carried by x, whose value is 0 for these agents). An expected-value linearisation of
the untaken paths with geometric stage durations of the right means.

Along untaken paths the mass in I would isolate as real infections do (`contributions.py`: symptomatic
ones w.p. isolate_prob, asymptomatic ones if reported), removing a share η of its non-household contacts.

In households the mass does not act through the (linearised) household force: it is handed to the other
members once, with the household's attack probabilities (`attack_probabilities`), waits in
``household_exposure`` for half the source's mean infectious period, is then infected (counted in
new_infections) and passes a latent period in ``household_latent`` before it joins I (apart from E, so
that it is not handed on again: the chains are in q):

    spread_k = Σ_{j ∈ h(k), j ≠ k} [q^sym_k f_j + q^asym_k (1 − f_j)] out_E,j
    infected = household_exposure / (D̄ / 2),   out_latent = household_latent r_E

Every flow is zero-valued, so forward values are untouched; the flows are linear in the carried
derivatives with coefficients that do not depend on the parameters' derivatives (a zero value times
anything has no derivative w.r.t. that anything). So the whole step is one autograd node, `_Transition`,
which also makes the day's real changes of the memberships (S − new_E, E + new_E, each field plus its change
at the exiting agents): its forward does only that, and its backward passes each field's gradient through plus
the transposed linear map, about 30 [B, N] operations instead of the ~100 of the same arithmetic written as
zero-valued tensors (each a fresh, page-faulted [B, N] buffer: 35 MB at full NYC). The exiting agents' values
are read through `_ExitsAt`, which adds their derivatives into `_Transition`'s gradient buffers in place: each
field's gradient is written once per day, where autograd's own gathers, index_puts and subtractions had
zero-filled, scattered and added [B, N] buffers around it (full NYC: 11 [B, N] additions, 4 fills and a negation
per day; backward 0.211 → 0.186 s/day). On CPU those 30 operations run as native passes (one pass over the
agents where households are runs of agents; `shadow_native.py`, models/covid/csrc/shadow_kernel.cpp; 0.51 → 0.30
s/day for the whole full-NYC backward); the torch ops below stay the reference and the path elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from agenttensor import select, transmission
from agenttensor.sampling import EventDerivatives
from agenttensor.transmission import group_gather, range_broadcast

from . import contributions_native, shadow_native


def mean_duration(cdf: Tensor) -> float:
    """Mean of a duration table's draws d = 1 + #{k : u ≥ F_k} (days): 1 + Σ_k (1 − F_k)."""
    return 1.0 + float((1 - cdf.double()).clamp_min(0).sum())


def attack_probabilities(unit: Tensor, susceptible: Tensor, others, alpha, f_mean: float, d_sym: float,
                         d_asym: float) -> tuple[Tensor, Tensor]:
    """S_k q_k for a symptomatic and an asymptomatic source in k's household: ([B, N], [B, N]).

        q_k = 1 − (1 − T_k)(1 − T_k T̄_k)^{s_k},   T^sym_k = 1 − exp(−u_k D_sym),   T^asym_k = 1 − exp(−u_k α D_asym)

    unit [B | 1, N]: u_k, the household hazard on k per unit of one other member's infectiousness today
    (β m w_h σ_k r_k / (n_h − 1)); D the mean I durations; s_k the other susceptible members besides k and
    the source; T̄ = f̄ T^sym + (1 − f̄) T^asym (chains through one intermediate). ``others``: Σ over the
    other members of each agent's household, [B, N] -> [B, N].

    Why: an untaken infection of j changes the outcome by the *finite* jump f(1) − f(0), which in a household
    saturates — member k is infected w.p. T = 1 − e^(−Λ), not Λ, and cannot infect j back. The pathwise
    derivative through the household force instead propagated it as an infinitesimal infectiousness acting on
    members who stay susceptible along the sampled path: each member received Λ (≈ 1.9 for a pair at the
    fitted NYC fall-2020 transmission) and echoed part of it back to j, a chain with a reproduction number
    above 1 inside the household, which made gradients 1.2–1.3× the finite difference at 8 weeks and 3.2–3.5×
    at 16 (`benchmarks/gradient_horizon.py`; 0.87–0.96× with this).
    """
    with torch.no_grad():  # in place: at city scale every [B, N] temporary is ~35 MB of page faults
        T_sym = (unit * -d_sym).exp_().neg_().add_(1)  # 1 − exp(−u D_sym)
        T_asym = (unit * (-alpha * d_asym)).exp_().neg_().add_(1)
        T_mid = torch.add(T_sym * f_mean, T_asym, alpha=1 - f_mean)
        chain = others(susceptible).sub_(1).clamp_min_(0)  # other susceptible members besides k and the source

        def attack(T: Tensor) -> Tensor:  # S_k q_k = S_k [1 − (1 − T)(1 − T T̄)^s]
            escape = torch.pow((T * T_mid).neg_().add_(1), chain)  # [B, N]
            return escape.mul_(T.neg().add_(1)).neg_().add_(1).mul_(susceptible)

        return attack(T_sym), attack(T_asym)


@dataclass
class UnitHazard:
    """u_k, the household hazard on k per unit of one other member's infectiousness today, as its factors:
    u_k = σ_k ((scale[h_k] kept_1,k) kept_2,k), the numbers `infection_pressure`'s household term gives. Kept
    factored, so that no [B, N] of it is made and saved for the backward pass every day (σ and the kept shares of
    the transmission-reduction levers are memoised across days; on CPU the native pass multiplies them out per
    chunk of agents)."""

    sigma: Tensor  # [B | 1, N] susceptibility
    scale: Tensor  # [B | 1, H + 1] β m w_h / (n_h − 1) per household slot
    slot: Tensor  # [N] household slots
    kept: tuple[Tensor, ...] = ()  # [B | 1, N] each: 1 − r of the household and the all-layer reductions
    sigma_table: Tensor | None = None  # [B | 1, A] where σ is this table at the agents' age groups (the native pass reads
    # one byte per agent then), else None

    def dense(self) -> Tensor:
        """u [B | 1, N]."""
        value = group_gather(self.scale, self.slot)
        for x in self.kept:
            value = value * x
        return self.sigma * value


@dataclass
class ShadowConstants:
    """Everything the backward pass needs besides the saved [B, N] tensors (small tables, detached)."""

    env: Any  # CovidEnv
    slot: int  # today's column of reported_recent (step % 7)
    symptomatic: Tensor  # [A] P(symptomatic | infected) by age group
    hosp_given_symptomatic: Tensor  # [A]
    death_given_hosp: Tensor  # [A]
    detection_rate: Tensor | float  # scalar or [B, 1]
    asymptomatic_detection_ratio: Tensor | float
    vaccine_efficacy_severe: Tensor | float
    asymptomatic_infectiousness: Tensor | float
    susceptibility: Tensor | None = None  # [B | 1, A]: σ by age group where σ is that table at the age groups (`UnitHazard`)


def _detached(x):
    return x.detach() if isinstance(x, Tensor) else x


def _combine(*terms: tuple[float | Tensor, Tensor | None]) -> Tensor | None:
    """Σ c · x over the terms whose x is not None (None: no gradient reached that output); None if all are."""
    out = None
    for c, x in terms:
        if x is None:
            continue
        if out is None:
            out = x * c
        elif isinstance(c, (int, float)):
            out.add_(x, alpha=c)
        else:
            out.add_(x * c)
    return out


EXIT_FIELDS = ("E", "I_asym", "I_sym", "H", "isolating")  # the fields read at today's exiting agents
STAGES = ("S", "E", "I_sym", "I_asym", "H", "R", "D", "isolating")  # the fields `transition` writes
# the fields `transition` may update in place when the loop owns them (`StepContext.owns`): no autograd node may save
# them (inside a checkpointed segment an in-place change of a saved tensor is not caught by its version counter, it
# silently changes the recomputed gradients). I_sym, I_asym and isolating are read by the own contributions' node,
# which saves them packed in one byte (`contributions_native.pack`) where it can: only then may they be updated
DONATABLE = ("H", "R", "D")
DONATABLE_IF_PACKED = ("I_sym", "I_asym", "isolating")


def donatable(state, ctx, packed: bool) -> tuple[str, ...]:
    """The fields of ``state`` that `transition` may update in place today: the loop's own (`StepContext.owns`) of
    `DONATABLE`, and of `DONATABLE_IF_PACKED` where the own contributions' node saved them packed."""
    names = DONATABLE + (DONATABLE_IF_PACKED if packed else ())
    return tuple(name for name in names if ctx.owns(getattr(state, name)))


# Gradient buffers a node made and handed on as one input's gradient only (nobody else holds them): the contributions'
# node registers the derivatives it returns for its pass-through fields, so that `_ExitsAt` adds the exiting agents'
# part into the one for isolating in place (it reaches `_ExitsAt` through `_Transition`'s pass-through; the engine
# hands on a sum of several gradients as a new tensor, which is not registered). Saves a [B, N] copy per day.
# `_Transition` registers the derivatives it makes for the fields, so that the day before's writes its own over them
# (`_exclusive`). The registry is `agenttensor.select`'s (id -> tensor, held weakly).
EXCLUSIVE_GRADIENTS = select.EXCLUSIVE_GRADIENTS


@dataclass
class Exits:
    """Today's exiting agents (b, i) [M] and their values of `EXIT_FIELDS` ([M] each, with derivative); in gradient
    modes also the fields as `transition` must read them (``fields``) and the buffers it hands back (``handoff``)."""

    b: Tensor
    i: Tensor
    leaving: dict[str, Tensor]
    fields: dict[str, Tensor] | None = None
    handoff: dict[str, Tensor] | None = None
    moved: tuple[Tensor, Tensor] | None = None  # S − new_E and E + new_E where the infection draws made them
    timed_flags: Tensor | None = None  # [B, N] uint8: bit 3 stage_end ≥ 0, bit 4 S, before the step (saved in their place)


class _ExitsAt(torch.autograd.Function):
    """Forward: each field unchanged (for `_Transition`) and its values at (b, i). Backward: the two derivatives
    added — into `_Transition`'s own fresh gradient buffer where that is what arrives (``handoff``), so a field's
    gradient is written once per day rather than zero-filled, scattered and added by autograd (a [B, N] fill and
    two or three [B, N] additions per field); the buffers it made or was handed are left in ``made`` for the node
    before it (the own contributions', which passes I_sym, I_asym and isolating through and adds its own part)."""

    @staticmethod
    def forward(ctx, handoff: dict, made: dict | None, b: Tensor, i: Tensor, *fields: Tensor):
        ctx.handoff, ctx.made, ctx.shape = handoff, made, fields[0].shape
        ctx.save_for_backward(b, i)
        ctx.set_materialize_grads(False)
        return (*[x.view_as(x) for x in fields], *select.values_at_fields(fields, b, i))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        b, i = ctx.saved_tensors
        dense, at_exits = grads[:len(grads) // 2], grads[len(grads) // 2:]
        out, targets, added = [], [], []
        for name, g, g_exits in zip(EXIT_FIELDS, dense, at_exits):
            # `_Transition`'s own buffer, or one its maker handed to nobody else (else it may be shared)
            ours = g is not None and (g is ctx.handoff.get(name) or select.is_exclusive(g))
            if g_exits is not None:
                if g is None:
                    g = g_exits.new_zeros(ctx.shape)
                elif not ours:
                    g = g.clone()
                ours = True
                targets.append(g)
                added.append(g_exits)
            if ours and ctx.made is not None:  # a buffer nobody else reads: the next node may add into it
                ctx.made[name] = g
            out.append(g)
        select.put_at_fields_(targets, b, i, added, accumulate=True)  # (one pass for every field)
        ctx.handoff.clear()
        return (None, None, None, None, *out)


def gather_exits(fields: dict[str, Tensor], b: Tensor, i: Tensor, differentiable: bool,
                 made: dict | None = None) -> Exits:
    """The values of `EXIT_FIELDS` (``fields``: [B, N] each) at the exiting agents (b, i); in gradient modes through
    `_ExitsAt`, for `transition`. ``made``: a dict in which the backward pass leaves, per field, the gradient buffer
    it returns where it made that buffer (nobody else reads it: the node that produced the field may add into it,
    `contributions.Contributions.handoff`)."""
    if not differentiable:
        return Exits(b, i, {name: select.values_at(fields[name], b, i) for name in EXIT_FIELDS})
    handoff: dict[str, Tensor] = {}
    out = _ExitsAt.apply(handoff, made, b, i, *[fields[name] for name in EXIT_FIELDS])
    k = len(EXIT_FIELDS)
    return Exits(b, i, dict(zip(EXIT_FIELDS, out[k:])), dict(zip(EXIT_FIELDS, out[:k])), handoff)


class _Transition(torch.autograd.Function):
    """The day's transition of the memberships in gradient modes, with the shadow flows. Forward: S − new_E,
    E + new_E and every field plus its change at the exiting agents (index_put with accumulate); exposure,
    latent and the counters unchanged (the flows are zero-valued). Backward: each field's gradient passed
    through plus the transpose of the shadow flows' linear map (module docstring), written once per field; the
    changes' gradients are the incoming ones at (b, i); with the infection event's derivatives (straight-through,
    `Sampler.hazard_event_and_derivatives`: no event node), S's gradient plus mask · d new_E and the force of
    infection's, d new_E · S · exp(−λ)."""

    @staticmethod
    def forward(ctx, k: ShadowConstants, exits: Exits, donated: tuple[str, ...], slot: Tensor, sigma: Tensor,
                scale: Tensor, kept_1: Tensor | None, kept_2: Tensor | None, susceptible: Tensor,
                stage_end: Tensor, vaccinated: Tensor | None, testing: Tensor | None, infection_mask: Tensor | None,
                survival: Tensor | None, hazard: Tensor | None, new_E: Tensor, infections: Tensor,
                exposure0: Tensor, latent0: Tensor, reported: Tensor, admissions: Tensor, deaths: Tensor,
                recent: Tensor, *fields_and_changes: Tensor):
        ctx.k, ctx.handoff = k, exits.handoff
        ctx.set_materialize_grads(False)
        b, i = exits.b, exits.i
        ctx.slot = slot  # the environment's (the unit hazard's factors are saved tensors: checkpointing drops them)
        ctx.hazard_shape = None if hazard is None else hazard.shape
        ctx.save_for_backward(sigma, scale, kept_1, kept_2, susceptible, exits.timed_flags if stage_end is None
                              else stage_end, vaccinated, testing, infection_mask,
                              survival if ctx.needs_input_grad[14] else None, b, i)  # (input 14: hazard)
        n = len(STAGES)
        before, changes = dict(zip(STAGES, fields_and_changes[:n])), dict(zip(STAGES[1:], fields_and_changes[n:]))
        # fresh tensors, or S and E themselves where the draws moved the infected agents in place (the loop's own
        # fields: their aliases, as for a donated field below)
        S, E = (before["S"] - new_E, before["E"] + new_E) if exits.moved is None else (x.detach() for x in exits.moved)
        after = {"S": S, "E": E}
        for name in STAGES[2:]:  # a donated field (the loop's own, `StepContext.owns`) in place: no [B, N] copy
            after[name] = before[name].detach() if name in donated else before[name].clone()
        select.put_at_fields_(list(after.values())[1:], b, i, [changes[name] for name in STAGES[1:]], accumulate=True)
        return (*after.values(), exposure0, latent0, infections.clone(), reported, admissions, deaths, recent)

    @staticmethod
    def backward(ctx, gS, gE, gIs, gIa, gH, gR, gD, g_isolating, g_exposure, g_latent, g_infections, g_reported,
                 g_admissions, g_deaths, g_recent):
        k: ShadowConstants = ctx.k
        env = k.env
        sigma, scale, kept_1, kept_2, susceptible, stage_end, vaccinated, testing, mask, survival, b, i = ctx.saved_tensors
        timed_flags = stage_end if stage_end.dtype == torch.uint8 else None  # stage_end's sign in bit 3
        unit = UnitHazard(sigma, scale, ctx.slot, tuple(x for x in (kept_1, kept_2) if x is not None), k.susceptibility)

        def per_agent(g: Tensor | None) -> Tensor | None:  # adjoint of the per-borough sums: [B, G] -> [B, N]
            return None if g is None else range_broadcast(g, env.borough_slices)

        g_report = _combine((1.0, g_reported), (1.0, None if g_recent is None else g_recent[:, k.slot]))
        counts = env.memo("age_group_counts", (env.age_group,),  # agents per age group [A]: f̄ without an [N] pass
                          lambda: torch.bincount(env.age_group.long(), minlength=k.symptomatic.numel()).double())
        f_mean = float((counts * k.symptomatic.double()).sum() / counts.sum()) if env.age_group.numel() else 0.0
        d_sym, d_asym = mean_duration(env.durations["I_sym"]), mean_duration(env.durations["I_asym"])
        rate = {stage: 1.0 / mean_duration(cdf) for stage, cdf in env.durations.items()}
        half_infectious = 0.5 * (f_mean * d_sym + (1 - f_mean) * d_asym)
        incoming = dict(gS=gS, gE=gE, gIs=gIs, gIa=gIa, gH=gH, gR=gR, gD=gD, g_exposure=g_exposure, g_latent=g_latent,
                        g_infections=g_infections, g_report=g_report, g_admissions=g_admissions, g_deaths=g_deaths)
        args = (k, unit, susceptible, None if timed_flags is not None else stage_end, vaccinated, testing, incoming,
                f_mean, d_sym, d_asym, half_infectious, rate, mask, survival, ctx.needs_input_grad[15])
        # the exiting agents' gradients first: the native pass may write the new ones over gE, gI_sym, ...
        arrived = [g for g in (gE, gIs, gIa, gH, gR, gD, g_isolating) if g is not None]
        read = iter(select.values_at_fields(arrived, b, i))
        at_exits = [None if g is None else next(read) for g in (gE, gIs, gIa, gH, gR, gD, g_isolating)]
        handed: dict = {}  # the force's household-term weight sums, where the native pass makes them (`hand_weight_sums`)
        fused = shadow_native.backward(*args, reuse=_exclusive(incoming), timed_flags=timed_flags,
                                       household_weight_sums=handed)
        if fused is None:  # the same map in torch ops
            fused = _transition_backward(*args, timed_flags=timed_flags)
        g_E0, g_Is0, g_Ia0, g_H0, g_exposure0, g_latent0, g_new_E, g_S0, g_hazard = fused
        # made here (or registered already, and written over), handed on as one input's gradient: nobody else holds
        # it. (The torch ops may pass gS through as d S0: the caller's, not registered.)
        made = (g_E0, g_Is0, g_Ia0, g_H0, g_exposure0, g_latent0, g_S0 if mask is not None and g_S0 is not gS else None)
        for g in made:
            if g is not None:
                EXCLUSIVE_GRADIENTS[id(g)] = g
        if g_hazard is not None and g_hazard.shape != ctx.hazard_shape:
            g_hazard = g_hazard.sum_to_size(ctx.hazard_shape)
        elif g_hazard is not None and "sums" in handed:  # the force's backward need not sum them again
            transmission.hand_weight_sums(g_hazard, ctx.slot, sigma, unit.kept, handed["sums"])
        if mask is None:  # S's gradient passes through (the infection event's node adds its own: relaxed samplers)
            g_S0 = gS
        ctx.handoff.update((name, g) for name, g in (("E", g_E0), ("I_sym", g_Is0), ("I_asym", g_Ia0), ("H", g_H0))
                           if g is not None)
        return (None,) * 14 + (g_hazard, g_new_E, None, g_exposure0, g_latent0, g_reported, g_admissions, g_deaths,
                               g_recent, g_S0, g_E0, g_Is0, g_Ia0, g_H0, gR, gD, g_isolating, *at_exits)


def _exclusive(incoming: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """The incoming [B, N] gradients of `shadow_native.REUSABLE` that nobody reads after `_Transition`'s backward: buffers
    registered in `EXCLUSIVE_GRADIENTS` (the day after's transition made them, the exits and the contributions added
    into them in place, the engine handed them on unchanged), each a buffer of its own (no other incoming gradient
    shares its memory). The native pass writes its outputs over them."""
    dense = {name: g for name, g in incoming.items() if g is not None}
    pointers = [g.data_ptr() for g in dense.values()]
    return {name: g for name, g in dense.items() if name in shadow_native.REUSABLE.values()
            and select.is_exclusive(g) and g._base is None and pointers.count(g.data_ptr()) == 1}


def _transition_backward(k: ShadowConstants, unit: UnitHazard, susceptible: Tensor | None, stage_end: Tensor | None,
                         vaccinated: Tensor | None, testing: Tensor | None, g: dict[str, Tensor | None], f_mean: float,
                         d_sym: float, d_asym: float, half_infectious: float,
                         rate: dict[str, float], infection_mask: Tensor | None = None,
                         survival: Tensor | None = None, want_new_E: bool = True,
                         timed_flags: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """`_Transition`'s derivatives for E, I_sym, I_asym, H, exposure, latent (before the step) and new_E (None unless
    ``want_new_E``) in torch ops (the reference for shadow_kernel.cpp; the path off CPU): every returned tensor is a
    fresh buffer; with ``infection_mask`` (the infection event's d new_E / d S,
    `Sampler.hazard_event_and_derivatives`), S's: gS + mask · d new_E (else None); with ``survival`` (exp(−λ): d new_E /
    d λ = S · survival), the force of infection's: d new_E · S · survival (else None). ``stage_end`` None:
    ``timed_flags`` carries its sign (bit 3: a countdown runs); ``susceptible`` None: they carry S (bit 4)."""
    env = k.env
    if susceptible is None:  # S in the flags' bit 4 (the transition saved them in its place)
        susceptible = (timed_flags >> 4 & 1).to(torch.float32)
    gS, gE, gIs, gIa, gH, gR, gD = (g[name] for name in ("gS", "gE", "gIs", "gIa", "gH", "gR", "gD"))
    g_exposure, g_latent = g["g_exposure"], g["g_latent"]

    def per_agent(x: Tensor | None) -> Tensor | None:
        return None if x is None else range_broadcast(x, env.borough_slices)

    f = k.symptomatic[env.age_group]  # [N]
    free = (stage_end < 0).to(susceptible.dtype) if stage_end is not None else \
        1 - (timed_flags >> 3 & 1).to(susceptible.dtype)
    infections = per_agent(g["g_infections"])
    g_new_E = _combine((1.0, gE), (-1.0, gS), (1.0, infections))
    # infected = exposure / half_infectious: leaves S and household_exposure, enters household_latent, counted
    g_infected = _combine((-1.0, gS), (1.0, infections), (-1.0, g_exposure), (1.0, g_latent))
    g_exposure0 = _combine((1.0, g_exposure), (1 / half_infectious, g_infected))
    # entering I (out_E + out_latent), split by f; reported with the detection probabilities
    g_to_Is, g_to_Ia = gIs, gIa
    if g["g_report"] is not None:
        detect_sym = k.detection_rate
        detect_asym = k.detection_rate * k.asymptomatic_detection_ratio
        if testing is not None:
            extra = testing.flatten(1).index_select(1, env.cell)  # [B, N]
            detect_sym = detect_sym + extra * (1 - detect_sym)
            detect_asym = detect_asym + extra * (1 - detect_asym)
        report = per_agent(g["g_report"])
        g_to_Is = _combine((1.0, gIs), (detect_sym, report))
        g_to_Ia = _combine((1.0, gIa), (detect_asym, report))
    if g_to_Is is None and g_to_Ia is None:
        g_enter = None
    elif g_to_Ia is None:
        g_enter = g_to_Is * f
    elif g_to_Is is None:
        g_enter = g_to_Ia * (1 - f)
    else:
        g_enter = (g_to_Is - g_to_Ia).mul_(f).add_(g_to_Ia)
    g_latent0 = _combine((1 - rate["E"], g_latent), (rate["E"], g_enter))
    # E exits: into I, minus out of E, plus the mass handed to household members
    g_spread = None
    if g_exposure is not None:
        others = env.household.others_sum
        q_sym, q_asym = attack_probabilities(unit.dense(), susceptible, others, k.asymptomatic_infectiousness, f_mean,
                                             d_sym, d_asym)
        from_sym = others(q_sym.mul_(g_exposure))
        g_spread = others(q_asym.mul_(g_exposure))
        g_spread = (from_sym - g_spread).mul_(f).add_(g_spread)  # f others(q_sym g) + (1 − f) others(q_asym g)
        del q_sym, q_asym, from_sym
    g_out_E = _combine((1.0, g_enter), (-1.0, gE), (1.0, g_spread))
    # I_sym exits: to H (admissions) w.p. p_hosp, else to R
    group = env.age_group
    g_to_H = _combine((1.0, gH), (-1.0, gR), (1.0, per_agent(g["g_admissions"])))
    p_hosp = k.hosp_given_symptomatic[group]
    if vaccinated is not None:
        p_hosp = p_hosp * (1 - k.vaccine_efficacy_severe * vaccinated)
    g_out_Is = _combine((1.0, gR), (-1.0, gIs), (p_hosp, g_to_H))
    g_out_Ia = _combine((1.0, gR), (-1.0, gIa))
    g_to_D = _combine((1.0, gD), (-1.0, gR), (1.0, per_agent(g["g_deaths"])))
    g_out_H = _combine((1.0, gR), (-1.0, gH), (k.death_given_hosp[group], g_to_D))

    def through(g_out: Tensor | None, r: float, g_field: Tensor | None) -> Tensor | None:
        """g_field + d/d(carried x) of free · x · r (g_out is None only where g_field is)."""
        return None if g_out is None else _combine((1.0, g_out.mul_(free).mul_(r)), (1.0, g_field))

    g_S0 = None
    if infection_mask is not None and (gS is not None or g_new_E is not None):
        via_event = None if g_new_E is None else torch.where(infection_mask, g_new_E, 0.0)
        g_S0 = gS if via_event is None else via_event if gS is None else gS + via_event
    g_hazard = None if survival is None or g_new_E is None else g_new_E * susceptible * survival
    return (through(g_out_E, rate["E"], gE), through(g_out_Is, rate["I_sym"], gIs),
            through(g_out_Ia, rate["I_asym"], gIa), through(g_out_H, rate["H"], gH), g_exposure0, g_latent0,
            g_new_E if want_new_E else None, g_S0, g_hazard)


def transition(before, after, exits: Exits, new_E: Tensor | None, changes: dict[str, Tensor], params, ctx,
               donated: tuple[str, ...] = (), infection: EventDerivatives | None = None, hazard: Tensor | None = None,
               moved: tuple[Tensor, Tensor] | None = None):
    """Gradient modes: ``after`` (``CovidState``, its other fields already set) with S, E, I_sym, I_asym, H, R, D and
    isolating from ``before``, today's infections ``new_E`` [B, N] and the ``changes`` [M] at the exiting agents
    (``exits``, from `gather_exits`), and with the shadow flows attached (module docstring). ``infection``: the
    infection event's derivatives (`StepContext.hazard_event_and_derivatives`; new_E then carries no graph and this
    node is its only differentiable consumer) w.r.t. S, which this node adds into S's, and w.r.t. the force of
    infection ``hazard``, whose gradient it returns: no event node reads d new_E, S and exp(−λ) again. ``moved``:
    S − new_E and E + new_E (fresh tensors, values) where the draws made them in their pass (new_E None, ``infection``
    given: `StepContext.hazard_move_and_derivatives`). Needs ``ctx.scratch["household_unit_hazard"]`` from
    `infection_pressure` and today's counters in ``ctx.scratch`` (``new_infections`` the infected agents' per-borough
    count [B, G]: it gets new_E's derivative here)."""
    k = ShadowConstants(
        env=ctx.env, slot=ctx.step % 7, symptomatic=params.symptomatic_fraction.detach(),
        hosp_given_symptomatic=params.hosp_given_symptomatic.detach(), death_given_hosp=params.death_given_hosp.detach(),
        detection_rate=_detached(params.detection_rate),
        asymptomatic_detection_ratio=_detached(params.asymptomatic_detection_ratio),
        vaccine_efficacy_severe=_detached(params.vaccine_efficacy_severe),
        asymptomatic_infectiousness=_detached(params.asymptomatic_infectiousness),
        susceptibility=ctx.scratch["household_unit_hazard"].sigma_table)
    vaccinated = before.vaccinated.detach().to(torch.float32) if ctx.lever("vaccination") is not None else None
    testing = ctx.lever("testing_isolation")
    fields = [exits.fields[name] if name in exits.fields else getattr(before, name) for name in STAGES]
    unit: UnitHazard = ctx.scratch["household_unit_hazard"]
    if moved is not None:
        if infection is None or new_E is not None:
            raise ValueError("transition: `moved` comes with the infection's derivatives and without new_E")
        exits = dataclasses.replace(exits, moved=moved)
    timed_flags = ctx.scratch.get("timed_flags")  # stage_end's sign, saved in its place (it may have been updated
    if timed_flags is not None:  # in place already: `progress`)
        exits = dataclasses.replace(exits, timed_flags=timed_flags)
    out = _Transition.apply(
        k, exits, donated, unit.slot, unit.sigma, unit.scale, *(list(unit.kept) + [None, None])[:2],
        None if timed_flags is not None else before.S.detach().to(torch.float32),  # (S: the flags' bit 4)
        None if timed_flags is not None else before.stage_end, vaccinated, None if testing is None else testing.detach(),
        *((None, None, None) if infection is None else (infection.where_mask, infection.survival, hazard)), new_E,
        ctx.scratch["new_infections"].detach(),
        before.household_exposure, before.household_latent, ctx.scratch["reported"], ctx.scratch["admissions"],
        ctx.scratch["deaths"], after.reported_recent, *fields, *[changes[name] for name in STAGES[1:]])
    S, E, I_sym, I_asym, H, R, D, isolating, exposure, latent, infections, reported, admissions, deaths, recent = out
    ctx.scratch.update(new_infections=infections, reported=reported, admissions=admissions, deaths=deaths)
    if ctx.scratch.get("live_flags") is not None:  # the own contributions' packed flags, now of the new fields
        contributions_native.carry(ctx.scratch.pop("live_flags"), exits.b, exits.i, I_sym, I_asym, isolating,
                                   *((after.stage_end, ctx.scratch.get("infected"), S) if timed_flags is not None
                                     else ()))
    return after.replace(S=S, E=E, I_sym=I_sym, I_asym=I_asym, H=H, R=R, D=D, isolating=isolating,
                         reported_recent=recent, household_exposure=exposure, household_latent=latent)

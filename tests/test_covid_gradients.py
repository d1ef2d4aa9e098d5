"""Gradient-mode correctness of the covid model against finite differences on common random numbers."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import torch

import agenttensor as at
from agenttensor import Hard, StraightThrough, select
from agenttensor.model import StepContext
from agenttensor.rng import Randomness
from agenttensor.transmission import range_sums
from models.covid import model as covid
from models.covid import shadow
from models.covid.model import MODEL, CovidParams

START = dt.date(2020, 9, 13)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def population():
    return at.synthetic(20_000, seed=1)


def moderate(**changes) -> CovidParams:
    """A non-saturating epidemic (a few % infected in 5 weeks), as in NYC in fall 2020."""
    return CovidParams(**{"initial_prevalence": 0.005, "transmission_scale": 0.3, "initial_immunity": 0.2, **changes})


def test_force_gradient_is_exact_for_parameters_inside_the_group_sums(population):
    """λ is linear in the isolation effectiveness η at a fixed state: d(Σ_S λ)/dη from autograd equals the
    central difference to float precision (each source's derivative is counted once: the sparse forward
    sum carries no gradient, the dense term does)."""
    params = moderate()
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    state = at.simulate(MODEL, None, params, steps=6, seeds=[0], env=env, start_date=START, progress=False).final_state
    assert state.isolating.sum() > 0
    rng = Randomness.for_agents([0], env.agent_ids)

    def force(eta, sampler):
        ctx = StepContext(step=6, env=env, rng=rng, sampler=sampler, start_date=START, schedule=None)
        s = state.replace(**{k: v.float() for k, v in state.tensors().items() if v.dtype == torch.uint8}) \
            if sampler.differentiable else state
        covid.infection_pressure(s, params.as_tensors().replace(isolation_effectiveness=eta), ctx)
        return (ctx.scratch["force"] * state.S.float()).sum()

    eta = torch.tensor(0.8, requires_grad=True)
    force(eta, StraightThrough()).backward()
    with torch.no_grad():
        fd = (force(torch.tensor(0.85), Hard()) - force(torch.tensor(0.75), Hard())) / 0.1
    assert eta.grad.item() < 0
    assert eta.grad.item() == pytest.approx(fd.item(), rel=1e-3)


@pytest.mark.slow
def test_gradients_through_later_generations_match_finite_differences(population):
    """Straight-through d(outcome)/d(β) over 35 days (several generations; 8 seeds, common random numbers)
    agrees with central finite differences for new infections and reported cases: the derivative of
    infections that did not happen is carried through the stages (`shadow_flows`). Without it the
    gradient of reported cases was 14 % of the finite difference (60 days)."""
    from agenttensor.calibration import sensitivities

    table = sensitivities(MODEL, population, moderate(), outcomes={"infections": "new_infections",
                                                                   "reported": "reported_cases"},
                          wrt=["transmission_scale", "isolation_effectiveness"], steps=35, seeds=list(range(8)),
                          start_date=START, fd_steps={"transmission_scale": 0.03, "isolation_effectiveness": 0.1})
    for row in table.iter_rows(named=True):
        assert row["rel_diff"] < 0.2, row
    beta = table.filter((table["wrt"] == "transmission_scale") & (table["outcome"] == "reported")).row(0, named=True)
    assert beta["gradient"] > 0 and beta["rel_diff"] < 0.1, beta


def test_shadow_flows_leave_the_forward_pass_unchanged(population):
    """Gradient mode with the shadow flows gives bit-identical metrics to hard mode."""
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    hard = at.simulate(MODEL, None, params, steps=30, seeds=[0, 1], env=env, start_date=START, progress=False)
    beta = torch.tensor(0.3, requires_grad=True)
    soft = at.simulate(MODEL, None, params.replace(transmission_scale=beta), steps=30, seeds=[0, 1], env=env,
                       start_date=START, progress=False, sampler=StraightThrough())
    for name in ("new_infections", "reported_cases", "hospital_admissions", "deaths", "I_sym", "R"):
        assert torch.equal(hard[name].float(), soft[name].detach().float()), name
    soft["deaths"].sum().backward()
    assert beta.grad.item() > 0


def test_checkpointed_gradients_equal_the_full_graph(population):
    """grad_checkpoint_every=k (segment inputs compacted to uint8 values + derivative carriers) gives the
    gradients of the uncheckpointed run. Each run on an environment of its own: the memos are filled during the
    checkpointed forward pass and read by its recomputation, which must save the same tensors (a memo computed with
    autograd on had saved one more in the forward pass)."""
    params = moderate(initial_prevalence=0.01)
    grads = []
    for every in (None, 4):
        env = MODEL.setup(population, params.as_tensors(), "cpu")
        beta = torch.tensor(0.3, requires_grad=True)
        eta = torch.tensor(0.8, requires_grad=True)
        res = at.simulate(MODEL, None, params.replace(transmission_scale=beta, isolation_effectiveness=eta), steps=18,
                          seeds=[0, 1], env=env, start_date=START, progress=False, sampler=StraightThrough(),
                          grad_checkpoint_every=every)
        (res["reported_cases"].sum() + res["deaths"].sum()).backward()
        grads.append((beta.grad.item(), eta.grad.item()))
    assert grads[0][0] > 0 and grads[0][1] < 0
    assert grads[1] == pytest.approx(grads[0], rel=1e-5)


def explicit_shadow_flows(before, after, params, ctx):
    """Reference for `models.covid.shadow`: the shadow flows written as zero-valued tensors ``x − x.detach()``
    times their coefficients, differentiated by autograd (how they were computed before the hand-written
    backward)."""
    from models.covid.shadow import attack_probabilities, mean_duration

    env = ctx.env
    free = (before.stage_end < 0).float()

    def mass(x):
        return free * (x - x.detach())

    rate = {stage: 1.0 / mean_duration(cdf) for stage, cdf in env.durations.items()}
    f = params.symptomatic_fraction[env.age_group]
    f_mean = float(f.detach().mean())
    d_sym, d_asym = mean_duration(env.durations["I_sym"]), mean_duration(env.durations["I_asym"])
    out_E = mass(before.E) * rate["E"]
    others = env.household.others_sum
    q_sym, q_asym = attack_probabilities(ctx.scratch["household_unit_hazard"].dense(), before.S.detach(), others,
                                         float(params.asymptomatic_infectiousness), f_mean, d_sym, d_asym)
    spread = q_sym * others(out_E * f.detach()) + q_asym * others(out_E * (1 - f.detach()))
    infected = before.household_exposure / (0.5 * (f_mean * d_sym + (1 - f_mean) * d_asym))
    out_latent = before.household_latent * rate["E"]
    to_Is = (out_E + out_latent) * f
    to_Ia = out_E + out_latent - to_Is
    out_Is, out_Ia, out_H = mass(before.I_sym) * rate["I_sym"], mass(before.I_asym) * rate["I_asym"], mass(before.H) * rate["H"]
    p_hosp = params.hosp_given_symptomatic[env.age_group]
    if ctx.lever("vaccination") is not None:
        p_hosp = p_hosp * (1 - params.vaccine_efficacy_severe * before.vaccinated)
    to_H, to_D = out_Is * p_hosp, out_H * params.death_given_hosp[env.age_group]
    detect_sym = params.detection_rate
    detect_asym = params.detection_rate * params.asymptomatic_detection_ratio
    testing = covid.lever_per_agent(ctx, "testing_isolation")
    if testing is not None:
        detect_sym, detect_asym = detect_sym + testing * (1 - detect_sym), detect_asym + testing * (1 - detect_asym)
    reported = covid.by_borough(env, to_Is * detect_sym + to_Ia * detect_asym)
    recent = after.reported_recent.clone()
    recent[:, ctx.step % 7] = recent[:, ctx.step % 7] + reported
    ctx.scratch.update(new_infections=ctx.scratch["new_infections"] + covid.by_borough(env, infected),
                       reported=ctx.scratch["reported"] + reported,
                       admissions=ctx.scratch["admissions"] + covid.by_borough(env, to_H),
                       deaths=ctx.scratch["deaths"] + covid.by_borough(env, to_D))
    return after.replace(S=after.S - infected, E=after.E - out_E, I_sym=after.I_sym + to_Is - out_Is,
                         I_asym=after.I_asym + to_Ia - out_Ia, H=after.H + to_H - out_H,
                         R=after.R + (out_Is - to_H) + out_Ia + (out_H - to_D), D=after.D + to_D,
                         reported_recent=recent, household_exposure=before.household_exposure - infected + spread,
                         household_latent=before.household_latent - out_latent + infected)


def plain_gather_exits(fields, b, i, differentiable, made=None):
    """Reference for `gather_exits`: the values at the exiting agents by plain indexing (autograd's own backward)."""
    return shadow.gather_exits(fields, b, i, differentiable=False)


def explicit_transition(before, after, exits, new_E, changes, params, ctx, donated=(), infection=None, hazard=None,
                        moved=None):
    """Reference for `shadow.transition`: the memberships' changes as autograd ops (accumulating index_put, the
    counts' derivative as the dense sum of new_E; into copies, ``donated`` or not), then the explicit shadow flows.
    With the infection event's derivatives (new_E then has no graph), new_E carries them as zero-valued terms:
    + mask (S − S) + S exp(−λ) (λ − λ). Where the draws moved the infected agents (``moved``: S − new_E,
    E + new_E), new_E is S − (S − new_E)."""
    if moved is not None:
        new_E = before.S.detach() - moved[0]
    if infection is not None:
        S = before.S.detach()
        new_E = new_E + infection.where_mask.to(new_E.dtype) * (before.S - S) \
            + S * infection.survival * (hazard - hazard.detach())
    b, i = exits.b, exits.i
    ctx.scratch["new_infections"] = range_sums(new_E, ctx.env.borough_slices, torch.float32,
                                               known=ctx.scratch["new_infections"])
    moved = {name: getattr(before, name).index_put((b, i), changes[name], accumulate=True)
             for name in ("I_sym", "I_asym", "H", "R", "D", "isolating")}
    after = after.replace(S=before.S - new_E, E=(before.E + new_E).index_put((b, i), changes["E"], accumulate=True),
                          **moved)
    return explicit_shadow_flows(before, after, params, ctx)


def explicit_own_contributions(state, params, presences, testing, groups, packed=None, timed=False):
    """Reference for `own_contributions`: each agent's contribution per layer as dense products, with the
    zero-valued expected isolation of untaken infections written out, handed to `layered_force` through the
    engine's generic probes (`others_sum_probes`: the others-sum by autograd, not fused)."""
    from agenttensor.transmission import others_sum_probes

    from models.covid.contributions import Contributions

    return Contributions({name: others_sum_probes(c, groups[name].slot, groups[name].scale, groups[name].plain)
                          for name, c in explicit_contributions(state, params, presences, testing).items()}, {}, {})


def explicit_contributions(state, params, presences, testing):
    """Each agent's contribution per layer as dense products [B, N] (with derivatives)."""
    alpha, eta = params.asymptomatic_infectiousness, params.isolation_effectiveness
    iota = state.I_sym + alpha * state.I_asym
    detect_asym = params.detection_rate * params.asymptomatic_detection_ratio
    if testing is not None:
        detect_asym = detect_asym + testing * (1 - detect_asym)
    constant = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731 (α, η constants there)
    untaken = state.I_sym + constant(alpha) * detect_asym * state.I_asym
    away = iota * (1 - eta * state.isolating) \
        - constant(eta) * (state.stage_end < 0).float() * state.isolate_prob * untaken
    out = {"household": torch.where(state.stage_end >= 0, iota, 0.0)}
    for name, presence in presences.items():
        out[name] = away if presence is None else away * presence
    return out


def test_hand_written_shadow_backward_equals_autograd_of_the_explicit_flows(population, monkeypatch):
    """`_ExitsAt` + `_Transition` (the memberships' changes and the transposed shadow flows, each field's gradient
    written once) and `_OwnContributions` (forward: zero-valued placeholders; backward: the chain rule by hand) give
    the gradients autograd computes from the explicit terms, with the testing and vaccination levers on (their
    branches)."""
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    interventions = [at.Intervention("testing_isolation", 3, 400, 0.3), at.Intervention("vaccination", 5, 400, 0.02)]
    names = ("transmission_scale", "detection_rate", "hosp_given_symptomatic", "household_weight",
             "isolation_effectiveness")

    def gradients() -> list[torch.Tensor]:
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=28, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 10 * res["hospital_admissions"].sum()
         + 30 * res["deaths"].sum() + 0.1 * res["I_sym"].sum() + 0.1 * res["H"].sum()).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    fast = gradients()
    monkeypatch.setattr(covid, "gather_exits", plain_gather_exits)
    monkeypatch.setattr(covid, "transition", explicit_transition)
    monkeypatch.setattr(covid, "own_contributions", explicit_own_contributions)
    reference = gradients()
    assert fast[0].item() > 0 and fast[2].abs().sum() > 0
    for name, a, b in zip(names, fast, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item()), name


@pytest.mark.parametrize("sampler", [StraightThrough(), at.Relaxed(0.3)])
def test_own_contributions_backward_equals_autograd_of_the_explicit_products(population, monkeypatch, sampler):
    """`_OwnContributions` (zero-valued placeholders; the chain rule by hand) gives the gradients of the explicit
    dense products: α and η inside them, the weights of all four layers, the go-to-work logit (the workplace
    presence is a straight-through draw), with school, workplace and stay-at-home levers (presences below 1) and
    testing on, and with the relaxed sampler's fractional memberships."""
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    interventions = [at.Intervention("testing_isolation", 3, 400, 0.3), at.Intervention("school_closure", 2, 400, 0.5),
                     at.Intervention("stay_at_home", 4, 400, 0.3), at.Intervention("workplace_closure", 6, 400, 0.2)]
    names = ("transmission_scale", "asymptomatic_infectiousness", "isolation_effectiveness", "household_weight",
             "school_weight", "workplace_weight", "community_weight", "work_intercept", "detection_rate")

    def gradients() -> list[torch.Tensor]:
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=21, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=sampler, interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 10 * res["hospital_admissions"].sum()
         + 0.1 * res["I_sym"].sum()).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    fast = gradients()
    monkeypatch.setattr(covid, "own_contributions", explicit_own_contributions)
    reference = gradients()
    for name, a, b in zip(names, fast, reference):
        assert b.abs().sum() > 0, name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item()), (name, a, b)


def test_own_contributions_paired_tables_give_the_same_bits(population, monkeypatch):
    """The own contributions' native backward reads a large scattered layer's group sums and scales as interleaved
    pairs (`contributions_native.PAIRED_GROUPS`: every scattered layer, here school and workplace); the gradients are
    those of the plain gathers (the threshold above every layer's groups), bit for bit."""
    from models.covid import contributions_native

    if contributions_native._library() is None:
        pytest.skip("native kernels unavailable")
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "school_weight", "workplace_weight", "asymptomatic_infectiousness")

    def gradients() -> list[torch.Tensor]:
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=14, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough())
        (res["new_infections"].sum() + res["reported_cases"].sum()).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    assert contributions_native.PAIRED_GROUPS <= min(env.school.num_groups, env.workplace.num_groups)
    paired = gradients()
    monkeypatch.setattr(contributions_native, "PAIRED_GROUPS", 1 << 40)
    plain = gradients()
    assert all(g.abs().sum() > 0 for g in plain)
    for name, a, b in zip(names, paired, plain):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("households", ["runs", "scattered"])
@pytest.mark.parametrize("sampler", [StraightThrough(), at.Relaxed(0.3)])
def test_native_shadow_backward_equals_its_torch_ops(population, monkeypatch, sampler, households):
    """models/covid/csrc/shadow_kernel.cpp (used on CPU) computes the map `_Transition` writes in torch ops (used
    elsewhere): the same gradients, with the testing, vaccination and household / all-layer transmission-reduction
    levers on (the unit hazard's per-day susceptibility and both kept shares), and with the relaxed sampler's
    fractional susceptibility (non-integer powers in the attack probabilities). Both native paths: households as runs
    of agents (the synthetic population's: attack probabilities, household sums and shadow arithmetic in one pass)
    and, as if they were scattered, the attack pass, torch's group sums and the shadow pass apart."""
    from models.covid import shadow_native

    assert shadow_native.contiguous_groups(MODEL.setup(population, moderate().as_tensors(), "cpu").household.slot) \
        or not shadow_native.native.kernels_enabled()
    if households == "scattered":
        monkeypatch.setattr(shadow_native, "contiguous_groups", lambda slot: False)

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    interventions = [at.Intervention("testing_isolation", 3, 400, 0.3), at.Intervention("vaccination", 5, 400, 0.02),
                     at.Intervention("transmission_reduction", 2, 400, 0.2, layer="household"),
                     at.Intervention("transmission_reduction", 4, 400, 0.1)]  # the unit hazard's two kept shares
    names = ("transmission_scale", "detection_rate", "hosp_given_symptomatic", "death_given_hosp", "household_weight",
             "asymptomatic_infectiousness", "vaccine_efficacy_severe")
    calls = []
    native_backward = shadow_native.backward

    def counted(*args, **kwargs):
        out = native_backward(*args, **kwargs)
        calls.append(out is not None)
        return out

    def gradients() -> list[torch.Tensor]:
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=24, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=sampler, interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 10 * res["hospital_admissions"].sum()
         + 30 * res["deaths"].sum() + 0.1 * res["I_sym"].sum() + 0.1 * res["H"].sum()).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    monkeypatch.setattr(shadow_native, "backward", counted)
    fast = gradients()
    assert calls and all(calls)  # the native kernel ran at every step
    monkeypatch.setattr(shadow_native, "backward", lambda *args, **kwargs: None)
    reference = gradients()
    assert fast[0].item() > 0 and fast[3].abs().sum() > 0
    for name, a, b in zip(names, fast, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item()), (name, a, b)


def test_the_fused_transition_gives_the_same_gradients_on_any_number_of_threads(monkeypatch):
    """The transition's fused native pass hands its pieces of ~2^16 agents (whole households) to the threads as they
    come free (`parallel_tasks`): a piece's numbers depend on its agents alone, so one and two threads give the same
    bits, here with three pieces per row and two rows (seeds)."""
    from models.covid import shadow_native

    if not shadow_native.native.kernels_enabled():
        pytest.skip("native kernels unavailable")
    population = at.synthetic(3 * 2**16, seed=5)
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    assert shadow_native.contiguous_groups(env.household.slot)  # (the fused pass's case)
    names = ("transmission_scale", "detection_rate", "household_weight")
    calls = []
    native_backward = shadow_native.backward
    monkeypatch.setattr(shadow_native, "backward",
                        lambda *args, **kwargs: calls.append(1) or native_backward(*args, **kwargs))

    def gradients(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=8, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough())
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 10 * res["hospital_admissions"].sum()
         ).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    one, two = gradients(1), gradients(2)
    torch.set_num_threads(1)
    assert calls and all(g.abs().sum() > 0 for g in one)
    for name, a, b in zip(names, one, two):
        assert torch.equal(a, b), (name, a, b)


def test_native_shadow_backward_skips_the_outputs_no_gradient_reaches(population, monkeypatch):
    """With a loss on flows only (no deaths), no gradient of H, R, D or deaths reaches most days' transitions (the
    reported flows are summed apart in gradient modes, so the admissions' gradient sends no zeros to the deaths'), and
    there the native shadow backward returns None for d H0, as the torch ops do, instead of writing a [B, N] of zeros;
    at every step its outputs are None exactly where the torch ops' are, and equal them elsewhere."""
    from models.covid import shadow_native

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    native_backward = shadow_native.backward
    compared = []

    def both(*args, **kwargs):
        reference = shadow._transition_backward(*args, timed_flags=kwargs.get("timed_flags"))  # first: the native
        # pass may write over incoming gradients
        fast = native_backward(*args, **kwargs)
        if fast is None:
            pytest.skip("native kernels unavailable")
        assert [x is None for x in fast] == [x is None for x in reference]
        for a, b in zip(fast, reference):
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))
        grads = args[6]
        compared.append((fast, all(grads[name] is None for name in ("gH", "gR", "gD", "g_deaths"))))
        return fast

    monkeypatch.setattr(shadow_native, "backward", both)
    learn = params.as_tensors(learn=("transmission_scale",))
    res = at.simulate(MODEL, None, learn, steps=14, seeds=[0], env=env, start_date=START, progress=False,
                      sampler=StraightThrough())
    (res["new_infections"].sum() + res["reported_cases"].sum() + res["hospital_admissions"].sum()).backward()
    # d H0 without a gradient of H, R, D or deaths: every day but those where the labour market reads D (alive = 1 − D)
    assert len(compared) == 14 and sum(untouched for _, untouched in compared) >= 10
    assert all(out[3] is None for out, untouched in compared if untouched)
    assert all(out[0] is not None for out, _ in compared[1:])  # d E0 (the last day's: no gradient reaches it yet)


def test_exit_gradients_are_written_into_the_transitions_buffers(population, monkeypatch):
    """In a gradient run the dense gradients `_ExitsAt` receives for E, I_asym, I_sym and H are `_Transition`'s own
    fresh buffers (or none), so the exits' derivatives are added to them in place, with no [B, N] copy; isolating's
    (passed through `_Transition`) too where the own contributions' node made it and handed it to nobody else
    (`shadow.EXCLUSIVE_GRADIENTS`): only the last day's, made by the metrics, is copied. The gradients are the bits
    of the path that copies every time, and equal those of plain indexing (`test_hand_written_shadow_backward...`)."""
    backward = shadow._ExitsAt.backward

    def run(seen: list) -> torch.Tensor:
        def spy(ctx, *grads):  # per field: would the incoming dense gradient be copied?
            seen.append(tuple(g is not None and g is not ctx.handoff.get(name)
                              and shadow.EXCLUSIVE_GRADIENTS.get(id(g)) is not g
                              for name, g in zip(shadow.EXIT_FIELDS, grads[:len(grads) // 2])))
            return backward(ctx, *grads)

        monkeypatch.setattr(shadow._ExitsAt, "backward", staticmethod(spy))
        beta = torch.tensor(0.3, requires_grad=True)
        res = at.simulate(MODEL, population, moderate(initial_prevalence=0.01).replace(transmission_scale=beta),
                          steps=12, seeds=[0, 1], start_date=START, progress=False, sampler=StraightThrough())
        (res["reported_cases"].sum() + res["hospital_admissions"].sum()).backward()
        return beta.grad

    seen: list = []
    in_place = run(seen)
    assert len(seen) >= 10 and in_place.item() > 0
    assert not any(any(copied[:4]) for copied in seen), seen
    assert sum(copied[4] for copied in seen) <= 1, seen  # isolating: the last day's only
    monkeypatch.setattr(shadow, "EXCLUSIVE_GRADIENTS", type("Forgetful", (dict,), {"__setitem__": lambda *a: None})())
    # (nothing registered: isolating's copied every day)
    seen = []
    copying = run(seen)
    assert sum(copied[4] for copied in seen) >= 10
    assert torch.equal(in_place, copying)


def test_the_transition_writes_its_gradients_over_the_incoming_ones_nobody_else_holds(population, monkeypatch):
    """`_Transition`'s native backward writes d E0, d I_sym0, d I_asym0, d H0, d exposure0, d latent0 and d S0 over the
    incoming gradients of the same fields where those are buffers nobody else reads (`shadow._exclusive`: registered
    in `EXCLUSIVE_GRADIENTS` by the day after's transition, the exits and the contributions), on most days for most of
    them; the gradients are the bits of the path that writes fresh buffers, with a loss on every kind of output."""
    from models.covid import shadow_native

    if not shadow_native_enabled():
        pytest.skip("native kernels unavailable")
    exclusive = shadow._exclusive
    reused: list[int] = []

    def spy(incoming):
        found = exclusive(incoming)
        reused.append(len(found))
        return found

    def gradients() -> list[torch.Tensor]:
        names = ("transmission_scale", "detection_rate", "hosp_given_symptomatic", "death_given_hosp")
        learn = moderate(initial_prevalence=0.01).as_tensors(learn=names)
        res = at.simulate(MODEL, population, learn, steps=16, seeds=[0, 1], start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=[at.Intervention("vaccination", 3, 400, 0.02)])
        (res["new_infections"].sum() + res["reported_cases"].sum() + 10 * res["hospital_admissions"].sum()
         + 30 * res["deaths"].sum() + 0.1 * res["E"].sum() + 0.1 * res["I_sym"].sum()).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    monkeypatch.setattr(shadow, "_exclusive", spy)
    written_over = gradients()
    assert len(reused) == 16 and sum(n >= 5 for n in reused) >= 12, reused
    monkeypatch.setattr(shadow, "_exclusive", lambda incoming: {})
    fresh = gradients()
    for a, b in zip(written_over, fresh):
        assert torch.equal(a, b)


def test_only_registered_unshared_gradients_are_written_over():
    """`shadow._exclusive`: of the incoming gradients, only those registered in `EXCLUSIVE_GRADIENTS` (made by a node
    that handed them to nobody else), not views and not sharing memory with another incoming gradient, and only for
    fields whose output may take their place (not R, D or the per-borough ones)."""
    made = {name: torch.zeros(1, 10) for name in ("gE", "gIs", "gIa", "gH", "gR", "g_exposure")}
    for g in made.values():
        shadow.EXCLUSIVE_GRADIENTS[id(g)] = g
    unregistered, base = torch.zeros(1, 10), torch.zeros(2, 10)
    view = base[:1]
    shadow.EXCLUSIVE_GRADIENTS[id(view)] = view
    incoming = dict(made, gS=unregistered, g_latent=view, gD=made["gE"], g_report=torch.zeros(1, 5))
    assert set(shadow._exclusive(incoming)) == {"gIs", "gIa", "gH", "g_exposure"}  # gE shares its buffer with gD
    assert set(shadow._exclusive(made)) == {"gE", "gIs", "gIa", "gH", "g_exposure"}


def test_exits_at_never_writes_into_a_shared_gradient():
    """`_ExitsAt` outside `_Transition`: the dense gradients it receives are shared (an addition passes one tensor
    to both of its inputs), so it must copy before adding the exits' derivatives: gradients equal plain indexing."""
    g = torch.Generator().manual_seed(0)
    b, i = torch.tensor([0, 0, 1, 1]), torch.tensor([3, 5, 0, 5])
    grads = []
    for fast in (True, False):
        fields = {name: torch.rand(2, 8, generator=torch.Generator().manual_seed(k)).requires_grad_()
                  for k, name in enumerate(shadow.EXIT_FIELDS)}
        exits = shadow.gather_exits(fields, b, i, differentiable=fast)
        dense = exits.fields if fast else fields
        weights = torch.rand(5, 4, generator=g)
        loss = (dense["E"] + dense["H"] + dense["I_sym"] * dense["I_asym"]).pow(2).sum() \
            + sum((w * exits.leaving[name]).sum() for w, name in zip(weights, shadow.EXIT_FIELDS))
        loss.backward()
        grads.append([fields[name].grad for name in shadow.EXIT_FIELDS])
        g = torch.Generator().manual_seed(0)
    for a, ref in zip(*grads):
        assert torch.equal(a, ref)


@pytest.mark.parametrize("memberships", ["fractional", "whole", "by size", "runs with gaps", "runs numbered at random"])
def test_native_attack_probabilities_match_the_torch_formula(memberships):
    """The kernel's exp / log polynomials (vectorised) against `attack_probabilities` in float64: household
    hazards from 0 to saturation, whole and fractional numbers of other susceptible members (relaxed memberships),
    and 0/1 memberships (whole powers by squaring), with two households of 150 (counts past 64: the exp/log path
    for their tiles). Households scattered over the agents (the fused pass for runs of agents is compared with this
    one in `test_native_shadow_backward_equals_its_torch_ops`). "by size": 0/1 memberships in runs of households of
    one size each (1, 3, 4, 6, 10, 20, 40, 100), so that whole tiles need each number of bits, 0 to 6 (run as 0, 3, 4,
    5 or 6 squaring steps), and the exp/log path past 64; households in agent order are read 16 agents at a time from
    one window of their table (`agenttensor::run_lookup`, csrc/tables.h), up to its last entry. "runs with gaps": runs
    in agent order over numbers most of which have no agents, so that 16 agents' numbers span about as many as the
    window holds (in it or not: then gathered); "runs numbered at random": their numbers shuffled (all gathered)."""
    from agenttensor import native
    from agenttensor.transmission import GroupLayer, group_sum
    from models.covid import shadow_native
    from models.covid.shadow import attack_probabilities

    library = native.load(shadow_native.SOURCE, "agenttensor_covid_shadow", shadow_native._declare, shadow_native.FLAGS)
    if library is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(0)
    n = 50_000
    if memberships == "by size":  # runs of 6,000 agents per size (whole tiles), households in agent order
        household = torch.cat([torch.arange(6_000) // size + 10_000 * k
                               for k, size in enumerate((1, 3, 4, 6, 10, 20, 40, 100))])
        n = household.numel()
        layer = GroupLayer(household)
    elif memberships.startswith("runs"):  # runs of agents: 50,000 over 60,000 numbers (~2 agents per household)
        household = torch.sort(torch.randint(0, 60_000, (n,), generator=g)).values
        if memberships == "runs numbered at random":
            household = torch.randperm(60_000, generator=g)[household]
        layer = GroupLayer(household)
        assert shadow_native.contiguous_groups(layer.slot)
    else:
        household = torch.sort(torch.randint(0, 9_000, (n,), generator=g)).values  # households of ~5.5
        household[1000:1150], household[30_000:30_150] = 9_000, 9_001  # two large ones (group quarters)
        layer = GroupLayer(household[torch.randperm(n, generator=g)])
        assert not shadow_native.contiguous_groups(layer.slot)
    slots = layer.num_groups + 1
    unit = (torch.rand(1, n, generator=g) ** 3 * 3)  # 0 .. 3: T from 0 to ~1
    if memberships == "fractional" or memberships.startswith("runs"):
        susceptible = torch.where(torch.rand(1, n, generator=g) < 0.5, 1.0, torch.rand(1, n, generator=g))
    else:
        susceptible = (torch.rand(1, n, generator=g) < (0.8 if memberships == "whole" else 0.95)).float()
    exposure = torch.randn(1, n, generator=g)
    q_sym, q_asym = torch.empty(1, n), torch.empty(1, n)
    sums = group_sum(susceptible, layer.slot, slots)
    alpha = torch.tensor([0.55])
    library.agenttensor_covid_attack(1, n, unit.data_ptr(), n, susceptible.data_ptr(), sums.data_ptr(),
                                     layer.slot.data_ptr(), slots, alpha.data_ptr(), 5.3, 4.1, 0.6, exposure.data_ptr(),
                                     q_sym.data_ptr(), q_asym.data_ptr(), 1)
    others = lambda x: group_sum(x, layer.slot, slots).index_select(1, layer.slot) - x  # noqa: E731
    ref_sym, ref_asym = attack_probabilities(unit.double(), susceptible.double(), others, 0.55, 0.6, 5.3, 4.1)
    for got, ref in ((q_sym, ref_sym * exposure), (q_asym, ref_asym * exposure)):
        assert (got.double() - ref).abs().max() < 2e-6 * exposure.abs().max()


def test_own_contributions_native_torch_and_explicit_agree(monkeypatch):
    """The own contributions' backward three ways on random inputs (batch 3, presences broadcast from one row or
    per element, α per element and η shared, both requiring gradients, testing on), with each layer's others-sum
    formed from the force's probes (household: member and group; school: member only; workplace: group only, with
    most agents in no workplace; community: all three, its scale per batch element): the native pass, its torch
    ops and autograd of the explicit products, whose others-sums are written out as fixed coefficients, agree; the
    native pass gives the same bits with 1 and 2 threads, and its forward outputs (the probes) are zero."""
    from types import SimpleNamespace

    from agenttensor.transmission import GroupLayer
    from models.covid import contributions, contributions_native

    g = torch.Generator().manual_seed(3)
    B, N = 3, 150_000  # > 2 blocks of the native partial sums
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    stage_end = torch.randint(-1, 20, (B, N), generator=g, dtype=torch.int16)
    timed = (stage_end >= 0).float()  # as in the model: agents in I have a running countdown
    state = SimpleNamespace(I_sym=(rand(B, N) < 0.3).float() * timed, I_asym=rand(B, N) * timed,
                            isolating=(rand(B, N) < 0.5).float(), stage_end=stage_end, isolate_prob=rand(B, N))
    testing = rand(1, N)
    presences = {"school": rand(1, N), "workplace": (rand(B, N) < 0.7).float(), "community": None}
    layers = {"household": GroupLayer(torch.sort(torch.randint(0, 50_000, (N,), generator=g)).values),
              "school": GroupLayer(torch.randint(0, 300, (N,), generator=g)),
              "workplace": GroupLayer(torch.where(rand(N) < 0.6, -1, torch.randint(0, 9000, (N,), generator=g))),
              "community": GroupLayer(torch.randint(0, 190, (N,), generator=g))}
    groups = {name: contributions.OthersSum(layer.slot, rand(B if name == "community" else 1, layer.num_groups + 1),
                                            plain=name == "community") for name, layer in layers.items()}
    probe_weights = {  # the derivatives reaching each probe (member [B, N], group and plain [B, S]; None: none)
        name: (None if name == "workplace" else torch.randn(B, N, generator=g),
               None if name == "school" else torch.randn(B, layers[name].num_groups + 1, generator=g),
               torch.randn(B, layers[name].num_groups + 1, generator=g) if groups[name].plain else None)
        for name in layers}

    field_weights = {"I_sym": torch.randn(B, N, generator=g), "isolating": torch.randn(B, N, generator=g)}

    def others_sum_coefficients(name: str) -> torch.Tensor:  # d loss / d c_j = s[g] (W[g] − w_j) + P[g], explicitly
        member, group, plain = probe_weights[name]
        slot, scale = groups[name].slot.long(), groups[name].scale.expand(B, -1)
        out = torch.zeros(B, N) if group is None else group[:, slot]
        out = (out - (0 if member is None else member)) * scale[:, slot]
        return out if plain is None else out + plain[:, slot]

    def gradients(mode: str, threads=1):
        torch.set_num_threads(threads)
        params = SimpleNamespace(asymptomatic_infectiousness=torch.tensor([[0.3], [0.4], [0.5]], requires_grad=True),
                                 isolation_effectiveness=torch.tensor(0.8, requires_grad=True), detection_rate=0.3,
                                 asymptomatic_detection_ratio=0.2)
        inputs = dict(I_sym=state.I_sym.clone().requires_grad_(), I_asym=state.I_asym.clone().requires_grad_(),
                      isolating=state.isolating.clone().requires_grad_())
        ps = {k: None if v is None else v.clone().requires_grad_() for k, v in presences.items()}
        current = SimpleNamespace(**{**vars(state), **inputs})
        if mode == "explicit":
            own = explicit_contributions(current, params, ps, testing)
            loss = sum((own[name] * others_sum_coefficients(name)).sum() for name in layers)
        else:
            result = contributions.own_contributions(current, params, ps, testing, groups)
            own = result.probes
            loss = sum((probe * w).sum() for name in layers for probe, w in zip(own[name], probe_weights[name])
                       if w is not None)
            loss = loss + sum((result.fields[name] * w).sum() for name, w in field_weights.items())
        if mode == "explicit":
            loss = loss + sum((getattr(current, name) * w).sum() for name, w in field_weights.items())
        loss.backward()
        leaves = [*inputs.values(), params.asymptomatic_infectiousness, params.isolation_effectiveness,
                  *(p for p in ps.values() if p is not None)]
        torch.set_num_threads(1)
        return [x.grad for x in leaves], own

    calls = []
    native_backward = contributions_native.backward

    def counted(*args, **kwargs):
        out = native_backward(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(contributions_native, "backward", counted)
    fast, own = gradients("native")
    two_threads, _ = gradients("native", threads=2)
    monkeypatch.setattr(contributions_native, "backward", lambda *a, **k: None)
    torch_ops, _ = gradients("torch")
    explicit, _ = gradients("explicit")
    if not any(calls):
        pytest.skip("native kernels unavailable")
    assert all(calls) and all(float(x.detach().abs().max()) == 0 for probes in own.values() for x in probes
                              if x is not None)
    assert own["community"].plain is not None and own["household"].plain is None
    for a, b, c, d in zip(fast, two_threads, torch_ops, explicit):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-5 * float(c.abs().max()))
        assert torch.allclose(c, d, rtol=1e-5, atol=1e-5 * float(d.abs().max()))


def test_metric_sums_from_known_values_carry_the_derivative_of_the_dense_sums(population, monkeypatch):
    """The per-borough metrics that take their values from elsewhere (rolled stage counts, new infections counted
    at the infected agents, memoised labour sums weighted by has_workplace and on-site work) give the values and
    gradients of dense sums over agents (autograd of the products and slices), for parameters of transmission, the
    labour market and behaviour."""
    import polars as pl

    from agenttensor import transmission

    # some employed agents work without a workplace (has_workplace weighs the sums), some start unemployed
    persons = population.persons.with_columns(
        workplace_id=pl.when(pl.col("agent_id") % 4 == 0).then(-1).otherwise(pl.col("workplace_id")),
        employment=pl.when((pl.col("agent_id") % 9 == 0) & (pl.col("employment") == 1)).then(2)
        .otherwise(pl.col("employment")))
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(at.Population(persons, population.groups, population.meta), params.as_tensors(), "cpu")
    interventions = [at.Intervention("workplace_closure", 3, 400, 0.3)]
    names = ("transmission_scale", "job_loss_base", "job_loss_closed", "job_loss_absent", "work_intercept", "rehire_rate")

    def run():
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=22, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["unemployment_rate_by_borough"].sum() + res["on_site_share_by_borough"].sum() + 1e-3 * res["I_sym"].sum()
         + 1e-3 * res["R_by_borough"].sum() + 1e-3 * res["new_infections_by_borough"].sum()).backward()
        return res, [getattr(learn, name).grad.clone() for name in names]

    def dense_sums(values, ranges, dtype=None, known=None, weight=None):
        values = values.to(dtype) if dtype is not None else values
        values = values if weight is None else values * weight
        return torch.stack([values[:, a:b].sum(1) for a, b in ranges], 1)

    fast, fast_grads = run()
    monkeypatch.setattr(covid, "range_sums", dense_sums)
    monkeypatch.setattr(transmission, "range_sums", dense_sums)
    reference, reference_grads = run()
    for name in ("unemployment_rate_by_borough", "on_site_share_by_borough", "I_sym", "R_by_borough",
                 "new_infections_by_borough"):
        assert torch.equal(fast[name], reference[name]), name
    for name, a, b in zip(names, fast_grads, reference_grads):
        assert b.abs().sum() > 0, name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item()), (name, a, b)


def test_the_unit_household_hazard_is_kept_factored(population, monkeypatch):
    """`_Transition` keeps the household unit hazard for its backward as its factors: the memoised susceptibility
    (one tensor for every day of the run) and a per-household scale, not a [B, N] product per day; multiplied out it
    is the household term of the force per unit of one member's infectiousness."""
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    seen = []
    apply = shadow._Transition.apply

    def spy(*args):
        unit_args = args[3:8]  # slot, sigma, scale, kept_1, kept_2
        seen.append(unit_args)
        return apply(*args)

    monkeypatch.setattr(shadow._Transition, "apply", spy)
    beta = torch.tensor(0.3, requires_grad=True)
    at.simulate(MODEL, None, params.replace(transmission_scale=beta), steps=6, seeds=[0, 1], env=env, start_date=START,
                progress=False, sampler=StraightThrough())
    assert len(seen) == 6
    slot, sigma, scale, kept_1, kept_2 = seen[-1]
    assert all(day[1].data_ptr() == sigma.data_ptr() for day in seen)  # memoised: no per-day [B, N]
    assert scale.shape == (1, env.household.num_groups + 1) and kept_1 is None and kept_2 is None
    unit = shadow.UnitHazard(sigma, scale, slot).dense()
    expected = sigma * (scale[0, env.household.slot.long()])
    assert torch.equal(unit, expected.expand_as(unit)) and unit.shape[-1] == env.num_agents


def test_packed_fields_unpack_to_the_same_bits_and_other_values_are_refused():
    """`contributions_native.pack`: I_sym, I_asym and isolating in one byte per agent (what the own contributions'
    node saves, so that the step may update the fields in place), bit for bit; any value other than +0.0 and 1.0
    (fractional, -0.0, NaN) or a tensor it cannot read leaves the fields as they are (None)."""
    from models.covid import contributions_native

    g = torch.Generator().manual_seed(3)
    fields = [(torch.rand(2, 70_001, generator=g) < p).float() for p in (0.1, 0.2, 0.3)]
    flags = contributions_native.pack(*fields)
    if not shadow_native_enabled():
        assert flags is None
        return
    assert flags.dtype == torch.uint8 and flags.shape == (2, 70_001)
    for k, x in enumerate(fields):
        assert torch.equal((flags >> k & 1).float(), x)
    for value in (0.5, -0.0, float("nan"), 2.0):
        changed = [x.clone() for x in fields]
        changed[1][1, 70_000] = value
        assert contributions_native.pack(*changed) is None, value
    assert contributions_native.pack(fields[0].double(), fields[1].double(), fields[2].double()) is None
    assert contributions_native.pack(fields[0][:, ::2], fields[1][:, ::2], fields[2][:, ::2]) is None


def shadow_native_enabled() -> bool:
    from agenttensor import native

    return native.kernels_enabled()


def test_packed_flags_are_carried_from_day_to_day(population, monkeypatch):
    """The own contributions' packed flags are packed once per run and then carried by the day's transition (updated at
    the exiting agents): every day they equal a fresh `pack` of the fields; a field changed in between (its version
    moves) or another tensor in its place is packed again."""
    from models.covid import contributions_native as cn

    if not shadow_native_enabled():
        pytest.skip("native kernels unavailable")
    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    pack, packed, days = cn.pack, cn.packed, []
    monkeypatch.setattr(cn, "pack", lambda *a: days.append("packed") or pack(*a))

    def checked(I_sym, I_asym, isolating, stage_end=None, S=None):
        flags, live = packed(I_sym, I_asym, isolating, stage_end, S)
        assert stage_end is not None and S is not None  # the model's: with the countdowns' sign and S
        assert torch.equal(flags, pack(I_sym.detach(), I_asym.detach(), isolating.detach(), stage_end, S.detach()))
        assert torch.equal(live, flags)
        days.append("day")
        return flags, live

    monkeypatch.setattr(cn, "packed", checked)
    learn = params.as_tensors(learn=("transmission_scale",))
    res = at.simulate(MODEL, None, learn, steps=20, seeds=[0, 1], env=env, start_date=START, progress=False,
                      sampler=StraightThrough())
    assert res["I_sym"].sum() > 0 and res["isolating_share"].sum() > 0
    assert days.count("day") == 20 and days.count("packed") == 1, days  # packed on day 0 only
    # invalidation: the carried flags are not used for a changed field or another tensor
    monkeypatch.setattr(cn, "packed", packed)
    B, N = 2, 1000
    I_sym, I_asym, isolating = ((torch.rand(B, N) < q).float() for q in (0.1, 0.1, 0.05))
    flags, live = cn.packed(I_sym, I_asym, isolating)
    b, i = torch.tensor([0, 1]), torch.tensor([3, 7])
    I_sym[0, 3], isolating[1, 7] = 1 - I_sym[0, 3], 1 - isolating[1, 7]  # the day's changes at the exits
    cn.carry(live, b, i, I_sym, I_asym, isolating)
    days.clear()
    assert torch.equal(cn.packed(I_sym, I_asym, isolating)[0], pack(I_sym, I_asym, isolating)) and not days
    I_asym[1, 5] = 1 - I_asym[1, 5]  # changed outside the transition
    assert torch.equal(cn.packed(I_sym, I_asym, isolating)[0], pack(I_sym, I_asym, isolating)) and days == ["packed"]
    assert cn.packed(I_sym, I_asym.clone(), isolating)[0] is not None and days == ["packed"] * 2
    # with the countdowns' sign (bit 3): carried where the exits and the day's infections changed it, packed again
    # where stage_end changed otherwise
    stage_end = torch.randint(-1, 5, (B, N), dtype=torch.int16)
    stage_end[1, 9] = -1
    flags, live = cn.packed(I_sym, I_asym, isolating, stage_end)
    assert torch.equal((flags >> 3 & 1).bool(), stage_end >= 0) and torch.equal(flags & 7, pack(I_sym, I_asym, isolating))
    stage_end[0, 3], stage_end[1, 7], stage_end[1, 9] = -1, 6, 7  # two exits' next countdowns, an infection's
    cn.carry(live, b, i, I_sym, I_asym, isolating, stage_end, (torch.tensor([1]), torch.tensor([9])))
    days.clear()
    assert torch.equal(cn.packed(I_sym, I_asym, isolating, stage_end)[0], pack(I_sym, I_asym, isolating, stage_end))
    assert not days
    assert cn.packed(I_sym, I_asym, isolating)[0] is not None and days == ["packed"]  # not the flags of no stage_end
    stage_end[0, 0] = -1 - int(stage_end[0, 0])  # changed outside the transition
    assert torch.equal(cn.packed(I_sym, I_asym, isolating, stage_end)[0], pack(I_sym, I_asym, isolating, stage_end))
    assert days == ["packed"] * 2
    # with S (bit 4): the day's infections leave it (in place, as the gradient modes' draws move them)
    S = ((I_sym + I_asym) == 0).float()
    S[1, 9] = 1.0
    flags, live = cn.packed(I_sym, I_asym, isolating, stage_end, S)
    assert torch.equal((flags >> 4 & 1).bool(), S == 1) and torch.equal(flags & 15, pack(I_sym, I_asym, isolating,
                                                                                          stage_end))
    S[1, 9] = 0.0  # today's infection
    cn.carry(live, b, i, I_sym, I_asym, isolating, stage_end, (torch.tensor([1]), torch.tensor([9])), S)
    days.clear()
    assert torch.equal(cn.packed(I_sym, I_asym, isolating, stage_end, S)[0], pack(I_sym, I_asym, isolating, stage_end,
                                                                                  S))
    assert not days
    S[0, 1] = 1 - S[0, 1]  # changed outside the transition
    assert torch.equal(cn.packed(I_sym, I_asym, isolating, stage_end, S)[0], pack(I_sym, I_asym, isolating, stage_end,
                                                                                  S))
    assert days == ["packed"]
    S[0, 2] = 0.5  # not a membership: nothing packed
    assert cn.packed(I_sym, I_asym, isolating, stage_end, S) == (None, None)


def test_the_native_carry_updates_the_flags_as_the_torch_ops(monkeypatch):
    """`contributions_native.carry`'s native pass and its torch ops give the same flags at the exiting and the infected
    agents (with and without the countdowns' sign and S, one row and two), and both leave them unchanged and carry
    nothing where a field's value at an exiting agent is not 0 or 1."""
    from models.covid import contributions_native as cn

    if not shadow_native_enabled():
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # (the large case: both threads split the agents)
    for B, N in ((1, 500), (2, 500), (2, 100_003)):
        fields = [(torch.rand(B, N, generator=g) < q).float() for q in (0.2, 0.2, 0.1)]
        stage_end = torch.randint(-1, 6, (B, N), dtype=torch.int16, generator=g)
        S = (torch.rand(B, N, generator=g) < 0.5).float()
        b, i = select.nonzero((torch.rand(B, N, generator=g) < 0.1).to(torch.uint8))
        infected = select.nonzero((torch.rand(B, N, generator=g) < 0.05).to(torch.uint8))
        for extra in ((), (stage_end, infected), (stage_end, infected, S)):
            results = []
            for native in (True, False):
                if not native:
                    monkeypatch.setattr(cn, "_library", lambda: None)
                live = torch.randint(0, 32, (B, N), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
                I_sym = fields[0].clone()
                cn.carry(live, b, i, I_sym, *fields[1:], *extra)
                assert getattr(I_sym, "_agenttensor_flags", None) is not None
                bad = fields[1].clone()
                bad[b[-1], i[-1]] = 0.5  # (the second thread's half, where there are two)
                before = live.clone()
                I_sym2 = fields[0].clone()
                cn.carry(live, b, i, I_sym2, bad, fields[2], *extra)
                assert torch.equal(live, before) and getattr(I_sym2, "_agenttensor_flags", None) is None
                results.append(live)
                monkeypatch.undo()
            assert torch.equal(*results), (B, len(extra))
            changed = results[0].view(-1)[select.flat_positions(results[0], b, i)]
            assert torch.equal(changed & 7, (fields[0] + 2 * fields[1] + 4 * fields[2])[b, i].to(torch.uint8))
    torch.set_num_threads(threads)


def test_own_contributions_read_packed_fields_as_the_floats(population, monkeypatch):
    """The own contributions' backward from the packed fields: the torch ops (unpacking them) give the bits they
    give from the float fields, and the native pass the same gradients."""
    from models.covid import contributions_native

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "asymptomatic_infectiousness", "isolation_effectiveness", "community_weight")
    interventions = [at.Intervention("testing_isolation", 3, 400, 0.3), at.Intervention("stay_at_home", 4, 400, 0.3)]

    def gradients() -> list[torch.Tensor]:
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=14, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum()).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    packs = []
    pack = contributions_native.pack
    monkeypatch.setattr(contributions_native, "pack", lambda *a: packs.append(pack(*a)) or packs[-1])
    native = gradients()
    assert packs and all(p is not None for p in packs) or not shadow_native_enabled()
    monkeypatch.setattr(contributions_native, "backward", lambda *a, **k: None)
    from_packed = gradients()
    monkeypatch.setattr(contributions_native, "pack", lambda *a: None)
    from_floats = gradients()
    for name, a, b, c in zip(names, native, from_packed, from_floats):
        assert torch.equal(b, c), name
        assert b.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-7 * b.abs().max().item()), (name, a, b)


@pytest.mark.parametrize("path", ["native", "torch ops"])
def test_own_contributions_give_each_agents_derivative_with_presences_below_one(population, monkeypatch, path):
    """Per agent, not only summed into parameters: the derivative of a few days' infections and reports w.r.t. each
    agent's I_sym, I_asym and isolating at a mid-epidemic state, through the own contributions (the native pass and
    its torch ops) against the explicit dense products through the generic probes, with school, workplace and
    stay-at-home levers (presences below 1). Each agent's own term (the others-sum leaves it out, weighted by its
    presence) is visible here, in small groups, where it is lost in the sums over agents of the parameters' tests."""
    params = moderate(initial_prevalence=0.02)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    interventions = [at.Intervention("school_closure", 0, 400, 0.5), at.Intervention("stay_at_home", 0, 400, 0.3),
                     at.Intervention("workplace_closure", 0, 400, 0.2), at.Intervention("testing_isolation", 0, 400, 0.3)]
    start = at.simulate(MODEL, None, params.as_tensors(), steps=15, seeds=[0, 1], env=env, start_date=START,
                        progress=False, sampler=StraightThrough(), interventions=interventions).final_state

    def gradients() -> list[torch.Tensor]:
        leaves = {name: getattr(start, name).detach().clone().requires_grad_() for name in ("I_sym", "I_asym",
                                                                                           "isolating")}
        res = at.simulate(MODEL, None, params.as_tensors(), steps=18, seeds=[0, 1], env=env, start_date=START,
                          progress=False, sampler=StraightThrough(), interventions=interventions,
                          initial_state=start.replace(**leaves), first_step=15)
        (res["new_infections"].sum() + res["reported_cases"].sum()).backward()
        return [leaf.grad for leaf in leaves.values()]

    from models.covid import contributions_native

    if path == "torch ops":
        monkeypatch.setattr(contributions_native, "backward", lambda *a, **k: None)
    fast = gradients()
    monkeypatch.setattr(covid, "own_contributions", explicit_own_contributions)
    reference = gradients()
    for a, b in zip(fast, reference):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_infections_moved_in_the_draws_pass_give_the_same_run_and_gradients(population, monkeypatch):
    """Gradient modes on CPU draw the infections and make S − new_E, E + new_E in one pass (`StepContext.
    hazard_move_and_derivatives`: no new_E [B, N]); the run's metrics and the parameters' gradients are those of
    the events drawn apart (new_E) and moved by `_Transition`, bit for bit, and the pass runs every day."""
    from agenttensor.sampling import StraightThrough as ST

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "detection_rate", "household_weight")
    interventions = [at.Intervention("testing_isolation", 3, 400, 0.3), at.Intervention("school_closure", 0, 400, 0.5)]

    def run():
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=21, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 10 * res["hospital_admissions"].sum()
         + 0.1 * res["E"].sum()).backward()
        return res, [getattr(learn, name).grad.clone() for name in names]

    calls = []
    move = ST.hazard_move_and_derivatives
    monkeypatch.setattr(ST, "hazard_move_and_derivatives", lambda *a: calls.append(move(*a)) or calls[-1])
    moved, moved_grads = run()
    assert len(calls) == 21 and all(c is not None for c in calls)
    monkeypatch.setattr(ST, "hazard_move_and_derivatives", lambda *a: None)
    apart, apart_grads = run()
    assert moved["new_infections"].sum() > 0
    for name in moved.metrics:
        assert torch.equal(moved[name], apart[name]), name
    for name, a, b in zip(names, moved_grads, apart_grads):
        assert a.abs().sum() > 0 and torch.equal(a, b), name


def test_the_countdowns_sign_in_the_packed_flags_gives_the_same_gradients(population, monkeypatch):
    """Gradient modes save the countdowns' sign (stage_end ≥ 0, all the backward passes read of them) as bit 3 of the
    own contributions' packed flags, which the transition saves too; stage_end is then saved by no node and updated in
    place from the second day on (no [B, N] copy a day). The metrics and gradients are those of the nodes saving
    stage_end itself (copied every day), bit for bit, through the native passes and through the torch ops."""
    from models.covid import contributions_native, shadow_native

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "detection_rate", "isolation_effectiveness")
    interventions = [at.Intervention("testing_isolation", 3, 400, 0.3), at.Intervention("stay_at_home", 4, 400, 0.3)]
    own = covid.own_contributions

    def run(timed: bool):
        monkeypatch.setattr(covid, "own_contributions", lambda *a, **k: own(*a, **{**k, "timed": timed and k["timed"]}))
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=21, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 10 * res["hospital_admissions"].sum()
         + 0.1 * res["I_sym"].sum()).backward()
        return res, [getattr(learn, name).grad.clone() for name in names], res.final_state.stage_end

    for torch_ops in (False, True):
        if torch_ops:
            monkeypatch.setattr(contributions_native, "backward", lambda *a, **k: None)
            monkeypatch.setattr(shadow_native, "backward", lambda *a, **k: None)
        clones = []
        clone = torch.Tensor.clone
        monkeypatch.setattr(torch.Tensor, "clone", lambda x, *a, **k: clones.append(x.dtype) or clone(x, *a, **k))
        signed, signed_grads, signed_end = run(True)
        signed_copies = clones.count(torch.int16)
        clones.clear()
        saved, saved_grads, saved_end = run(False)
        monkeypatch.setattr(torch.Tensor, "clone", clone)
        assert signed_copies <= 1 < clones.count(torch.int16)  # the first day's only, against one a day
        assert torch.equal(signed_end, saved_end) and signed["reported_cases"].sum() > 0
        for name in signed.metrics:
            assert torch.equal(signed[name], saved[name]), name
        for name, a, b in zip(names, signed_grads, saved_grads):
            assert a.abs().sum() > 0 and torch.equal(a, b), (torch_ops, name)


def assert_same_run(a, b, names, label) -> None:
    """Two runs' (result, parameter gradients) are the same, bit for bit: every metric and every gradient (non-zero)."""
    (res_a, grads_a), (res_b, grads_b) = a, b
    for name in res_a.metrics:
        assert torch.equal(res_a[name], res_b[name]), name
    for name, x, y in zip(names, grads_a, grads_b):
        assert x.abs().sum() > 0 and torch.equal(x, y), (label, name)


def test_the_force_hands_its_weights_to_the_own_contributions_as_parts_with_the_same_gradients(population, monkeypatch):
    """In gradient modes `layered_force`'s native backward hands each layer's weight w = grad σ presence factors to
    the own contributions' backward as its parts (`ForceTerm.weight_handoff`, `WeightParts`), which forms w tile by
    tile: no [B, N] per layer is written and read back. The metrics and gradients are those of the weights written
    as the member probes' derivatives, bit for bit, through the contributions' native pass and its torch ops."""
    from models.covid import contributions_native

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "household_weight", "isolation_effectiveness")
    interventions = [at.Intervention("testing_isolation", 3, 400, 0.3), at.Intervention("stay_at_home", 4, 400, 0.3),
                     at.Intervention("transmission_reduction", 2, 400, 0.2, layer="community")]
    own, native_backward = covid.own_contributions, contributions_native.backward
    handed = []

    def run(handoff: bool, torch_ops: bool):
        monkeypatch.setattr(covid, "own_contributions", own if handoff else
                            lambda *a, **k: own(*a, **k)._replace(weight_handoffs=None))

        def backward(*a, **k):
            handed.append(tuple(sorted(k.get("weights") or ())))
            return None if torch_ops else native_backward(*a, **k)

        monkeypatch.setattr(contributions_native, "backward", backward)
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=14, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + 0.1 * res["I_sym"].sum()).backward()
        return res, [getattr(learn, name).grad.clone() for name in names]

    for torch_ops in (False, True):
        handed.clear()
        parts, parts_grads = run(True, torch_ops)
        assert handed and all(set(h) == {"household", "community"} | ({"school", "workplace"} & set(h))
                              for h in handed) and any("workplace" in h for h in handed)
        handed.clear()
        written, written_grads = run(False, torch_ops)
        assert handed and not any(handed)
        assert_same_run((parts, parts_grads), (written, written_grads), names, torch_ops)


def test_the_force_hands_the_workplace_presences_derivative_to_the_own_contributions(population, monkeypatch):
    """Where the week's decision carries a derivative, the workplace presence (on_site · open share, kept for the week:
    `select.scale_and_pass_on`) is read by the force and by the own contributions; the force's backward hands its
    derivative to the own contributions' (`ForceTerm.weight_handoff`, "take_presence"), which add theirs into it
    (natively at the infectious agents only) and return it: autograd adds no two [B, N]. Metrics and gradients are
    those without the hand-over, bit for bit, through the contributions' native pass and their torch ops."""
    from models.covid import contributions_native

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "household_weight", "workplace_weight", "detection_rate")
    interventions = [at.Intervention("workplace_closure", 3, 400, 0.4)]
    own, native_backward = covid.own_contributions, contributions_native.backward
    handed = []

    def run(take: bool, torch_ops: bool):
        def own_without(*a, **k):
            out = own(*a, **k)
            for handoff in out.weight_handoffs.values():
                handoff.pop("take_presence")
            return out

        monkeypatch.setattr(covid, "own_contributions", own if take else own_without)

        def backward(*a, **k):
            handed.append(tuple(sorted(k.get("presences_passed") or ())))
            return None if torch_ops else native_backward(*a, **k)

        monkeypatch.setattr(contributions_native, "backward", backward)
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=21, seeds=[0], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + res["hospital_admissions"].sum()).backward()
        return res, [getattr(learn, name).grad.clone() for name in names]

    for torch_ops in (False, True):
        handed.clear()
        taken, taken_grads = run(True, torch_ops)
        assert ("workplace",) in handed, handed
        handed.clear()
        added, added_grads = run(False, torch_ops)
        assert handed and not any(handed)
        assert_same_run((taken, taken_grads), (added, added_grads), names, torch_ops)


@pytest.mark.parametrize("checkpoint", [None, 7])
def test_infections_moved_in_place_give_the_fresh_fields_numbers_and_gradients(population, checkpoint, monkeypatch):
    """Gradient modes move the day's infections from S to E in place where the loop owns both (the packed flags hold
    S, bit 4: the transition saves no float32 S) and write at the infected agents only: the metrics and every
    calibratable parameter's gradient are those of S − new_E and E + new_E written afresh, bit for bit, also where a
    checkpointed segment recomputes its days (whose input state must stay as it was)."""
    env = MODEL.setup(population, moderate().as_tensors(), "cpu")
    move = StepContext.hazard_move_and_derivatives
    days = []

    def run(allowed: bool):
        def patched(self, hazard, stream, source, target, in_place=False):
            days.append(in_place and allowed)
            return move(self, hazard, stream, source, target, in_place and allowed)

        monkeypatch.setattr(StepContext, "hazard_move_and_derivatives", patched)
        params = moderate(transmission_multiplier=torch.ones(5)).as_tensors(learn=covid.CALIBRATABLE)
        kwargs = {} if checkpoint is None else dict(grad_checkpoint_every=checkpoint)
        res = at.simulate(MODEL, None, params, steps=35, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), **kwargs)
        loss = sum(res[name].sum() for name in ("new_infections", "reported_cases", "hospital_admissions", "deaths"))
        (loss + 1000 * res["unemployment_rate"].sum()).backward()
        return res, [getattr(params, name).grad for name in covid.CALIBRATABLE]

    moved, grads = run(True)
    assert sum(days) >= 34 and int(moved["new_infections"].sum()) > 0  # every day but the first (the caller's state)
    days.clear()
    fresh, fresh_grads = run(False)
    assert not any(days)
    for name in fresh.metrics:
        assert torch.equal(moved[name].detach(), fresh[name].detach()), name
    assert sum(g is not None for g in grads) >= 10
    for name, a, b in zip(covid.CALIBRATABLE, grads, fresh_grads):
        assert (a is None and b is None) or torch.equal(a, b), name


def test_the_native_passes_read_sigma_by_age_group_with_the_same_numbers(population, monkeypatch):
    """Without vaccination σ is the susceptibility table at the agents' age groups: the transition's native backward
    (`UnitHazard.sigma_table`), the layered force both ways and the own contributions' backward
    (`_group_kernels.by_group`) read it through the age-group bytes instead of a float32 per agent, with the same
    metrics (hard mode too) and gradients bit for bit (and with vaccination, σ per agent, they read the array)."""
    from agenttensor import _group_kernels

    env = MODEL.setup(population, moderate().as_tensors(), "cpu")
    tables = []
    unit_hazard = shadow.UnitHazard
    sigma_table = _group_kernels._sigma_table

    def run(by_age: bool, interventions=(), sampler=StraightThrough()):
        def made(*args, **kwargs):
            unit = unit_hazard(*args, **kwargs)
            tables.append(unit.sigma_table is not None)
            return unit if by_age else dataclasses.replace(unit, sigma_table=None)

        def read(*args):
            table = sigma_table(*args)
            tables.append(table is not None)
            return table if by_age else None

        monkeypatch.setattr(shadow, "UnitHazard", made)
        monkeypatch.setattr(_group_kernels, "_sigma_table", read)
        if not sampler.differentiable:
            env.native.clear()  # (the hard force's kept arguments: made again with or without the table)
            return at.simulate(MODEL, None, moderate(), steps=21, seeds=[0, 1], env=env, start_date=START,
                               progress=False)
        params = moderate().as_tensors(learn=("transmission_scale", "household_weight", "detection_rate"))
        res = at.simulate(MODEL, None, params, steps=21, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=list(interventions))
        (res["new_infections"].sum() + res["reported_cases"].sum()).backward()
        return [params.transmission_scale.grad, params.household_weight.grad, params.detection_rate.grad]

    by_age = run(True)
    assert tables and all(tables)
    per_agent = run(False)
    for a, b in zip(by_age, per_agent):
        assert torch.equal(a, b)
    hard, hard_arrays = run(True, sampler=at.Hard()), run(False, sampler=at.Hard())
    for name in hard.metrics:
        assert torch.equal(hard[name], hard_arrays[name]), name
    tables.clear()
    run(True, [at.Intervention("vaccination", START, START + dt.timedelta(days=30), 0.02)])
    assert tables and not any(tables)


@pytest.mark.parametrize("case", ["plain", "kept shares", "vaccination", "learnable sigma", "checkpointed"])
def test_the_transition_hands_the_household_weight_sums_to_the_force_with_the_same_gradients(population, case,
                                                                                             monkeypatch):
    """The transition's fused native pass, which makes d λ household by household, also sums the force's household
    term's weights (d λ σ) · kept per household (`transmission.hand_weight_sums`), and the force's backward leaves that
    term out of its own pass: the same gradients bit for bit as the force summing them, with the household and the
    all-layer kept shares and in checkpointed segments; declined where the force is asked for more of that term (d σ,
    for a learnable σ or one that carries the vaccinations' derivative). A sum of the wrong weights, or over the wrong
    agents, fails."""
    from agenttensor import transmission

    params = moderate(initial_prevalence=0.01)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "household_weight", "detection_rate") + \
        (("susceptibility",) if case == "learnable sigma" else ())
    interventions = {"plain": [], "vaccination": [at.Intervention("vaccination", 2, 400, 0.02)]}.get(case, [
        at.Intervention("transmission_reduction", 2, 400, 0.2, layer="household"),
        at.Intervention("transmission_reduction", 4, 400, 0.1)])
    hand, handed_term = transmission.hand_weight_sums, transmission._handed_term
    used = []

    def counted(*args):
        out = handed_term(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(transmission, "_handed_term", counted)

    def run(handing: bool):
        monkeypatch.setattr(transmission, "hand_weight_sums", hand if handing else lambda *args: None)
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=14, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough(), interventions=interventions,
                          grad_checkpoint_every=7 if case == "checkpointed" else None)
        (res["new_infections"].sum() + 2 * res["reported_cases"].sum() + res["hospital_admissions"].sum()).backward()
        return res, [getattr(learn, name).grad.clone() for name in names]

    handed, handed_grads = run(True)
    uses, used[:] = list(used), []
    reference, grads = run(False)
    assert not any(used)
    if case == "learnable sigma":
        assert uses and not any(uses)  # the force makes d σ: it keeps the term
    elif case == "vaccination":  # σ carries the vaccinations' derivative from day 2 on: d σ, as for a learnable σ
        assert any(uses) and not all(uses)
    else:
        assert sum(uses) >= 12  # every day with a gradient of the force (the last one's has none)
    for name in reference.metrics:
        assert torch.equal(handed[name], reference[name]), name
    for name, a, b in zip(names, handed_grads, grads):
        assert a.abs().sum() > 0 and torch.equal(a, b), name


def test_isolatings_gradient_is_added_in_place_at_the_infectious_agents_only(population, monkeypatch):
    """The own contributions' native backward adds isolating's part ι D (−η), 0 but at the infectious agents, into the
    gradient the exits handed it at those agents only: the same gradients as the torch ops, which add it everywhere,
    with a loss on the isolating share (every agent's isolating carries a derivative of its own). An agent skipped
    that is infectious, or one whose derivative is lost, fails."""
    from models.covid import contributions_native

    params = moderate(initial_prevalence=0.02)
    env = MODEL.setup(population, params.as_tensors(), "cpu")
    names = ("transmission_scale", "isolation_effectiveness", "detection_rate", "isolate_intercept")
    native = contributions_native.backward
    in_place = []

    def spied(*args, **kwargs):
        g, writable = kwargs["passed"]["isolating"]
        in_place.append(g is not None and writable)
        return native(*args, **kwargs)

    def run(torch_ops: bool):
        monkeypatch.setattr(contributions_native, "backward", (lambda *a, **k: None) if torch_ops else spied)
        learn = params.as_tensors(learn=names)
        res = at.simulate(MODEL, None, learn, steps=14, seeds=[0, 1], env=env, start_date=START, progress=False,
                          sampler=StraightThrough())
        (res["new_infections"].sum() + 1e4 * res["isolating_share"].sum()).backward()
        return [getattr(learn, name).grad.clone() for name in names]

    native_grads = run(False)
    assert sum(in_place) >= 10
    for name, a, b in zip(names, native_grads, run(True)):
        assert a.abs().sum() > 0 and torch.equal(a, b), name

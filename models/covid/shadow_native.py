"""The backward of the day's transition with the shadow flows (`shadow._Transition`) as native passes over the agents
on CPU (models/covid/csrc/shadow_kernel.cpp): ~30 [B, N] torch ops become one pass where every household is a run of
agents (attack probabilities, their household sums and the shadow arithmetic per chunk of whole households; full NYC
74 -> 68 ms per day, medians of interleaved runs), else the attack pass, 3 household sums and the shadow pass.
shadow.py keeps the same map in torch ops (the reference, used on other devices, without a compiler and with
``AGENTTENSOR_NATIVE_KERNELS=0``); tests compare the two."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from agenttensor import native
from agenttensor._group_kernels import contiguous_groups
from agenttensor.transmission import group_sum

if TYPE_CHECKING:
    from .shadow import UnitHazard

SOURCE = Path(__file__).with_name("csrc") / "shadow_kernel.cpp"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_household_scratch: dict[tuple, list[Tensor]] = {}  # the fused pass's [B, H] scratch tables, by (B, H, device)


def household_scratch(B: int, slots: int, device: torch.device) -> list[Tensor]:
    """The fused pass's three [B, slots] scratch tables (S, q_sym, q_asym per household), kept from call to call (one
    shape at a time): allocated per call, they came back from the caching allocator as fresh memory on each backward's
    first day (the forward in between had evicted their size), and that call spent half its time zeroing new pages
    (full NYC on the AMD VM: ~100-170 against ~50 ms)."""
    key = (B, slots, str(device))
    if key not in _household_scratch:
        _household_scratch.clear()
        _household_scratch[key] = [torch.empty(B, slots, device=device) for _ in range(3)]
    return _household_scratch[key]


FLAGS = ("-O3", "-fno-trapping-math")  # lets the attack-probability loop (exp, log as polynomials) vectorise


class _Args(ctypes.Structure):  # ShadowArgs in shadow_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("B", "N", "G", "threads")] \
        + [(n, _P) for n in ("gS", "gE", "gIs", "gIa", "gH", "gR", "gD", "g_exposure", "g_latent", "g_infections",
                             "g_report", "g_admissions", "g_deaths", "borough", "age_group", "symptomatic", "hosp",
                             "death", "detect_sym", "detect_asym", "testing", "cell")] \
        + [("cells", _I)] + [(n, _P) for n in ("vaccinated", "efficacy_severe", "stage_end", "from_sym_sums",
                                               "from_asym_sums", "q_sym", "q_asym", "household")] \
        + [("households", _I)] + [(n, _F) for n in ("half_infectious", "rate_E", "rate_Is", "rate_Ia", "rate_H")] \
        + [(n, _P) for n in ("out_E", "out_Is", "out_Ia", "out_H", "out_exposure0", "out_latent0", "out_new_E")] \
        + [(n, _P) for n in ("sigma", "scale", "kept1", "kept2")] \
        + [(n, _I) for n in ("sigma_stride", "scale_stride", "kept1_stride", "kept2_stride")] \
        + [(n, _P) for n in ("susceptible", "alpha")] \
        + [(n, _F) for n in ("d_sym", "d_asym", "f_mean")] + [("susceptible_sums", _P), ("ages", _I)] \
        + [(n, _P) for n in ("infection_mask", "out_S", "borough_starts", "survival", "out_hazard", "timed_flags")] \
        + [("susceptible_bit", _I), ("sigma_table", _P), ("sigma_table_stride", _I), ("weight_sums", _P)]


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_covid_attack.argtypes = [_I, _I, _P, _I, _P, _P, _P, _I, _P, _F, _F, _F, _P, _P, _P, _I]
    library.agenttensor_covid_shadow_backward.argtypes = [ctypes.POINTER(_Args)]
    library.agenttensor_covid_shadow_backward_fused.argtypes = [ctypes.POINTER(_Args)]


# the outputs (d E0, d I_sym0, d I_asym0, d H0, d exposure0, d latent0, d S0) that may be written over the incoming
# gradient named here (`backward`'s ``reuse``)
REUSABLE = dict(out_E="gE", out_Is="gIs", out_Ia="gIa", out_H="gH", out_exposure0="g_exposure", out_latent0="g_latent",
                out_S="gS")


def age_group_bytes(env) -> Tensor:
    """[N] uint8: the environment's age groups, one byte per agent (what the native passes read), once per run."""
    return env.memo("age_group_bytes", (env.age_group,), lambda: env.age_group.to(torch.uint8))


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_covid_shadow", _declare, flags=FLAGS)


def _nonzero_outputs(grads: dict[str, Tensor | None]) -> tuple[bool, ...]:
    """Which of (d E0, d I_sym0, d I_asym0, d H0, d exposure0, d latent0, d new_E) can be non-zero, given which
    incoming gradients arrived: as `shadow._transition_backward`, which returns None for the others (e.g. d H0
    without a gradient of H, R, D or deaths: a loss on new infections, cases and admissions)."""
    has = {name: g is not None for name, g in grads.items()}
    enter = has["gIs"] or has["gIa"] or has["g_report"]
    return (enter or has["gE"] or has["g_exposure"],
            has["gR"] or has["gIs"] or has["gH"] or has["g_admissions"],
            has["gR"] or has["gIa"],
            has["gR"] or has["gH"] or has["gD"] or has["g_deaths"],
            has["g_exposure"] or has["gS"] or has["g_infections"] or has["g_latent"],
            has["g_latent"] or enter,
            has["gE"] or has["gS"] or has["g_infections"])


def _ptr(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def backward(k, unit: UnitHazard, susceptible: Tensor | None, stage_end: Tensor, vaccinated: Tensor | None,
             testing: Tensor | None, grads: dict[str, Tensor | None], f_mean: float, d_sym: float, d_asym: float,
             half_infectious: float, rate: dict[str, float], infection_mask: Tensor | None = None,
             survival: Tensor | None = None, want_new_E: bool = True,
             reuse: dict[str, Tensor] | None = None, timed_flags: Tensor | None = None,
             household_weight_sums: dict | None = None) -> tuple[Tensor, ...] | None:
    """(d E0, d I_sym0, d I_asym0, d H0, d exposure0, d latent0, d new_E, d S0, d λ), each [B, N] or None where no
    incoming gradient reaches it (`_nonzero_outputs`; d new_E only if ``want_new_E``; d S0 = gS + mask · d new_E only
    with ``infection_mask``, the infection event's d new_E / d S [B, N] bool; d λ = d new_E · S · survival only with
    ``survival``, exp(−λ) [B, N]), or None where the kernel does not apply (not CPU float32, kernels off
    or unbuilt): the caller runs the torch ops. ``k``: ShadowConstants; ``unit``: the household unit hazard, factored
    (multiplied out per chunk in the fused pass, else here); ``grads``: the incoming [B, N] (gS ... g_latent) and per-borough [B, G] (g_infections, g_report,
    g_admissions, g_deaths) gradients, None where none arrived. ``reuse``: incoming gradients (by name, of `REUSABLE`'s)
    that nobody reads after this call: each output is written over its own (`REUSABLE`) instead of into a fresh
    [B, N]: the caller's promise; the buffers must be distinct. ``stage_end`` None: ``timed_flags`` [B, N] uint8
    carries its sign in bit 3 (`contributions_native.pack`); ``susceptible`` None: they carry S in bit 4 (unpacked
    per tile: no float32 S saved by the transition). ``household_weight_sums``: a dict that receives, where the pass is
    the fused one and makes d λ, the household sums of the force's household-term weights (d λ σ) · kept ([B, H + 1],
    key "sums"; `agenttensor.transmission.hand_weight_sums`)."""
    if not unit.sigma.is_cpu or any(g is not None and g.dtype != torch.float32 for g in grads.values()):
        return None
    library = _library()
    if library is None:
        return None
    env = k.env
    B, N = (stage_end if stage_end is not None else timed_flags).shape
    if survival is not None and (survival.shape != (B, N) or not survival.is_contiguous()
                                 or survival.dtype != torch.float32):
        return None
    G = len(env.group_labels)
    keep = []  # every tensor whose pointer the kernel reads, alive until it returns

    def dense(x: Tensor | None, dtype=torch.float32) -> Tensor | None:
        if x is None:
            return None
        x = x.to(dtype).expand(B, -1).contiguous()
        keep.append(x)
        return x

    def per_element(x) -> Tensor:  # scalar or [B, 1] -> [B]
        x = torch.as_tensor(x, dtype=torch.float32).detach().reshape(-1).expand(B).contiguous()
        keep.append(x)
        return x

    def table(x: Tensor, dtype=torch.float32) -> Tensor:  # per-age-group probabilities, per-agent indices
        x = x.detach().to(dtype).contiguous()
        keep.append(x)
        return x

    g = {name: dense(value) for name, value in grads.items()}
    args = _Args(B=B, N=N, G=G, threads=torch.get_num_threads(), half_infectious=half_infectious,
                 rate_E=rate["E"], rate_Is=rate["I_sym"], rate_Ia=rate["I_asym"], rate_H=rate["H"])
    for name, value in g.items():
        setattr(args, name, _ptr(value))
    detect_sym = per_element(k.detection_rate)
    detect_asym = per_element(torch.as_tensor(k.detection_rate) * torch.as_tensor(k.asymptomatic_detection_ratio))
    args.detect_sym, args.detect_asym = _ptr(detect_sym), _ptr(detect_asym)
    if testing is not None:
        cells = dense(testing.flatten(1))
        args.testing, args.cells = _ptr(cells), cells.shape[1]
    for name in ("borough", "cell"):
        setattr(args, name, _ptr(table(getattr(env, name), torch.int32)))
    ages = k.symptomatic.numel()
    if ages > 256:  # (one byte per agent below; the model's 10 age groups)
        return None
    args.age_group = _ptr(table(age_group_bytes(env),
                                torch.uint8))
    slices = env.borough_slices
    if len(slices) == G and all(a == b for (_, a), (b, _) in zip(slices, slices[1:])) and slices[0][0] == 0 \
            and slices[-1][1] == N:  # agents sorted by borough: the slices tile 0..N in order
        starts = torch.tensor([a for a, _ in slices] + [N], dtype=torch.int64)
        keep.append(starts)
        args.borough_starts = starts.data_ptr()
    for name, values in (("symptomatic", k.symptomatic), ("hosp", k.hosp_given_symptomatic), ("death", k.death_given_hosp)):
        setattr(args, name, _ptr(table(values)))
    args.ages = ages
    if vaccinated is not None:
        args.vaccinated, args.efficacy_severe = _ptr(dense(vaccinated)), _ptr(per_element(k.vaccine_efficacy_severe))
    if stage_end is not None:
        stage = stage_end.contiguous()
        keep.append(stage)
        args.stage_end = _ptr(stage)
    else:
        if timed_flags.dtype != torch.uint8 or timed_flags.shape != (B, N):
            return None
        args.timed_flags = _ptr(table(timed_flags, torch.uint8))
    # read by the attack probabilities and by d λ; None: bit 4 of the flags (unpacked per tile by the kernels)
    if susceptible is None and timed_flags is None:
        return None
    S = dense(susceptible)
    args.susceptible_bit = int(S is None)

    def materialized() -> Tensor:  # S as floats, where a pass reads it as an array
        nonlocal S
        if S is None:
            S = ((timed_flags >> 4) & 1).to(torch.float32)
            keep.append(S)
            args.susceptible_bit = 0
        return S

    if g["g_exposure"] is not None:
        layer = env.household
        slots = layer.num_groups + 1
        household = table(layer.slot, torch.int32)  # GroupLayer's own int32 slots: no copy
        alpha = per_element(k.asymptomatic_infectiousness)
        fused = contiguous_groups(layer.slot) and unit.slot is layer.slot and len(unit.kept) <= 2 \
            and unit.scale.shape[-1] == slots  # households as runs of agents: attack, sums and shadow in one pass
        if fused:
            sums = household_scratch(B, slots, unit.sigma.device)  # scratch: S, q_sym, q_asym per household
            args.susceptible_sums, args.from_sym_sums, args.from_asym_sums = (x.data_ptr() for x in sums)
            for name, x, length in (("sigma", unit.sigma, N), ("scale", unit.scale, slots),
                                    *((f"kept{n + 1}", x, N) for n, x in enumerate(unit.kept))):
                x = table(x.reshape(-1, length))  # [B | 1, length] rows
                setattr(args, name, x.data_ptr())
                setattr(args, f"{name}_stride", 0 if x.shape[0] == 1 else length)
            args.susceptible, args.alpha = _ptr(S), alpha.data_ptr()
            if unit.sigma_table is not None and unit.sigma_table.shape[-1] == ages:  # σ read by age group
                sigma_table = table(unit.sigma_table.reshape(-1, ages))
                args.sigma_table, args.sigma_table_stride = sigma_table.data_ptr(), 0 if sigma_table.shape[0] == 1 else ages
            args.d_sym, args.d_asym, args.f_mean = d_sym, d_asym, f_mean
        else:
            u = unit.dense().detach().to(torch.float32).contiguous()
            keep.append(u)
            q_sym, q_asym = torch.empty(B, N), torch.empty(B, N)
            S_sums = group_sum(materialized(), layer.slot, slots)
            library.agenttensor_covid_attack(B, N, u.data_ptr(), 0 if u.shape[0] == 1 else N, S.data_ptr(),
                                             S_sums.data_ptr(), household.data_ptr(), slots, alpha.data_ptr(), d_sym,
                                             d_asym, f_mean, g["g_exposure"].data_ptr(), q_sym.data_ptr(),
                                             q_asym.data_ptr(), torch.get_num_threads())
            from_sym, from_asym = group_sum(q_sym, layer.slot, slots), group_sum(q_asym, layer.slot, slots)
            keep += [S_sums, q_sym, q_asym, from_sym, from_asym]
            args.q_sym, args.q_asym, args.from_sym_sums, args.from_asym_sums = map(_ptr, (q_sym, q_asym, from_sym,
                                                                                          from_asym))
        args.household, args.households = household.data_ptr(), slots
    needed = _nonzero_outputs(grads)
    new_E_reached = needed[-1]  # d new_E can be non-zero (it is computed for d S0 and d λ even where not returned)
    reuse = reuse or {}

    def fresh_or_reused(name: str) -> Tensor:  # the incoming gradient's buffer where the caller gave it up, else new
        g = reuse.get(REUSABLE.get(name, ""))
        usable = g is not None and g.shape == (B, N) and g.dtype == torch.float32 and g.is_contiguous()
        return g if usable else torch.empty(B, N)

    names = ("out_E", "out_Is", "out_Ia", "out_H", "out_exposure0", "out_latent0", "out_new_E")
    out = tuple(fresh_or_reused(name) if x else None
                for name, x in zip(names, (*needed[:-1], want_new_E and new_E_reached)))
    for name, value in zip(names, out):
        setattr(args, name, _ptr(value))
    g_S0 = None
    if infection_mask is not None and (new_E_reached or grads["gS"] is not None):
        mask = infection_mask.expand(B, N).contiguous().view(torch.uint8)
        keep.append(mask)
        g_S0 = fresh_or_reused("out_S")
        args.infection_mask, args.out_S = mask.data_ptr(), g_S0.data_ptr()
    g_hazard = None
    if survival is not None and new_E_reached:  # d λ = d new_E · S · exp(−λ)
        g_hazard = torch.empty(B, N)
        args.susceptible, args.survival, args.out_hazard = _ptr(S), survival.data_ptr(), g_hazard.data_ptr()
        if household_weight_sums is not None and args.sigma:  # (the fused pass: households as runs of agents)
            # the pass writes every slot that has agents: zeros at the others only (no [B, H + 1] fill a day)
            sums = torch.empty(B, env.household.num_groups + 1)
            sums[:, env.static("household_slots_without_agents", lambda: torch.nonzero(torch.bincount(
                env.household.slot, minlength=env.household.num_groups + 1) == 0).flatten())] = 0.0
            args.weight_sums = sums.data_ptr()
            household_weight_sums["sums"] = sums
    (library.agenttensor_covid_shadow_backward_fused if args.sigma else library.agenttensor_covid_shadow_backward)(
        ctypes.byref(args))
    return (*out, g_S0, g_hazard)

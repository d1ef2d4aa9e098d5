"""The covid model's hard-mode day as native passes on CPU (models/covid/csrc/hard_kernel.cpp):

- `hard_force`: the force of infection (`model.infection_pressure`): every layer's group totals of the infectious
  agents' contributions in one pass over I_sym and I_asym, the layers' tables made from them (the scaling and the
  community mixing), and the layered force read from the tables, in one call whose arguments are kept from day to day;
- `hard_progress`: the transition (`model.progress`): the infection draws, the newly infected agents' entry into E and
  every exiting agent's next stage, detection, isolation and countdown, with the per-borough flows and the stage counts'
  changes counted in the same pass;
- and for gradient modes, `source_totals_at`: `hard_force`'s group totals (no derivative flows through them) from the
  infectious agents' pairs and packed memberships, with each source's position and contribution that the derivatives
  read, and the scaled layers' values at the summed slots.

The same bits as the torch ops in `model` (the reference, used on other devices, in gradient modes but for the totals,
without a compiler and with ``AGENTTENSOR_NATIVE_KERNELS=0``); tests compare the two. At AgentTorch's 37,518 agents a
day's torch ops were calls on tens of agents: ~0.6 ms of the transition's, ~0.3 ms of the force's."""

from __future__ import annotations

import ctypes
import itertools
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from agenttensor import native

SOURCE = Path(__file__).with_name("csrc") / "hard_kernel.cpp"
FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math")  # (-fno-trapping-math: the infection draws' polynomial exp
# and its comparisons vectorise, `certified_tests`; no result changes: no contraction, no reassociation)
_P, _I = ctypes.c_void_p, ctypes.c_int64
STREAMS = ("symptoms", "hospitalisation", "death", "detection", "isolation", "duration-exit", "duration-E", "infection")
FIELDS = ("S", "E", "I_asym", "I_sym", "H", "R", "D", "isolating")  # updated in place, uint8 [B, N]
# the rows of the flows [13, B, G]
FLOWS = ("new_infections", "reported", "admissions", "deaths", "out_E", "in_Ia", "out_Ia", "in_Is", "out_Is", "out_H",
         "in_R", "isolating_after", "isolating_prior")  # the first four: the metrics' flows, in their order
# then the changes of the per-borough stage counts [8, B, G] (`CovidEnv.rolled_counts`), as `progress` forms them
CHANGES = ("S", "E", "I_asym", "I_sym", "H", "R", "D", "isolating")


class _Strided(ctypes.Structure):
    _fields_ = [("p", _P), ("sb", _I), ("sn", _I)]


class _Args(ctypes.Structure):  # ProgressArgs in hard_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("B", "N", "G", "K", "t", "threads")] \
        + [(n, _P) for n in ("S", "E", "Ia", "Is", "H", "R", "D", "isolating", "stage_end")] \
        + [(n, _P) for n in ("survival", "hazard", "exp")] + [("exp_mode", _I), ("local_threads", _P)] \
        + [(n, _P) for n in ("base", "keys", "age_group", "borough", "symptomatic", "hosp", "death")] \
        + [(n, _Strided) for n in ("detect", "detect_asym_ratio", "testing", "isolate", "efficacy_severe")] \
        + [(n, _P) for n in ("vaccinated", "cdf_E", "cdf_exit", "flows")] + [("infected", _I), ("pairs", _P)]


class _SourceLayer(ctypes.Structure):  # SourceLayer in the kernel, field for field
    _fields_ = [("slot", _P), ("slot_i32", _I), ("slots", _I), ("away", _I), ("lever", _Strided), ("on_site", _P),
                ("closed", _Strided), ("out", _P)]


class _PairLayer(ctypes.Structure):  # PairLayer in the kernel, field for field
    _fields_ = [("slot", _P), ("slot_i32", _I), ("slots", _I), ("away", _I), ("lever", _Strided),
                ("on_site", _Strided), ("closed", _Strided), ("out", _P), ("index", _P), ("values", _P),
                ("product", _P), ("scale", _P), ("scale_stride", _I)]


class _TableLayer(ctypes.Structure):  # TableLayer in the kernel, field for field
    _fields_ = [("kind", _I), ("weight", _P), ("inv", _P), ("level", _P)]


class _Community(ctypes.Structure):  # Community in the kernel, field for field
    _fields_ = [("C", _I), ("G", _I), ("borough", _P), ("divisor", _P), ("mixing", _P), ("size", _P), ("rho", _P)]


class _ForceArgs(ctypes.Structure):  # ForceArgs in the kernel, field for field
    _fields_ = [(n, _I) for n in ("B", "N", "L", "threads")] + [(n, _P) for n in ("I_sym", "I_asym", "isolating")] \
        + [("alpha", _Strided), ("eta", _Strided), ("sources", ctypes.POINTER(_SourceLayer)),
           ("tables", ctypes.POINTER(_TableLayer)), ("scale", _P), ("multiplier", _P), ("community", _Community),
           ("layered_force", _P), ("force_layers", _P), ("sigma", _P), ("sigma_stride", _I), ("force", _P),
           ("sigma_by_group", _P)]


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_covid_hard_progress.argtypes = [ctypes.POINTER(_Args)]
    library.agenttensor_covid_take_pairs.argtypes = [_P, _P, _P]
    library.agenttensor_covid_hard_force.argtypes = [ctypes.POINTER(_ForceArgs)]
    library.agenttensor_covid_source_totals_at.argtypes = [_I, _I, _I, _P, _P, _P, ctypes.POINTER(_Strided),
                                                           ctypes.POINTER(_Strided), _I, ctypes.POINTER(_PairLayer), _I]


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_covid_hard", _declare, flags=FLAGS)


def _cpu(x: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    return x.is_cpu and x.dtype == dtype and tuple(x.shape) == shape and x.is_contiguous()


def _strided(x: Tensor | None, B: int, N: int) -> _Strided | None:
    """A per-agent value as `At` reads it (a number, [N], [B | 1, N] or [B | 1, 1]) as a broadcast [B, N] float32 view;
    None where it is not one."""
    if x is None:
        return _Strided(None, 0, 0)
    if not (isinstance(x, Tensor) and x.is_cpu and x.dtype == torch.float32 and x.dim() <= 2):
        return None
    try:
        view = x.detach().expand(B, N)
    except RuntimeError:
        return None
    return _Strided(view.data_ptr(), view.stride(0), view.stride(1))


def enabled() -> bool:
    """Whether the kernels are on and built."""
    return _library() is not None


def hard_progress(fields: dict[str, Tensor], stage_end: Tensor, t: int, hazard: Tensor, keys: Tensor, base: Tensor,
                  age_group: Tensor, borough: Tensor, G: int, tables: dict[str, Tensor],
                  per_agent: dict[str, Tensor | None], vaccinated: Tensor | None, cdf_E: Tensor, cdf_exit: Tensor,
                  cache: dict | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]] | None:
    """Update ``fields`` (`FIELDS`, uint8 [B, N]) and ``stage_end`` (int16 [B, N]) in place for step ``t``: the agents
    of S are infected where u < 1 − exp(−``hazard``) (λ [B, N] float32; `StepContext.hazard_event`'s draws, exp(−λ)
    made inside the pass by torch's own exp where `native.torch_exp` finds it, else by torch before it) and enter E,
    the agents whose countdown is ``t`` exit their stage. ``keys`` [8, B] int32 are the `STREAMS`' keys at t;
    ``tables``: symptomatic, hosp, death [A] float32; ``per_agent``: detect, detect_asym_ratio, isolate and (optional)
    testing, efficacy_severe as `At` reads them; ``vaccinated`` [B, N] uint8 with the vaccination lever, else None;
    ``cdf_E`` [K], ``cdf_exit`` [3, K] (I_asym, I_sym, H). -> (the flows and the stage counts' changes [21, B, G]
    float32 (rows `FLOWS`, then `CHANGES`), today's infections as `select.nonzero`'s (b, i) int64 pairs), or None
    where the kernel does not apply (nothing is then written). With a ``cache``, the arguments are kept there while
    the inputs are the same tensors (a day then checks and sets only what is new)."""
    library = _library()
    if library is None or stage_end.dim() != 2:
        return None
    shape = tuple(stage_end.shape)
    B, N = shape
    static = (base, age_group, borough, tables["symptomatic"], tables["hosp"], tables["death"], cdf_E, cdf_exit)
    plan = None if cache is None else cache.get("hard_progress")
    if plan is None or plan.shape != shape or plan.G != G or not _same(plan.static, static):
        plan = _progress_plan(shape, G, static)
        if cache is not None:
            cache["hard_progress"] = plan
    args = plan.args
    if args is None:
        return None
    inputs = (per_agent["detect"], per_agent["detect_asym_ratio"], per_agent.get("testing"), per_agent["isolate"],
              per_agent.get("efficacy_severe"), vaccinated)
    if not _alive(plan.per_agent, inputs):
        plan.per_agent = ()
        strided = [_strided(x, B, N) for x in inputs[:5]]
        if any(v is None for v in strided) or any(strided[k].p is None for k in (0, 1, 3)) \
                or (vaccinated is not None and (not _cpu(vaccinated, torch.uint8, shape) or strided[4].p is None)):
            return None
        args.detect, args.detect_asym_ratio, args.testing, args.isolate, args.efficacy_severe = strided
        args.vaccinated = None if vaccinated is None else vaccinated.data_ptr()
        plan.per_agent = _refs(inputs)
    state = (*(fields[name] for name in FIELDS), stage_end)
    if not _alive(plan.fields, state):  # the fields (a donated state's are the same tensors from day to day)
        plan.fields = ()
        if not (_cpu(stage_end, torch.int16, shape) and all(_cpu(x, torch.uint8, shape) for x in state[:-1])):
            return None
        args.S, args.E, args.Ia, args.Is, args.H, args.R, args.D, args.isolating, args.stage_end = (
            x.data_ptr() for x in state)
        plan.fields = _refs(state)
    if not (_cpu(keys, torch.int32, (len(STREAMS), B)) and _cpu(hazard, torch.float32, shape)):
        return None
    exp = native.torch_exp()
    survival = (-hazard).exp_() if exp is None else None  # (kept alive through the call)
    args.survival, args.hazard = (None, hazard.data_ptr()) if survival is None else (survival.data_ptr(), None)
    if exp is not None:
        args.exp, args.exp_mode, args.local_threads = exp
    flows = torch.empty(len(FLOWS) + len(CHANGES), B, G, dtype=torch.float32)
    args.t, args.threads, args.keys, args.flows = t, torch.get_num_threads(), keys.data_ptr(), flows.data_ptr()
    library.agenttensor_covid_hard_progress(ctypes.byref(args))
    torch.autograd.graph.increment_version(state)  # in-place writes: the version counters move as index_put_'s would
    infected_b, infected_i = torch.empty(args.infected, dtype=torch.int64), torch.empty(args.infected, dtype=torch.int64)
    if args.infected:
        library.agenttensor_covid_take_pairs(args.pairs, infected_b.data_ptr(), infected_i.data_ptr())
    return flows, (infected_b, infected_i)


class _ProgressPlan:
    """`hard_progress`'s kept arguments: made from the inputs ``static`` (held), with the per-agent values and the
    fields set into them when they are new tensors (by weak reference: a run's state is not kept alive; a tensor that
    died is a new one). ``args`` None: the kernel does not apply."""

    def __init__(self, shape: tuple[int, int], G: int, static: tuple, args: _Args | None):
        self.shape, self.G, self.static, self.args = shape, G, static, args
        self.per_agent: tuple = ()
        self.fields: tuple = ()


def _refs(xs: tuple) -> tuple:
    return tuple(None if x is None else weakref.ref(x) for x in xs)


def _alive(refs: tuple, xs: tuple) -> bool:
    """Whether ``refs`` (`_refs`) are weak references to the tensors ``xs`` (None for None)."""
    if len(refs) != len(xs):
        return False
    for r, x in zip(refs, xs):
        if (x is not None) if r is None else (r() is not x):
            return False
    return True


def _progress_plan(shape: tuple[int, int], G: int, static: tuple) -> _ProgressPlan:
    B, N = shape
    base, age_group, borough, symptomatic, hosp, death, cdf_E, cdf_exit = static
    K = cdf_E.numel()
    if not (all(_cpu(x, torch.float32, tuple(x.shape)) and x.dim() == 1 for x in (symptomatic, hosp, death))
            and _cpu(cdf_E, torch.float32, (K,)) and _cpu(cdf_exit, torch.float32, (3, K))
            and all(_cpu(x, torch.int32, (N,)) for x in (base, age_group, borough))):
        return _ProgressPlan(shape, G, static, None)
    args = _Args(B=B, N=N, G=G, K=K, base=base.data_ptr(), age_group=age_group.data_ptr(), borough=borough.data_ptr(),
                 symptomatic=symptomatic.data_ptr(), hosp=hosp.data_ptr(), death=death.data_ptr(),
                 cdf_E=cdf_E.data_ptr(), cdf_exit=cdf_exit.data_ptr())
    return _ProgressPlan(shape, G, static, args)


class SourceSpec(NamedTuple):
    """One layer of `source_totals_at`: ``slot`` [N] int32 or int64 with values in [0, S); ``out`` [B, S] float32
    contiguous, added into; ``away``: ι a, else ι; times the presence 1 − ``lever`` and, for workplaces, ``on_site``
    and 1 − ``closed`` (float32, as `At` reads them, or None); ``record``: also each source's flat position and
    contribution. ``product`` [B, S] zeros and ``scale`` [S] or [B, S] (float32), or None: scale · totals written at
    the positions summed at (`transmission._product_at`'s numbers), then ``out`` set back to zeros there."""
    slot: Tensor
    out: Tensor
    away: bool
    lever: Tensor | None = None
    on_site: Tensor | None = None
    closed: Tensor | None = None
    record: bool = False
    product: Tensor | None = None
    scale: Tensor | None = None


def source_totals_at(b: Tensor, i: Tensor, flags: Tensor, alpha: Tensor, eta: Tensor, layers: list[SourceSpec]
                     ) -> list[tuple[Tensor, Tensor] | None] | None:
    """Gradient modes: each layer's group totals of the contributions of the infectious agents (b, i) [M] int64
    (`select.nonzero_bits` of ``flags`` [B, N] uint8, `contributions_native.pack`'s bits 0-2: I_sym, I_asym,
    isolating), ι = I_sym + α I_asym or ι a = ι (1 − η isolating) times the layer's presence, added into each layer's
    ``out`` at b · S + slot (at the slot where B is 1), the reads at the sources on the threads and the sums in one
    serial pass: the numbers of `model.infection_pressure`'s gathers, products and index_add. -> per layer (flat
    positions [M] int64, contributions [M]) where ``record``, else None; or None (nothing written) where the kernel does
    not apply."""
    library = _library()
    if library is None or flags.dim() != 2 or not _cpu(flags, torch.uint8, tuple(flags.shape)):
        return None
    B, N = flags.shape
    M = b.numel()
    if not (_cpu(b, torch.int64, (M,)) and _cpu(i, torch.int64, (M,))):
        return None
    a, e = _strided(alpha, B, N), _strided(eta, B, N)
    if a is None or e is None or a.p is None or e.p is None:
        return None
    structs, recorded, scratch = [], [], []  # (the pointers: into the caller's tensors, or into scratch)
    for spec in layers:
        S = spec.out.shape[-1]
        strided = [_strided(x, B, N) for x in (spec.lever, spec.on_site, spec.closed)]
        if not (_cpu(spec.out, torch.float32, (B, S)) and spec.slot.dtype in (torch.int32, torch.int64)
                and _cpu(spec.slot, spec.slot.dtype, (N,))) or any(x is None for x in strided) \
                or (spec.closed is not None and spec.on_site is None):
            return None
        if spec.product is not None and not (
                _cpu(spec.product, torch.float32, (B, S)) and spec.scale is not None and spec.scale.dim() in (1, 2)
                and _cpu(spec.scale, torch.float32, tuple(spec.scale.shape)) and spec.scale.shape[-1] == S
                and (spec.scale.dim() == 1 or spec.scale.shape[0] in (1, B))):
            return None
        index, values = torch.empty(M, dtype=torch.int64), torch.empty(M)  # (every layer's: the kernel's scratch)
        recorded.append((index, values) if spec.record else None)
        product = None if spec.product is None else (spec.product.data_ptr(), spec.scale.data_ptr(),
                                                      S if spec.scale.dim() == 2 and spec.scale.shape[0] > 1 else 0)
        structs.append(_PairLayer(spec.slot.data_ptr(), int(spec.slot.dtype == torch.int32), S, int(spec.away),
                                  *strided, spec.out.data_ptr(), index.data_ptr(), values.data_ptr(),
                                  *(product or (None, None, 0))))
        scratch.append((index, values))
    array = (_PairLayer * len(structs))(*structs)
    library.agenttensor_covid_source_totals_at(B, N, M, b.data_ptr(), i.data_ptr(), flags.data_ptr(),
                                               ctypes.byref(a), ctypes.byref(e), len(structs), array,
                                               torch.get_num_threads())
    return recorded


class ForceLayerSpec(NamedTuple):
    """One layer of `hard_force`: its sources (slot [N] int32 or int64 with values in [0, S); away: ι a, else ι; the
    presence 1 − ``lever`` and, for workplaces, ``on_site`` [B, N] uint8 and 1 − ``closed``, each as `At` reads it or
    None), its table (``kind``: "scaled" (c inv_s) T_s, "levels" ((c inv_s) level_s) T_s, "community" (S = C + 1);
    c = β w with ``weight``; ``inv`` and ``level`` [S]) and its force term (presence, factor, factor_all [B | 1, N] or
    None). ``kind`` is one of `KINDS`' own strings: the kept arguments are matched by identity. The first `STATIC`
    fields make the arguments; the others (per-agent values, e.g. levers that change during a run) are set into
    them when they change."""
    slot: Tensor
    away: bool
    kind: str
    weight: Tensor
    inv: Tensor | None
    level: Tensor | None
    lever: Tensor | None
    on_site: Tensor | None
    closed: Tensor | None
    presence: Tensor | None
    factor: Tensor | None
    factor_all: Tensor | None


STATIC = 6


class CommunitySpec(NamedTuple):
    """The community table's mixing: NTA c's borough ``borough`` [C] int64 of G < 8, ``divisor`` [G] (agents per
    borough, ≥ 1), ``mixing`` [G, G] row-normalised, ``size`` [C] (agents per NTA, ≥ 1), ``rho`` the borough share."""
    borough: Tensor
    divisor: Tensor
    mixing: Tensor
    size: Tensor
    rho: Tensor


KINDS = {"scaled": 0, "levels": 1, "community": 2}


def _one_value(x: Tensor) -> bool:
    return isinstance(x, Tensor) and x.is_cpu and x.dtype == torch.float32 and x.numel() == 1


class _Plan:
    """`hard_force`'s kept arguments: made from the inputs ``static`` (and ``shape``), with the per-agent inputs
    ``dynamic`` set into them (the inputs are held: their memory stays theirs). ``args`` None: the kernel does not
    apply to the static inputs; ``ready`` False: not to the per-agent ones."""

    def __init__(self, shape: tuple[int, int], static: tuple):
        self.shape, self.static, self.dynamic = shape, static, ()
        self.args: _ForceArgs | None = None
        self.ready = False  # whether the per-agent inputs `dynamic` are set and apply
        self.tables: dict[str, Tensor] = {}
        self.structs: tuple = ()  # (sources, table layers, force layers) ctypes arrays
        self.kept: list = []  # `layered_force`'s keep list form, for `layered_shares_at`
        self.sigma_table: tuple | None = None  # σ as a table by group (`_group_kernels.by_group`), held


def hard_force(cache: dict, fields: tuple[Tensor, Tensor, Tensor], alpha: Tensor, eta: Tensor, scale: Tensor,
               multiplier: Tensor, layers: dict[str, ForceLayerSpec], community: CommunitySpec, sigma: Tensor
               ) -> tuple[Tensor, dict[str, Tensor], list] | None:
    """`model.infection_pressure` in hard mode as one native call: every layer's group totals of the infectious
    agents' contributions (``fields`` I_sym, I_asym, isolating uint8 [B, N]; ι = I_sym + α I_asym, ι a = ι (1 − η
    isolating)), the layers' tables made from them in place (β = scale · multiplier), and the force of infection
    σ Σ_l ((table_l[slot_l] presence_l) factor_l) factor_all_l [B, N] (`_group_kernels.layered_force`'s kernel). ->
    (force, the tables [B, S] by layer, the layers' native form as `layered_force`'s keep list holds it), or None
    where it does not apply (other devices, dtypes or shapes, a derivative reaching the inputs, G ≥ 8 boroughs).

    The arguments are kept in ``cache`` (one set per set of layers) while the layers' inputs are the same tensors (their
    values may change in place): a day then sets the fields' and β's pointers and makes one call; a new per-agent
    input (σ, a lever, the on-site decisions) is set into them. The tables are the kept arguments' buffers, rewritten
    each day (one run at a time per environment)."""
    library = _library()
    I_sym, I_asym, isolating = fields
    shape = tuple(I_sym.shape)
    if library is None or len(shape) != 2 or not all(_cpu(x, torch.uint8, shape) for x in fields) \
            or not (_one_value(scale) and _one_value(multiplier)) \
            or (torch.is_grad_enabled() and (scale.requires_grad or multiplier.requires_grad)):
        return None
    specs = layers.values()
    static = (torch.is_grad_enabled(), alpha, eta, *community, *itertools.chain.from_iterable(x[:STATIC] for x in specs))
    dynamic = (sigma, *itertools.chain.from_iterable(x[STATIC:] for x in specs))
    plan = cache.get(("hard_force", *layers))  # one per set of layers (school and work days, weekends)
    if plan is None or plan.shape != shape or not _same(plan.static, static):
        plan = cache[("hard_force", *layers)] = _plan(shape, static, alpha, eta, layers, community,
                                                      cache.setdefault("hard_force_tables", {}))
    if plan.args is not None and not _same(plan.dynamic, dynamic):
        plan.ready = _set_per_agent(plan, dynamic, layers, sigma)
    if plan.args is None or not plan.ready:
        return None
    B, N = shape
    force = torch.empty(B, N)
    args = plan.args
    args.I_sym, args.I_asym, args.isolating = I_sym.data_ptr(), I_asym.data_ptr(), isolating.data_ptr()
    args.scale, args.multiplier, args.force = scale.data_ptr(), multiplier.data_ptr(), force.data_ptr()
    args.threads = torch.get_num_threads()
    library.agenttensor_covid_hard_force(ctypes.byref(args))
    return force, plan.tables, plan.kept


def _same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is not y:
            return False
    return True


def _plan(shape: tuple[int, int], static: tuple, alpha: Tensor, eta: Tensor, layers: dict[str, ForceLayerSpec],
          community: CommunitySpec, buffers: dict) -> _Plan:
    """`hard_force`'s arguments made from the static inputs (``args`` None where the kernel does not apply to them);
    the per-agent ones are set by `_set_per_agent`."""
    from agenttensor import _group_kernels

    plan = _Plan(shape, static)
    B, N = shape
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in static):
        return plan
    a, e = _strided(alpha, B, N), _strided(eta, B, N)
    C, G = community.size.numel(), community.divisor.numel()
    if a is None or e is None or a.p is None or e.p is None or not (
            0 < G < 8 and _cpu(community.borough, torch.int64, (C,)) and _cpu(community.divisor, torch.float32, (G,))
            and _cpu(community.size, torch.float32, (C,)) and _one_value(community.rho)
            and _cpu(community.mixing, torch.float32, (G, G))) \
            or (C and not 0 <= int(community.borough.min()) <= int(community.borough.max()) < G):
        return plan
    tables, sources, table_structs, terms = {}, [], [], []
    for name, spec in layers.items():
        S = C + 1 if spec.kind == "community" else -1 if spec.inv is None else spec.inv.numel()
        if spec.kind not in KINDS or not _one_value(spec.weight) \
                or (spec.kind != "community" and not _cpu(spec.inv, torch.float32, (S,))) \
                or (spec.kind == "levels" and not _cpu(spec.level, torch.float32, (S,))):
            return plan
        table = tables[name] = buffers.get((name, B, S))
        if table is None:  # one buffer per layer (of the latest shape), shared by the sets of layers: a day uses one
            for key in [key for key in buffers if key[0] == name]:
                del buffers[key]
            table = tables[name] = buffers[(name, B, S)] = torch.empty(B, S)
        sources.append(_SourceLayer(spec.slot.data_ptr(), int(spec.slot.dtype == torch.int32), S, int(spec.away),
                                    _Strided(None, 0, 0), None, _Strided(None, 0, 0), table.data_ptr()))
        table_structs.append(_TableLayer(KINDS[spec.kind], spec.weight.data_ptr(),
                                         None if spec.inv is None else spec.inv.data_ptr(),
                                         None if spec.level is None else spec.level.data_ptr()))
        terms.append((table, spec.slot, None, None, None))
    # every table's non-member slot is a zero ((c inv) · 0 sums, or the community's zero); σ and the presences and
    # factors are set by `_set_per_agent`
    forward = _group_kernels.forward_layers(torch.empty(B, N), terms, constant_last=(True,) * len(terms))
    if forward is None or forward[0] != B or forward[1] != N:
        return plan
    force_layers = forward[2]
    source_array = (_SourceLayer * len(sources))(*sources)
    table_array = (_TableLayer * len(table_structs))(*table_structs)
    plan.args = _ForceArgs(B=B, N=N, L=len(sources), alpha=a, eta=e,
                           sources=ctypes.cast(source_array, ctypes.POINTER(_SourceLayer)),
                           tables=ctypes.cast(table_array, ctypes.POINTER(_TableLayer)),
                           community=_Community(C, G, *(x.data_ptr() for x in community)),
                           layered_force=ctypes.cast(_group_kernels._library().agenttensor_layered_force, _P).value,
                           force_layers=ctypes.addressof(force_layers))
    plan.tables, plan.structs, plan.kept = tables, (source_array, table_array, force_layers), [(B, force_layers, terms)]
    return plan


def _set_per_agent(plan: _Plan, dynamic: tuple, layers: dict[str, ForceLayerSpec], sigma: Tensor) -> bool:
    """Set the per-agent inputs ``dynamic`` (σ, then each layer's lever, on_site, closed, presence, factor and
    factor_all) into the plan's arguments. -> False where one does not apply (a dtype or shape, a derivative)."""
    from agenttensor import _group_kernels

    B, N = plan.shape
    plan.dynamic = dynamic  # (held: the arguments point into them)
    source_array, _, force_layers = plan.structs
    grad = torch.is_grad_enabled()
    rows = {id(x): _group_kernels.term_rows(x, B, N) for x in dynamic if x is None or x.dtype == torch.float32}
    sigma_rows = _group_kernels.term_rows(sigma[None] if sigma.dim() == 1 else sigma, B, N)  # [N]: one row for all
    ok = sigma_rows is not None and sigma_rows[0] is not None
    for k, spec in enumerate(layers.values()):
        lever, closed = _strided(spec.lever, B, N), _strided(spec.closed, B, N)
        terms = [rows.get(id(x)) for x in (spec.presence, spec.factor, spec.factor_all)]
        if not ok or lever is None or closed is None or any(x is None for x in terms) \
                or (spec.on_site is not None and not _cpu(spec.on_site, torch.uint8, plan.shape)):
            ok = False
            break
        source = source_array[k]
        source.lever, source.closed = lever, closed
        source.on_site = None if spec.on_site is None else spec.on_site.data_ptr()
        layer = force_layers[k]
        (layer.presence, layer.presence_stride), (layer.factor, layer.factor_stride), \
            (layer.factor_all, layer.factor_all_stride) = terms
    if not ok or (grad and any(x is not None and x.requires_grad for x in dynamic)):
        return False
    plan.args.sigma, plan.args.sigma_stride = sigma_rows
    plan.sigma_table = _group_kernels._sigma_table(sigma, B, N)  # (held: the struct and what it points into)
    plan.args.sigma_by_group = None if plan.sigma_table is None else ctypes.addressof(plan.sigma_table[0])
    return True

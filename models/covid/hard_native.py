"""The covid model's hard-mode day as native passes on CPU (models/covid/csrc/hard_kernel.cpp):

- `source_totals`: every layer's group totals of the infectious agents' contributions (`model.infection_pressure`),
  one pass over I_sym and I_asym instead of the selection, ~10 gathers and products and a scatter per layer;
- `hard_progress`: the transition after the infection draws (`model.progress`): the newly infected agents' entry into
  E and every exiting agent's next stage, detection, isolation and countdown, with the per-borough flows and the
  stage counts' changes counted in the same pass.

The same bits as the torch ops in `model` (the reference, used on other devices, in gradient modes, without a compiler
and with ``AGENTTENSOR_NATIVE_KERNELS=0``); tests compare the two. At AgentTorch's 37,518 agents a day's torch ops
were calls on tens of agents: ~0.6 ms of the transition's, ~0.1 ms of the totals'."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from agenttensor import native

SOURCE = Path(__file__).with_name("csrc") / "hard_kernel.cpp"
_P, _I = ctypes.c_void_p, ctypes.c_int64
STREAMS = ("symptoms", "hospitalisation", "death", "detection", "isolation", "duration-exit", "duration-E")
FIELDS = ("S", "E", "I_asym", "I_sym", "H", "R", "D", "isolating")  # updated in place, uint8 [B, N]
# the rows of the flows [13, B, G]
FLOWS = ("reported", "admissions", "deaths", "out_E", "in_Ia", "out_Ia", "in_Is", "out_Is", "out_H", "in_R",
         "isolating_after", "isolating_prior", "new_infections")
# then the changes of the per-borough stage counts [8, B, G] (`CovidEnv.rolled_counts`), as `progress` forms them
CHANGES = ("S", "E", "I_asym", "I_sym", "H", "R", "D", "isolating")


class _Strided(ctypes.Structure):
    _fields_ = [("p", _P), ("sb", _I), ("sn", _I)]


class _Args(ctypes.Structure):  # ProgressArgs in hard_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("B", "N", "G", "K", "t", "threads")] \
        + [(n, _P) for n in ("S", "E", "Ia", "Is", "H", "R", "D", "isolating", "stage_end")] \
        + [("infected", _I)] + [(n, _P) for n in ("infected_b", "infected_i", "base", "keys", "age_group", "borough",
                                                  "symptomatic", "hosp", "death")] \
        + [(n, _Strided) for n in ("detect", "detect_asym_ratio", "testing", "isolate", "efficacy_severe")] \
        + [(n, _P) for n in ("vaccinated", "cdf_E", "cdf_exit", "flows")]


class _SourceLayer(ctypes.Structure):  # SourceLayer in the kernel, field for field
    _fields_ = [("slot", _P), ("slot_i32", _I), ("slots", _I), ("away", _I), ("lever", _Strided), ("on_site", _P),
                ("closed", _Strided), ("out", _P)]


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_covid_hard_progress.argtypes = [ctypes.POINTER(_Args)]
    library.agenttensor_covid_hard_sources.argtypes = [_I, _I, _P, _P, _P, ctypes.POINTER(_Strided),
                                                       ctypes.POINTER(_Strided), _I, ctypes.POINTER(_SourceLayer)]


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_covid_hard", _declare, flags=("-O3", "-ffp-contract=off"))


def _cpu(x: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    return x.device.type == "cpu" and x.dtype == dtype and tuple(x.shape) == shape and x.is_contiguous()


def _strided(x: Tensor | None, B: int, N: int) -> _Strided | None:
    """A per-agent value as `At` reads it (a number, [N], [B | 1, N] or [B | 1, 1]) as a broadcast [B, N] float32 view;
    None where it is not one."""
    if x is None:
        return _Strided(None, 0, 0)
    if not (isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() <= 2):
        return None
    try:
        view = x.detach().expand(B, N)
    except RuntimeError:
        return None
    return _Strided(view.data_ptr(), view.stride(0), view.stride(1))


def applies(fields: dict[str, Tensor], stage_end: Tensor) -> bool:
    """Whether the kernel can run on these fields (uint8 [B, N] contiguous on CPU, int16 countdowns) where built."""
    shape = tuple(stage_end.shape)
    return len(shape) == 2 and _cpu(stage_end, torch.int16, shape) \
        and all(_cpu(fields[name], torch.uint8, shape) for name in FIELDS) and _library() is not None


def hard_progress(fields: dict[str, Tensor], stage_end: Tensor, t: int, infected: tuple[Tensor, Tensor],
                  keys: Tensor, base: Tensor, age_group: Tensor, borough: Tensor, G: int, tables: dict[str, Tensor],
                  per_agent: dict[str, Tensor | None], vaccinated: Tensor | None, cdf_E: Tensor, cdf_exit: Tensor
                  ) -> Tensor | None:
    """Update ``fields`` (`FIELDS`, uint8 [B, N]) and ``stage_end`` (int16 [B, N]) in place for step ``t``: the
    ``infected`` pairs (b, i) enter E, the agents whose countdown is ``t`` exit their stage. ``keys`` [7, B] int32 are
    the `STREAMS`' keys at t; ``tables``: symptomatic, hosp, death [A] float32; ``per_agent``: detect,
    detect_asym_ratio, isolate and (optional) testing, efficacy_severe as `At` reads them; ``vaccinated`` [B, N]
    uint8 with the vaccination lever, else None; ``cdf_E`` [K], ``cdf_exit`` [3, K] (I_asym, I_sym, H). -> the flows
    and the stage counts' changes [21, B, G] float32 (rows `FLOWS`, then `CHANGES`), or None where the kernel does not
    apply (nothing is then written)."""
    library = _library()
    B, N = stage_end.shape
    K = cdf_E.numel()
    strided = {name: _strided(per_agent.get(name), B, N) for name in
               ("detect", "detect_asym_ratio", "testing", "isolate", "efficacy_severe")}
    ib, ii = infected
    if library is None or any(v is None for v in strided.values()) or strided["detect"].p is None \
            or strided["detect_asym_ratio"].p is None or strided["isolate"].p is None \
            or not all(_cpu(tables[k], torch.float32, tuple(tables[k].shape)) and tables[k].dim() == 1
                       for k in ("symptomatic", "hosp", "death")) \
            or not (_cpu(cdf_E, torch.float32, (K,)) and _cpu(cdf_exit, torch.float32, (3, K))) \
            or not (_cpu(keys, torch.int32, (len(STREAMS), B)) and _cpu(base, torch.int32, (N,))
                    and _cpu(age_group, torch.int32, (N,)) and _cpu(borough, torch.int32, (N,))) \
            or not all(x.device.type == "cpu" and x.dtype == torch.int64 and x.dim() == 1 and x.is_contiguous()
                       for x in (ib, ii)) \
            or (vaccinated is not None and (not _cpu(vaccinated, torch.uint8, (B, N)) or strided["efficacy_severe"].p is None)):
        return None
    flows = torch.empty(len(FLOWS) + len(CHANGES), B, G, dtype=torch.float32)
    f = {name: fields[name].data_ptr() for name in FIELDS}
    args = _Args(B=B, N=N, G=G, K=K, t=t, threads=torch.get_num_threads(),
                 S=f["S"], E=f["E"], Ia=f["I_asym"], Is=f["I_sym"], H=f["H"], R=f["R"], D=f["D"],
                 isolating=f["isolating"], stage_end=stage_end.data_ptr(), infected=ib.numel(),
                 infected_b=ib.data_ptr(), infected_i=ii.data_ptr(), base=base.data_ptr(), keys=keys.data_ptr(),
                 age_group=age_group.data_ptr(), borough=borough.data_ptr(),
                 symptomatic=tables["symptomatic"].data_ptr(), hosp=tables["hosp"].data_ptr(),
                 death=tables["death"].data_ptr(), **strided,
                 vaccinated=None if vaccinated is None else vaccinated.data_ptr(), cdf_E=cdf_E.data_ptr(),
                 cdf_exit=cdf_exit.data_ptr(), flows=flows.data_ptr())
    library.agenttensor_covid_hard_progress(ctypes.byref(args))
    for x in (*fields.values(), stage_end):  # in-place writes: the version counters move as index_put_'s would
        torch.autograd.graph.increment_version(x)
    return flows


def source_totals(I_sym: Tensor, I_asym: Tensor, isolating: Tensor, alpha: Tensor, eta: Tensor,
                  layers: dict[str, tuple]) -> dict[str, Tensor] | None:
    """Each layer's group totals of the infectious agents' contributions, [B, S] float32 (`model.infection_pressure`'s
    ``group_totals``) in one native pass: ι = I_sym + α I_asym, ι a = ι (1 − η isolating), times the layer's presence.
    ``layers``: name -> (slot [N] int32 or int64 with values in [0, S), S, away (bool: ι a, else ι), lever (presence
    1 − lever, as `At` reads it) or None, on_site [B, N] uint8 or None, closed or None). The fields are uint8 [B, N];
    α and η as `At` reads them. None where the kernel does not apply, or a derivative would reach the totals."""
    library = _library()
    shape = tuple(I_sym.shape)
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in (
            alpha, eta, *(spec[3] for spec in layers.values()), *(spec[5] for spec in layers.values()))):
        return None
    if library is None or len(shape) != 2 or not all(_cpu(x, torch.uint8, shape) for x in (I_sym, I_asym, isolating)):
        return None
    B, N = shape
    a, e = _strided(alpha, B, N), _strided(eta, B, N)
    if a is None or e is None or a.p is None or e.p is None:
        return None
    out, structs = {}, []
    for name, (slot, S, away, lever, on_site, closed) in layers.items():
        lever_view, closed_view = _strided(lever, B, N), _strided(closed, B, N)
        if lever_view is None or closed_view is None or not (
                slot.device.type == "cpu" and slot.dtype in (torch.int32, torch.int64) and slot.shape == (N,)
                and slot.is_contiguous()) or (on_site is not None and not _cpu(on_site, torch.uint8, shape)):
            return None
        out[name] = torch.empty(B, S)
        structs.append(_SourceLayer(slot.data_ptr(), int(slot.dtype == torch.int32), S, int(away), lever_view,
                                    None if on_site is None else on_site.data_ptr(), closed_view, out[name].data_ptr()))
    library.agenttensor_covid_hard_sources(B, N, I_sym.data_ptr(), I_asym.data_ptr(), isolating.data_ptr(),
                                           ctypes.byref(a), ctypes.byref(e), len(structs),
                                           (_SourceLayer * len(structs))(*structs))
    return out

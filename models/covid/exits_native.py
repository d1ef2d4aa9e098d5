"""The day's exits in the gradient modes as one native node on CPU (models/covid/csrc/exits_kernel.cpp).

`model.progress` draws, for every agent whose countdown ends today (M of them, ~10^4–10^5 a day at full NYC), its
next stage, detection and isolation, sets its next countdown and counts the flows per borough. In hard mode that is
part of `hard_native.hard_progress`; in gradient modes it was ~40 torch ops on [M] tensors and as many autograd nodes
(~5 ms a day forward at full NYC, and their backward). With straight-through draws it is one node here (`_ExitFlows`):
the forward's numbers are the torch ops' bit for bit, and its backward is autograd's chain for those ops, each sum of
terms added in the order autograd's engine adds them, with the reductions into parameters made by the same torch ops
(`index_add_` into the age tables, `sum_to_size` for a broadcast parameter): the same derivatives, bit for bit
(tests/test_covid_exits.py compares the two). Other samplers, devices, dtypes and ``AGENTTENSOR_NATIVE_KERNELS=0``
keep the torch ops in `model.progress` (the reference)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from agenttensor import native
from agenttensor.sampling import StraightThrough

SOURCE = Path(__file__).with_name("csrc") / "exits_kernel.cpp"
STREAMS = ("symptoms", "hospitalisation", "death", "detection", "isolation", "duration-exit")  # the uniforms' rows
CHANGES = ("E", "I_sym", "I_asym", "H", "R", "D", "isolating")  # shadow.STAGES[1:]: `transition`'s changes
# the rows of the per-borough flows (detached), as `progress` names them
FLOWS = ("out_E", "in_Ia", "out_Ia", "in_Is", "out_Is", "out_H", "in_R", "isolating_after", "isolating_prior")
_P, _I = ctypes.c_void_p, ctypes.c_int64


class _Args(ctypes.Structure):  # ExitArgs in exits_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("M", "B", "N", "G", "K", "t", "threads")] \
        + [(n, _P) for n in ("b", "i", "lE", "lIa", "lIs", "lH", "iso0", "u", "age_group", "borough", "symptomatic",
                             "hosp", "death", "detect", "ratio")] \
        + [(n, _I) for n in ("detect_stride", "ratio_stride")] \
        + [(n, _P) for n in ("testing", "severe", "isolate", "cdf_exit", "stage_end")] \
        + [("changes", _P * len(CHANGES)), ("events", _P), ("sums", _P)]


class _GradArgs(ctypes.Structure):  # ExitGradArgs in exits_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("M", "B", "G", "threads")] \
        + [(n, _P) for n in ("b", "i", "borough", "lE", "lIa", "lIs", "lH", "iso0", "events", "hosp_at", "detect",
                             "ratio")] \
        + [(n, _I) for n in ("detect_stride", "ratio_stride")] + [(n, _P) for n in ("testing", "severe")] \
        + [("g_changes", _P * len(CHANGES)), ("g_sums", _P * 3), ("out", _P * 13)]


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_covid_exits_forward.argtypes = [ctypes.POINTER(_Args)]
    library.agenttensor_covid_exits_backward.argtypes = [ctypes.POINTER(_GradArgs)]


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_covid_exits", _declare, flags=("-O3", "-ffp-contract=off"))


class ExitFlows(NamedTuple):
    """`exit_flows`'s result: the changes of `CHANGES` at the exits ([M] each, with derivatives), today's reported
    cases, admissions and deaths per borough ([B, G] each, with derivatives), and the per-borough `FLOWS` [9, B, G]
    (values)."""

    changes: dict[str, Tensor]
    reported: Tensor
    admissions: Tensor
    deaths: Tensor
    flows: Tensor


def _f32(x: Tensor | None, shape: tuple[int, ...] | None = None) -> bool:
    return x is None or (isinstance(x, Tensor) and x.is_cpu and x.dtype == torch.float32
                         and (shape is None or tuple(x.shape) == shape))


def _value_or_per_exit(x: Tensor | float, M: int) -> Tensor | None:
    """A parameter as `At` read it at the exits: one value (0-dim) or [M]; None where it is neither."""
    if not isinstance(x, Tensor):
        return torch.tensor(float(x), dtype=torch.float32)
    return x if _f32(x) and (x.dim() == 0 or tuple(x.shape) == (M,)) else None


def _inputs(leaving: dict[str, Tensor], params) -> tuple[list[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """The node's field values at the exits and its age tables, in the kernel's argument order."""
    return ([leaving[name] for name in ("E", "I_asym", "I_sym", "H", "isolating")],
            (params.symptomatic_fraction, params.hosp_given_symptomatic, params.death_given_hosp))


def supported(sampler, leaving: dict[str, Tensor], u: Tensor, params, env, stage_end: Tensor,
              read: tuple = ()) -> bool:
    """Whether `exit_flows` applies: straight-through draws, CPU float32 values at M > 0 exits, the kernel built.
    ``read``: what the caller will read at the exits for it (the detection rate, the asymptomatic ratio, the testing
    lever, the vaccine's efficacy, the vaccinations, the isolation probability), each a number, None or a CPU float32
    tensor (anything else: the torch ops, which promote as torch does)."""
    fields, tables = _inputs(leaving, params)
    M = fields[0].numel()
    return type(sampler) is StraightThrough and M > 0 and stage_end.dtype == torch.int16 and stage_end.dim() == 2 \
        and stage_end.is_contiguous() and all(_f32(x, (M,)) for x in fields) and _f32(u, (len(STREAMS), M)) \
        and all(_f32(x) and x.dim() == 1 for x in tables) and env.age_group.dtype == torch.int32 \
        and env.borough.dtype == torch.int32 and _f32(env.exit_durations) \
        and all(isinstance(x, (int, float)) or _f32(x) for x in read) and _library() is not None


def exit_flows(leaving: dict[str, Tensor], b: Tensor, i: Tensor, u: Tensor, env, params, detect: Tensor | float,
               ratio: Tensor | float, testing: Tensor | None, severe: Tensor | None, isolate: Tensor,
               stage_end: Tensor, t: int) -> ExitFlows:
    """The exits of `model.progress` with straight-through draws, where `supported`: ``leaving`` (E, I_asym, I_sym, H,
    isolating at the exits (b, i) [M], from `shadow.gather_exits`), ``u`` [6, M] the `STREAMS`' uniforms there,
    ``detect`` and ``ratio`` (the detection rate and the asymptomatic ratio as `At` reads them: one value or [M]),
    ``testing`` and ``severe`` ([M]: the testing lever and efficacy · vaccinated at the exits, or None), ``isolate``
    [M] the isolation probability there. Writes the exits' next countdowns into ``stage_end`` (int16 [B, N], in
    place)."""
    M = b.numel()
    B, N = stage_end.shape
    fields, tables = _inputs(leaving, params)
    detect, ratio = _value_or_per_exit(detect, M), _value_or_per_exit(ratio, M)
    if detect is None or ratio is None or not all(_f32(x, (M,)) for x in (isolate, testing, severe)):
        raise ValueError("exit_flows: the detection rate, the asymptomatic ratio, the testing lever, efficacy · "
                         f"vaccinated and the isolation probability must be float32 values or [M={M}] at the exits "
                         "(`supported`'s ``read`` checks their sources)")
    plan = (_library(), env, stage_end, t)
    out = _ExitFlows.apply(plan, b, i, u, *fields, *tables, detect, ratio, testing, severe, isolate)
    torch.autograd.graph.increment_version(stage_end)  # (written in place by the kernel)
    changes, (reported, admissions, deaths, flows) = out[:len(CHANGES)], out[len(CHANGES):]
    return ExitFlows(dict(zip(CHANGES, changes)), reported, admissions, deaths, flows)


def _reached(g_changes, g_sums) -> list[bool]:
    """Which of the node's inputs a gradient reaches, from which of its outputs' gradients are None (autograd's None
    where no gradient reached a tensor: a loss without deaths sends none to H's exits, and none to H; a [M] of zeros
    here would become a [B, N] of zeros a day in `shadow._ExitsAt`'s backward and the transition's)."""
    gE, gIs, gIa, gH, gR, gD, giso = (g is not None for g in g_changes)
    rep, H, D = (g is not None for g in g_sums)
    reported = rep or giso  # (its consumers: the borough sums, and the awareness behind isolation)
    to_Ia = gIa or reported
    to_Is = gIs or giso or reported or to_Ia
    to_H, to_D = gH or H or gR, gD or D or gR
    return [gE or to_Ia or to_Is, gIa or giso or gR, gIs or giso or gR or to_H, gH or gR or to_D, giso,
            to_Is, to_H, to_D, reported, reported, reported, to_H, giso]


def _ptr(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


class _ExitFlows(torch.autograd.Function):
    """Forward: `agenttensor_covid_exits_forward`. Backward: `agenttensor_covid_exits_backward`'s per-exit terms, then
    autograd's reductions into the parameters (index_select's index_add_, a broadcast value's sum_to_size)."""

    @staticmethod
    def forward(ctx, plan, b, i, u, lE, lIa, lIs, lH, iso0, symptomatic, hosp, death, detect, ratio,
                testing, severe, isolate):
        library, env, stage_end, t = plan
        (B, N), M, G = stage_end.shape, b.numel(), len(env.group_labels)
        inputs = [x.detach().contiguous() if isinstance(x, Tensor) else x
                  for x in (lE, lIa, lIs, lH, iso0, symptomatic, hosp, death, detect, ratio, testing, severe, isolate)]
        lE, lIa, lIs, lH, iso0, symptomatic, hosp, death, detect, ratio, testing, severe, isolate = inputs
        b, i, u = b.contiguous(), i.contiguous(), u.contiguous()
        cdf = env.exit_durations.contiguous()
        changes = [torch.empty(M) for _ in CHANGES]
        events = torch.empty(M, dtype=torch.uint8)
        sums = torch.empty(12, B, G)
        args = _Args(M=M, B=B, N=N, G=G, K=cdf.shape[-1], t=t, threads=torch.get_num_threads(),
                     b=b.data_ptr(), i=i.data_ptr(), lE=lE.data_ptr(), lIa=lIa.data_ptr(), lIs=lIs.data_ptr(),
                     lH=lH.data_ptr(), iso0=iso0.data_ptr(), u=u.data_ptr(), age_group=env.age_group.data_ptr(),
                     borough=env.borough.data_ptr(), symptomatic=symptomatic.data_ptr(), hosp=hosp.data_ptr(),
                     death=death.data_ptr(), detect=detect.data_ptr(), ratio=ratio.data_ptr(),
                     detect_stride=int(detect.dim() == 1), ratio_stride=int(ratio.dim() == 1),
                     testing=_ptr(testing), severe=_ptr(severe), isolate=isolate.data_ptr(), cdf_exit=cdf.data_ptr(),
                     stage_end=stage_end.data_ptr(), events=events.data_ptr(), sums=sums.data_ptr())
        args.changes = (_P * len(CHANGES))(*[x.data_ptr() for x in changes])
        library.agenttensor_covid_exits_forward(ctypes.byref(args))
        ctx.library, ctx.env, ctx.B = library, env, B
        ctx.table_sizes = tuple(len(x) for x in (symptomatic, hosp, death))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(b, i, lE, lIa, lIs, lH, iso0, events, hosp, detect, ratio, testing, severe)
        flows = sums[3:]
        ctx.mark_non_differentiable(flows)
        return (*changes, sums[0].clone(), sums[1].clone(), sums[2].clone(), flows)

    @staticmethod
    def backward(ctx, *grads):
        library, env, B = ctx.library, ctx.env, ctx.B
        b, i, lE, lIa, lIs, lH, iso0, events, hosp, detect, ratio, testing, severe = ctx.saved_tensors
        g_changes, g_sums = grads[:len(CHANGES)], grads[len(CHANGES):len(CHANGES) + 3]
        M, G = b.numel(), len(env.group_labels)
        needs = [need and reached for need, reached in zip(ctx.needs_input_grad[4:], _reached(g_changes, g_sums))]
        # lE, lIa, lIs, lH, iso0, symptomatic, hosp, death, detect, ratio, testing, severe, isolate: each input's
        # per-exit derivative terms, where asked for and a gradient reaches it
        outs = [torch.empty(M) if need else None for need in needs]
        group = env.age_group.index_select(0, i) if any(needs[5:8]) or severe is not None else None
        hosp_at = hosp.index_select(0, group) if severe is not None else None
        g_changes = [None if g is None else g.contiguous() for g in g_changes]
        g_sums = [None if g is None else g.contiguous() for g in g_sums]
        args = _GradArgs(M=M, B=B, G=G, threads=torch.get_num_threads(), b=b.data_ptr(), i=i.data_ptr(),
                         borough=env.borough.data_ptr(), lE=lE.data_ptr(), lIa=lIa.data_ptr(), lIs=lIs.data_ptr(),
                         lH=lH.data_ptr(), iso0=iso0.data_ptr(), events=events.data_ptr(), hosp_at=_ptr(hosp_at),
                         detect=detect.data_ptr(), ratio=ratio.data_ptr(), detect_stride=int(detect.dim() == 1),
                         ratio_stride=int(ratio.dim() == 1), testing=_ptr(testing), severe=_ptr(severe))
        args.g_changes = (_P * len(CHANGES))(*[_ptr(g) for g in g_changes])
        args.g_sums = (_P * 3)(*[_ptr(g) for g in g_sums])
        args.out = (_P * 13)(*[_ptr(x) for x in outs])
        library.agenttensor_covid_exits_backward(ctypes.byref(args))
        d_lE, d_lIa, d_lIs, d_lH, d_iso0, d_sym, d_hosp, d_death, d_detect, d_ratio, d_testing, d_severe, d_isolate = outs
        # autograd's reductions: index_select's backward into the age tables, a broadcast value's sum
        tables = [None if d is None else torch.zeros(size).index_add_(0, group, d)
                  for d, size in zip((d_sym, d_hosp, d_death), ctx.table_sizes)]
        d_detect, d_ratio = (None if d is None else d if x.dim() == 1 else d.sum_to_size(())
                             for d, x in ((d_detect, detect), (d_ratio, ratio)))
        return (None, None, None, None, d_lE, d_lIa, d_lIs, d_lH, d_iso0, *tables, d_detect, d_ratio, d_testing,
                d_severe, d_isolate)

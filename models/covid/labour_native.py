"""The weekly labour market (`model.labour_market`) as one native pass on CPU (models/covid/csrc/labour_kernel.cpp).

`labour_market` returns (employed, unemployed) after the week's job losses and rehires: the numbers of the torch ops
in `model.labour_flows` (the reference, used on other devices, without a compiler and with
``AGENTTENSOR_NATIVE_KERNELS=0``), bit for bit, for hard mode's uint8 memberships and gradient modes' float32 ones.
Under autograd the pass is one node (`_LabourMarket`) that keeps the five fields it read packed in one byte per agent,
with the week's two draws, and, only where a gradient reaches it, writes the fields' straight-through derivatives in a
second native pass (`agenttensor_covid_labour_backward`: autograd's chain of operations written out, the same bits), or
else (rates or levers asking for derivatives, relaxed samplers, fractional fields) recomputes the reference's torch ops
to take their derivatives: the same derivatives as the torch ops', with none of their ~20 [B, N] intermediates made in
the forward pass. Full NYC, one week's pass: hard 37 → ~5 ms, straight-through 70 → ~8 ms; its backward 182 → 13 ms
(see benchmarks/HISTORY.md)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from agenttensor import native
from agenttensor.model import StepContext
from agenttensor.rng import Randomness
from agenttensor.sampling import Sampler, StraightThrough

SOURCE = Path(__file__).with_name("csrc") / "labour_kernel.cpp"
# -fno-trapping-math: the backward's conditional selects (`L ? x : 0.f`) become vector blends, so that its loop
# vectorises (without it GCC left it scalar: 30.8 -> 8.9 ms per weekly call at full NYC); no result changes (no
# contraction, no reassociation), as for the contributions, shadow and hard kernels
FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math")
STREAMS = ("job-loss", "rehire")
FIELDS = ("employed", "unemployed", "on_site", "remote", "D")  # in the packed bits' order
RATES = ("job_loss_base", "job_loss_absent", "job_loss_closed", "stimulus_job_loss_relief", "rehire_rate")
LEVERS = ("closed", "stimulus", "closure")
_P, _I = ctypes.c_void_p, ctypes.c_int64


class _Args(ctypes.Structure):  # LabourArgs in labour_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("B", "N", "threads", "is_float")] \
        + [(n, _P) for n in (*FIELDS, "has_workplace", "base", "keys", "loss_base", "loss_absent", "loss_closed",
                             "relief", "rehire", *LEVERS)] \
        + [(f"{n}_stride", _I) for n in LEVERS] + [(n, _P) for n in ("employed_out", "unemployed_out", "packed")]


class _BackwardArgs(ctypes.Structure):  # LabourBackwardArgs in labour_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("B", "N", "threads")] \
        + [(n, _P) for n in ("packed", "has_workplace", "g_employed", "g_unemployed", "loss_absent", "loss_closed",
                             "relief", "closed", "stimulus")] \
        + [(n, _I) for n in ("closed_stride", "stimulus_stride")] \
        + [(n, _P) for n in ("d_employed", "d_unemployed", "d_on_site", "d_remote", "d_D")]


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_covid_labour.argtypes = [ctypes.POINTER(_Args)]
    library.agenttensor_covid_labour.restype = _I
    library.agenttensor_covid_labour_backward.argtypes = [ctypes.POINTER(_BackwardArgs)]


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_covid_labour", _declare, flags=FLAGS)


Reference = Callable[..., tuple[Tensor, Tensor]]


def labour_market(fields: tuple[Tensor, ...], has_workplace: Tensor, rates: tuple[Tensor, ...],
                  levers: tuple[Tensor | None, ...], rng: Randomness, step: int, sampler: Sampler,
                  reference: Reference) -> tuple[Tensor, Tensor] | None:
    """(employed, unemployed) [B, N] after the week, or None where the native pass does not apply (then call the
    reference). ``fields``: `FIELDS` [B, N], one dtype (uint8 or float32); ``has_workplace`` [N] bool or 0/1 bytes; ``rates``:
    `RATES`, float32 scalars or per batch element ([B, 1]); ``levers``: `LEVERS` [B | 1, N] float32 or None;
    ``reference(ctx, *fields, has_workplace, *rates, *levers)``: the torch ops (the derivatives' recomputation)."""
    prepared = _prepare(fields, has_workplace, rates, levers, rng, step)
    if prepared is None:
        return None
    tensors = (*fields, *rates, *levers)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return _LabourMarket.apply(prepared, (rng, step, sampler, reference), *tensors)
    return _run(prepared, packed=False)[:2]


def _prepare(fields, has_workplace, rates, levers, rng: Randomness, step: int):
    """The kernel's arguments and the tensors they point into, or None where it does not apply."""
    employed = fields[0]
    if not employed.is_cpu or employed.dim() != 2 or employed.dtype not in (torch.uint8, torch.float32):
        return None
    B, N = employed.shape
    if any(x.dtype != employed.dtype or x.shape != (B, N) for x in fields) or has_workplace.shape != (N,) \
            or rng.agent_base.shape != (N,) or len(rng.seeds) != B:
        return None
    library = _library()
    if library is None:
        return None
    keep = [x.detach().contiguous() for x in fields]
    args = _Args(B=B, N=N, threads=torch.get_num_threads(), is_float=int(employed.dtype == torch.float32))
    for name, x in zip(FIELDS, keep):
        setattr(args, name, x.data_ptr())
    workplace = has_workplace.detach().to(torch.uint8).contiguous()
    keys = rng._keys(step, STREAMS).contiguous()
    keep += [workplace, keys, rng.agent_base]
    args.has_workplace, args.keys, args.base = workplace.data_ptr(), keys.data_ptr(), rng.agent_base.data_ptr()
    for name, rate in zip(("loss_base", "loss_absent", "loss_closed", "relief", "rehire"), rates):
        rate = torch.as_tensor(rate).detach()
        if rate.dtype != torch.float32 or rate.numel() not in (1, B) or (rate.dim() and rate.shape[-1] != 1
                                                                             and rate.numel() != 1):
            return None  # (per-agent or differently typed rates: the torch ops)
        row = rate.reshape(-1).expand(B).contiguous()
        keep.append(row)
        setattr(args, name, row.data_ptr())
    for name, lever in zip(LEVERS, levers):
        if lever is None:
            continue
        lever = lever.detach()
        if lever.dtype != torch.float32 or lever.dim() != 2 or lever.shape[-1] != N or lever.shape[0] not in (1, B):
            return None
        lever = lever.contiguous()
        keep.append(lever)
        setattr(args, name, lever.data_ptr())
        setattr(args, f"{name}_stride", 0 if lever.shape[0] == 1 else N)
    return args, keep, library, employed.dtype


def _run(prepared, packed: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(employed, unemployed, the fields packed or None where one is neither 0 nor 1 or not asked for)."""
    args, keep, library, dtype = prepared
    B, N = args.B, args.N
    employed, unemployed = torch.empty(B, N, dtype=dtype), torch.empty(B, N, dtype=dtype)
    args.employed_out, args.unemployed_out = employed.data_ptr(), unemployed.data_ptr()
    flags = torch.empty(B, N, dtype=torch.uint8) if packed and dtype == torch.float32 else None
    args.packed = None if flags is None else flags.data_ptr()
    other = library.agenttensor_covid_labour(ctypes.byref(args))
    return employed, unemployed, flags if other == 0 else None


class _LabourMarket(torch.autograd.Function):
    """Forward: the native pass. Backward: with straight-through events, packed fields and derivatives asked of the
    fields only (a run's case: the rates and levers are constants), one native pass from the packed bytes, which hold
    the draws too (`_field_derivatives`: the same bits as autograd's); else the reference's torch ops recomputed from
    the fields it read (kept packed, one byte per agent; kept as they are where one is neither 0 nor 1), their
    derivatives taken by autograd (~20 [B, N] intermediates and their derivatives: 182 ms a week at full NYC, against
    13 for the native pass)."""

    @staticmethod
    def forward(ctx, prepared, recompute, *tensors):
        employed, unemployed, flags = _run(prepared, packed=True)
        k = len(FIELDS)
        rng, ctx.step, ctx.sampler, ctx.reference = recompute
        ctx.seeds, ctx.dtype, ctx.packed = rng.seeds, tensors[0].dtype, flags is not None
        # every tensor as a saved tensor (a checkpointed segment drops them); the fields packed where they are 0/1
        fields = (flags,) if flags is not None else tuple(x.detach().clone() for x in tensors[:k])
        ctx.save_for_backward(rng.agent_base, prepared[1][k], *fields, *tensors[k:])
        return employed, unemployed

    @staticmethod
    def backward(ctx, g_employed: Tensor, g_unemployed: Tensor):
        k = len(FIELDS)
        agent_base, has_workplace, *saved = ctx.saved_tensors
        wants = ctx.needs_input_grad[2:]
        if ctx.packed and isinstance(ctx.sampler, StraightThrough) and not any(wants[k:]):
            flags, *rest = saved
            fields = _field_derivatives(flags, has_workplace, rest[:len(RATES)], rest[len(RATES):], g_employed,
                                        g_unemployed, wants[:k])
            if fields is not None:
                return (None, None, *fields, *[None] * len(rest))
        if ctx.packed:
            flags, *rest = saved
            fields = [((flags >> bit) & 1).to(ctx.dtype) for bit in range(k)]
        else:
            fields, rest = saved[:k], saved[k:]
        inputs = [*fields, *rest]
        step_ctx = StepContext(step=ctx.step, env=None, rng=Randomness(ctx.seeds, agent_base), sampler=ctx.sampler)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) if x is not None and want else x
                      for x, want in zip(inputs, wants)]
            outs = ctx.reference(step_ctx, *leaves[:k], has_workplace, *leaves[k:])
            asked = [leaf for leaf, want in zip(leaves, wants) if want and leaf is not None]
            grads = iter(torch.autograd.grad(outs, asked, (g_employed, g_unemployed), allow_unused=True))
        out = [next(grads) if want and x is not None else None for x, want in zip(inputs, wants)]
        return (None, None, *out)


def _field_derivatives(flags: Tensor, has_workplace: Tensor, rates: tuple, levers: tuple, g_employed: Tensor | None,
                       g_unemployed: Tensor | None, wants: tuple[bool, ...]) -> list[Tensor | None] | None:
    """The five fields' derivatives [B, N] (None where not wanted) in one native pass, or None where it does not apply
    (no library; then the caller recomputes the torch ops)."""
    library = _library()
    if library is None:
        return None
    B, N = flags.shape
    keep = []

    def ptr(x: Tensor | None, dtype=torch.float32) -> int | None:
        if x is None:
            return None
        x = x.detach().to(dtype).contiguous()
        keep.append(x)
        return x.data_ptr()

    args = _BackwardArgs(B=B, N=N, threads=torch.get_num_threads(), packed=ptr(flags, torch.uint8),
                         has_workplace=ptr(has_workplace, torch.uint8))
    for name, g in (("g_employed", g_employed), ("g_unemployed", g_unemployed)):
        if g is not None and g.shape != (B, N):
            return None
        setattr(args, name, ptr(g))
    for name, rate in zip(("loss_absent", "loss_closed", "relief"), rates[1:4]):
        setattr(args, name, ptr(torch.as_tensor(rate).reshape(-1).expand(B)))
    closed, stimulus, _ = levers  # (workplace closure enters the rehire probability only: no field derivative)
    for name, lever in (("closed", closed), ("stimulus", stimulus)):
        if lever is not None:
            setattr(args, name, ptr(lever))
            setattr(args, f"{name}_stride", 0 if lever.shape[0] == 1 else N)
    out = [torch.empty(B, N) if want else None for want in wants]
    for name, x in zip(("d_employed", "d_unemployed", "d_on_site", "d_remote", "d_D"), out):
        setattr(args, name, None if x is None else x.data_ptr())
    library.agenttensor_covid_labour_backward(ctypes.byref(args))
    return out

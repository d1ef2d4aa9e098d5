"""The own contributions' backward (`contributions._OwnContributions`) as one native pass over the agents on CPU
(models/covid/csrc/contributions_kernel.cpp): the others-sums of `layered_force`'s probes and ~20 [B, N] torch ops
become one loop. contributions.py keeps the
same chain rule in torch ops (the reference, used on other devices, without a compiler and with
``AGENTTENSOR_NATIVE_KERNELS=0``); tests compare the two."""

from __future__ import annotations

import ctypes
import weakref
from pathlib import Path

import torch
from torch import Tensor

from agenttensor import _group_kernels, native, select
from agenttensor._group_kernels import contiguous_groups
from agenttensor.transmission import WeightParts

SOURCE = Path(__file__).with_name("csrc") / "contributions_kernel.cpp"
BLOCK = 1 << 16  # agents per partial sum of d alpha, d eta (fixed: the sums do not depend on the thread count)
# a layer of scattered groups with at least this many reads each group's sum and scale as one interleaved pair: one
# 64-bit gather per agent instead of two 32-bit ones, half the gathered elements (full NYC's 252,257 workplaces, whose
# tables miss the cache, and, from the twenty-sixth round, its schools, whose tables fit it: the own contributions'
# backward 36.9 -> 34.9 ms per call, 12 of 14 interleaved pairs faster)
PAIRED_GROUPS = 1
LAYERS = ("school", "workplace", "community")
_P, _I = ctypes.c_void_p, ctypes.c_int64
# no fused multiply-adds (the others-sums' arithmetic is the torch ops'); no trapping math, so that the selects of
# the main loop are computed for every agent and it vectorises (with trapping math it ran one agent at a time)
FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math")


class _OthersSum(ctypes.Structure):  # OthersSumArgs in contributions_kernel.cpp
    _fields_ = [(n, _P) for n in ("member", "group", "plain")] + [("weighted", _I)] \
        + [(n, _P) for n in ("w_presence", "w_factor", "w_factor_all")] \
        + [(n, _I) for n in ("w_presence_stride", "w_factor_stride", "w_factor_all_stride")] \
        + [(n, _P) for n in ("slot", "scale")] + [("scale_stride", _I), ("groups", _I), ("runs", _I), ("paired", _I)]


class _Args(ctypes.Structure):  # OwnArgs in contributions_kernel.cpp, field for field
    _fields_ = [(n, _I) for n in ("B", "N", "threads", "block")] \
        + [(n, _OthersSum) for n in ("household", *LAYERS)] \
        + [(n, _P) for n in ("p_school", "p_workplace", "p_community")] \
        + [(n, _I) for n in ("p_school_stride", "p_workplace_stride", "p_community_stride")] \
        + [(n, _P) for n in ("I_sym", "I_asym", "isolating", "isolate_prob", "stage_end", "testing")] \
        + [("testing_stride", _I)] \
        + [(n, _P) for n in ("alpha", "eta", "detect_asym", "out_I_sym", "out_I_asym", "out_isolating", "out_p_school",
                             "out_p_workplace", "out_p_community", "alpha_sums", "eta_sums", "acc_I_sym", "acc_I_asym",
                             "acc_isolating", "flags")] + [("flags_timed", _I)] \
        + [("w_grad", _P), ("w_sigma", _P), ("w_sigma_stride", _I)] \
        + [("w_sigma_table", _P), ("w_sigma_table_stride", _I), ("w_sigma_table_size", _I), ("w_sigma_index", _P)] \
        + [(n, _P) for n in ("acc_p_school", "acc_p_workplace", "acc_p_community")]


def _rows_ok(parts: WeightParts, B: int, N: int) -> bool:
    """Whether the kernel reads ``parts`` as rows: grad a float32 CPU [B, N], σ and the rest [B | 1, N] or [N] (or
    None)."""
    rows = [x for x in (parts.sigma, *parts[2:]) if x is not None]
    return parts.grad.shape == (B, N) and all(x.is_cpu and x.dtype == torch.float32
                                              for x in (parts.grad, *rows)) \
        and all(x.shape == (N,) or (x.dim() == 2 and x.shape[1] == N and x.shape[0] in (1, B)) for x in rows)


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_covid_own_backward.argtypes = [ctypes.POINTER(_Args)]
    library.agenttensor_covid_pack.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I]
    library.agenttensor_covid_pack.restype = _I
    library.agenttensor_covid_carry.argtypes = [_P, _P, _I, _P, _P, _P, _P, _P, _P, _I, _I]
    library.agenttensor_covid_carry.restype = _I


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_covid_contributions", _declare, flags=FLAGS)


def packed(I_sym: Tensor, I_asym: Tensor, isolating: Tensor, stage_end: Tensor | None = None, S: Tensor | None = None
           ) -> tuple[Tensor | None, Tensor | None]:
    """(`pack` of the fields, for a node to save; the same flags to carry to the next day, `carry`): from the flags the
    day's transition carried on I_sym where they are of these very fields (and ``stage_end`` and ``S``, or none) at
    their current versions (a 1-byte copy per agent), else packed (three float32 reads per agent, or four, five).
    (None, None) where `pack` gives None."""
    carried = getattr(I_sym, "_agenttensor_flags", None)
    if carried is not None:
        live, others, versions = carried
        fields = (I_asym, isolating, stage_end, S)
        if all((x is None) if ref is None else ref() is x for ref, x in zip(others, fields)) \
                and versions == tuple(x._version for x in (I_sym, *fields) if x is not None):
            return live.clone(), live
    flags = pack(I_sym.detach(), I_asym.detach(), isolating.detach(), stage_end, None if S is None else S.detach())
    return flags, None if flags is None else flags.clone()


def carry(live: Tensor, b: Tensor, i: Tensor, I_sym: Tensor, I_asym: Tensor, isolating: Tensor,
          stage_end: Tensor | None = None, infected: tuple[Tensor, Tensor] | None = None, S: Tensor | None = None
          ) -> None:
    """The flags ``live`` [B, N] of the fields before the day's transition, updated at the exiting agents (b, i) to
    the fields' values after it (where those are 0/1) and carried on I_sym for the next day's `packed`, with the
    fields' identities and versions (any other change of them makes `packed` pack again). ``stage_end``: the
    countdowns after it, where the flags carry their sign (bit 3; ``infected``: the agents that entered E today,
    whose countdown began); ``S``: S after it, where the flags carry it (bit 4: the infected agents left it). On CPU one
    native pass over the exiting and infected agents (the same flags; ~25 small torch ops otherwise)."""
    if not _update_flags(live, b, i, I_sym, I_asym, isolating, stage_end, infected, S):
        return
    others = (I_asym, isolating, stage_end, S)
    I_sym._agenttensor_flags = (live, tuple(None if x is None else weakref.ref(x) for x in others),
                                tuple(x._version for x in (I_sym, *others) if x is not None))


def _update_flags(live: Tensor, b: Tensor, i: Tensor, I_sym: Tensor, I_asym: Tensor, isolating: Tensor,
                  stage_end: Tensor | None, infected: tuple[Tensor, Tensor] | None, S: Tensor | None) -> bool:
    """`carry`'s update of ``live``: True where done (natively, else by the torch ops), False where a field's value at an
    exiting agent is not 0 or 1 (``live`` unchanged: the flags are not carried)."""
    B, N = live.shape
    fields = [x.detach() for x in (I_sym, I_asym, isolating)] + ([S.detach()] if S is not None else [])
    library = _library() if live.is_cpu and live.is_contiguous() and all(
        x.is_cpu and x.dtype == torch.float32 and x.shape == (B, N) and x.is_contiguous()
        for x in fields) and (stage_end is None or (stage_end.dtype == torch.int16 and stage_end.shape == (B, N)
                                                    and stage_end.is_contiguous())) else None
    if library is not None:
        at = select.flat_positions(live, b, i).contiguous()
        started = None if infected is None or not infected[0].numel() or (stage_end is None and S is None) else \
            select.flat_positions(live, *infected).contiguous()
        return not library.agenttensor_covid_carry(
            live.data_ptr(), at.data_ptr(), at.numel(), *(x.data_ptr() for x in fields[:3]),
            None if stage_end is None else stage_end.data_ptr(), None if S is None else fields[3].data_ptr(),
            None if started is None else started.data_ptr(), 0 if started is None else started.numel(),
            torch.get_num_threads())
    values = [select.values_at(x.detach(), b, i) for x in (I_sym, I_asym, isolating)]
    if not all(bool(((v == 0) | (v == 1)).all()) for v in values):
        return False
    bits = values[0] + 2 * values[1] + 4 * values[2]
    if stage_end is not None:
        bits = bits + 8 * (select.values_at(stage_end, b, i) >= 0)
    if S is not None:  # (an exiting agent is not in S)
        bits = bits + 16 * (select.values_at(S.detach(), b, i) == 1)
    select.put_at_(live, b, i, bits.to(torch.uint8))
    if (stage_end is not None or S is not None) and infected is not None and infected[0].numel():
        started = select.values_at(live, *infected)
        started = started | 8 if stage_end is not None else started
        started = started & ~16 if S is not None else started
        select.put_at_(live, *infected, started)
    return True


def pack(I_sym: Tensor, I_asym: Tensor, isolating: Tensor, stage_end: Tensor | None = None, S: Tensor | None = None
         ) -> Tensor | None:
    """I_sym | I_asym << 1 | isolating << 2 as one byte per agent ([B, N] uint8: what the backward pass reads in
    place of the three float32 fields, 12 bytes per agent), | (stage_end ≥ 0) << 3 where ``stage_end`` (int16
    [B, N]) is given (then read in its place), | S << 4 where ``S`` is (then saved in its place by the transition), or
    None where the fields are not CPU float32 [B, N] (contiguous) with every value exactly +0.0 or 1.0 (e.g. a
    hand-made fractional state), or the kernel is off."""
    fields = (I_sym, I_asym, isolating) + (() if S is None else (S,))
    if any(not x.is_cpu or x.dtype != torch.float32 or x.dim() != 2 or x.shape != I_sym.shape
           or not x.is_contiguous() for x in fields):
        return None
    if stage_end is not None and (not stage_end.is_cpu or stage_end.dtype != torch.int16
                                  or stage_end.shape != I_sym.shape or not stage_end.is_contiguous()):
        return None
    library = _library()
    if library is None:
        return None
    flags = torch.empty(I_sym.shape, dtype=torch.uint8)
    bad = library.agenttensor_covid_pack(*(x.data_ptr() for x in fields[:3]), None if stage_end is None else
                                         stage_end.data_ptr(), None if S is None else S.data_ptr(), flags.data_ptr(),
                                         flags.numel(), torch.get_num_threads())
    return None if bad else flags


def backward(probes: dict[str, tuple], presences: dict[str, Tensor | None], I_sym: Tensor, I_asym: Tensor,
             isolating: Tensor, stage_end: Tensor | None, isolate_prob: Tensor, testing: Tensor | None, alpha, eta,
             detect_asym, wants: dict[str, bool],
             passed: dict[str, tuple[Tensor | None, bool]] | None = None,
             flags: Tensor | None = None, weights: dict[str, WeightParts] | None = None,
             presences_passed: dict[str, Tensor] | None = None) -> dict[str, Tensor | None] | None:
    """{"I_sym", "I_asym", "isolating": [B, N]; "alpha_sums", "eta_sums": [B] float64; layer: d presence [B, N]},
    None where not wanted, or None where the kernel does not apply (not CPU float32 with int32 slots, kernels off or
    unbuilt): the caller runs the torch ops. ``probes``: per layer ("household" and ``LAYERS``) its
    `contributions.OthersSum` and the derivatives reaching its probes (member [B, N], group [B, S], plain [B, S] or
    None each); ``wants``: which of the outputs above are needed; ``passed``: per field (I_sym, I_asym, isolating)
    a derivative [B, N] already reaching it, or None, and whether it may be added into in place: the output is then
    that plus the contributions' (the same buffer where it may); ``flags``: the three fields packed (`pack`), read in
    their place (I_sym, I_asym and isolating are then None), and stage_end's sign where it is None (bit 3);
    ``weights``: per layer whose member derivative is None, that derivative as the force's `WeightParts`, formed in
    the pass (tile by tile: not written); where their grad and σ are not all the same tensors, or not float32 CPU
    rows, the derivative is made dense here. ``presences_passed``: per layer a derivative [B, N] already reaching its
    presence (the force's, `ForceTerm.weight_handoff`), a buffer nobody else holds: the contributions' are added into
    it in place (at the infectious agents only: elsewhere they are 0) and it is the layer's output."""
    passed = passed or {}
    presences_passed = presences_passed or {}
    if stage_end is None and flags is None:
        return None
    B, N = (stage_end if stage_end is not None else flags).shape
    weights = dict(weights or {})
    if weights and (len({(id(parts.grad), id(parts.sigma)) for parts in weights.values()}) > 1
                    or not all(_rows_ok(parts, B, N) for parts in weights.values())):
        probes = {name: (group, (weights.pop(name).dense() if name in weights else grads[0], *grads[1:]))
                  for name, (group, grads) in probes.items()}
    incoming = [g for _, grads in probes.values() for g in grads if g is not None] \
        + [g for g, _ in passed.values() if g is not None] + list(presences_passed.values())
    fields = [I_sym, I_asym, isolating] if flags is None else []
    dense = [*fields, isolate_prob, *incoming, *(group.scale for group, _ in probes.values()),
             *(p for p in presences.values() if p is not None), *([testing] if testing is not None else [])]
    if any(not x.is_cpu or x.dtype != torch.float32 for x in dense) \
            or (stage_end is not None and stage_end.dtype != torch.int16) \
            or any(group.slot.dtype != torch.int32 or group.slot.shape != (N,) for group, _ in probes.values()):
        return None
    library = _library()
    if library is None:
        return None
    if any(x.shape != (B, N) for x in fields) or (flags is not None and (flags.shape != (B, N) or
                                                                         flags.dtype != torch.uint8)):
        return None
    keep = []  # every tensor whose pointer the kernel reads or writes, alive until it returns

    def ptr(x: Tensor | None) -> int | None:
        if x is None:
            return None
        keep.append(x)
        return x.data_ptr()

    def row(x: Tensor) -> tuple[Tensor, int]:  # [B | 1, N] or [N] -> contiguous, row stride
        x = x.detach().reshape(-1, N).contiguous()
        return x, (0 if x.shape[0] == 1 else N)

    def per_element(x) -> Tensor:  # scalar or [B, 1] -> [B]
        return torch.as_tensor(x, dtype=torch.float32).detach().reshape(-1).expand(B).contiguous()

    def others_sum(group, member: Tensor | None, sums: Tensor | None, plain: Tensor | None,
                   parts: WeightParts | None) -> _OthersSum | None:
        S = group.scale.shape[-1]
        runs = contiguous_groups(group.slot)
        if group.scale.dim() != 2 or group.scale.shape[0] not in (1, B) \
                or any(x is not None and x.shape != (B, S) for x in (sums, plain)) \
                or (member is not None and member.shape != (B, N)):
            return None
        def part(x: Tensor | None) -> tuple[int | None, int]:  # a weight part [B | 1, N] -> (pointer, row stride)
            if x is None:
                return None, 0
            x, stride = row(x)
            return ptr(x), stride

        factors = [part(x) for x in (parts[2:] if parts is not None else (None,) * 3)]
        return _OthersSum(ptr(None if member is None else member.contiguous()),
                          ptr(None if sums is None else sums.contiguous()),
                          ptr(None if plain is None else plain.contiguous()), int(parts is not None),
                          *(f[0] for f in factors), *(f[1] for f in factors), ptr(group.slot),
                          ptr(group.scale.contiguous()), 0 if group.scale.shape[0] == 1 else S, S, int(runs),
                          int(S >= PAIRED_GROUPS and not runs))

    blocks = -(-N // BLOCK)
    args = _Args(B=B, N=N, threads=torch.get_num_threads(), block=BLOCK)
    for name, (group, grads) in probes.items():
        layer = others_sum(group, *grads, weights.get(name))
        if layer is None:
            return None
        setattr(args, name, layer)
    if weights:  # (one grad and σ: checked above)
        parts = next(iter(weights.values()))
        args.w_grad = ptr(parts.grad.contiguous())
        sigma, args.w_sigma_stride = row(parts.sigma)
        args.w_sigma = ptr(sigma)
        by_group = _group_kernels._sigma_table(parts.sigma, B, N)  # σ read by group (`_group_kernels.by_group`)
        if by_group is not None:
            table, held = by_group
            keep.extend(held)
            args.w_sigma_table, args.w_sigma_table_stride, args.w_sigma_table_size, args.w_sigma_index = (
                table.table, table.stride, table.size, table.index)
    for name in LAYERS:
        p = presences.get(name)
        if p is not None:
            p, stride = row(p)
            setattr(args, f"p_{name}", ptr(p))
            setattr(args, f"p_{name}_stride", stride)
    for name, x in (("I_sym", I_sym), ("I_asym", I_asym), ("isolating", isolating), ("isolate_prob", isolate_prob),
                    ("stage_end", stage_end), ("flags", flags)):  # (stage_end None: the flags' bit 3)
        if x is not None:
            setattr(args, name, ptr(x.detach().expand(B, N).contiguous()))
    args.flags_timed = int(stage_end is None)
    if testing is not None:
        t, args.testing_stride = row(testing)
        args.testing = ptr(t)
    args.alpha, args.eta, args.detect_asym = (ptr(per_element(x)) for x in (alpha, eta, detect_asym))
    out: dict[str, Tensor | None] = {}
    for name in ("I_sym", "I_asym", "isolating"):
        g, writable = passed.get(name, (None, False))
        if g is not None and (g.shape != (B, N) or not g.is_contiguous()):
            return None
        out[name] = g if writable else torch.empty(B, N) if wants.get(name) or g is not None else None
        setattr(args, f"out_{name}", ptr(out[name]))
        setattr(args, f"acc_{name}", ptr(g))
    for name in LAYERS:
        g = presences_passed.get(name)
        if g is not None and (g.shape != (B, N) or not g.is_contiguous()):
            return None
        out[name] = g if g is not None else torch.empty(B, N) if wants.get(name) else None
        setattr(args, f"out_p_{name}", ptr(out[name]))
        setattr(args, f"acc_p_{name}", ptr(g))
    for name in ("alpha_sums", "eta_sums"):
        out[name] = torch.empty(B, blocks, dtype=torch.float64) if wants.get(name) else None
        setattr(args, name, ptr(out[name]))
    library.agenttensor_covid_own_backward(ctypes.byref(args))
    for name in ("alpha_sums", "eta_sums"):
        if out[name] is not None:
            out[name] = out[name].sum(1)
    return out

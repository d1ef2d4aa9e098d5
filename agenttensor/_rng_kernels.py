"""Native CPU kernels for `agenttensor.rng` (agenttensor/csrc/rng_kernels.cpp): uniforms for every agent, or at
selected (batch, agent) pairs for several streams, each in one pass instead of ~13 torch ops, the same bits.
Every function returns None where the kernel does not apply (other devices, unexpected dtypes, kernels off with
``AGENTTENSOR_NATIVE_KERNELS=0`` or no compiler) and the caller runs the torch-ops definition."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import native

SOURCE = native.CSRC / "rng_kernels.cpp"
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_uniform.argtypes = [_I, _I, _P, _P, _P, _I]
    library.agenttensor_uniform_at.argtypes = [_I, _I, _I, _I, _P, _P, _P, _P, _P, _I]
    library.agenttensor_uniform_at.restype = _I
    library.agenttensor_hard_event.argtypes = [_I, _I, _P, _P, _P, _I, _I, _I, _P, _P, _I]
    library.agenttensor_float_event.argtypes = [_I, _I, _P, _P, _P, _I, _I, _I, _P, _P, _P, _I]
    library.agenttensor_float_event_move.argtypes = [_I, _I, _P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P,
                                                     ctypes.POINTER(_P), _I]
    library.agenttensor_float_event_move.restype = _I
    library.agenttensor_hazard_event_move.argtypes = [_I, _I, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P,
                                                      ctypes.POINTER(_P), _I]
    library.agenttensor_hazard_event_move.restype = _I
    library.agenttensor_take_pairs.argtypes = [_P, _P, _P]


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_rng_kernels", _declare, flags=("-O3", "-ffp-contract=off"))


def _int32(x: Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.int32 and x.is_contiguous()


def _hashes(base: Tensor, keys: Tensor) -> bool:
    """base [N] and keys [B] as the kernels read them."""
    return _int32(base) and _int32(keys) and base.dim() == 1 and keys.dim() == 1


def uniform(base: Tensor, keys: Tensor) -> Tensor | None:
    """[B, N] float32 uniforms of base [N] int32 and keys [B] int32, or None where the kernel does not apply."""
    if not _hashes(base, keys):
        return None
    library = _library()
    if library is None:
        return None
    out = torch.empty(keys.numel(), base.numel(), dtype=torch.float32)
    library.agenttensor_uniform(keys.numel(), base.numel(), base.data_ptr(), keys.data_ptr(), out.data_ptr(),
                                torch.get_num_threads())
    return out


def uniform_at(base: Tensor, keys: Tensor, batch_index: Tensor, agent_index: Tensor) -> Tensor | None:
    """[S, M] float32 uniforms at the pairs (batch_index [M], agent_index [M]) int64 for keys [S, B] int32 (one row
    per stream), or None where the kernel does not apply or an index is out of range (the torch ops then index as
    torch does: negative indices wrap, others raise)."""
    if not (_int32(base) and _int32(keys) and keys.dim() == 2 and base.dim() == 1
            and all(x.is_cpu and x.dtype == torch.int64 and x.dim() == 1 and x.is_contiguous()
                    for x in (batch_index, agent_index))):
        return None
    library = _library()
    if library is None:
        return None
    S, B = keys.shape
    M = agent_index.numel()
    out = torch.empty(S, M, dtype=torch.float32)
    outside = library.agenttensor_uniform_at(S, B, base.numel(), M, base.data_ptr(), keys.data_ptr(),
                                             batch_index.data_ptr(), agent_index.data_ptr(), out.data_ptr(),
                                             torch.get_num_threads())
    return None if outside else out


def _event_inputs(base: Tensor, keys: Tensor, p: Tensor | float, where: Tensor | None, where_dtype: torch.dtype
                  ) -> tuple[ctypes.CDLL, Tensor] | None:
    """(library, p as a float32 CPU [B, N] view whose agent stride is 0 or 1) for the event kernels, or None where they
    do not apply: base [N] and keys [B] as the kernels read them, where None or a contiguous [B, N] of
    ``where_dtype``, p float32 and broadcastable to [B, N] (or a number)."""
    B, N = keys.numel(), base.numel()
    if not _hashes(base, keys):
        return None
    if where is not None and not (where.is_cpu and where.dtype == where_dtype
                                  and where.shape == (B, N) and where.is_contiguous()):
        return None
    if not isinstance(p, Tensor):
        p = torch.tensor(float(p), dtype=torch.float32)
    if not p.is_cpu or p.dtype != torch.float32 or p.dim() > 2:
        return None
    try:
        p_view = p.expand(B, N)
    except RuntimeError:
        return None
    library = _library() if p_view.stride(1) in (0, 1) else None
    return None if library is None else (library, p_view)


def hard_event(base: Tensor, keys: Tensor, p: Tensor | float, where: Tensor | None, complement: bool = False
               ) -> Tensor | None:
    """Hard events for every agent, uint8 [B, N]: ``(u < q).to(uint8) * where`` with u the uniforms of base [N] and
    keys [B], q = p, or 1 − p with ``complement`` (p = exp(−hazard)); p float32 broadcastable to [B, N] (or a
    number), where uint8 [B, N] or None. None where the kernel does not apply."""
    inputs = _event_inputs(base, keys, p, where, torch.uint8)
    if inputs is None:
        return None
    library, p_view = inputs
    out = torch.empty(p_view.shape, dtype=torch.uint8)
    library.agenttensor_hard_event(*p_view.shape, base.data_ptr(), keys.data_ptr(), p_view.data_ptr(),
                                   *p_view.stride(), int(complement), None if where is None else where.data_ptr(),
                                   out.data_ptr(), torch.get_num_threads())
    return out


def float_event(base: Tensor, keys: Tensor, p: Tensor | float, where: Tensor | None, complement: bool = False
                ) -> tuple[Tensor, Tensor] | None:
    """Events for every agent as the gradient modes hold them: (happened bool [B, N], ``(u < q).to(float32) * where``
    float32 [B, N]), u and q as in `hard_event`, where float32 [B, N] or None; the uniforms drawn inside the pass
    (no [B, N] of them). None where the kernel does not apply."""
    inputs = _event_inputs(base, keys, p, where, torch.float32)
    if inputs is None:
        return None
    library, p_view = inputs
    happened = torch.empty(p_view.shape, dtype=torch.uint8)
    out = torch.empty(p_view.shape, dtype=torch.float32)
    library.agenttensor_float_event(*p_view.shape, base.data_ptr(), keys.data_ptr(), p_view.data_ptr(),
                                    *p_view.stride(), int(complement), None if where is None else where.data_ptr(),
                                    happened.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return happened.view(torch.bool), out


def float_event_move(base: Tensor, keys: Tensor, p: Tensor | float, source: Tensor, target: Tensor,
                     complement: bool = False, in_place: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]] | None:
    """`float_event` with ``where`` = ``source`` [B, N] float32, whose events e move from ``source`` to ``target``
    [B, N] float32 in the same pass: (happened bool [B, N], source − e, target + e, the (batch, agent) int64 pairs [M]
    with e != 0 in row-major order, as ``e.nonzero(as_tuple=True)``), the same numbers without e's [B, N]. ``in_place``:
    source − e and target + e written into source and target (at the moved agents only; their versions bumped), which
    are returned. None where the kernel does not apply."""
    inputs = _move_inputs(base, keys, p, source, target, in_place)
    if inputs is None:
        return None
    library, p_view = inputs
    happened = torch.empty(p_view.shape, dtype=torch.uint8)
    source_out, target_out = (source, target) if in_place else (torch.empty_like(source), torch.empty_like(target))
    pairs = _P()
    M = library.agenttensor_float_event_move(*p_view.shape, base.data_ptr(), keys.data_ptr(), p_view.data_ptr(),
                                             *p_view.stride(), int(complement), source.data_ptr(), target.data_ptr(),
                                             happened.data_ptr(), None if in_place else source_out.data_ptr(),
                                             None if in_place else target_out.data_ptr(), ctypes.byref(pairs),
                                             torch.get_num_threads())
    return happened.view(torch.bool), source_out, target_out, _moved_pairs(library, M, pairs, in_place, source, target)


def hazard_event_move(base: Tensor, keys: Tensor, hazard: Tensor, source: Tensor, target: Tensor, in_place: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor]] | None:
    """`float_event_move` at p = exp(−hazard), complement (events ``1[u < 1 − exp(−hazard)]``), with exp(−hazard)
    made inside the pass, block by block, by torch's own exp (`native.torch_exp`): (exp(−hazard) [B, N], happened,
    source − e, target + e, the pairs), the same numbers as ``float_event_move((-hazard).exp_(), ...)`` without the
    negation's and the exp's passes over [B, N]. hazard float32 [B, N] contiguous; None where the kernel does not
    apply (then the caller makes exp(−hazard) with torch)."""
    exp = native.torch_exp()
    inputs = _move_inputs(base, keys, hazard, source, target, in_place) if exp is not None else None
    if inputs is None or not (hazard.shape == source.shape and hazard.is_contiguous()):
        return None
    library = inputs[0]
    B, N = hazard.shape
    survival, happened = torch.empty_like(hazard), torch.empty(B, N, dtype=torch.uint8)
    source_out, target_out = (source, target) if in_place else (torch.empty_like(source), torch.empty_like(target))
    pairs = _P()
    M = library.agenttensor_hazard_event_move(B, N, base.data_ptr(), keys.data_ptr(), hazard.data_ptr(), exp.function,
                                              exp.mode, exp.local_threads, survival.data_ptr(), source.data_ptr(),
                                              target.data_ptr(), happened.data_ptr(),
                                              None if in_place else source_out.data_ptr(),
                                              None if in_place else target_out.data_ptr(), ctypes.byref(pairs),
                                              torch.get_num_threads())
    return (survival, happened.view(torch.bool), source_out, target_out,
            _moved_pairs(library, M, pairs, in_place, source, target))


def _move_inputs(base: Tensor, keys: Tensor, p: Tensor | float, source: Tensor, target: Tensor, in_place: bool
                 ) -> tuple[ctypes.CDLL, Tensor] | None:
    """`_event_inputs` for the move kernels (where = ``source``), with ``target`` a float32 CPU [B, N] contiguous like
    it and, ``in_place``, source, target and p in three distinct buffers; else None."""
    inputs = _event_inputs(base, keys, p, source, torch.float32)
    if inputs is None or not (target.is_cpu and target.dtype == torch.float32
                              and target.shape == source.shape and target.is_contiguous()):
        return None
    if in_place and (inputs[1].data_ptr() in (source.data_ptr(), target.data_ptr())
                     or source.data_ptr() == target.data_ptr()):
        return None
    return inputs


def _moved_pairs(library: ctypes.CDLL, M: int, pairs: ctypes.c_void_p, in_place: bool, source: Tensor, target: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """The move kernels' M pairs (b [M], i [M]) taken from ``pairs``; source's and target's versions bumped where
    they were written in place."""
    if in_place:
        for x in (source, target):
            torch.autograd.graph.increment_version(x)
    b, i = torch.empty(M, dtype=torch.int64), torch.empty(M, dtype=torch.int64)
    if M:
        library.agenttensor_take_pairs(pairs, b.data_ptr(), i.data_ptr())
    return b, i

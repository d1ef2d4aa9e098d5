"""Native CPU kernels for the straight-through hazard event (agenttensor/csrc/event_kernels.cpp), used by
`agenttensor.sampling` where they apply: float32 [B, N] tensors of one shape on CPU; every function returns None
elsewhere and the caller runs torch ops (the same numbers, bit for bit). The forward is one pass instead of four
(1 − s, the comparison, the conversion and the product), the backward one instead of three (also the drawn event's,
`sampling._StraightThroughDrawnEvent`: its two derivatives in one pass, where `torch.where` alone took ~10 ms at full
NYC).
``AGENTTENSOR_NATIVE_KERNELS=0`` turns them off."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import native

SOURCE = native.CSRC / "event_kernels.cpp"
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_hazard_event.argtypes = [_I, _P, _P, _P, _P, _P, _I]
    library.agenttensor_hazard_event_backward.argtypes = [_I, _P, _P, _P, _P, _P, _P, _I]


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_event_kernels", _declare, flags=("-O3", "-ffp-contract=off"))


def _plain(*xs: Tensor) -> bool:
    """CPU float32 contiguous tensors of one shape."""
    shape = xs[0].shape
    return all(x.is_cpu and x.dtype == torch.float32 and x.shape == shape and x.is_contiguous()
               for x in xs)


def hazard_event(survival: Tensor, u: Tensor, where: Tensor) -> tuple[Tensor, Tensor] | None:
    """(happened bool, 1[u < 1 − survival] · where float32), or None where the kernel does not apply."""
    if not _plain(survival, u, where):
        return None
    library = _library()
    if library is None:
        return None
    happened = torch.empty(survival.shape, dtype=torch.bool)
    out = torch.empty(survival.shape, dtype=torch.float32)
    library.agenttensor_hazard_event(survival.numel(), survival.data_ptr(), u.data_ptr(), where.data_ptr(),
                                     happened.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return happened, out


def hazard_event_backward(grad: Tensor, where: Tensor | None, survival: Tensor | None, happened: Tensor | None,
                          drawn: bool = False) -> tuple[Tensor | None, Tensor | None] | None:
    """(grad · where · survival if survival is given, happened ? grad : 0 if happened is given), or None where the
    kernel does not apply. ``drawn`` (the event 1[u < p] · where, `sampling._StraightThroughDrawnEvent`): grad · where
    in the first place (d/dp; survival None), if where is given."""
    dense = [x for x in (grad, where, survival) if x is not None]
    if not _plain(*dense) or (happened is not None and (happened.shape != grad.shape or happened.dtype != torch.bool
                                                        or not happened.is_contiguous())):
        return None
    library = _library()
    if library is None:
        return None
    d_hazard = torch.empty_like(grad) if survival is not None or (drawn and where is not None) else None
    d_where = torch.empty_like(grad) if happened is not None else None
    ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    library.agenttensor_hazard_event_backward(grad.numel(), grad.data_ptr(), ptr(where), ptr(survival), ptr(happened),
                                              ptr(d_hazard), ptr(d_where), torch.get_num_threads())
    return d_hazard, d_where

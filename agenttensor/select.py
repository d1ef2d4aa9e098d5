"""Which agents satisfy a test, as torch.nonzero's (batch, agent) index pairs, by a native CPU kernel
(agenttensor/csrc/select_kernels.cpp): one fused pass to count and one to write, without the intermediate mask
(full NYC: the day's exits `stage_end == t` 8 → 2 ms). The functions always answer: where the kernel does not apply
(other devices, other dtypes or shapes, ``AGENTTENSOR_NATIVE_KERNELS=0``, no compiler) they run the torch ops."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import native

SOURCE = native.CSRC / "select_kernels.cpp"
_P, _I = ctypes.c_void_p, ctypes.c_int64
_KIND = {torch.uint8: 0, torch.float32: 1}
_MIN_CHUNK = 1 << 16  # agents per chunk at least: smaller masks run in one chunk


def _declare(library: ctypes.CDLL) -> None:
    library.agenttensor_select_count.argtypes = [_I, _I, _P, _P, _I, _I, _I, _P]
    library.agenttensor_select_fill.argtypes = [_I, _I, _I, _P, _P, _I, _I, _I, _P, _P, _P]


def _library() -> ctypes.CDLL | None:
    return native.load(SOURCE, "agenttensor_select_kernels", _declare)


def _chunk_counts(library: ctypes.CDLL, kind: int, a: Tensor, b: Tensor | None, value: int):
    """The counting pass: hits per fixed chunk of a's entries (a plain ctypes array: no torch calls at small N)."""
    threads = torch.get_num_threads()
    chunks = max(1, min(threads, a.numel() // _MIN_CHUNK))
    counts = (ctypes.c_int64 * chunks)()
    library.agenttensor_select_count(kind, a.numel(), a.data_ptr(), None if b is None else b.data_ptr(), value, chunks,
                                     min(threads, chunks), counts)
    return counts


def _select(kind: int, a: Tensor, b: Tensor | None, value: int) -> tuple[Tensor, Tensor] | None:
    library = _library()
    if library is None:
        return None
    counts = _chunk_counts(library, kind, a, b, value)
    total = 0
    for c in range(len(counts)):  # each chunk's count -> its offset
        counts[c], total = total, total + counts[c]
    out_b, out_i = torch.empty(total, dtype=torch.int64), torch.empty(total, dtype=torch.int64)
    library.agenttensor_select_fill(kind, a.numel(), a.shape[-1], a.data_ptr(), None if b is None else b.data_ptr(),
                                    value, len(counts), min(torch.get_num_threads(), len(counts)), counts,
                                    out_b.data_ptr(), out_i.data_ptr())
    return out_b, out_i


def _plain(x: Tensor, *dtypes: torch.dtype) -> bool:
    return x.device.type == "cpu" and x.dtype in dtypes and x.dim() == 2 and x.is_contiguous() and x.numel() > 0


def nonzero(a: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(batch, agent) int64 indices [M] of the entries of a [B, N] where a or b [B, N] is non-zero:
    ``(a | b).nonzero(as_tuple=True)``, the same pairs in the same order."""
    if _plain(a, torch.uint8, torch.float32) and (b is None or (_plain(b, a.dtype) and b.shape == a.shape)):
        out = _select(_KIND[a.dtype], a, b, 0)
        if out is not None:
            return out
    mask = a if b is None else torch.logical_or(a, b)
    return mask.nonzero(as_tuple=True)


def count(a: Tensor) -> int:
    """The number of non-zero entries of a [B, N] (``int(torch.count_nonzero(a))``), in one vectorised native pass on
    CPU (the counting pass of `nonzero`)."""
    if _plain(a, torch.uint8, torch.float32):
        library = _library()
        if library is not None:
            return sum(_chunk_counts(library, _KIND[a.dtype], a, None, 0))
    return int(torch.count_nonzero(a))


def equal(x: Tensor, value: int) -> tuple[Tensor, Tensor]:
    """(batch, agent) int64 indices of the entries of x [B, N] equal to ``value``: ``(x == value).nonzero(as_tuple=True)``."""
    if _plain(x, torch.int16) and -2**15 <= value < 2**15:
        out = _select(2, x, None, value)
        if out is not None:
            return out
    return (x == value).nonzero(as_tuple=True)

"""Values derived from a tensor (an index's int64 copy, its bounds, its sort order), computed once per tensor and
again when it is modified in place."""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

from torch import Tensor

T = TypeVar("T")


class Derived:
    """A memo of values derived from tensors, keyed by the tensor's identity (through a weak reference, so a new
    tensor at a recycled address is not mistaken for the old one, and the memo keeps no tensor alive), its
    version counter (bumped by in-place changes) and an optional extra key. Cleared when it holds ``limit``
    entries."""

    def __init__(self, limit: int = 64):
        self._seen: dict[tuple[int, Hashable], tuple[weakref.ref, int, object]] = {}
        self._limit = limit

    def get(self, tensor: Tensor, compute: Callable[[], T], key: Hashable = None) -> T:
        hit = self._seen.get((id(tensor), key))
        if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
            return hit[2]  # type: ignore[return-value]
        if len(self._seen) >= self._limit:
            self._seen.clear()
        value = compute()
        self._seen[(id(tensor), key)] = (weakref.ref(tensor), tensor._version, value)
        return value

"""Typed containers of tensors for agent state.

A model's state is a frozen dataclass subclassing `TensorState`: every field is a tensor with
a leading batch dim (scenarios × seeds) and agents on the next dim, ``[B, N]`` (or ``[B, N, K]``).
Static per-agent data (ages, group ids) lives in the population, not in the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor

S = TypeVar("S", bound="TensorState")
_init_fields: dict[type, frozenset[str]] = {}  # a state class's fields set at init (`TensorState.replace`)


@dataclasses.dataclass(frozen=True)
class TensorState:
    """Base for model states: a frozen dataclass whose fields are tensors shaped [B, N, ...].

    ``gradient_only``: names of fields that only carry derivatives in the gradient-carrying sampling
    modes (zero-valued [B, N] there, [B, 0] in hard mode); a state handed from one mode to the other
    gets them afresh from ``model.init`` (`agenttensor.simulate`'s ``initial_state``).
    """

    gradient_only: ClassVar[tuple[str, ...]] = ()

    def replace(self: S, **changes: Any) -> S:
        """New state with some fields replaced (the old one is unchanged). ``dataclasses.replace``'s result, without its
        per-field init call where the class has no ``__post_init__`` (a step's few microseconds at small N)."""
        cls = type(self)
        names = _init_fields.get(cls)
        if names is None:
            names = _init_fields[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
        if hasattr(cls, "__post_init__") or not changes.keys() <= names:
            return dataclasses.replace(self, **changes)  # (its checks and errors)
        new = object.__new__(cls)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def map(self: S, fn: Callable[[Tensor], Tensor]) -> S:
        """Apply fn to every tensor field."""
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def to(self: S, device: str | torch.device) -> S:
        """The same state on another device (one call moves everything)."""
        return self.map(lambda t: t.to(device))

    def detach(self: S) -> S:
        return self.map(lambda t: t.detach())

    def select_batch(self: S, index: Tensor | slice) -> S:
        """Sub-batch of the state along dim 0."""
        return self.map(lambda t: t[index])

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.tensors().values())).shape[0])

    @property
    def num_agents(self) -> int:
        return int(next(iter(self.tensors().values())).shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def concat(cls: type[S], states: list[S]) -> S:
        """Concatenate states along the batch dim."""
        first = states[0]
        return dataclasses.replace(first, **{k: torch.cat([getattr(s, k) for s in states], 0) for k in first.tensors()})

"""Discrete events with a hard mode and gradient-carrying modes.

Every event is decided by comparing a uniform ``u`` (from `agenttensor.rng`) with a probability
``p``: the event happens iff ``u < p``. All samplers make exactly that decision in the forward
pass, so for the same random numbers every mode gives the same trajectory. They differ only in
what flows backward:

- `Hard` — exact sampling, no gradient; events are ``uint8`` (0/1), the cheapest representation.
- `StraightThrough` — forward ``1[u < p]``, backward ``d event / d p = 1`` (Bengio et al. 2013;
  the estimator GradABM/AgentTorch use). Unbiased for the expectation of any quantity that is
  linear in a single event; biased (but low-variance) through chains of events, because the
  downstream effect of an event is linearised along the sampled path.
- `Relaxed(tau)` — forward ``1[u < p]``, backward through the binary-concrete surrogate
  ``sigmoid((logit p - logit u) / tau)`` (Maddison et al. 2017; Jang et al. 2017) with the same
  ``u``. Biased for ``tau > 0``; the bias shrinks and the variance grows as ``tau -> 0``.

Events in the gradient modes are float32 tensors whose values are exactly 0.0 or 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import _event_kernels
from .rng import Uniforms, drawn


@dataclass(frozen=True)
class Sampler:
    """Base of the sampling strategies; pick one of `Hard`, `StraightThrough`, `Relaxed`."""

    @property
    def differentiable(self) -> bool:
        return not isinstance(self, Hard)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of event and compartment-membership tensors in this mode."""
        return torch.uint8 if isinstance(self, Hard) else torch.float32

    def bernoulli(self, p: Tensor, u: Tensor) -> Tensor:
        """Event indicator ``1[u < p]``, broadcast of p and u. Values exactly 0/1."""
        raise NotImplementedError

    def hazard_event(self, hazard: Tensor, u: Tensor | Uniforms, where: Tensor) -> Tensor:
        """``1[u < 1 − exp(−hazard)] · where`` (an event at rate ``hazard`` over one step, among the 0/1
        members ``where``), all broadcastable to [B, N]; the same numbers as ``bernoulli(1 − exp(−hazard), u)
        · where``. ``u`` may be `Uniforms` not drawn yet (see `event_among`)."""
        return self.event_among(torch.exp(-hazard), u, where, complement=True)

    def hazard_event_and_derivatives(self, hazard: Tensor, u: Tensor | Uniforms, where: Tensor
                                     ) -> tuple[Tensor, "EventDerivatives | None"]:
        """`hazard_event`, and where this sampler's derivatives are a mask and a factor (straight-through), those
        (`EventDerivatives`), the derivatives then left to the caller: ``(events, derivatives)`` with events carrying
        no autograd graph, or ``(hazard_event(...), None)`` (the derivatives flow through autograd as usual). A caller
        that already writes where's and hazard's gradients in one node of its own (taking ``hazard`` as an input)
        applies them there, where the event's node would read the events' gradient, where and exp(−hazard) again
        and write a [B, N] of hazard's gradient; it must then be the events' only differentiable consumer."""
        return self.hazard_event(hazard, u, where), None

    def hazard_move_and_derivatives(self, hazard: Tensor, u: Uniforms, source: Tensor, target: Tensor,
                                    in_place: bool = False) -> "Moved | None":
        """`hazard_event_and_derivatives` with ``where`` = ``source`` (0/1 memberships [B, N]) whose events e move
        from ``source`` to ``target`` [B, N] in the same pass (e.g. infections, S → E): `Moved` (source − e,
        target + e, e's (batch, agent) pairs and the derivatives), the same numbers without e's [B, N]; ``in_place``:
        written into source and target themselves (values only: no autograd node may have saved them). None where
        this sampler has no such derivatives or no native pass applies (the caller then uses the events)."""
        return None

    def event_among(self, p: Tensor | float, u: Tensor | Uniforms, where: Tensor | None = None,
                    complement: bool = False) -> Tensor:
        """``bernoulli(1 − p if complement else p, u) · where`` (where None: 1), the same numbers. ``u`` may be
        `Uniforms` not drawn yet: straight-through then draws them inside one native pass on CPU."""
        events = self.bernoulli(1 - p if complement else p, drawn(u))
        return events if where is None else events * where

    def categorical(self, probs: Tensor, u: Tensor) -> Tensor:
        """One-hot draw from ``probs`` [..., K] (rows sum to 1) by inverse CDF with u [...]. -> [..., K]."""
        cdf = probs.detach().cumsum(-1)
        index = (u.unsqueeze(-1) >= cdf).sum(-1).clamp_max(probs.shape[-1] - 1)
        hard = torch.nn.functional.one_hot(index.long(), probs.shape[-1])
        if not self.differentiable:
            return hard.to(torch.uint8)
        hard = hard.to(probs.dtype)
        return hard + (probs - probs.detach())


@dataclass(frozen=True)
class Hard(Sampler):
    """Exact sampling, no gradients (the default for forward runs)."""

    def bernoulli(self, p: Tensor, u: Tensor) -> Tensor:
        return (u < p).to(torch.uint8)


@dataclass(frozen=True)
class StraightThrough(Sampler):
    """Forward exact; backward d event/d p = 1."""

    def bernoulli(self, p: Tensor, u: Tensor) -> Tensor:
        if not isinstance(p, Tensor):
            return (u < p).to(torch.float32)
        return _StraightThroughEvent.apply(p, u) if p.requires_grad else (u < p).to(p.dtype)


    def hazard_event(self, hazard: Tensor, u: Tensor | Uniforms, where: Tensor) -> Tensor:
        if not (isinstance(hazard, Tensor) and hazard.requires_grad) and not where.requires_grad:
            return super().hazard_event(hazard, u, where)
        return _StraightThroughHazardEvent.apply(hazard, u, where)

    def hazard_event_and_derivatives(self, hazard: Tensor, u: Tensor | Uniforms, where: Tensor
                                     ) -> tuple[Tensor, "EventDerivatives"]:
        hazard = hazard if isinstance(hazard, Tensor) else torch.tensor(float(hazard), dtype=torch.float32)
        with torch.no_grad():
            survival, happened, events = _hazard_event_values(hazard, u, where)
        return events, EventDerivatives(happened, survival)

    def hazard_move_and_derivatives(self, hazard: Tensor, u: Uniforms, source: Tensor, target: Tensor,
                                    in_place: bool = False) -> "Moved | None":
        if not (isinstance(hazard, Tensor) and hazard.is_cpu and isinstance(u, Uniforms)):
            return None
        with torch.no_grad():  # exp(−h) made inside the pass, else as `_hazard_event_values` makes it: the same bits
            moved = u.hazard_event_move(hazard.detach(), source.detach(), target.detach(), in_place=in_place)
            if moved is None:
                survival = (-hazard).exp_()
                moved = u.float_event_move(survival, source.detach(), target.detach(), complement=True,
                                           in_place=in_place)
                moved = None if moved is None else (survival, *moved)
        if moved is None:
            return None
        survival, happened, source_after, target_after, pairs = moved
        if in_place:  # the tensors themselves (their detached aliases were written)
            source_after, target_after = source, target
        return Moved(source_after, target_after, pairs, EventDerivatives(happened, survival))

    def event_among(self, p: Tensor | float, u: Tensor | Uniforms, where: Tensor | None = None,
                    complement: bool = False) -> Tensor:
        if not isinstance(u, Uniforms) or where is None:
            return super().event_among(p, u, where, complement)
        if not isinstance(p, Tensor):
            p = torch.tensor(float(p), dtype=torch.float32)
        return _StraightThroughDrawnEvent.apply(p, where, u, complement)


class EventDerivatives(NamedTuple):
    """The derivatives of straight-through events ``1[u < 1 − exp(−h)] · where`` (`Sampler.hazard_event_and_derivatives`),
    for a caller that applies them: d events / d where = ``where_mask`` and d events / d h = where · ``survival``
    (d event / d p = 1), each times the events' gradient."""

    where_mask: Tensor  # [B, N] bool: 1[u < 1 − exp(−h)]
    survival: Tensor  # exp(−h), h's shape, float32


class Moved(NamedTuple):
    """`Sampler.hazard_move_and_derivatives`' result: the two fields after the events e moved (values; no graph), e's
    (batch, agent) int64 pairs [M] in row-major order (``e.nonzero(as_tuple=True)``) and e's derivatives w.r.t.
    the source and the hazard, for the caller to apply (as with `Sampler.hazard_event_and_derivatives`)."""

    source: Tensor  # [B, N] source − e
    target: Tensor  # [B, N] target + e
    pairs: tuple[Tensor, Tensor]
    derivatives: EventDerivatives


def _hazard_event_values(hazard: Tensor, u: Tensor | Uniforms, where: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(exp(−h), the mask 1[u < 1 − exp(−h)] (bool), the events 1[u < 1 − exp(−h)] · where (where's dtype)) in torch
    ops or, on CPU, one native pass for the mask and the events (undrawn uniforms: drawn inside it): the same numbers."""
    survival = (-hazard).exp_()  # one buffer, the same bits
    fused = (u.float_event(survival, where, complement=True) if isinstance(u, Uniforms)
             else _event_kernels.hazard_event(survival, u, where))
    if fused is None:
        happened = drawn(u) < 1 - survival
        return survival, happened, happened.to(where.dtype) * where
    return survival, *fused


class _StraightThroughHazardEvent(torch.autograd.Function):
    """``1[u < 1 − exp(−h)] · where`` forward (`_hazard_event_values`); backward d/dh = grad · where · exp(−h)
    (d event/d p = 1), d/dwhere = grad · event. One node keeping exp(−h) and a 1-byte event mask, where the
    composition keeps exp(−h) and the float32 event and runs ~5 elementwise nodes each way."""

    @staticmethod
    def forward(ctx, hazard: Tensor, u: Tensor | Uniforms, where: Tensor):
        survival, happened, out = _hazard_event_values(hazard, u, where)  # no autograd inside forward
        ctx.shapes = hazard.shape, where.shape
        ctx.save_for_backward(survival if ctx.needs_input_grad[0] else None,
                              where if ctx.needs_input_grad[0] else None,
                              happened if ctx.needs_input_grad[2] else None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        survival, where, happened = ctx.saved_tensors
        hazard_shape, where_shape = ctx.shapes
        fused = _event_kernels.hazard_event_backward(grad, where, survival, happened)
        if fused is not None:
            d_hazard, d_where = fused
            return (None if d_hazard is None else d_hazard.sum_to_size(hazard_shape), None,
                    None if d_where is None else d_where.sum_to_size(where_shape))
        d_hazard = d_where = None
        if ctx.needs_input_grad[0]:
            d_hazard = (grad * where * survival).sum_to_size(hazard_shape)
        if ctx.needs_input_grad[2]:
            d_where = torch.where(happened, grad, 0.0).sum_to_size(where_shape)
        return d_hazard, None, d_where


class _StraightThroughDrawnEvent(torch.autograd.Function):
    """``1[u < p] · where`` (1 − p with ``complement``) forward, the uniforms drawn inside one native pass on CPU
    (`Uniforms.float_event`; else torch ops, the same numbers); backward d/dp = ±grad · where (d event/d p = 1),
    d/dwhere = grad · event. One node keeping where and a 1-byte event mask, where `bernoulli` and the product
    wrote a [B, N] of uniforms and kept the float32 events."""

    @staticmethod
    def forward(ctx, p: Tensor, where: Tensor, u: Uniforms, complement: bool) -> Tensor:
        fused = u.float_event(p, where, complement)
        if fused is None:
            happened = drawn(u) < (1 - p if complement else p)
            out = happened.to(p.dtype) * where
        else:
            happened, out = fused
        ctx.shapes, ctx.complement = (p.shape, where.shape), complement
        ctx.save_for_backward(where if ctx.needs_input_grad[0] else None,
                              happened if ctx.needs_input_grad[1] else None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        where, happened = ctx.saved_tensors
        p_shape, where_shape = ctx.shapes
        if p_shape == where_shape == grad.shape:  # both in one native pass on CPU (the same numbers)
            fused = _event_kernels.hazard_event_backward(grad, where, None, happened, drawn=True)
            if fused is not None:
                d_p, d_where = fused
                return (d_p.neg_() if d_p is not None and ctx.complement else d_p), d_where, None, None
        d_p = d_where = None
        if ctx.needs_input_grad[0]:
            d_p = grad * where
            d_p = (d_p.neg_() if ctx.complement else d_p).sum_to_size(p_shape)
        if ctx.needs_input_grad[1]:
            d_where = torch.where(happened, grad, 0.0).sum_to_size(where_shape)
        return d_p, d_where, None, None


class _StraightThroughEvent(torch.autograd.Function):
    """``1[u < p]`` forward, identity backward: what ``hard + (p - p.detach())`` computes, without its two
    extra [B, N] temporaries."""

    @staticmethod
    def forward(ctx, p: Tensor, u: Tensor) -> Tensor:
        ctx.p_shape = p.shape
        return (u < p).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad if grad.shape == ctx.p_shape else grad.sum_to_size(ctx.p_shape)), None


@dataclass(frozen=True)
class Relaxed(Sampler):
    """Forward exact; backward through sigmoid((logit p - logit u)/tau) with the same u."""

    tau: float = 0.1

    def bernoulli(self, p: Tensor, u: Tensor) -> Tensor:
        eps = 1e-6
        pc = p.clamp(eps, 1 - eps)
        soft = torch.sigmoid((torch.logit(pc) - torch.logit(u)) / self.tau)
        hard = (u < p.detach()).to(p.dtype)
        return hard + (soft - soft.detach())


def sampler_named(name: str) -> Sampler:
    """'hard' | 'straight-through' | 'relaxed' -> a sampler (CLI helper)."""
    table = {"hard": Hard(), "straight-through": StraightThrough(), "st": StraightThrough(), "relaxed": Relaxed()}
    if name not in table:
        from .errors import ConfigError

        raise ConfigError(f"unknown sampling mode {name!r}; choose one of: hard, straight-through, relaxed")
    return table[name]

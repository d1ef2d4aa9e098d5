"""Gradient modes: every agent's own contribution to its groups' infectious pressure, as one autograd node.

The forward force of infection sums the infectious agents only (`infection_pressure`); in gradient modes each
layer also carries the derivative of every agent's contribution to its group (`ForceTerm.own`: the others-sum
of the members' force derivatives). The contributions are

    own_household = 1[stage_end ≥ 0] ι                 real sources only (untaken infections act via `shadow.py`)
    own_l         = ι ã p_l                            l = school, workplace, community
    ι = I_sym + α I_asym,   ã = 1 − η isolating − η free isolate_prob (I_sym + α d_asym I_asym) / ι

where the last term is the expected isolation of the derivative mass of untaken infections (agents without a
running countdown, ``free``; `shadow.py`): symptomatic ones isolate w.p. isolate_prob, asymptomatic ones if
reported (d_asym, raised by the testing lever). It is zero-valued, as is everything here in the forward pass:
`layered_force` reads only the contributions' derivatives. So the forward returns zero-stride placeholders and
does no [B, N] work (it was ~30 ms of dense products per full-NYC day), and the backward applies the chain rule
in one go (on CPU one native pass, `contributions_native`), with D = Σ_l d_l p_l (d_l: the derivative reaching own_l):

    dι = 1[stage_end ≥ 0] d_household + (1 − η isolating) D
    d I_sym  = dι − η free isolate_prob D,     d I_asym = α dι − η free isolate_prob α d_asym D
    d isolating = −η ι D,   d α = Σ I_asym dι,   d η = −Σ ι isolating D,   d p_l = ι (1 − η isolating) d_l

(α, η and d_asym in the expected-isolation term are constants, as in `shadow.py`.) The torch ops below are the
reference; tests/test_covid_gradients.py checks them against autograd of the explicit products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import contributions_native
from .shadow import _detached

NON_HOUSEHOLD = contributions_native.LAYERS  # ("school", "workplace", "community")


def _sum_to(grad: Tensor, like) -> Tensor | None:
    """grad [B, N] summed to the shape of ``like`` (a number: None; 0-dim, [B, 1], [1, N] ...)."""
    if not isinstance(like, Tensor):
        return None
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


class _OwnContributions(torch.autograd.Function):
    """Forward: one zero-valued [B, N] placeholder per layer (household first, then ``layers``). Backward: the
    chain rule of the module docstring."""

    @staticmethod
    def forward(ctx, layers: tuple[str, ...], I_sym: Tensor, I_asym: Tensor, isolating: Tensor, stage_end: Tensor,
                isolate_prob: Tensor, testing: Tensor | None, alpha, eta, detect_asym, *presences: Tensor | None):
        ctx.set_materialize_grads(False)
        ctx.layers = layers
        ctx.numbers = tuple(None if isinstance(x, Tensor) else x for x in (alpha, eta))
        ctx.save_for_backward(I_sym, I_asym, isolating, stage_end, isolate_prob, testing,
                              *(x if isinstance(x, Tensor) else None for x in (alpha, eta, detect_asym)), *presences)
        ctx.detect_asym = None if isinstance(detect_asym, Tensor) else detect_asym
        shape = torch.broadcast_shapes(I_sym.shape, stage_end.shape)
        return tuple(I_sym.new_zeros(()).expand(shape) for _ in range(1 + len(layers)))

    @staticmethod
    def backward(ctx, d_household: Tensor | None, *d_layers: Tensor | None):
        I_sym, I_asym, isolating, stage_end, isolate_prob, testing, alpha_t, eta_t, detect_t, *presences = \
            ctx.saved_tensors
        alpha = ctx.numbers[0] if alpha_t is None else alpha_t
        eta = ctx.numbers[1] if eta_t is None else eta_t
        detect_asym = ctx.detect_asym if detect_t is None else detect_t
        wants = ctx.needs_input_grad  # (layers, I_sym, I_asym, isolating, stage_end, isolate_prob, testing, α, η, ...)
        n_fixed = 10
        if d_household is None and all(d is None for d in d_layers):
            return (None,) * len(wants)
        fused = contributions_native.backward(
            dict(household=d_household, **dict(zip(ctx.layers, d_layers))), dict(zip(ctx.layers, presences)), I_sym,
            I_asym, isolating, stage_end, isolate_prob, testing, alpha, eta, detect_asym,
            wants=dict(I_sym=wants[1], I_asym=wants[2], isolating=wants[3], alpha_sums=wants[7], eta_sums=wants[8],
                       **{name: wants[n_fixed + k] and d_layers[k] is not None and presences[k] is not None
                          for k, name in enumerate(ctx.layers)}))
        if fused is not None:  # the same chain rule in one native pass (CPU)
            def summed(sums: Tensor | None, like) -> Tensor | None:  # per-element sums [B] -> like's shape
                return None if sums is None else _sum_to(sums.to(torch.float32).view(-1, 1), like)

            return (None, fused["I_sym"], fused["I_asym"], fused["isolating"], None, None, None,
                    summed(fused["alpha_sums"], alpha), summed(fused["eta_sums"], eta), None,
                    *(None if fused[name] is None else _sum_to(fused[name], p) for name, p in zip(ctx.layers, presences)))
        D = None  # Σ_l d_l p_l
        for d, p in zip(d_layers, presences):
            if d is None:
                continue
            term = d * p if p is not None else d
            if D is None:
                D = term.clone() if term is d else term  # the incoming gradient is not ours to add into
            else:
                D.add_(term)
        real = stage_end >= 0
        d_iota = None if d_household is None else torch.where(real, d_household, 0.0)
        kept = None if D is None else torch.mul(isolating, eta).neg_().add_(1)  # 1 − η isolating
        if D is not None:
            d_iota = D * kept if d_iota is None else d_iota.add_(D * kept)
        need_iota = D is not None and (wants[3] or wants[8] or any(wants[n_fixed + k] for k in range(len(presences))))
        iota = torch.add(I_sym, alpha * I_asym) if need_iota else None
        d_I_sym = d_I_asym = d_isolating = d_alpha = d_eta = None
        if d_iota is not None:
            if wants[7]:
                d_alpha = _sum_to(I_asym * d_iota, alpha)
            expected = None  # the expected isolation of untaken infections: −η free isolate_prob D
            if D is not None and (wants[1] or wants[2]):
                expected = torch.where(real, 0.0, isolate_prob).mul_(D).mul_(-eta)
            if wants[1]:
                d_I_sym = d_iota if expected is None else d_iota + expected
            if wants[2]:
                d_I_asym = d_iota * alpha
                if expected is not None:
                    if testing is not None:
                        detect_asym = detect_asym + testing * (1 - detect_asym)
                    d_I_asym.add_(expected.mul_(alpha * detect_asym))
        if iota is not None:
            iota_D = iota * D
            if wants[3]:
                d_isolating = iota_D * -eta
            if wants[8]:
                d_eta = _sum_to(-(iota_D * isolating), eta)
        d_presences = []
        for k, (d, p) in enumerate(zip(d_layers, presences)):
            want = wants[n_fixed + k] and d is not None and p is not None
            d_presences.append(_sum_to(d * (iota * kept), p) if want else None)
        return (None, d_I_sym, d_I_asym, d_isolating, None, None, None, d_alpha, d_eta, None,
                *d_presences)


def own_contributions(state, params, presences: dict[str, Tensor | None], testing: Tensor | None) -> dict[str, Tensor]:
    """{"household": [B, N], layer: [B, N] for each layer in ``presences``}: zero-valued contributions carrying
    their derivative (module docstring). ``state``: a ``CovidState`` (gradient mode: float memberships);
    ``presences``: today's non-household layers (school, workplace, community) and each one's presence p_l
    [B | 1, N] (None: 1); ``testing``: the testing lever per agent [B, N] or None."""
    layers = tuple(name for name in NON_HOUSEHOLD if name in presences)
    detect_asym = _detached(params.detection_rate) * _detached(params.asymptomatic_detection_ratio)
    out = _OwnContributions.apply(layers, state.I_sym, state.I_asym, state.isolating, state.stage_end,
                                  state.isolate_prob.detach(), None if testing is None else testing.detach(),
                                  params.asymptomatic_infectiousness, params.isolation_effectiveness, detect_asym,
                                  *(presences[name] for name in layers))
    return dict(zip(("household", *layers), out))

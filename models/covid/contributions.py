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
`layered_force` reads only the contributions' derivatives, which it hands out as the two parts of an others-sum
(its probes, `agenttensor.transmission.ForceTerm`): the layer's weight w [B, N] and its group sums W [B, S]. On CPU
w comes as its parts (`WeightParts`, through `ForceTerm.weight_handoff`), which the native pass multiplies out tile by
tile: no w is written and read back. So the forward returns zero-stride probes and does no [B, N] work (it was ~30 ms
of dense products per full-NYC day), and the backward applies the chain rule in one go (on CPU one native pass,
`contributions_native`, which also forms the others-sums, so that none is written to memory and read back), with

    d_l = s_l[g_l] (W_l[g_l] − w_l) + P_l[g_l]      (s_l: the layer's per-group scale; P_l: the ``plain`` probe's
                                                     derivative, community only: the borough-wide mixing)
    D = Σ_l d_l p_l,   dι = 1[stage_end ≥ 0] d_household + (1 − η isolating) D
    d I_sym  = dι − η free isolate_prob D,     d I_asym = α dι − η free isolate_prob α d_asym D
    d isolating = −η ι D,   d α = Σ I_asym dι,   d η = −Σ ι isolating D,   d p_l = ι (1 − η isolating) d_l

(α, η and d_asym in the expected-isolation term are constants, as in `shadow.py`.) The torch ops below are the
reference; tests/test_covid_gradients.py checks them against autograd of the explicit products.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from agenttensor.transmission import OthersSumProbes, others_sum_derivative

from . import contributions_native, shadow
from .shadow import _detached

NON_HOUSEHOLD = contributions_native.LAYERS  # ("school", "workplace", "community")


class OthersSum(NamedTuple):
    """How a layer's contributions reach the other members of their group (`ForceTerm`): the agents' slots [N], the
    per-group scale [B | 1, S] (no derivative) and whether it also needs the ``plain`` probe (community)."""

    slot: Tensor
    scale: Tensor
    plain: bool = False


PASSED = ("I_sym", "I_asym", "isolating")  # the state fields passed through the node (`Contributions.fields`)


class Contributions(NamedTuple):
    """`own_contributions`' result: each layer's probes; the state's I_sym, I_asym and isolating passed through the
    node, for the rest of the step to read, so that their derivatives reach its backward pass and are added there to
    the contributions' own (one [B, N] write per field; autograd's engine would add two buffers); and the dict in
    which `shadow.gather_exits` leaves the gradient buffers it made, which the backward may then add into in place."""

    probes: dict[str, OthersSumProbes]
    fields: dict[str, Tensor]
    handoff: dict
    packed: bool = False  # whether the node saved the fields packed (not themselves): the step may then update them
    live_flags: Tensor | None = None  # the packed flags, for the transition to carry to the next day
    # the flags the node saved where they also hold stage_end's sign (bit 3; the node did not save stage_end) and S
    # (bit 4): the transition saves them in their place, and the step may then update stage_end, S and E in place
    timed_flags: Tensor | None = None
    # per layer, the dict to give its `ForceTerm` as ``weight_handoff``: the backward then forms the layer's weights
    # from their parts in its own pass (`layered_force` neither writes them nor reads them back)
    weight_handoffs: dict[str, dict] | None = None


def _sum_to(grad: Tensor, like) -> Tensor | None:
    """grad [B, N] summed to the shape of ``like`` (a number: None; 0-dim, [B, 1], [1, N] ...)."""
    if not isinstance(like, Tensor):
        return None
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


class _OwnContributions(torch.autograd.Function):
    """Forward: I_sym, I_asym and isolating passed through, then the zero-valued probes of each layer (household
    first, then ``layers``): member [B, N], group [B, S] and, where asked, plain [B, S]. Backward: the chain rule of
    the module docstring, added to the pass-through's derivatives (in place where one is a buffer ``handoff`` holds:
    made for this node by the exits, and by nobody else read)."""

    @staticmethod
    def forward(ctx, layers: tuple[str, ...], groups: tuple[OthersSum, ...], handoff: dict,
                weight_handoffs: tuple[dict, ...], flags: Tensor | None,
                I_sym: Tensor, I_asym: Tensor, isolating: Tensor, stage_end: Tensor | None, isolate_prob: Tensor,
                testing: Tensor | None, alpha, eta, detect_asym, *presences: Tensor | None):
        ctx.set_materialize_grads(False)
        # slots are the environment's; the per-day scales are saved tensors, so that gradient checkpointing drops
        # and recomputes them (held on ctx they stayed alive for the whole run: 13 MB per day at full NYC)
        ctx.layers, ctx.handoff, ctx.weight_handoffs = layers, handoff, weight_handoffs
        ctx.slots, ctx.plains = tuple(g.slot for g in groups), tuple(g.plain for g in groups)
        ctx.numbers = tuple(None if isinstance(x, Tensor) else x for x in (alpha, eta))
        # the three fields as one packed byte where given (then the step may update them in place: nothing saved
        # them), else themselves
        fields = (flags, None, None) if flags is not None else (I_sym, I_asym, isolating)
        ctx.save_for_backward(*fields, stage_end, isolate_prob, testing,
                              *(x if isinstance(x, Tensor) else None for x in (alpha, eta, detect_asym)), *presences,
                              *(g.scale for g in groups))
        ctx.detect_asym = None if isinstance(detect_asym, Tensor) else detect_asym
        shape = torch.broadcast_shapes(I_sym.shape, (flags if stage_end is None else stage_end).shape)
        zeros = lambda *size: I_sym.new_zeros(()).expand(*size)  # noqa: E731 (zero-stride: no memory)
        return (I_sym.view_as(I_sym), I_asym.view_as(I_asym), isolating.view_as(isolating),
                *(probe for group in groups for probe in
                  (zeros(shape), *(zeros(shape[0], group.scale.shape[-1]) for _ in range(1 + group.plain)))))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        I_sym, I_asym, isolating, stage_end, isolate_prob, testing, alpha_t, eta_t, detect_t, *rest = ctx.saved_tensors
        flags = I_sym if I_sym.dtype == torch.uint8 else None  # packed (`contributions_native.pack`)
        presences, scales = rest[:len(ctx.layers)], rest[len(ctx.layers):]
        groups = [OthersSum(slot, scale, plain) for slot, scale, plain in zip(ctx.slots, scales, ctx.plains)]
        alpha = ctx.numbers[0] if alpha_t is None else alpha_t
        eta = ctx.numbers[1] if eta_t is None else eta_t
        detect_asym = ctx.detect_asym if detect_t is None else detect_t
        # (layers, groups, handoff, weight_handoffs, flags, I_sym, I_asym, isolating, stage_end, isolate_prob, testing,
        # α, η, d_asym, presences...) -> drop weight_handoffs and flags: indices as in the chain rule below
        wants = ctx.needs_input_grad[:3] + ctx.needs_input_grad[5:]
        n_fixed = 12
        # the pass-through's derivatives, and whether each may be added into (a buffer the exits made for us)
        passed = {name: (g, g is not None and g is ctx.handoff.get(name)) for name, g in zip(PASSED, grads[:3])}
        ctx.handoff.clear()
        probes, k = [], 3  # per layer (d member, d group, d plain)
        for group in groups:
            n = 3 if group.plain else 2
            probes.append((*grads[k:k + n], None)[:3])
            k += n
        # the member derivatives `layered_force` handed over as their parts (`WeightParts`: not written)
        weights = {name: parts for name, handoff in zip(("household", *ctx.layers), ctx.weight_handoffs)
                   if (parts := handoff.pop("weight", None)) is not None}
        # the presences' derivatives the force handed over (`ForceTerm.weight_handoff`), each a buffer of its own: ours
        # are added into it and it is returned as the presence's (autograd would add the two [B, N])
        handed = {name: d for name, handoff in zip(ctx.layers, ctx.weight_handoffs[1:])
                  if (d := handoff.pop("presence", None)) is not None}
        if all(d is None for p in probes for d in p) and not weights:
            return (None,) * 5 + tuple(passed[name][0] for name in PASSED) + (None,) * (len(wants) - 6 - len(presences)) \
                + tuple(handed.get(name) for name in ctx.layers)
        fused = contributions_native.backward(
            dict(zip(("household", *ctx.layers), zip(groups, probes))), dict(zip(ctx.layers, presences)),
            *((I_sym, I_asym, isolating) if flags is None else (None, None, None)), stage_end, isolate_prob, testing,
            alpha, eta, detect_asym,
            wants=dict(I_sym=wants[3], I_asym=wants[4], isolating=wants[5], alpha_sums=wants[9], eta_sums=wants[10],
                       **{name: name in handed or (wants[n_fixed + k] and presences[k] is not None
                                                   and (name in weights or any(d is not None for d in probes[1 + k])))
                          for k, name in enumerate(ctx.layers)}),
            passed=passed, flags=flags, weights=weights, presences_passed=handed)
        if fused is not None:  # the same chain rule in one native pass (CPU)
            def summed(sums: Tensor | None, like) -> Tensor | None:  # per-element sums [B] -> like's shape
                return None if sums is None else _sum_to(sums.to(torch.float32).view(-1, 1), like)

            for name in PASSED:  # each a buffer made here or handed to us by the exits: nobody else holds it
                if fused[name] is not None:
                    shadow.EXCLUSIVE_GRADIENTS[id(fused[name])] = fused[name]

            return (None, None, None, None, None, fused["I_sym"], fused["I_asym"], fused["isolating"], None, None, None,
                    summed(fused["alpha_sums"], alpha), summed(fused["eta_sums"], eta), None,
                    *(None if fused[name] is None else _sum_to(fused[name], p) for name, p in zip(ctx.layers, presences)))
        if flags is not None:  # the torch ops read the fields as floats
            I_sym, I_asym, isolating = ((flags >> k & 1).to(torch.float32) for k in range(3))
        probes = [(weights[name].dense(), *p[1:]) if name in weights else p
                  for name, p in zip(("household", *ctx.layers), probes)]
        # the others-sums d_l (torch ops), then the chain rule
        d_household, *d_layers = (others_sum_derivative(*p, group.slot, group.scale)
                                  for group, p in zip(groups, probes))
        D = None  # Σ_l d_l p_l
        for d, p in zip(d_layers, presences):
            if d is None:
                continue
            term = d * p if p is not None else d
            if D is None:
                D = term.clone() if term is d else term  # d is read again below (d presence): not added into
            else:
                D.add_(term)
        real = stage_end >= 0 if stage_end is not None else (flags >> 3 & 1).bool()  # (stage_end None: in the flags)
        d_iota = None if d_household is None else torch.where(real, d_household, 0.0)
        kept = None if D is None else torch.mul(isolating, eta).neg_().add_(1)  # 1 − η isolating
        if D is not None:
            d_iota = D * kept if d_iota is None else d_iota.add_(D * kept)
        need_iota = D is not None and (wants[5] or wants[10] or any(wants[n_fixed + k] for k in range(len(presences))))
        iota = torch.add(I_sym, alpha * I_asym) if need_iota else None
        d_I_sym = d_I_asym = d_isolating = d_alpha = d_eta = None
        if d_iota is not None:
            if wants[9]:
                d_alpha = _sum_to(I_asym * d_iota, alpha)
            expected = None  # the expected isolation of untaken infections: −η free isolate_prob D
            if D is not None and (wants[3] or wants[4]):
                expected = torch.where(real, 0.0, isolate_prob).mul_(D).mul_(-eta)
            if wants[3]:
                d_I_sym = d_iota if expected is None else d_iota + expected
            if wants[4]:
                d_I_asym = d_iota * alpha
                if expected is not None:
                    if testing is not None:
                        detect_asym = detect_asym + testing * (1 - detect_asym)
                    d_I_asym.add_(expected.mul_(alpha * detect_asym))
        if iota is not None:
            iota_D = iota * D
            if wants[5]:
                d_isolating = iota_D * -eta
            if wants[10]:
                d_eta = _sum_to(-(iota_D * isolating), eta)
        d_presences = []
        for k, (d, p, name) in enumerate(zip(d_layers, presences, ctx.layers)):
            want = wants[n_fixed + k] and d is not None and p is not None
            own = _sum_to(d * (iota * kept), p) if want else None
            given = handed.get(name)
            d_presences.append(given if own is None else own if given is None else given.add_(own))
        totals = []
        for name, own in zip(PASSED, (d_I_sym, d_I_asym, d_isolating)):  # plus the pass-through's derivative
            g, writable = passed[name]
            totals.append(g if own is None else own if g is None else g.add_(own) if writable else g + own)
        return (None, None, None, None, None, *totals, None, None, None, d_alpha, d_eta, None, *d_presences)


def own_contributions(state, params, presences: dict[str, Tensor | None], testing: Tensor | None,
                      groups: dict[str, OthersSum], packed: tuple[Tensor | None, Tensor | None] | None = None,
                      timed: bool = False) -> Contributions:
    """The `layered_force` probes of the zero-valued contributions per layer ("household" and every layer in
    ``presences``; module docstring), with I_sym, I_asym and isolating passed through (`Contributions`).
    ``state``: a ``CovidState`` (gradient mode: float memberships); ``presences``: today's non-household layers
    (school, workplace, community) and each one's presence p_l [B | 1, N] (None: 1); ``testing``: the testing lever
    per agent [B, N] or None; ``groups``: each layer's `OthersSum`; ``packed``: `contributions_native.packed` of the
    state's fields where the caller has it (``timed``: with the state's stage_end, bit 3, and S, bit 4), else made
    here (with them)."""
    layers = tuple(name for name in NON_HOUSEHOLD if name in presences)
    names = ("household", *layers)
    detect_asym = _detached(params.detection_rate) * _detached(params.asymptomatic_detection_ratio)
    ordered = tuple(OthersSum(groups[name].slot, groups[name].scale.detach(), groups[name].plain) for name in names)
    handoff: dict[str, Tensor] = {}
    # `ForceTerm.weight_handoff` per layer; the node takes the presences' derivatives too (it reads the same presences)
    weight_handoffs = tuple({"take_presence": True} for _ in names)
    with torch.no_grad():  # one byte per agent saved for the backward pass in place of three float32 fields (and
        if packed is None:  # stage_end's sign: two bytes)
            packed, timed = contributions_native.packed(state.I_sym, state.I_asym, state.isolating, state.stage_end,
                                                        getattr(state, "S", None)), True
        flags, live = packed
    timed = timed and flags is not None
    out = iter(_OwnContributions.apply(layers, ordered, handoff, weight_handoffs, flags, state.I_sym, state.I_asym,
                                       state.isolating, None if timed else state.stage_end, state.isolate_prob.detach(),
                                       None if testing is None else testing.detach(), params.asymptomatic_infectiousness,
                                       params.isolation_effectiveness, detect_asym, *(presences[name] for name in layers)))
    fields = {name: next(out) for name in PASSED}
    probes = {name: OthersSumProbes(next(out), next(out), next(out) if group.plain else None)
              for name, group in zip(names, ordered)}
    return Contributions(probes, fields, handoff, flags is not None, live, flags if timed else None,
                         dict(zip(names, weight_handoffs)))

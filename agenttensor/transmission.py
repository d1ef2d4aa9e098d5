"""Transmission primitives: group aggregation and edge-list message passing.

Groups (households, schools, workplaces, neighbourhoods) never materialise pairs: the
infectious weight of each group is one segment sum (``index_add_``) over the group ids, O(N)
per layer, and each agent reads its group's total back with one gather. On CPU both run as native loops
(`_group_kernels`: 2-4x faster than torch's ``index_add_`` / ``index_select`` at city scale). Explicit networks use
PyG-style message passing: gather source values along edges, scale per edge, scatter-add into
targets. Edge lists are stored as int32; scatter indices are int64 because torch's CPU ``index_add_``
along dim 1 is an order of magnitude slower with int32 indices.
On CUDA, group sums are differences of prefix sums over the agents sorted by group (`_prefix_segment_sum`)
and sparse sums go through `scatter_sum`: no atomic adds, so sums are deterministic and do not serialise on
large groups.

Shapes: values are [B, N] (batch, agents); group ids [N]; edge_index [2, E].
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import networkx as nx

import torch
from torch import Tensor

from . import _group_kernels, fused
from ._derived import Derived


def index_dtype(n: int) -> torch.dtype:
    """Smallest index dtype for n items (int32 unless n needs 64 bits)."""
    return torch.int32 if n < 2**31 - 1 else torch.int64


_wide_indices = Derived()


def _index_add_index(group_of: Tensor) -> Tensor:
    """group_of as torch's CPU ``index_add_`` wants it: int64 (it is ~13x slower with int32 indices, torch 2.13).
    The int64 copy of an int32 index is made once per tensor version (only where the native kernels do not run)."""
    if group_of.dtype == torch.int64 or not group_of.is_cpu:
        return group_of
    return _wide_indices.get(group_of, lambda: group_of.to(torch.int64))


_segment_layouts = Derived()


def _segment_bounds(index: Tensor, num_groups: int, in_order: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """(order [K] that sorts ``index`` by group, or None if ``in_order``; each group's first position and one past
    its last in that order [G], equal for an empty group). No host synchronisation."""
    order = None if in_order else torch.argsort(index, stable=True)
    in_groups = index if order is None else index.index_select(0, order)
    groups = torch.arange(num_groups, device=index.device, dtype=in_groups.dtype)
    return order, torch.searchsorted(in_groups, groups), torch.searchsorted(in_groups, groups, right=True)


def _segment_layout(group_of: Tensor, num_groups: int) -> tuple[Tensor | None, Tensor, Tensor]:
    """`_segment_bounds` of group_of [N] (ids in [0, G)), computed once per tensor version (a layer's slots)."""
    def compute() -> tuple[Tensor | None, Tensor, Tensor]:
        in_order = bool((group_of[1:] >= group_of[:-1]).all()) if group_of.numel() > 1 else True
        return _segment_bounds(group_of, num_groups, in_order)

    return _segment_layouts.get(group_of, compute, key=num_groups)


def _prefix_segment_sum(values: Tensor, group_of: Tensor, num_groups: int, layout: tuple | None = None) -> Tensor:
    """Per-group sums as differences of float64 prefix sums over the agents sorted by group: [B, N] -> [B, G].

    Used on CUDA, where ``index_add_`` serialises on atomic adds into the same address: at full NYC (8.7M agents)
    a dense sum into the ~200 neighbourhoods took 5-6 ms per call on an H100, the scan ~0.1 ms. The scan is also
    deterministic (atomic adds are not), so a CUDA run repeats bit for bit. float64 prefixes keep the rounding
    of a difference at ~1e-16 of the running total. ``layout``: `_segment_bounds` of group_of (default: memoised)."""
    order, first, past_last = _segment_layout(group_of, num_groups) if layout is None else layout
    in_groups = values if order is None else values.index_select(1, order)
    prefix = torch.nn.functional.pad(in_groups.cumsum(1, dtype=torch.float64), (1, 0))  # [B, N + 1], from 0
    return (prefix.index_select(1, past_last) - prefix.index_select(1, first)).to(values.dtype)


SCATTER_SORTED_ABOVE = 1 << 15  # scatter_sum on CUDA: index_put below this many values, the scan above


def scatter_sum(out: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``out`` plus the sum of ``values`` at each ``index`` along the last dim: out [..., M], index [K],
    values [..., K] -> [..., M] (out of place, differentiable). On CPU ``index_add`` (sequential). On CUDA
    deterministic, where ``index_add``'s atomic adds make float sums depend on thread timing (a checkpointed
    segment's recomputation could then take other events than its first pass): ``index_put(accumulate=True)``
    (it sorts the indices, then adds each run of equal indices serially) for up to `SCATTER_SORTED_ABOVE` values,
    the scan of `_prefix_segment_sum` above, where those serial runs grow long (4 ms per call at the peak of a
    full-NYC epidemic, 85 % of a calibration epoch's GPU time)."""
    if out.device.type != "cuda":
        return out.index_add(-1, index, values)
    M, K = out.shape[-1], index.shape[0]
    values = values.expand(*out.shape[:-1], K)
    if K <= SCATTER_SORTED_ABOVE:
        if out.dim() == 1:
            return out.index_put((index,), values, accumulate=True)
        rows = torch.arange(out.numel() // M, device=out.device)[:, None] * M
        return out.reshape(-1).index_put(((rows + index).reshape(-1),), values.reshape(-1),
                                         accumulate=True).view(out.shape)
    layout = _segment_bounds(index, M, in_order=False)
    return out + _prefix_segment_sum(values.reshape(-1, K), index, M, layout).view(out.shape)


def scaled_sums(coef: Tensor | float, per_slot: Tensor, sums: Tensor, index: Tensor, values: Tensor,
                scale: Tensor | None = None, product: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(coef · per_slot) · sums and the scale coef · per_slot: ([B, S], [S] or [B, S]), the same numbers as those
    two products. ``sums`` [B, S]: `scatter_sum` of ``values`` [M] at flat positions ``index`` [M] (b · S + slot),
    e.g. a layer's group totals of its few infectious members; ``per_slot`` [S]; ``coef`` [] or [B, 1]; ``scale``:
    coef · per_slot's values where the caller has them (e.g. kept from the day before: an [S] product fewer), used
    where the scale carries no derivative.

    Where only ``coef`` carries a derivative (sums and per_slot none), its derivative is read at the M summed values,
    Σ_j g[index_j] per_slot[slot_j] values_j, instead of autograd's [B, S] products, its reduction to [S] and the
    product with per_slot (full NYC household layer, 3.3M slots: ~7 ms per gradient day). The returned scale then
    carries no derivative.

    ``product``: `_product_at`'s values of ``scale`` · ``sums`` where the caller made them with the sums (e.g. natively,
    `hard_native.source_totals_at`, which then sets the sums back to zeros): used where neither ``scale``, ``per_slot``
    nor ``sums`` carries a derivative (else an error: the sums' values may be gone)."""
    coef_grad = torch.is_grad_enabled() and isinstance(coef, Tensor) and coef.requires_grad
    if product is not None and (per_slot.requires_grad or sums.requires_grad or scale is None or scale.requires_grad):
        raise ValueError("scaled_sums: a product made by the caller needs a given scale, and per_slot, sums and "
                         "scale without derivatives")
    if not coef_grad or per_slot.requires_grad or sums.requires_grad:
        scale = coef * per_slot if scale is None or coef_grad or per_slot.requires_grad else scale
        if scale.requires_grad or sums.requires_grad:
            return scale * sums, scale
        return (_product_at(scale, sums, index) if product is None else product), scale
    if scale is None:
        with torch.no_grad():
            scale = coef * per_slot
    return _ScaledSums.apply(coef, scale, per_slot, sums, index, values.detach(), product), scale


def _product_at(scale: Tensor, sums: Tensor, index: Tensor | None) -> Tensor:
    """scale · sums [B, S] for sums that are zero outside the flat positions ``index`` [M] (b · S + slot): the products
    at those positions only, zeros elsewhere (the dense product's numbers where scale is finite and not negative;
    full NYC's households, 3.3M slots: ~1.5 → ~0.8 ms), or the dense product where M is not small or ``index`` is
    None (sums made densely)."""
    B, S = sums.shape
    if index is None or index.numel() * 8 > sums.numel() or scale.dim() not in (1, 2) or scale.shape[-1] != S \
            or torch.broadcast_shapes(scale.shape, sums.shape) != sums.shape:
        return scale * sums
    flat = scale.reshape(-1)
    at = flat.index_select(0, index if B == 1 or scale.numel() != S else index.remainder(S))
    out = torch.zeros(B * S, dtype=torch.result_type(scale, sums), device=sums.device)
    return out.index_put_((index,), at * sums.reshape(-1).index_select(0, index)).view(B, S)


class _ScaledSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coef: Tensor, scale: Tensor, per_slot: Tensor, sums: Tensor, index: Tensor, values: Tensor,
                product: Tensor | None):
        ctx.coef_shape, ctx.rows = coef.shape, sums.shape[0]
        ctx.save_for_backward(per_slot, index, values)
        return _product_at(scale, sums, index) if product is None else product

    @staticmethod
    def backward(ctx, grad: Tensor):
        per_slot, index, values = ctx.saved_tensors
        S = per_slot.shape[-1]
        rows = ctx.rows
        grad = grad.expand(rows, S).reshape(-1)
        slot = index if rows == 1 else torch.remainder(index, S)
        terms = grad.index_select(0, index).mul_(per_slot.index_select(0, slot)).mul_(values)
        if len(ctx.coef_shape) == 0 or ctx.coef_shape.numel() == 1:
            d_coef = terms.sum().reshape(ctx.coef_shape)
        else:  # [B, 1]: per row
            d_coef = torch.zeros(rows, dtype=terms.dtype, device=terms.device).index_add_(
                0, torch.div(index, S, rounding_mode="floor"), terms).view(rows, 1).sum_to_size(ctx.coef_shape)
        return d_coef, None, None, None, None, None, None


def _segment_sum(values: Tensor, group_of: Tensor, num_groups: int) -> Tensor:
    if values.device.type == "cuda" and values.shape[1] > 0:
        return _prefix_segment_sum(values, group_of, num_groups)
    out = _group_kernels.segment_sum(values, group_of, num_groups)
    if out is None:
        out = torch.zeros(values.shape[0], num_groups, dtype=values.dtype, device=values.device)
        out.index_add_(1, _index_add_index(group_of), values)
    return out


def _gather(table: Tensor, group_of: Tensor) -> Tensor:
    out = _group_kernels.gather(table, group_of)
    return table.index_select(1, group_of) if out is None else out


class _GroupSum(torch.autograd.Function):
    """Segment sum whose backward keeps only the index: autograd's own ``index_add`` saves its source
    ([B, N], 4 bytes per agent per call) although the derivative is a gather of the incoming gradient."""

    @staticmethod
    def forward(ctx, values: Tensor, group_of: Tensor, num_groups: int) -> Tensor:
        ctx.save_for_backward(group_of)
        ctx.values_shape = values.shape
        return _segment_sum(values, group_of, num_groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (group_of,) = ctx.saved_tensors
        return _gather(grad, group_of).expand(ctx.values_shape), None, None


class _GroupGather(torch.autograd.Function):
    """Gather whose backward is the segment sum (autograd's ``index_select`` backward is torch's slower
    ``index_add_``)."""

    @staticmethod
    def forward(ctx, table: Tensor, group_of: Tensor) -> Tensor:
        ctx.save_for_backward(group_of)
        ctx.num_groups = table.shape[1]
        return _gather(table, group_of)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (group_of,) = ctx.saved_tensors
        return _segment_sum(grad, group_of, ctx.num_groups), None


def group_sum(values: Tensor, group_of: Tensor, num_groups: int) -> Tensor:
    """Sum of agent values per group. values [B, N], group_of [N] (ids in [0, G)) -> [B, G].

    Agents with a negative group id (no group) must be filtered by the caller (use `GroupLayer`).
    """
    if values.requires_grad:
        return _GroupSum.apply(values, group_of, num_groups)
    return _segment_sum(values, group_of, num_groups)


def group_gather(table: Tensor, group_of: Tensor) -> Tensor:
    """Each agent's group value: table [B, G], group_of [N] (ids in [0, G)) -> [B, N] (the adjoint of
    `group_sum`)."""
    if table.requires_grad:
        return _GroupGather.apply(table, group_of)
    return _gather(table, group_of)


def scaled_others_sum(values: Tensor, scale: Tensor, group_of: Tensor, sums: Tensor | None = None) -> Tensor:
    """scale[g(i)] Σ_{j ∈ g(i), j ≠ i} values_j: values [B, N], scale [B | 1, G], group_of [N] -> [B, N]
    (no autograd; one native pass after the group sums on CPU). ``sums``: `group_sum` of values, if at hand."""
    out = _group_kernels.others_scaled(values, scale, group_of, sums)
    if out is None:
        sums = _segment_sum(values, group_of, scale.shape[1]) if sums is None else sums
        out = sums.index_select(1, group_of).sub(values).mul_(scale.index_select(1, group_of))
    return out


@dataclass
class ForceTerm:
    """One contact layer of `layered_force`: each agent reads ``table[b, slot[i]]`` (its group's value), times its
    presence and the layer's factors (both [B | 1, N] or None).

    Probes (optional, zero-valued, gradient modes): where each agent's own contribution c_j also makes its group's
    value for the *other* members (table[g] = scale[g] Σ_{j ∈ g} c_j, the self term left out), the derivative of
    c_j is scale[g(j)] (Σ_{i ∈ g} w_i − w_j), with w_i the layer's weight (∂L/∂λ_i σ_i times presence and factors).
    `layered_force` hands out its two parts: ``member_probe`` [B, N] receives w as its derivative and
    ``group_probe`` [B, S] the group sums Σ_{i ∈ g} w_i, which it computes anyway (the table's derivative). The
    caller combines them: `others_sum_probes` for contributions given as tensors, or inside its own chain rule
    (models/covid/contributions.py: no [B, N] others-sum per layer is then written and read back)."""

    table: Tensor  # [B | 1, S]
    slot: Tensor  # [N]
    presence: Tensor | None = None
    factor: Tensor | None = None  # e.g. a policy's reduction of this layer
    factor_all: Tensor | None = None  # a second one, applied after ``factor`` (e.g. one for every layer)
    member_probe: Tensor | None = None  # [B, N], zero-valued: its derivative is the layer's weight w
    group_probe: Tensor | None = None  # [B, S], zero-valued: its derivative is Σ_{i ∈ g} w_i
    # the table's last slot (the layer's non-members, `GroupLayer`) is a constant, e.g. a zero pad: the backward may
    # leave its derivative 0 (the native pass then skips the non-members' sum of a layer of few members: full NYC's
    # schools and workplaces, 41.7 -> 37.5 ms per force backward)
    last_slot_constant: bool = False
    # with member_probe, for a probe owner that forms w in its own pass: a dict in which the backward may leave w as
    # its `WeightParts` (key "weight") in place of w [B, N] as member_probe's derivative (None then), so that w is
    # neither written nor read back (native CPU pass; else w is the derivative as usual). An owner that reads the same
    # ``presence`` tensor and sets "take_presence": True there also receives the presence's derivative (key "presence",
    # a [B, N] buffer nobody else holds, where it has the presence's shape) in place of the presence's gradient: it
    # must add its own into it and return it as the presence's derivative (autograd's addition of the two saved)
    weight_handoff: dict | None = None


class WeightParts(NamedTuple):
    """A layer's weight w = (grad σ) (presence (factor factor_all)) as `layered_force`'s backward hands it over
    (`ForceTerm.weight_handoff`): its parts, each [B | 1, N] (grad [B, N]; presence and factors None: 1)."""

    grad: Tensor
    sigma: Tensor
    presence: Tensor | None
    factor: Tensor | None
    factor_all: Tensor | None

    def dense(self) -> Tensor:
        """w [B, N], in the native pass's order of products (the same bits)."""
        factors = [x for x in (self.factor, self.factor_all) if x is not None]
        fa = functools.reduce(torch.mul, factors) if factors else None
        pfa = self.presence if fa is None else fa if self.presence is None else self.presence * fa
        gs = self.grad * self.sigma
        return (gs if pfa is None else gs * pfa).expand_as(self.grad)


class OthersSumProbes(NamedTuple):
    """The probes of one layer (`ForceTerm`) and, with ``plain``, a zero-valued [B, S] whose derivative d reaches
    each member's contribution unscaled (d[g(j)]: for a caller that also sums the contributions per group)."""

    member: Tensor  # [B, N]
    group: Tensor  # [B, S]
    plain: Tensor | None = None  # [B, S]


class _OthersSumProbes(torch.autograd.Function):
    """Forward: zero-valued probes. Backward: d c_j = scale[g(j)] (d group[g(j)] − d member_j) + d plain[g(j)]."""

    @staticmethod
    def forward(ctx, own: Tensor, slot: Tensor, scale: Tensor, plain: bool):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(slot, scale)
        groups = (own.shape[0], scale.shape[-1])
        return own.new_zeros(()).expand(own.shape), *(own.new_zeros(()).expand(groups) for _ in range(1 + plain))

    @staticmethod
    def backward(ctx, d_member: Tensor | None, d_group: Tensor | None, d_plain: Tensor | None = None):
        slot, scale = ctx.saved_tensors
        return others_sum_derivative(d_member, d_group, d_plain, slot, scale), None, None, None


def others_sum_derivative(d_member: Tensor | None, d_group: Tensor | None, d_plain: Tensor | None, slot: Tensor,
                          scale: Tensor) -> Tensor | None:
    """scale[g(j)] (d_group[g(j)] − d_member_j) + d_plain[g(j)]: [B, N] from the probes' derivatives (None: zero;
    None if all are). d_member [B, N], d_group and d_plain [B, S], scale [B | 1, S]."""
    out = None
    if d_group is not None:
        member = d_member if d_member is not None else d_group.new_zeros(d_group.shape[0], slot.shape[0])
        out = scaled_others_sum(member, scale, slot, d_group)
    elif d_member is not None:
        out = _gather(scale, slot).mul(d_member).neg_()
    if d_plain is not None:
        spread = _gather(d_plain, slot)
        out = spread if out is None else out.add_(spread)
    return out


def others_sum_probes(own: Tensor, slot: Tensor, scale: Tensor, plain: bool = False) -> OthersSumProbes:
    """Probes for a `ForceTerm` from each agent's contribution ``own`` [B, N] (with its derivative) to its group's
    value for the other members, scaled per group by ``scale`` [B | 1, S] (no derivative); ``plain``: also a
    zero-valued [B, S] whose derivative reaches ``own`` unscaled (add it to per-group sums of ``own``)."""
    return OthersSumProbes(*_OthersSumProbes.apply(own, slot, scale.detach(), plain))


def _reduce_to(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """Sum a [B, ...] gradient over the batch where its input was one broadcast row (or had no batch dim)."""
    if grad is None or like is None:
        return None
    while grad.dim() > like.dim():
        grad = grad.sum(0)
    return grad.sum(0, keepdim=True) if like.shape[0] == 1 and grad.shape[0] > 1 else grad


def _force_torch(sigma: Tensor, terms: list[ForceTerm]) -> Tensor:
    return force_of_layers(sigma, tuple((t.table, t.slot, t.presence, t.factor, t.factor_all) for t in terms))


def _layer_terms(layers: tuple) -> list[Tensor]:
    """Each layer's term (table[slot] presence) factor) factor_all, [B | 1, N], of (table, slot, presence, factor,
    factor_all) tuples (`force_of_layers`)."""
    values = []
    for table, slot, *factors in layers:
        value = table.index_select(1, slot) if torch.compiler.is_compiling() else _gather(table, slot)
        for x in factors:
            if x is not None:
                value = value * x
        values.append(value)
    return values


@fused.on_request
def force_of_layers(sigma: Tensor, layers: tuple) -> Tensor:
    """σ Σ_l ((table_l[slot_l] presence_l) factor_l) factor_all_l in torch ops: sigma [B | 1, N]; layers: (table
    [B, S], slot [N], presence, factor, factor_all: [B | 1, N] or None) each. One fused kernel where compiled
    (`fused.on_request`: on a GPU one pass over memory for ~5 per layer), the same numbers."""
    return sigma * functools.reduce(torch.add, _layer_terms(layers))


@fused.on_request
def layer_shares(layers: tuple, where: Tensor) -> Tensor:
    """Each layer's share of the agents' summed terms (`force_of_layers`' layers), summed over the agents in
    ``where`` [B, N] (0/1): Σ_i where_i term_l,i / max(Σ_l term_l,i, 1e-30) -> [L, B] float32; `layer_shares_at`'s
    numbers for every agent at once, no index list (to float rounding: another order of the sums). One fused kernel
    where compiled."""
    terms = _layer_terms(layers)
    weight = where / functools.reduce(torch.add, terms).clamp_min(1e-30)
    return torch.stack([(term * weight).sum(-1) for term in terms])


class HandedSums(NamedTuple):
    """Group sums of one term's weights (grad σ presence factors), made by the node that made the force's gradient in a
    pass of its own (`hand_weight_sums`)."""

    grad: weakref.ref  # the force's gradient [B, N] they were summed from
    slot: Tensor  # [N] the term's slots
    parts: tuple  # σ and the factors they were weighted with (factor, factor_all: those present), by `_memory`
    sums: Tensor  # [B, S]


_HANDED: dict[int, HandedSums] = {}  # id(grad) -> its sums (one entry: the latest)


def hand_weight_sums(grad: Tensor, slot: Tensor, sigma: Tensor, factors: tuple[Tensor, ...], sums: Tensor) -> None:
    """Hand `layered_force`'s backward the group sums [B, S] of a term's weights for the gradient ``grad`` [B, N] it is
    about to receive: the term of slots ``slot`` with no presence, this σ and these ``factors`` (its factor and
    factor_all, those it has, in that order; the same tensors, compared by memory), weights w = grad σ (the factors'
    product) summed per group in agent order from +0 (the native pass's arithmetic: the same bits), e.g. by the pass
    that made grad. The backward then leaves that term out of its own pass where nothing else is asked of it."""
    _HANDED.clear()
    _HANDED[id(grad)] = HandedSums(weakref.ref(grad), slot, _memory(sigma, *factors), sums)


def _memory(*xs: Tensor | None) -> tuple:
    """The tensors that are not None, by their memory (data pointer, shape)."""
    return tuple((x.data_ptr(), tuple(x.shape)) for x in xs if x is not None)


def _handed_term(grad: Tensor, sigma: Tensor, terms: list[ForceTerm], only_sums: list[bool]) -> tuple[int, Tensor] | None:
    """(index of the term, its sums) where `hand_weight_sums` handed sums for ``grad`` and one of ``terms`` of which
    nothing but the sums is asked (``only_sums``), else None."""
    handed = _HANDED.pop(id(grad), None)
    if handed is None or handed.grad() is not grad:
        return None
    for index, t in enumerate(terms):
        if t.slot is handed.slot and t.presence is None and handed.sums.shape == (grad.shape[0], t.table.shape[-1]) \
                and handed.parts == _memory(sigma, t.factor, t.factor_all) and only_sums[index]:
            return index, handed.sums
    return None


def table_kept(sigma: Tensor, presence: Tensor | None, factor: Tensor | None, factor_all: Tensor | None) -> bool:
    """Whether `layered_force`'s node keeps a term's table for its backward: only where σ, the term's presence or one
    of its factors asks for a derivative (the table's values are read for those only; its own derivative, the group
    sums of the weights, is not made from them). A table not kept may be written over once the force is made (e.g.
    a buffer reused from day to day)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (sigma, presence, factor, factor_all))


class _LayeredForce(torch.autograd.Function):
    """Forward: one native pass over the agents on CPU (torch ops elsewhere). Backward: per layer the weight
    w = grad σ presence factors and its group sums (the table's derivative; both are the probes' derivatives, see
    `ForceTerm`; w as its parts where the term has a ``weight_handoff``); those of presence, the factors and σ from
    the same pass. Saves only inputs, a table only where its values are read (`table_kept`)."""

    @staticmethod
    def forward(ctx, sigma: Tensor, *flat_and_per_term):
        # 7 per term, then each term's last_slot_constant and weight_handoff, and the keep list (`layered_force`)
        *flat, ctx.constant_last, ctx.handoffs, keep = flat_and_per_term
        terms = [ForceTerm(*flat[k:k + 7]) for k in range(0, len(flat), 7)]
        ctx.terms = len(terms)
        ctx.tables = [(t.table.shape, t.table.dtype, t.table.device) for t in terms]
        wants = ctx.needs_input_grad  # (`table_kept`'s test: in here autograd is off, the inputs' wants are these)
        kept = [wants[0] or any(wants[1 + 7 * k + j] for j in (2, 3, 4)) for k in range(len(terms))]
        ctx.save_for_backward(sigma, *[x for t, keep_table in zip(terms, kept)
                                       for x in (t.table if keep_table else None, t.presence, t.factor, t.factor_all)])
        ctx.slots = [t.slot for t in terms]
        ctx.probes = [(t.member_probe is not None, t.group_probe is not None) for t in terms]
        layers = [(t.table, t.slot, t.presence, t.factor, t.factor_all) for t in terms]
        force = _group_kernels.layered_force(sigma, layers, keep=keep)
        return _force_torch(sigma, terms) if force is None else force

    @staticmethod
    def backward(ctx, grad: Tensor):
        sigma, *saved = ctx.saved_tensors
        # a table not kept: its shape only (its values are not read: no derivative asks for them)
        terms = [ForceTerm(saved[4 * k] if saved[4 * k] is not None else torch.empty(shape, dtype=dtype, device=device),
                           ctx.slots[k], *saved[4 * k + 1:4 * k + 4])
                 for k, (shape, dtype, device) in enumerate(ctx.tables)]
        wants = ctx.needs_input_grad
        want_sigma = wants[0]
        want = tuple((wants[1 + 7 * k + 2], wants[1 + 7 * k + 3], wants[1 + 7 * k + 4]) for k in range(ctx.terms))
        grad = grad.contiguous()
        summed = tuple(wants[1 + 7 * k] or group for k, (_, group) in enumerate(ctx.probes))  # the tables' sums
        # the weights handed over as their parts (not written), where the probe's owner forms them
        unwritten = tuple(member and handoff is not None for (member, _), handoff in zip(ctx.probes, ctx.handoffs))
        # a term whose weights' sums were handed over (`hand_weight_sums`) and of which nothing else is asked: left out
        handed = _handed_term(grad, sigma, terms, [not (want_sigma or any(asked)) and lazy
                                                   for asked, lazy in zip(want, unwritten)])
        kept = [k for k in range(len(terms)) if handed is None or k != handed[0]]

        def without(x: tuple) -> tuple:
            return tuple(x[k] for k in kept if k < len(x))

        fused = _group_kernels.layered_force(sigma, [(t.table, t.slot, t.presence, t.factor, t.factor_all)
                                                     for t in without(terms)], grad, want_sigma, without(want),
                                             without(summed), without(ctx.constant_last), unwritten=without(unwritten)) \
            if kept else ([], [], None, [])
        if fused is not None and handed is not None:  # the handed term's place: its sums, no weights or derivatives
            weights, derivatives, d_sigma, group_sums = (list(x) if isinstance(x, (list, tuple)) else x for x in fused)
            weights.insert(handed[0], None)
            derivatives.insert(handed[0], (None, None, None))
            group_sums.insert(handed[0], handed[1])
            fused = weights, derivatives, d_sigma, group_sums
        if fused is None:  # the same derivatives in torch ops
            gs = grad * sigma
            weights, derivatives, total = [], [], 0
            for t, asked in zip(terms, want):
                parts = (t.presence, t.factor, t.factor_all)
                product = functools.reduce(torch.mul, [x for x in parts if x is not None], 1.0)
                weights.append((gs * product).expand_as(grad))
                if not (want_sigma or any(asked)):  # (the table's values are not read: it may not have been kept)
                    derivatives.append((None, None, None))
                    continue
                value = _gather(t.table, t.slot)

                def without(k: int) -> Tensor:  # grad σ value × the other parts
                    return gs * functools.reduce(torch.mul, [x for j, x in enumerate(parts) if j != k and x is not None], value)

                derivatives.append(tuple(without(k) if asked[k] and parts[k] is not None else None for k in range(3)))
                total = total + value * product
            fused = (weights, derivatives, grad * total if want_sigma else None, [None] * len(terms))
        weights, derivatives, d_sigma, group_sums = fused
        out = [_reduce_to(d_sigma, sigma)]
        for t, w, (d_presence, d_factor, d_factor_all), (member, group), sums, handoff in zip(
                terms, weights, derivatives, ctx.probes, group_sums, ctx.handoffs):
            if w is None:  # not written: its parts to the probe's owner
                handoff["weight"] = WeightParts(grad, sigma, t.presence, t.factor, t.factor_all)
            if handoff is not None and handoff.get("take_presence") and d_presence is not None \
                    and d_presence.shape == t.presence.shape:  # (a fresh buffer: the owner adds its own into it)
                handoff["presence"], d_presence = d_presence, None
            if sums is None and (wants[len(out)] or group):  # (unless the native pass summed them)
                sums = _segment_sum(w, t.slot, t.table.shape[-1])
            d_table = _reduce_to(sums, t.table) if wants[len(out)] else None
            out += [d_table, None, _reduce_to(d_presence, t.presence), _reduce_to(d_factor, t.factor),
                    _reduce_to(d_factor_all, t.factor_all), w if member else None, sums if group else None]
        return (*out, None, None, None)


def layered_force(sigma: Tensor, terms: list[ForceTerm], keep: list | None = None) -> Tensor:
    """λ = σ Σ_l ((table_l[slot_l] presence_l) factor_l) factor_all_l: [B, N] (σ [B | 1, N]), the force of infection
    of group layers, with the probes of each layer's own contributions (`ForceTerm`).

    Under autograd it is one node (saving its inputs only) instead of ~5 elementwise nodes per layer with their
    [B, N] intermediates; on CPU forward and backward are single native passes. Values are those of the same
    arithmetic in torch ops, bit for bit (same order, no fused multiply-adds). ``keep``: a list that receives the
    native forward pass's form of the terms (`layer_shares_at` reads it; values only, in every mode)."""
    for t in terms:
        if t.group_probe is not None and t.group_probe.shape[-1] != t.table.shape[-1]:
            raise ValueError(f"layered_force: a ForceTerm's group_probe has {t.group_probe.shape[-1]} groups, its table "
                             f"{t.table.shape[-1]}: the probe receives the table's derivative ([B, S], S = table slots)")
    if not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for t in terms
                                              for x in (sigma, t.table, t.presence, t.factor, t.factor_all,
                                                        t.member_probe, t.group_probe)):
        force = _group_kernels.layered_force(sigma, [(t.table, t.slot, t.presence, t.factor, t.factor_all)
                                                     for t in terms], keep=keep)
        return _force_torch(sigma, terms) if force is None else force
    flat = [x for t in terms for x in (t.table, t.slot, t.presence, t.factor, t.factor_all, t.member_probe,
                                       t.group_probe)]
    return _LayeredForce.apply(sigma, *flat, tuple(t.last_slot_constant for t in terms),
                               tuple(t.weight_handoff if t.member_probe is not None else None for t in terms), keep)


def layer_shares_at(kept: list | None, b: Tensor, i: Tensor) -> Tensor | None:
    """Each term's share of the force at the agents (b [M], i [M]), summed per batch element: [L, B] float32,
    Σ_m term_l / max(Σ_l' term_l', 1e-30), in one native pass over the terms `layered_force` kept (its ``keep`` list);
    the numbers of those torch ops. None where there is none (e.g. the force was not the native pass)."""
    return _group_kernels.layered_shares_at(kept[0], b, i) if kept else None


def range_sums(values: Tensor, ranges: list[tuple[int, int]], dtype: torch.dtype | None = None,
               known: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """Sums over contiguous agent ranges (e.g. boroughs of agents sorted by borough): [B, N] -> [B, G]; with
    ``weight`` [B | 1, N] the sums of values · weight (derivatives for both, without the product in the forward
    pass when the sums are ``known``).

    Slices, not a segment sum: the cheapest reduction for a few large groups. The backward spreads each
    range's gradient over its agents in one op (`range_broadcast`); autograd's own would build a [B, N]
    zero buffer per range and add them up. ``known`` [B, G]: the sums, where the caller has them another way
    (values are then not read; the derivative is the same).
    """
    if values.requires_grad or (weight is not None and weight.requires_grad):
        return _RangeSums.apply(values, ranges, dtype, known, weight)
    if known is not None:
        return known.to(dtype or known.dtype)
    return _stacked_range_sums(values if weight is None else values * weight, ranges, dtype)


def _stacked_range_sums(values: Tensor, ranges: list[tuple[int, int]], dtype: torch.dtype | None) -> Tensor:
    return torch.stack([values[:, a:b].sum(1, dtype=dtype) for a, b in ranges], 1)


def range_broadcast(per_range: Tensor, ranges: list[tuple[int, int]]) -> Tensor:
    """Each agent's range value: [B, G] -> [B, N] (the adjoint of `range_sums`; ranges cover 0..N in order).
    One broadcast fill per range: a single pass of writes (2.5x faster than ``repeat_interleave`` at 1M). Under
    autograd its derivative is one sum per range, where ``index_select``'s (an ``index_add`` of every agent into a
    few slots, one thread) took 475 ms at full NYC for the 5 boroughs."""
    if per_range.requires_grad and torch.is_grad_enabled():
        return _RangeBroadcast.apply(per_range, ranges)
    return _range_broadcast(per_range, ranges)


def _range_broadcast(per_range: Tensor, ranges: list[tuple[int, int]]) -> Tensor:
    out = per_range.new_empty(per_range.shape[0], ranges[-1][1] if ranges else 0)
    for k, (a, b) in enumerate(ranges):
        out[:, a:b] = per_range[:, k:k + 1]
    return out


class _RangeBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, per_range: Tensor, ranges: list[tuple[int, int]]) -> Tensor:
        ctx.ranges = ranges
        return _range_broadcast(per_range, ranges)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _stacked_range_sums(grad, ctx.ranges, None), None


class _RangeSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, ranges: list[tuple[int, int]], dtype: torch.dtype | None,
                known: Tensor | None, weight: Tensor | None) -> Tensor:
        ctx.ranges = ranges
        ctx.shapes = values.shape, None if weight is None else weight.shape
        ctx.dtypes = values.dtype, None if weight is None else weight.dtype
        wants_values, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        ctx.save_for_backward(weight if wants_values else None, values if wants_weight else None)
        if known is not None:
            return known.detach().to(dtype or known.dtype, copy=True)
        return _stacked_range_sums(values if weight is None else values * weight, ranges, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, values = ctx.saved_tensors
        spread = range_broadcast(grad, ctx.ranges)
        d_values = d_weight = None
        if ctx.needs_input_grad[0]:
            d_values = spread if weight is None else spread * weight
            d_values = d_values.to(ctx.dtypes[0]).sum_to_size(ctx.shapes[0])
        if ctx.needs_input_grad[4]:
            d_weight = (spread * values).to(ctx.dtypes[1]).sum_to_size(ctx.shapes[1])
        return d_values, None, None, None, d_weight


class GroupLayer:
    """A contact layer made of disjoint groups (e.g. households).

    group_of [N]: each agent's group id in [0, G), or -1 for agents outside the layer (e.g. no
    workplace). Internally non-members point at an extra, always-empty slot G, so a layer costs one
    ``index_add_`` and one gather per step whatever its coverage.
    """

    def __init__(self, group_of: Tensor, num_groups: int | None = None):
        group_of = group_of.to(torch.int64)
        member = group_of >= 0
        self.num_agents = int(group_of.shape[0])
        self.num_groups = int(num_groups if num_groups is not None else (int(group_of.max()) + 1 if member.any() else 0))
        self.all_members = bool(member.all())
        slot = torch.where(member, group_of, torch.full_like(group_of, self.num_groups))
        sizes = torch.bincount(slot, minlength=self.num_groups + 1).to(torch.float32)
        # int32 (4 bytes less per agent for every pass that reads it; the native kernels take it as it is, and
        # torch's CPU index_add_, slow with int32, gets a one-time int64 copy where they do not run)
        slot = slot.to(index_dtype(max(self.num_agents, self.num_groups + 1)))
        self.slot = slot  # [N] int32 (int64 beyond 2^31 agents or groups)
        sizes[self.num_groups] = 0.0
        self.group_size = sizes  # [G + 1], last slot empty
        # 1 / (others in my group), 0 for non-members and groups of one: [N]
        others = sizes[slot] - 1
        self.inv_others = torch.where(member & (others > 0), 1.0 / others.clamp_min(1), torch.zeros_like(others))

    def to(self, device) -> "GroupLayer":
        for name in ("slot", "group_size", "inv_others"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def totals(self, values: Tensor) -> Tensor:
        """Per-group sums of agent values: [B, N] -> [B, G] (non-members excluded)."""
        return group_sum(values, self.slot, self.num_groups + 1)[:, : self.num_groups]

    def broadcast(self, per_group: Tensor) -> Tensor:
        """Per-group values back to agents: [B, G] -> [B, N] (zero for non-members)."""
        padded = torch.nn.functional.pad(per_group, (0, 1))
        return group_gather(padded, self.slot)

    def others_sum(self, values: Tensor) -> Tensor:
        """Sum of the values of the *other* members of each agent's group: [B, N] -> [B, N]
        (``sum_group(values) - values_self``)."""
        return group_gather(group_sum(values, self.slot, self.num_groups + 1), self.slot) - values

    def pressure(self, infectious: Tensor) -> Tensor:
        """Mean infectiousness of the *other* members of each agent's group: [B, N] -> [B, N].

        ``(sum_group(inf) - inf_self) / (size - 1)``; zero for groups of one and non-members.
        """
        return self.others_sum(infectious) * self.inv_others


def message_passing(values: Tensor, edge_index: Tensor, num_nodes: int, edge_weight: Tensor | None = None) -> Tensor:
    """Sum over incoming edges of weight * source value. values [B, N], edge_index [2, E] -> [B, N]."""
    src, dst = edge_index[0], edge_index[1]
    messages = values.index_select(1, src)
    if edge_weight is not None:
        messages = messages * edge_weight
    out = torch.zeros(values.shape[0], num_nodes, dtype=values.dtype, device=values.device)
    return out.index_add_(1, dst.to(torch.int64), messages)  # int64: see GroupLayer


def edges_from_networkx(graph: nx.Graph) -> tuple[Tensor, Tensor, list]:
    """networkx graph -> (edge_index [2, E] int32, edge_weight [E] float32, node list).

    Undirected graphs yield both directions. Node order is ``list(graph.nodes)``; edge weight is the
    ``weight`` attribute (default 1).
    """
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    src, dst, weight = [], [], []
    for a, b, data in graph.edges(data=True):
        w = float(data.get("weight", 1.0))
        src.append(position[a]); dst.append(position[b]); weight.append(w)
        if not graph.is_directed():
            src.append(position[b]); dst.append(position[a]); weight.append(w)
    edge_index = torch.tensor([src, dst], dtype=torch.int32).reshape(2, -1)
    return edge_index, torch.tensor(weight, dtype=torch.float32), nodes


def edges_to_networkx(edge_index: Tensor, edge_weight: Tensor | None = None, num_nodes: int | None = None,
                      directed: bool = False) -> nx.Graph:
    """edge_index [2, E] (+ weights) -> networkx (Di)Graph with nodes 0..num_nodes-1."""
    graph = nx.DiGraph() if directed else nx.Graph()
    n = int(num_nodes if num_nodes is not None else (int(edge_index.max()) + 1 if edge_index.numel() else 0))
    graph.add_nodes_from(range(n))
    weights = edge_weight.tolist() if edge_weight is not None else [1.0] * edge_index.shape[1]
    for (a, b), w in zip(edge_index.t().tolist(), weights):
        graph.add_edge(a, b, weight=w)
    return graph

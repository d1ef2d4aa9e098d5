"""Iterative proportional fitting (IPF) on batched N-dimensional tables, plus integerisation.

A city builder fits one joint table per zone (e.g. NTA x age x sex x race) to that zone's marginals, all zones
at once: ``seed`` is ``[B, d1, ..., dk]`` (B zones) and each marginal constrains a subset of the k axes,
``[B, *sizes of those axes]``. Any city with separate marginals per zone can reuse this.

    fit = ipf(seed, [((0,), age), ((1,), sex), ((2,), race)], tol=1e-8)
    counts = integerise(fit.table, generator=torch.Generator().manual_seed(0), marginals=[...])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError, InputError

Marginal = tuple[Sequence[int], torch.Tensor]


@dataclass(frozen=True)
class IPFResult:
    table: torch.Tensor  # [B, *dims] fitted (float64)
    iterations: int
    max_error: float  # max |fitted marginal - target| / max(target total, 1), over all marginals and batch rows
    converged: bool


def _check(seed: torch.Tensor, marginals: Sequence[Marginal]) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    if seed.dim() < 2:
        raise ConfigError(f"ipf: seed must be [B, d1, ...] with at least one table axis, got shape {tuple(seed.shape)}")
    if (seed < 0).any() or not torch.isfinite(seed).all():
        raise InputError("ipf: seed has negative or non-finite entries")
    k = seed.dim() - 1
    out = []
    for axes, target in marginals:
        axes = tuple(int(a) for a in axes)
        if not axes or len(set(axes)) != len(axes) or min(axes) < 0 or max(axes) >= k:
            raise ConfigError(f"ipf: marginal axes {axes} invalid for a table with {k} axes (0..{k - 1})")
        if list(axes) != sorted(axes):
            raise ConfigError(f"ipf: marginal axes must be increasing, got {axes}")
        expected = (seed.shape[0], *(seed.shape[1 + a] for a in axes))
        if tuple(target.shape) != expected:
            raise ConfigError(f"ipf: marginal over axes {axes} has shape {tuple(target.shape)}, expected {expected}")
        target = target.to(torch.float64)
        if (target < 0).any() or not torch.isfinite(target).all():
            raise InputError(f"ipf: marginal over axes {axes} has negative or non-finite entries")
        out.append((axes, target))
    return out


def ipf(seed: torch.Tensor, marginals: Sequence[Marginal], *, max_iter: int = 500, tol: float = 1e-8,
        strict: bool = False) -> IPFResult:
    """Fit ``seed`` [B, *dims] to each ``(axes, target)`` marginal by cyclic proportional scaling.

    Converged when every fitted marginal is within ``tol`` x (batch row total) of its target. Cells that are
    zero in the seed stay zero; a target that is positive where the seed slice is all zero cannot be met (the
    seed gets a tiny floor there first, ``1e-12``, so such structural zeros do not stall the fit). With
    ``strict=True`` a fit that did not converge raises ``ConfigError``.
    """
    checked = _check(seed, marginals)
    table = seed.to(torch.float64).clone()
    k = table.dim() - 1
    # a marginal slice whose seed is all zero but target positive: give it a uniform floor
    for axes, target in checked:
        other = tuple(1 + a for a in range(k) if a not in axes)
        mass = table.sum(dim=other) if other else table
        empty = (mass <= 0) & (target > 0)
        if empty.any():
            table = table + 1e-12 * _expand(empty.to(torch.float64), axes, table.shape)
    totals = table.flatten(1).sum(1).clamp_min(1.0)
    scale_ref = torch.stack([t.flatten(1).sum(1) for _, t in checked], 0).amax(0).clamp_min(1.0) if checked else totals
    error = float("inf")
    iteration = 0
    for iteration in range(1, max_iter + 1):
        for axes, target in checked:
            other = tuple(1 + a for a in range(k) if a not in axes)
            current = table.sum(dim=other) if other else table
            factor = torch.where(current > 0, target / current.clamp_min(1e-300), torch.zeros_like(current))
            table = table * _expand(factor, axes, table.shape)
        error = _max_error(table, checked, scale_ref)
        if error <= tol:
            break
    converged = error <= tol
    if strict and not converged:
        raise ConfigError(f"ipf did not converge in {max_iter} iterations (max relative marginal error {error:.2e} > "
                          f"tol {tol:.1e}); marginals may be inconsistent (different totals) or the seed has zeros")
    return IPFResult(table, iteration, error, converged)


def _expand(values: torch.Tensor, axes: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    """[B, *sizes of axes] -> broadcastable to [B, *dims]."""
    view = [shape[0]] + [shape[1 + a] if a in axes else 1 for a in range(len(shape) - 1)]
    return values.reshape(view)


def _max_error(table: torch.Tensor, checked, scale_ref: torch.Tensor) -> float:
    k = table.dim() - 1
    worst = 0.0
    for axes, target in checked:
        other = tuple(1 + a for a in range(k) if a not in axes)
        current = table.sum(dim=other) if other else table
        err = (current - target).abs().flatten(1).amax(1) / scale_ref
        worst = max(worst, float(err.max()))
    return worst


def integerise(table: torch.Tensor, *, generator: torch.Generator | None = None, totals: torch.Tensor | None = None,
               marginals: Sequence[Marginal] = (), max_moves: int = 100_000) -> torch.Tensor:
    """Round a fitted table [B, *dims] to integers (int64), keeping each row's total.

    Truncate-replicate-sample: floor every cell, then add one unit to ``total - sum(floor)`` cells drawn
    without replacement with probability proportional to the fractional parts (Gumbel top-k, seeded by
    ``generator``). ``totals`` [B] (integers) overrides ``round(row sum)``. If integer 1-D ``marginals``
    ``(axes=(a,), target [B, d_a])`` are given, single units are then moved between cells until every one of
    them is met exactly (a repair that needs a few moves per row; rows are independent).
    """
    if (table < 0).any():
        raise InputError("integerise: table has negative cells")
    b = table.shape[0]
    flat = table.to(torch.float64).reshape(b, -1)
    floor = torch.floor(flat)
    frac = flat - floor
    want = torch.round(flat.sum(1)) if totals is None else totals.to(torch.float64)
    remainder = (want - floor.sum(1)).round().to(torch.int64)
    if (remainder < 0).any() or (remainder > flat.shape[1]).any():
        raise ConfigError("integerise: totals are incompatible with the table (remainder outside [0, cells])")
    u = torch.rand(flat.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    keys = torch.where(frac > 0, torch.log(frac.clamp_min(1e-300)) - torch.log(-torch.log(u)),
                       torch.full_like(frac, -float("inf")))
    # cells with zero fractional part are picked only if a row needs more units than it has fractional cells
    keys = torch.where(frac > 0, keys, -1e300 + torch.rand(flat.shape, generator=generator, dtype=torch.float64))
    rank = torch.empty_like(flat, dtype=torch.int64)
    order = torch.argsort(keys, dim=1, descending=True)
    rank.scatter_(1, order, torch.arange(flat.shape[1]).expand(b, -1).contiguous())
    out = (floor + (rank < remainder[:, None]).to(torch.float64)).to(torch.int64).reshape(table.shape)
    one_d = [(tuple(a)[0], t) for a, t in marginals if len(tuple(a)) == 1]
    if len(one_d) != len(marginals):
        raise ConfigError("integerise: repair supports 1-D marginals only")
    if one_d:
        out = _repair(out, [(a, torch.round(t.to(torch.float64)).to(torch.int64)) for a, t in one_d], max_moves)
    return out


def _repair(counts: torch.Tensor, marginals: list[tuple[int, torch.Tensor]], max_moves: int) -> torch.Tensor:
    """Move single units so that each 1-D marginal is met; greedy, a few moves per row."""
    k = counts.dim() - 1
    counts = counts.clone()
    for row in range(counts.shape[0]):
        table = counts[row]
        targets = [t[row] for _, t in marginals]
        if any(int(t.sum()) != int(table.sum()) for t in targets):
            raise InputError(f"integerise: row {row} has marginals with different totals "
                             f"({[int(t.sum()) for t in targets]} vs table {int(table.sum())})")
        for _ in range(max_moves):
            dev = []
            for (axis, _), target in zip(marginals, targets):
                other = tuple(a for a in range(k) if a != axis)
                dev.append((axis, (table.sum(dim=other) if other else table) - target))
            if all(int(d.abs().sum()) == 0 for _, d in dev):
                break
            moved = False
            # constrain the source cell to surplus indices on as many deviating axes as possible
            active = [(axis, d) for axis, d in dev if int(d.abs().sum())]
            for n_constrained in range(len(active), 0, -1):
                mask = torch.ones_like(table, dtype=torch.bool)
                for axis, d in active[:n_constrained]:
                    shape = [1] * k
                    shape[axis] = -1
                    mask &= (d > 0).reshape(shape)
                candidates = torch.where(mask & (table > 0), table, torch.zeros_like(table))
                if int(candidates.max()) <= 0:
                    continue
                source = list(torch.unravel_index(torch.argmax(candidates), table.shape))
                target_cell = list(source)
                for axis, d in active[:n_constrained]:
                    target_cell[axis] = int(torch.argmin(d))
                table[tuple(source)] -= 1
                table[tuple(target_cell)] += 1
                moved = True
                break
            if not moved:
                raise ConfigError(f"integerise: could not repair row {row} to its marginals")
        else:
            raise ConfigError(f"integerise: repair of row {row} did not finish in {max_moves} moves")
    return counts

"""The weekly labour market as one native pass (models/covid/labour_native.py): the numbers of the torch ops in
`model.labour_flows` bit for bit, in hard mode (uint8) and gradient modes (float32), and under autograd the same
derivatives, taken from the torch ops recomputed in the backward pass."""

from __future__ import annotations

import shutil

import pytest
import torch

from agenttensor import Hard, Relaxed, StraightThrough
from agenttensor.model import StepContext
from agenttensor.rng import Randomness
from models.covid import labour_native
from models.covid.model import labour_flows

pytestmark = [pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler"),
              pytest.mark.usefixtures("one_thread")]

B, N, STEP = 2, 30_011, 7


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    employed = torch.rand(B, N, generator=g) < 0.5
    unemployed = ~employed & (torch.rand(B, N, generator=g) < 0.1)
    on_site = employed & (torch.rand(B, N, generator=g) < 0.7)
    remote = employed & (torch.rand(B, N, generator=g) < 0.4)
    dead = torch.rand(B, N, generator=g) < 0.02
    fields = [x.to(dtype) for x in (employed, unemployed, on_site, remote, dead)]
    has_workplace = torch.rand(N, generator=g) < 0.8
    # scalar and per-element rates; levers [B, N] and one row for every element
    rates = [torch.tensor(0.01), torch.tensor([[0.2], [0.3]]), torch.tensor(0.25), torch.tensor(0.6),
             torch.tensor([[0.05], [0.07]])]
    levers = [(torch.rand(B, N, generator=g) < 0.3).float(), torch.rand(1, N, generator=g),
              torch.rand(B, N, generator=g) * 0.5]
    return fields, has_workplace, rates, levers


def rng():
    return Randomness.for_agents([3, 5], torch.arange(N))


def native(fields, has_workplace, rates, levers, sampler):
    out = labour_native.labour_market(tuple(fields), has_workplace, tuple(rates), tuple(levers), rng(), STEP, sampler,
                                      reference=labour_flows)
    assert out is not None  # the native pass ran
    return out


def reference(fields, has_workplace, rates, levers, sampler):
    return labour_flows(StepContext(step=STEP, env=None, rng=rng(), sampler=sampler), *fields, has_workplace, *rates,
                        *levers)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sampler", [Hard(), StraightThrough(), Relaxed()], ids=["hard", "straight-through", "relaxed"])
@pytest.mark.parametrize("present", range(8))  # which of closed workplaces, stimulus, workplace closure are on
def test_the_native_week_gives_the_torch_ops_numbers(sampler, present, threads):
    torch.set_num_threads(threads)
    fields, has_workplace, rates, levers = inputs(sampler.dtype)
    levers = [x if present >> k & 1 else None for k, x in enumerate(levers)]
    expected = reference(fields, has_workplace, rates, levers, sampler)
    got = native(fields, has_workplace, rates, levers, sampler)
    for x, y in zip(got, expected):
        assert x.dtype == y.dtype == sampler.dtype and torch.equal(x, y)
    assert not torch.equal(got[0], fields[0]) and not torch.equal(got[1], fields[1])  # jobs were lost and found
    alive = fields[4] == 0
    assert torch.equal((got[0] + got[1])[alive], (fields[0] + fields[1])[alive])  # nobody else leaves or joins
    assert not got[0][~alive].any() and not got[1][~alive].any()  # the dead leave the labour force


@pytest.mark.parametrize("sampler", [StraightThrough(), Relaxed()], ids=["straight-through", "relaxed"])
@pytest.mark.parametrize("binary", [True, False], ids=["packed", "fractional"])
def test_the_native_node_gives_the_torch_ops_derivatives(sampler, binary):
    """Every field, rate and lever's derivative, bit for bit, and the values; fields that are not all 0/1 (kept as they
    are, not packed) too."""
    fields, has_workplace, rates, levers = inputs(torch.float32, seed=1)
    if not binary:
        fields[2], fields[3] = fields[2] * 0.3, fields[3] * 0.7
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    leaves = [x.clone().requires_grad_() for x in (*fields, *rates, *levers)]

    def derivatives(fn):
        for x in leaves:
            x.grad = None
        xs = [x * 1 for x in leaves]  # (non-leaf inputs, as in a run)
        employed, unemployed = fn(xs[:5], has_workplace, xs[5:10], xs[10:], sampler)
        ((employed * weights[0]).sum() + (unemployed * weights[1]).sum()).backward()
        return [x.grad for x in leaves], (employed.detach(), unemployed.detach())

    expected, expected_values = derivatives(reference)
    got, values = derivatives(native)
    assert all(torch.equal(x, y) for x, y in zip(values, expected_values))
    for k, (x, y) in enumerate(zip(got, expected)):
        assert x is not None and torch.equal(x, y), k
    assert any(bool(x.ne(0).any()) for x in got[5:10])  # the rates' derivatives are not all zero


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("present", range(8))  # which of closed workplaces, stimulus, workplace closure are on
def test_the_native_backward_gives_the_fields_torch_ops_derivatives(present, threads, monkeypatch):
    """Where only the fields ask for derivatives (a run's case), one native pass from the packed bytes: the torch ops'
    derivatives bit for bit, for every lever combination; the pass ran (no recomputation), and a field that asks for
    none gets None."""
    torch.set_num_threads(threads)
    fields, has_workplace, rates, levers = inputs(torch.float32, seed=3)
    levers = [x if present >> k & 1 else None for k, x in enumerate(levers)]
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    wanted = [True, True, True, True, present != 3]  # (D without a derivative once)
    leaves = [x.clone().requires_grad_(want) for x, want in zip(fields, wanted)]
    passes = []
    original = labour_native._field_derivatives
    monkeypatch.setattr(labour_native, "_field_derivatives", lambda *a: passes.append(1) or original(*a))

    def derivatives(fn):
        for x in leaves:
            x.grad = None
        xs = [x * 1 if x.requires_grad else x for x in leaves]
        employed, unemployed = fn(xs, has_workplace, rates, levers, StraightThrough())
        ((employed * weights[0]).sum() + (unemployed * weights[1]).sum()).backward()
        return [x.grad for x in leaves]

    expected = derivatives(reference)
    got = derivatives(native)
    assert passes == [1]
    for k, (x, y, want) in enumerate(zip(got, expected, wanted)):
        assert (x is None) == (y is None) == (not want), k
        assert x is None or torch.equal(x, y), (k, (x - y).abs().max())
    assert all(bool(x.ne(0).any()) for x in got if x is not None)


def test_the_node_keeps_the_fields_in_one_byte_per_agent():
    fields, has_workplace, rates, levers = inputs(torch.float32)
    employed, _ = native([fields[0].requires_grad_(), *fields[1:]], has_workplace, rates, levers, StraightThrough())
    saved = employed.grad_fn.saved_tensors
    per_agent = [x for x in saved if x.numel() == B * N]
    assert [x.dtype for x in per_agent] == [torch.uint8, torch.float32, torch.float32]  # the flags, 2 [B, N] levers


def test_where_the_native_pass_does_not_apply_it_says_so():
    fields, has_workplace, rates, levers = inputs(torch.float32)
    args = (has_workplace, tuple(rates), tuple(levers), rng(), STEP, StraightThrough(), labour_flows)
    assert labour_native.labour_market((*fields[:4], fields[4].double()), *args) is None  # mixed dtypes
    per_agent_rate = (torch.full((B, N), 0.1), *rates[1:])
    assert labour_native.labour_market(tuple(fields), has_workplace, per_agent_rate, *args[2:]) is None

import pytest
import torch

from agenttensor import Hard, Relaxed, StraightThrough


def test_all_modes_same_forward():
    p = torch.rand(10_000)
    u = torch.rand(10_000)
    hard = Hard().bernoulli(p, u)
    assert hard.dtype == torch.uint8
    for sampler in (StraightThrough(), Relaxed(0.1), Relaxed(1.0)):
        q = p.clone().requires_grad_(True)
        ev = sampler.bernoulli(q, u)
        assert ev.dtype == torch.float32
        assert torch.equal(ev.detach(), hard.float())
        ev.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()


def test_straight_through_gradient_is_one():
    p = torch.full((5,), 0.3, requires_grad=True)
    StraightThrough().bernoulli(p, torch.rand(5)).sum().backward()
    assert torch.equal(p.grad, torch.ones(5))


def test_straight_through_gradient_reduces_over_broadcast_dimensions():
    """p [N] drawn against u [B, N]: d(events)/dp sums the B draws of each agent, as `hard + (p - p.detach())` does."""
    p = torch.rand(50, requires_grad=True)
    u = torch.rand(3, 50)
    weights = torch.rand(3, 50)
    (StraightThrough().bernoulli(p, u) * weights).sum().backward()
    assert torch.allclose(p.grad, weights.sum(0))
    assert torch.equal(StraightThrough().bernoulli(p.detach(), u), (u < p.detach()).float())


def test_categorical_forward_and_gradient():
    probs = torch.tensor([[0.2, 0.5, 0.3]]).repeat(30_000, 1)
    u = torch.rand(30_000)
    hard = Hard().categorical(probs, u)
    assert hard.sum(1).eq(1).all()
    freq = hard.float().mean(0)
    assert torch.allclose(freq, probs[0], atol=0.01)
    q = probs.clone().requires_grad_(True)
    st = StraightThrough().categorical(q, u)
    assert torch.equal(st.detach(), hard.float())
    (st[:, 1]).sum().backward()
    assert q.grad[:, 1].eq(1).all()


def test_hazard_event_matches_its_composition_in_values_and_gradients():
    """`hazard_event` = bernoulli(1 − exp(−h), u) · where: the fused straight-through node gives the same events
    and the same derivatives for h (incl. broadcast [1, N] and [B, 1] rates) and for the members `where`."""
    torch.manual_seed(0)
    B, N = 3, 4000
    u = torch.rand(B, N)
    where_values = (torch.rand(B, N) < 0.7).float()
    for shape in ((B, N), (1, N), (B, 1)):
        hazard_values = torch.rand(shape) * 0.8
        weights = torch.rand(B, N)
        grads = []
        for fused in (True, False):
            hazard = hazard_values.clone().requires_grad_(True)
            where = where_values.clone().requires_grad_(True)
            sampler = StraightThrough()
            events = (sampler.hazard_event(hazard, u, where) if fused else
                      sampler.bernoulli(1 - torch.exp(-hazard), u) * where)
            (events * weights).sum().backward()
            grads.append((events.detach(), hazard.grad, where.grad))
        (e1, h1, w1), (e2, h2, w2) = grads
        assert torch.equal(e1, e2) and 0 < e1.sum() < where_values.sum()
        assert h1.shape == hazard_values.shape and torch.allclose(h1, h2, rtol=1e-5, atol=1e-6)
        assert torch.equal(w1, w2) and torch.equal(w1, weights * (u < 1 - torch.exp(-hazard_values)).float())
    # gradients to `where` only (a fixed rate), and none at all: plain events
    where = where_values.clone().requires_grad_(True)
    StraightThrough().hazard_event(torch.full((B, N), 0.3), u, where).sum().backward()
    assert torch.equal(where.grad, (u < 1 - torch.exp(torch.tensor(-0.3))).float())
    plain = StraightThrough().hazard_event(torch.full((B, N), 0.3), u, where_values)
    assert not plain.requires_grad and torch.equal(plain, (u < 1 - torch.exp(torch.tensor(-0.3))).float() * where_values)
    assert torch.equal(Hard().hazard_event(torch.full((B, N), 0.3), u, where_values.to(torch.uint8)), plain.to(torch.uint8))


@pytest.mark.parametrize("undrawn", [False, True])
def test_hazard_event_and_derivatives_leave_both_derivatives_to_the_caller(undrawn):
    """`hazard_event_and_derivatives`: straight-through gives `hazard_event`'s events without an autograd graph, and
    the mask d events / d where and exp(−h), with which the caller's mask · g and g · where · exp(−h) are the
    derivatives `hazard_event` gives ``where`` and the hazard, bit for bit; the other samplers give `hazard_event`
    and None."""
    from agenttensor.rng import Randomness, Uniforms

    B, N = 2, 70_001
    r = Randomness.for_agents([1, 5], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(B, N, generator=g)
    where_values = (torch.rand(B, N, generator=g) < 0.6).float()
    hazard_values = torch.rand(B, N, generator=g) * 0.7
    draws = Uniforms(r, 3, "infection") if undrawn else r.uniform(3, "infection")
    hazard, where = hazard_values.clone().requires_grad_(), where_values.clone().requires_grad_()
    events = StraightThrough().hazard_event(hazard, draws, where)
    (events * weights).sum().backward()
    handed, derivatives = StraightThrough().hazard_event_and_derivatives(hazard, draws, where)
    assert not handed.requires_grad and torch.equal(handed, events.detach())
    mask, survival = derivatives
    assert mask.dtype == torch.bool and torch.equal(mask, r.uniform(3, "infection") < 1 - torch.exp(-hazard_values))
    assert 0 < handed.sum() < where_values.sum()
    assert torch.equal(torch.where(mask, weights, 0.0), where.grad)
    assert torch.equal(weights * where_values * survival, hazard.grad)
    for sampler in (Hard(), Relaxed(0.5)):
        where = where_values.to(torch.uint8) if isinstance(sampler, Hard) else where_values
        events, none = sampler.hazard_event_and_derivatives(hazard_values, r.uniform(3, "infection"), where)
        assert none is None and torch.equal(events, sampler.hazard_event(hazard_values, r.uniform(3, "infection"), where))


def test_hazard_move_gives_the_events_moved_and_the_same_derivatives():
    """`hazard_move_and_derivatives` (straight-through, CPU): the fields after `hazard_event_and_derivatives`' events
    moved from source to target, the events' pairs and the same derivatives (mask, exp(−h)), bit for bit; the other
    samplers, drawn uniforms and other devices' hazards give None (the caller moves the events itself)."""
    from agenttensor.rng import Randomness, Uniforms

    B, N = 2, 70_001
    r = Randomness.for_agents([1, 5], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(8)
    source = (torch.rand(B, N, generator=g) < 0.6).float().requires_grad_()
    target = (torch.rand(B, N, generator=g) < 0.1).float()
    hazard = (torch.rand(B, N, generator=g) * 0.7).requires_grad_()
    draws = Uniforms(r, 3, "infection")
    events, (mask, survival) = StraightThrough().hazard_event_and_derivatives(hazard, draws, source)
    moved = StraightThrough().hazard_move_and_derivatives(hazard, draws, source, target)
    assert not moved.source.requires_grad and torch.equal(moved.source, source.detach() - events)
    assert torch.equal(moved.target, target + events) and 0 < moved.pairs[0].numel() < source.sum()
    assert all(torch.equal(x, y) for x, y in zip(moved.pairs, events.nonzero(as_tuple=True)))
    assert torch.equal(moved.derivatives.where_mask, mask) and torch.equal(moved.derivatives.survival, survival)
    assert StraightThrough().hazard_move_and_derivatives(hazard, r.uniform(3, "infection"), source, target) is None
    assert Relaxed(0.5).hazard_move_and_derivatives(hazard, draws, source, target) is None
    assert Hard().hazard_move_and_derivatives(hazard.detach(), draws, source.detach().to(torch.uint8),
                                              target.to(torch.uint8)) is None


def test_native_hazard_event_gives_the_bits_of_the_torch_ops(monkeypatch):
    """agenttensor/csrc/event_kernels.cpp (the straight-through hazard event and its backward, one pass each on
    CPU) against the same node in torch ops: identical events and gradients, bit for bit, with 1 and 2 threads."""
    from agenttensor import _event_kernels

    if _event_kernels._library() is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(5)
    B, N = 2, 300_000
    u, weights = torch.rand(B, N, generator=g), torch.randn(B, N, generator=g)
    hazard_values = torch.rand(B, N, generator=g) ** 2
    where_values = (torch.rand(B, N, generator=g) < 0.6).float()

    def run(threads: int):
        torch.set_num_threads(threads)
        hazard, where = hazard_values.clone().requires_grad_(), where_values.clone().requires_grad_()
        events = StraightThrough().hazard_event(hazard, u, where)
        (events * weights).sum().backward()
        return events.detach(), hazard.grad, where.grad

    threads = torch.get_num_threads()
    calls = []
    forward, backward = _event_kernels.hazard_event, _event_kernels.hazard_event_backward
    monkeypatch.setattr(_event_kernels, "hazard_event", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setattr(_event_kernels, "hazard_event_backward", lambda *a: calls.append(2) or backward(*a))
    try:
        native = [run(1), run(2)]
        assert sorted(set(calls)) == [1, 2]
        monkeypatch.setattr(_event_kernels, "hazard_event", lambda *a: None)
        monkeypatch.setattr(_event_kernels, "hazard_event_backward", lambda *a: None)
        torch_ops = run(1)
    finally:
        torch.set_num_threads(threads)
    assert 0 < torch_ops[0].sum() < where_values.sum()
    for result in native:
        assert all(torch.equal(a, b) for a, b in zip(result, torch_ops))


@pytest.mark.parametrize("complement", [False, True])
def test_the_drawn_events_derivatives_come_from_one_native_pass_with_the_torch_ops_numbers(monkeypatch, complement):
    """The straight-through drawn event's backward (d/dp = ±grad · where, d/dwhere = grad where the event happened) as
    one native pass where p, where and the gradient are [B, N] float32 on CPU (`_event_kernels.hazard_event_backward`,
    ``drawn``), bit for bit the torch ops' (the pass turned off); only the derivatives asked for are made."""
    from agenttensor import _event_kernels
    from agenttensor.rng import Randomness, Uniforms

    B, N = 2, 70_001
    r = Randomness.for_agents([4, 9], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(B, N, generator=g)
    p_values, where_values = torch.rand(B, N, generator=g), (torch.rand(B, N, generator=g) < 0.7).float()
    real, calls = _event_kernels.hazard_event_backward, []

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(None if out is None else tuple(x is not None for x in out))
        return out

    monkeypatch.setattr(_event_kernels, "hazard_event_backward", spy)
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(_event_kernels, "hazard_event_backward", lambda *a, **k: None)
        for asked in ((True, True), (True, False), (False, True)):
            p = p_values.clone().requires_grad_(asked[0])
            where = where_values.clone().requires_grad_(asked[1])
            events = StraightThrough().event_among(p, Uniforms(r, 6, "x"), where, complement)
            (events * weights).sum().backward()
            results.append((events.detach(), p.grad, where.grad))
    assert calls == [(True, True), (True, False), (False, True)]
    for a, b in zip(results[:3], results[3:]):
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))
    assert results[0][1].ne(0).any() and results[0][2].ne(0).any()


@pytest.mark.parametrize("kernel", [True, False])
def test_undrawn_uniforms_give_the_events_and_gradients_of_drawn_ones(monkeypatch, kernel):
    """`Uniforms` (drawn inside one native pass on CPU, or by the torch ops where it does not apply) against the
    same uniforms drawn first: identical events and gradients of p (every broadcast shape, 1 − p too), where and
    the hazard, in straight-through; the other samplers draw them and give their own numbers."""
    from agenttensor import _rng_kernels
    from agenttensor.rng import Randomness, Uniforms

    if not kernel:
        monkeypatch.setattr(_rng_kernels, "float_event", lambda *a, **k: None)
    B, N = 2, 70_001
    r = Randomness.for_agents([4, 9], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(B, N, generator=g)
    where_values = (torch.rand(B, N, generator=g) < 0.7).float()
    u = r.uniform(6, "x")
    for p_values in (torch.rand(B, N, generator=g), torch.rand(B, 1, generator=g), torch.rand(N, generator=g)):
        for complement in (False, True):
            results = []
            for draws in (u, Uniforms(r, 6, "x")):
                p, where = p_values.clone().requires_grad_(), where_values.clone().requires_grad_()
                events = StraightThrough().event_among(p, draws, where, complement)
                (events * weights).sum().backward()
                results.append((events.detach(), p.grad, where.grad))
            assert 0 < results[0][0].sum() < where_values.sum()
            assert all(torch.equal(a, b) for a, b in zip(*results))
    results, hazard_values = [], torch.rand(B, N, generator=g)
    for draws in (u, Uniforms(r, 6, "x")):
        hazard, where = hazard_values.clone().requires_grad_(), where_values.clone().requires_grad_()
        events = StraightThrough().hazard_event(hazard, draws, where)
        (events * weights).sum().backward()
        results.append((events.detach(), hazard.grad, where.grad))
        assert torch.equal(Relaxed().event_among(hazard_values, draws, where_values),
                           Hard().event_among(hazard_values, u, where_values))
    assert all(torch.equal(a, b) for a, b in zip(*results))

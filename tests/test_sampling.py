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

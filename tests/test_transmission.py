import networkx as nx
import torch

from agenttensor import GroupLayer, edges_from_networkx, edges_to_networkx, message_passing
import pytest

from agenttensor.transmission import _prefix_segment_sum, range_broadcast, range_sums, scaled_sums, scatter_sum


def test_group_pressure_matches_bruteforce():
    g = torch.randint(-1, 50, (400,))
    inf = (torch.rand(2, 400) < 0.3).float()
    layer = GroupLayer(g)
    got = layer.pressure(inf)
    for b in range(2):
        for i in range(400):
            if g[i] < 0:
                assert got[b, i] == 0
                continue
            others = (g == g[i]) & (torch.arange(400) != i)
            expect = inf[b][others].mean() if others.any() else torch.tensor(0.0)
            assert torch.isclose(got[b, i], expect, atol=1e-6)


def test_group_totals_and_broadcast():
    g = torch.tensor([0, 0, 1, -1, 2, 2, 2])
    layer = GroupLayer(g)
    v = torch.arange(7.0).unsqueeze(0)
    assert torch.equal(layer.totals(v), torch.tensor([[1.0, 2.0, 15.0]]))
    assert torch.equal(layer.broadcast(torch.tensor([[10.0, 20.0, 30.0]])),
                       torch.tensor([[10.0, 10.0, 20.0, 0.0, 30.0, 30.0, 30.0]]))


def test_range_sums_and_their_gradient():
    """Sums over contiguous ranges; the backward spreads each range's gradient over its agents."""
    ranges = [(0, 3), (3, 3), (3, 10)]  # an empty range too
    x = torch.rand(2, 10, requires_grad=True)
    sums = range_sums(x, ranges)
    expect = torch.stack([x[:, :3].sum(1), torch.zeros(2), x[:, 3:].sum(1)], 1)
    assert torch.allclose(sums, expect)
    weights = torch.rand(2, 3)
    (sums * weights).sum().backward()
    assert torch.equal(x.grad, torch.cat([weights[:, :1].expand(2, 3), weights[:, 2:].expand(2, 7)], 1))
    assert torch.equal(range_broadcast(weights, ranges), x.grad)
    as_float = range_sums(torch.ones(1, 10, dtype=torch.uint8), ranges, dtype=torch.float32)
    assert torch.equal(as_float, torch.tensor([[3.0, 0.0, 7.0]]))


def test_range_broadcast_carries_the_derivative_of_the_gather():
    """range_broadcast under autograd: the values of ``index_select`` by range id, and its derivative as one sum per
    range (integer-valued, so the sums are exact whatever their order); an empty range gets zero."""
    ranges = [(0, 4), (4, 4), (4, 9)]
    range_of = torch.tensor([0] * 4 + [2] * 5)
    per_range = torch.rand(2, 3, requires_grad=True)
    spread = range_broadcast(per_range, ranges)
    reference = per_range.detach().clone().requires_grad_()
    gathered = reference.index_select(1, range_of)
    assert torch.equal(spread, gathered) and spread.requires_grad
    upstream = torch.randint(-5, 6, (2, 9)).float()
    (spread * upstream).sum().backward()
    (gathered * upstream).sum().backward()
    assert torch.equal(per_range.grad, reference.grad) and torch.equal(per_range.grad[:, 1], torch.zeros(2))
    with torch.no_grad():
        assert not range_broadcast(per_range, ranges).requires_grad


def test_weighted_range_sums_and_known_sums_carry_the_derivative_of_the_dense_sums():
    """range_sums(values, weight=w): the sums of values · w, with the derivatives of both (w broadcast from one
    row); with ``known`` the given sums are returned and values are not read, the derivatives unchanged."""
    ranges = [(0, 4), (4, 4), (4, 9)]
    x = torch.rand(3, 9, requires_grad=True)
    w = torch.rand(1, 9, requires_grad=True)
    weights = torch.rand(3, 3)
    sums = range_sums(x, ranges, weight=w)
    (sums * weights).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    dense = torch.stack([(x_ref * w_ref)[:, a:b].sum(1) for a, b in ranges], 1)
    (dense * weights).sum().backward()
    assert torch.allclose(sums, dense) and torch.allclose(x.grad, x_ref.grad) and torch.allclose(w.grad, w_ref.grad)
    x.grad = w.grad = None
    known = torch.full((3, 3), 7.0)
    given = range_sums(x, ranges, torch.float32, known=known, weight=w)
    assert torch.equal(given, known)
    (given * weights).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad) and torch.allclose(w.grad, w_ref.grad)
    constant = range_sums(x, ranges, weight=w.detach())  # a constant weight gets no gradient
    assert constant.requires_grad and torch.allclose(constant, dense)


def test_message_passing_and_networkx_roundtrip():
    graph = nx.karate_club_graph()
    edge_index, weight, nodes = edges_from_networkx(graph)
    assert edge_index.dtype == torch.int32 and edge_index.shape[1] == 2 * graph.number_of_edges()
    x = torch.rand(1, len(nodes))
    got = message_passing(x, edge_index, len(nodes), weight)
    adjacency = torch.tensor(nx.to_numpy_array(graph, nodelist=nodes), dtype=torch.float32)
    assert torch.allclose(got[0], adjacency.T @ x[0], atol=1e-5)
    back = edges_to_networkx(edge_index, weight, len(nodes))
    assert nx.is_isomorphic(back, nx.Graph(graph))
    assert back.number_of_edges() == graph.number_of_edges()


@pytest.mark.parametrize("in_order", [True, False], ids=["sorted_groups", "unsorted_groups"])
def test_prefix_segment_sum_equals_index_add(in_order):
    """The scan-based group sums used on CUDA equal index_add_ (empty groups, first and last group empty,
    a batch of rows, an int32 index), and a second call reuses the layout."""
    g = torch.Generator().manual_seed(0)
    G, N = 9, 500
    group_of = torch.randint(1, G - 1, (N,), generator=g)  # groups 0 and G-1 empty
    group_of[group_of == 4] = 5  # and one in the middle
    if in_order:
        group_of = group_of.sort().values
    values = torch.randn(3, N, generator=g) * 10
    expected = torch.zeros(3, G, dtype=torch.float64).index_add_(1, group_of, values.double())
    for index in (group_of, group_of.to(torch.int32)):
        for _ in range(2):
            got = _prefix_segment_sum(values, index, G)
            assert got.dtype == torch.float32 and got.shape == (3, G)
            torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)
    assert (got[:, [0, 4, G - 1]] == 0).all()


def test_scatter_sum_adds_along_the_last_dim():
    index = torch.tensor([2, 0, 2, 3])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    out = scatter_sum(torch.ones(2, 5), index, values)
    assert torch.equal(out, torch.tensor([[3.0, 1.0, 5.0, 5.0, 1.0], [7.0, 1.0, 13.0, 9.0, 1.0]]))
    out[:, 2].sum().backward()
    assert torch.equal(values.grad, torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2))
    assert torch.equal(scatter_sum(torch.zeros(4), index, values[0].detach()), torch.tensor([2.0, 0.0, 4.0, 4.0]))


@pytest.mark.parametrize("S", [50, 1000])  # the dense product / the product at the M summed slots only
@pytest.mark.parametrize("batch, coef_shape", [(1, ()), (3, ()), (3, (3, 1)), (3, (1, 1))])
def test_scaled_sums_read_the_coefficients_derivative_at_the_summed_values(batch, coef_shape, S):
    """(coef · per_slot) · sums: the values and scale of the two products (where few slots were summed, formed at
    those only: the same numbers), and d coef (read at the M summed values) that of autograd through them; with a
    per_slot that carries a derivative, the products themselves."""
    torch.manual_seed(0)
    M = 40
    rows, slot = torch.randint(0, batch, (M,)), torch.randint(0, S, (M,))
    index = slot if batch == 1 else rows * S + slot
    values = torch.rand(M)
    sums = scatter_sum(torch.zeros(batch * S), index, values).view(batch, S)
    per_slot = torch.rand(S)
    upstream = torch.randn(batch, S)
    coef = (torch.rand(coef_shape) + 0.5).requires_grad_()
    got, scale = scaled_sums(coef, per_slot, sums, index, values)
    (got * upstream).sum().backward()
    reference = coef.detach().clone().requires_grad_()
    expect_scale = reference * per_slot
    expect = expect_scale * sums
    (expect * upstream).sum().backward()
    assert torch.equal(got, expect) and torch.equal(scale, expect_scale.detach())
    assert not scale.requires_grad and got.grad_fn is not None and "ScaledSums" in type(got.grad_fn).__name__
    assert coef.grad.shape == reference.grad.shape
    assert torch.allclose(coef.grad, reference.grad, rtol=1e-5)
    learned = per_slot.clone().requires_grad_()  # per_slot with a derivative: plain products, both derivatives
    got, scale = scaled_sums(coef.detach(), learned, sums, index, values)
    assert scale.requires_grad and "Mul" in type(got.grad_fn).__name__
    with torch.no_grad():  # no autograd: plain products (at the summed slots)
        assert torch.equal(scaled_sums(coef, per_slot, sums, index, values)[0], expect.detach())
        assert torch.equal(scaled_sums(coef, per_slot, sums, index, values, scale=expect_scale)[0], expect.detach())
    # the product made by the caller (e.g. with the sums, natively): returned as the values, the same d coef
    made = expect.detach().clone()
    coef.grad = None
    got, _ = scaled_sums(coef, per_slot, torch.zeros_like(sums), index, values, scale=expect_scale.detach(),
                         product=made)
    assert torch.equal(got, made) and "ScaledSums" in type(got.grad_fn).__name__
    (got * upstream).sum().backward()
    assert torch.allclose(coef.grad, reference.grad, rtol=1e-5)
    with pytest.raises(ValueError, match="product made by the caller"):
        scaled_sums(coef, learned, sums, index, values, scale=expect_scale.detach(), product=made)


def test_derived_values_are_recomputed_when_the_tensor_changes():
    from agenttensor._derived import Derived

    memo, calls = Derived(limit=4), []

    def total(x, key=None):
        return memo.get(x, lambda: calls.append(key) or float(x.sum()), key=key)

    x = torch.ones(5)
    assert total(x) == 5.0 and total(x) == 5.0 and calls == [None]
    assert total(x, key="other") == 5.0 and calls == [None, "other"]  # an extra key is its own entry
    x.add_(1)  # in place: the version counter moves
    assert total(x) == 10.0 and len(calls) == 3
    y = torch.zeros(5)  # another tensor is never taken for x
    assert total(y) == 0.0 and len(calls) == 4
    for _ in range(6):  # the memo stays bounded
        total(torch.ones(2))
    assert len(memo._seen) <= 4

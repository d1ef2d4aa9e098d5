import networkx as nx
import torch

from agenttensor import GroupLayer, edges_from_networkx, edges_to_networkx, message_passing
from agenttensor.transmission import range_broadcast, range_sums


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

"""Native group kernels (agenttensor/_group_kernels.py): the same sums and gathers as torch's index ops, the
same numbers whatever the thread count or batch, and a torch fallback wherever they do not apply."""

from __future__ import annotations

import shutil

import pytest
import torch

from agenttensor import _group_kernels
from agenttensor.transmission import GroupLayer, group_gather, group_sum, scaled_others_sum

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")


def slots(kind: str, n: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "sorted":  # agents sorted by place: long runs of one slot (the register path)
        return torch.sort(torch.randint(0, groups, (n,), generator=generator)).values
    if kind == "members":  # 3 in 4 agents in no group: the last slot (the spread path)
        s = torch.randint(0, groups - 1, (n,), generator=generator)
        return torch.where(torch.rand(n, generator=generator) < 0.75, groups - 1, s)
    return torch.randint(0, groups, (n,), generator=generator)


@pytest.mark.parametrize("index", [torch.int64, torch.int32])
@pytest.mark.parametrize("kind", ["random", "sorted", "members"])
@pytest.mark.parametrize("n", [1000, 300_000])  # one part / two halves
def test_kernels_match_torch_index_ops(kind, n, index):
    g = torch.Generator().manual_seed(n)
    groups = 517
    slot = slots(kind, n, groups, g).to(index)
    values = torch.rand(3, n, generator=g)
    assert _group_kernels.enabled()
    sums = _group_kernels.segment_sum(values, slot, groups)
    expected = torch.zeros(3, groups, dtype=torch.float64).index_add_(1, slot, values.double())
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-3)
    table = torch.rand(3, groups, generator=g)
    assert torch.equal(_group_kernels.gather(table, slot), table.index_select(1, slot))
    assert torch.equal(_group_kernels.gather(table[:1], slot), table[:1].index_select(1, slot))
    scale = torch.rand(1, groups, generator=g)
    others = (expected.float().index_select(1, slot) - values) * scale.index_select(1, slot)
    torch.testing.assert_close(_group_kernels.others_scaled(values, scale, slot), others, rtol=1e-4, atol=1e-2)


def test_results_do_not_depend_on_threads_or_batch():
    g = torch.Generator().manual_seed(0)
    n, groups = 400_000, 3000
    slot, values = slots("random", n, groups, g), torch.rand(4, n, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _group_kernels.segment_sum(values, slot, groups)
        torch.set_num_threads(2)
        two = _group_kernels.segment_sum(values, slot, groups)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(_group_kernels.segment_sum(values[2:3], slot, groups), two[2:3])
    broadcast = values[:1].expand(4, n)  # a row broadcast over the batch (stride 0)
    assert torch.equal(_group_kernels.segment_sum(broadcast, slot, groups), two[:1].expand(4, groups))


def test_elementwise_kernels_split_over_threads_give_the_same_bits():
    """With 2 threads the elementwise kernels split [B * N) between the threads (agenttensor/csrc/parallel.h): the
    gather and the others-sum give the bits of one thread's single pass (and of torch's index ops), at a size the
    split does not divide."""
    g = torch.Generator().manual_seed(5)
    n, groups = 1_100_003, 40_000
    slot = slots("random", n, groups, g).to(torch.int32)
    table, values = torch.rand(2, groups, generator=g), torch.rand(2, n, generator=g)
    scale = torch.rand(1, groups, generator=g)
    sums = _group_kernels.segment_sum(values, slot, groups)
    threads = torch.get_num_threads()
    try:
        results = []
        for k in (1, 2):
            torch.set_num_threads(k)
            results.append((_group_kernels.gather(table, slot), _group_kernels.others_scaled(values, scale, slot, sums)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], table.index_select(1, slot.long()))
    (one_gathered, one_others), (two_gathered, two_others) = results
    assert torch.equal(two_gathered, one_gathered) and torch.equal(two_others, one_others)


@pytest.mark.parametrize("index", [torch.int64, torch.int32])
@pytest.mark.parametrize("n", [1003, 300_001])  # one part / two halves; neither a multiple of the 8 lanes
def test_sums_over_members_give_the_bits_of_the_full_pass(monkeypatch, n, index):
    """Where most agents are in the last slot (non-members), the group sums add that slot in a vectorised pass and
    the members one by one (`_members_of`): the same bits as the pass over every agent, for a batch, a broadcast
    row and either thread count; the member list follows in-place changes of the slots."""
    g = torch.Generator().manual_seed(n)
    groups = 211
    slot = slots("members", n, groups, g).to(index)
    values = torch.randn(3, n, generator=g)
    values[0, 5] = float("inf")  # non-finite values take the same path as in the full pass
    values[1, :64] = -0.0
    assert _group_kernels._members_of(slot, groups) is not None
    threads = torch.get_num_threads()
    try:
        results = []
        for members in (True, False):
            if not members:
                monkeypatch.setattr(_group_kernels, "_members_of", lambda slot, groups: None)
            for k in (1, 2):
                torch.set_num_threads(k)
                results.append((_group_kernels.segment_sum(values, slot, groups),
                                _group_kernels.segment_sum(values[:1].expand(3, n), slot, groups)))
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    for batch, broadcast in results[1:]:
        assert torch.equal(batch, results[0][0]) and torch.equal(broadcast, results[0][1])
    slot[:n // 2] = groups - 1  # in place: the member list is rebuilt
    expected = torch.zeros(3, groups, dtype=torch.float64).index_add_(1, slot, values.double())
    torch.testing.assert_close(_group_kernels.segment_sum(values, slot, groups).double(), expected, rtol=1e-5,
                               atol=1e-3)
    assert _group_kernels._members_of(slot, groups).numel() == int((slot != groups - 1).sum())


def test_where_the_kernels_do_not_apply_torch_ops_run():
    slot = torch.tensor([0, 2, 1, 2])
    values = torch.arange(8.0).view(2, 4)
    assert _group_kernels.segment_sum(values, slot, 2) is None  # slot 2 is out of range: not for the kernel
    with pytest.raises(RuntimeError, match="out of bounds"):
        group_sum(values, slot, 2)  # torch's own bounds check
    assert _group_kernels.segment_sum(values.double(), slot, 3) is None
    assert _group_kernels.segment_sum(values, slot.to(torch.int16), 3) is None
    assert torch.equal(_group_kernels.segment_sum(values, slot.to(torch.int32), 3),
                       _group_kernels.segment_sum(values, slot, 3))  # int32 slots: the `_i32` kernels
    assert _group_kernels.gather(values.t(), slot) is None
    assert torch.equal(group_sum(values.double(), slot, 3), torch.tensor([[0.0, 2, 4], [4, 6, 12]], dtype=torch.float64))
    slot[1], slot[3] = 1, 0  # modified in place: checked again
    assert torch.equal(_group_kernels.segment_sum(values, slot, 2), torch.tensor([[3.0, 3], [11, 11]]))


def test_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "0")
    assert _group_kernels.segment_sum(torch.ones(1, 3), torch.tensor([0, 0, 1]), 2) is None
    assert torch.equal(group_sum(torch.ones(1, 3), torch.tensor([0, 0, 1]), 2), torch.tensor([[2.0, 1.0]]))


def test_gradients_of_group_sum_and_gather_match_autograd_of_torch_ops():
    g = torch.Generator().manual_seed(3)
    n, groups = 5000, 40
    layer = GroupLayer(torch.where(torch.rand(n, generator=g) < 0.3, -1, torch.randint(0, groups, (n,), generator=g)))
    values = torch.rand(2, n, generator=g, requires_grad=True)
    table = torch.rand(2, groups + 1, generator=g, requires_grad=True)
    weights = torch.rand(2, n, generator=g)
    loss = (group_gather(table, layer.slot) * weights).sum() + (group_sum(values, layer.slot, groups + 1) ** 2).sum()
    loss.backward()
    ref_values, ref_table = values.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    ref = (ref_table.index_select(1, layer.slot) * weights).sum() \
        + (torch.zeros(2, groups + 1).index_add(1, layer.slot, ref_values) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(values.grad, ref_values.grad)
    torch.testing.assert_close(table.grad, ref_table.grad)
    scale = torch.rand(1, groups + 1, generator=g)
    expected = (group_sum(weights, layer.slot, groups + 1).index_select(1, layer.slot) - weights) * scale[:, layer.slot]
    torch.testing.assert_close(scaled_others_sum(weights, scale, layer.slot), expected)


def test_without_a_compiler_the_torch_ops_run(tmp_path):
    """No C++ compiler: one logged warning, and group sums and gathers still work (torch's index ops)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import logging, torch
        from agenttensor import _group_kernels
        from agenttensor.transmission import group_gather, group_sum
        records = []
        logging.getLogger("agenttensor.native").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r)})())
        slot = torch.tensor([0, 1, 1])
        assert torch.equal(group_sum(torch.ones(1, 3), slot, 2), torch.tensor([[1.0, 2.0]]))
        assert torch.equal(group_gather(torch.tensor([[5.0, 7.0]]), slot), torch.tensor([[5.0, 7.0, 7.0]]))
        assert not _group_kernels.enabled() and len(records) == 1 and "unavailable" in records[0].getMessage()
        print("ok")
    """)
    env = {**os.environ, "AGENTTENSOR_CACHE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_layered_force_kernel_equals_torch_ops_in_value_and_gradients(monkeypatch):
    """`layered_force` (one native pass each way on CPU) against the same function on torch ops: forward values
    bit for bit (no contraction, same order), and the derivatives of σ, the tables, a presence, the factors and
    the own contributions (others-sums through the probes, `others_sum_probes`); a batch of 3 with broadcast rows, a
    layer without presence, one layer with int32 slots and one with int64, and a neighbourhood-like layer (sorted runs
    longer than the kernel's tile: most tiles read their group's value once instead of gathering it)."""
    from agenttensor.transmission import ForceTerm, layered_force, others_sum_probes

    g = torch.Generator().manual_seed(5)
    B, n = 3, 300_000
    households = torch.sort(torch.randint(0, 90_000, (n,), generator=g)).values.to(torch.int32)  # int32 and int64 slots
    schools = torch.where(torch.rand(n, generator=g) < 0.7, 400, torch.randint(0, 400, (n,), generator=g))
    neighbourhoods = torch.sort(torch.randint(0, 12, (n,), generator=g)).values.to(torch.int32)
    assert _group_kernels.contiguous_groups(neighbourhoods)
    leaves = {
        "sigma": torch.rand(n, generator=g), "t_h": torch.rand(1, 90_000, generator=g), "t_n": torch.rand(B, 12, generator=g),
        "t_s": torch.rand(B, 401, generator=g), "presence": torch.rand(B, n, generator=g),
        "own_h": torch.rand(B, n, generator=g), "own_s": torch.rand(B, n, generator=g),
        "factor": torch.rand(1, n, generator=g), "factor_all": torch.rand(B, n, generator=g)}
    scale_h, scale_s = torch.rand(1, 90_000, generator=g), torch.rand(B, 401, generator=g)
    weights = torch.rand(B, n, generator=g)

    def run() -> tuple[torch.Tensor, dict]:
        x = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        own_h, own_s = others_sum_probes(x["own_h"], households, scale_h), others_sum_probes(x["own_s"], schools, scale_s)
        force = layered_force(x["sigma"], [
            ForceTerm(x["t_h"], households, None, None, x["factor_all"], own_h.member, own_h.group),
            ForceTerm(x["t_s"], schools, x["presence"], x["factor"], x["factor_all"], own_s.member, own_s.group),
            ForceTerm(x["t_n"], neighbourhoods, x["presence"], None, None, None, None)])
        (force * weights).sum().backward()
        return force.detach(), {k: v.grad for k, v in x.items()}

    calls = []
    kernel = _group_kernels.layered_force
    monkeypatch.setattr(_group_kernels, "layered_force", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    fast, fast_grads = run()
    assert len(calls) == 2  # forward and backward ran natively
    monkeypatch.setattr(_group_kernels, "layered_force", lambda *a, **k: None)
    ref, ref_grads = run()
    assert torch.equal(fast, ref)
    for name in leaves:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-ops"])
def test_layered_force_keeps_a_table_only_where_its_backward_reads_it(native, monkeypatch):
    """A table whose values no derivative reads (σ, the term's presence and factors constant) is not kept by the
    force's node (`table_kept`): written over in place once the force is made, it leaves the gradients as they were
    (the table's, the other term's presence's). Where σ asks for a derivative the table is kept: writing over it then
    makes autograd refuse the backward."""
    from agenttensor.transmission import ForceTerm, layered_force, table_kept

    if not native:
        monkeypatch.setattr(_group_kernels, "layered_force", lambda *a, **k: None)
    g = torch.Generator().manual_seed(3)
    B, n = 2, 5_000
    households = torch.sort(torch.randint(0, 2_000, (n,), generator=g)).values.to(torch.int32)
    workplaces = torch.randint(0, 300, (n,), generator=g)
    sigma, presence = torch.rand(n, generator=g), torch.rand(B, n, generator=g)
    values_h, values_w = torch.rand(B, 2_000, generator=g), torch.rand(B, 300, generator=g)
    weights = torch.rand(B, n, generator=g)

    def gradients(overwrite: bool, learn_sigma: bool = False):
        coef = torch.tensor(1.5, requires_grad=True)
        p, s = presence.clone().requires_grad_(), sigma.clone().requires_grad_(learn_sigma)
        assert table_kept(s, None, None, None) == learn_sigma and table_kept(s, p, None, None)
        table_h = coef * values_h
        force = layered_force(s, [ForceTerm(table_h, households), ForceTerm(values_w, workplaces, p)])
        if overwrite:
            with torch.no_grad():
                table_h.fill_(float("nan"))
        (force * weights).sum().backward()
        return coef.grad, p.grad, s.grad

    for got, want in zip(gradients(True), gradients(False)):
        assert (got is None and want is None) or torch.equal(got, want)
    assert gradients(False, learn_sigma=True)[2] is not None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gradients(True, learn_sigma=True)


@pytest.mark.parametrize("rows", [1, 3])  # one table for every batch element, or one per element
def test_layered_force_reads_sigma_by_group_with_the_same_numbers(rows):
    """σ marked as a table read at a byte per agent (`by_group`: e.g. susceptibility by age group) gives the force and
    every derivative of σ given as its [N] array, bit for bit; the kernels then read 1 byte per agent for σ."""
    from agenttensor.transmission import ForceTerm, layered_force

    g = torch.Generator().manual_seed(8)
    B, n, groups = 3, 200_003, 11
    age = torch.randint(0, groups, (n,), generator=g).to(torch.uint8)
    table = torch.rand(rows, groups, generator=g)
    households = torch.sort(torch.randint(0, 70_000, (n,), generator=g)).values.to(torch.int32)
    schools = torch.where(torch.rand(n, generator=g) < 0.7, 300, torch.randint(0, 300, (n,), generator=g))
    t_h, t_s = torch.rand(1, 70_000, generator=g), torch.rand(B, 301, generator=g)
    presence, weights = torch.rand(B, n, generator=g), torch.rand(B, n, generator=g)

    def run(marked: bool):
        t_hh, t_ss = t_h.clone().requires_grad_(), t_s.clone().requires_grad_()
        sigma = table.index_select(1, age.long()) if rows > 1 else table[0].index_select(0, age.long())
        if marked:
            _group_kernels.by_group(sigma, table, age)
        force = layered_force(sigma, [ForceTerm(t_hh, households, None, None, None, None, None),
                                      ForceTerm(t_ss, schools, presence, None, None, None, None)])
        (force * weights).sum().backward()
        return force.detach(), t_hh.grad, t_ss.grad

    for x, y in zip(run(True), run(False)):
        assert torch.equal(x, y)
    assert _group_kernels._sigma_table(_group_kernels.by_group(torch.rand(n), table, age.long()), B, n) is None  # int64


def test_others_sum_probes_give_the_derivative_of_the_others_sum():
    """A contribution c read by the *other* members of its group (λ_i = σ_i s[g] Σ_{j ∈ g, j ≠ i} c_j, with a
    borough-like per-group sum of c besides) gets the derivative autograd computes from that explicit form, through
    `layered_force`'s probes and `others_sum_probes`; the probes are zero-valued, and a probe of the wrong width is
    refused at the boundary."""
    from agenttensor.transmission import ForceTerm, layered_force, others_sum_probes

    g = torch.Generator().manual_seed(9)
    B, n, groups = 2, 20_000, 700
    layer = GroupLayer(torch.where(torch.rand(n, generator=g) < 0.2, -1, torch.randint(0, groups, (n,), generator=g)))
    sigma, weights = torch.rand(B, n, generator=g), torch.rand(B, n, generator=g)
    scale, per_group_weight = torch.rand(1, groups + 1, generator=g), torch.rand(B, groups + 1, generator=g)
    c0 = torch.rand(B, n, generator=g)

    c = c0.clone().requires_grad_()
    probes = others_sum_probes(c, layer.slot, scale, plain=True)
    table = torch.zeros(1, groups + 1)  # the values themselves come from elsewhere: only the derivatives ride here
    force = layered_force(sigma, [ForceTerm(table, layer.slot, member_probe=probes.member, group_probe=probes.group)])
    ((force * weights).sum() + ((table + probes.plain) * per_group_weight).sum()).backward()

    ref_c = c0.clone().requires_grad_()
    others = layer.others_sum(ref_c) * scale[:, layer.slot]
    sums = group_sum(ref_c, layer.slot, groups + 1)
    ((sigma * others * weights).sum() + (sums * per_group_weight).sum()).backward()
    assert all(float(p.detach().abs().max()) == 0 for p in probes)
    torch.testing.assert_close(c.grad, ref_c.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="group_probe"):
        layered_force(sigma, [ForceTerm(table, layer.slot, member_probe=probes.member, group_probe=probes.group[:, :5])])


def test_a_constant_last_slot_gives_the_same_parameter_gradients_without_the_non_members_sum():
    """`ForceTerm.last_slot_constant`: a layer most agents are not members of (school-like), whose table's non-member
    slot is a constant (the zero of (coef · per-slot) · sums with per-slot 0 there, as the covid model's tables): the
    derivatives of coef, of the presence and of σ are the same bits as without the declaration; the native backward
    then leaves the table's last-slot derivative 0 instead of summing the non-members' weights."""
    from agenttensor.transmission import ForceTerm, layered_force

    g = torch.Generator().manual_seed(5)
    B, n, groups = 2, 300_001, 400  # two pieces
    slot = torch.where(torch.rand(n, generator=g) < 0.7, groups, torch.randint(0, groups, (n,), generator=g))
    layer = GroupLayer(torch.where(slot == groups, -1, slot))
    per_slot = torch.cat([torch.rand(groups, generator=g), torch.zeros(1)])  # 0 at the non-member slot
    sums = torch.rand(B, groups + 1, generator=g)
    sigma0, presence0 = torch.rand(1, n, generator=g), torch.rand(B, n, generator=g)
    weights = torch.randn(B, n, generator=g)

    def gradients(constant: bool) -> tuple[torch.Tensor, ...]:
        coef = torch.tensor(0.7, requires_grad=True)
        sigma, presence = sigma0.clone().requires_grad_(), presence0.clone().requires_grad_()
        table = (coef * per_slot) * sums
        table.retain_grad()
        force = layered_force(sigma, [ForceTerm(table, layer.slot, presence, last_slot_constant=constant)])
        (force * weights).sum().backward()
        return coef.grad, sigma.grad, presence.grad, table.grad

    flagged, plain = gradients(True), gradients(False)
    for a, b in zip(flagged[:3], plain[:3]):
        assert torch.equal(a, b)
    assert torch.equal(flagged[3][:, :-1], plain[3][:, :-1]) and plain[3][:, -1].abs().min() > 0
    if _group_kernels.enabled():
        assert torch.equal(flagged[3][:, -1], torch.zeros(B))  # not summed


def test_layered_force_backward_sums_groups_in_its_pass_whatever_the_threads():
    """The backward's group sums of the weights (the tables' derivatives) are made in the same pass for contiguous
    groups of many agents (neighbourhood-like) and for layers most agents are not members of (school-like): those of
    `segment_sum` up to rounding, the same bits with 1 and 2 threads and for a row run alone as in its batch. Other
    layers (household-like short runs, scattered groups of everyone) are left to `segment_sum` (None)."""
    g = torch.Generator().manual_seed(11)
    B, n = 3, 300_001  # two pieces; the cut moves to a neighbourhood boundary
    neighbourhoods = torch.sort(torch.randint(0, 300, (n,), generator=g)).values.to(torch.int32)
    households = torch.sort(torch.randint(0, 100_000, (n,), generator=g)).values.to(torch.int32)
    schools = torch.where(torch.rand(n, generator=g) < 0.7, 400, torch.randint(0, 400, (n,), generator=g))
    everyone = torch.randint(0, 5000, (n,), generator=g).to(torch.int32)
    slots = [neighbourhoods, households, schools, everyone]
    layers = [(torch.rand(1, int(s.max()) + 1, generator=g), s, torch.rand(B, n, generator=g) if k % 2 else None,
               None, None) for k, s in enumerate(slots)]
    sigma, grad = torch.rand(1, n, generator=g), torch.randn(B, n, generator=g)
    want = ((False, False, False),) * 4
    threads = torch.get_num_threads()
    try:
        runs = []
        for k in (1, 2):
            torch.set_num_threads(k)
            runs.append(_group_kernels.layered_force(sigma, layers, grad, False, want, (True,) * 4))
        row = [(t, s, None if p is None else p[1:2].contiguous(), None, None) for t, s, p, _, _ in layers]
        alone = _group_kernels.layered_force(sigma, row, grad[1:2].contiguous(), False, want, (True,) * 4)
    finally:
        torch.set_num_threads(threads)
    (weights, _, _, sums), (weights_2, _, _, sums_2) = runs
    assert sums[1] is None and sums[3] is None
    for k in (0, 2):
        assert torch.equal(weights[k], weights_2[k]) and torch.equal(sums[k], sums_2[k])
        assert torch.equal(alone[3][k], sums[k][1:2])
        expected = torch.zeros(B, layers[k][0].shape[-1], dtype=torch.float64).index_add_(1, slots[k],
                                                                                           weights[k].double())
        torch.testing.assert_close(sums[k].double(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("household_index", [torch.int32, torch.int64])  # the vectorised runs / the scalar chain
def test_layered_force_backward_hands_over_unwritten_weights_with_their_group_sums(household_index):
    """``unwritten`` layers' weights are not written (None: `WeightParts.dense` gives them, bit for bit) and their
    group sums come from the pass for every kind of layer: household-like short runs (continued across tiles and
    threads' pieces) with `segment_sum`'s bits, the others those of the written weights' pass or, for scattered
    groups of everyone (not summed in the pass otherwise), `segment_sum`'s, up to rounding; the same bits with 1 and
    2 threads and for a row run alone."""
    from agenttensor.transmission import WeightParts

    g = torch.Generator().manual_seed(12)
    B, n = 3, 300_001  # two pieces; the cut moves to a neighbourhood boundary
    neighbourhoods = torch.sort(torch.randint(0, 300, (n,), generator=g)).values.to(torch.int32)
    households = torch.sort(torch.randint(0, 100_000, (n,), generator=g)).values.to(household_index)
    schools = torch.where(torch.rand(n, generator=g) < 0.7, 400, torch.randint(0, 400, (n,), generator=g))
    everyone = torch.randint(0, 5000, (n,), generator=g).to(torch.int32)
    slots = [neighbourhoods, households, schools, everyone]
    rows = lambda k: torch.rand(k, n, generator=g)  # noqa: E731
    layers = [(torch.rand(1, int(slots[0].max()) + 1, generator=g), slots[0], None, rows(1), None),
              (torch.rand(1, int(slots[1].max()) + 1, generator=g), slots[1], None, None, None),
              (torch.rand(1, int(slots[2].max()) + 1, generator=g), slots[2], rows(B), None, None),
              (torch.rand(1, int(slots[3].max()) + 1, generator=g), slots[3], rows(1), rows(B), rows(1))]
    sigma, grad = torch.rand(1, n, generator=g), torch.randn(B, n, generator=g)
    want = ((False, False, False),) * 4
    written = _group_kernels.layered_force(sigma, layers, grad, False, want, (True,) * 4)
    threads = torch.get_num_threads()
    try:
        runs = []
        for k in (1, 2):
            torch.set_num_threads(k)
            runs.append(_group_kernels.layered_force(sigma, layers, grad, False, want, (True,) * 4,
                                                     unwritten=(True,) * 4))
        row = [(t, s, *(None if x is None else x[-1:].contiguous() for x in rest)) for t, s, *rest in layers]
        alone = _group_kernels.layered_force(sigma, row, grad[-1:].contiguous(), False, want, (True,) * 4,
                                             unwritten=(True,) * 4)
    finally:
        torch.set_num_threads(threads)
    (weights, _, _, sums), (_, _, _, sums_2) = runs
    assert all(w is None for w in weights) and all(s is not None for s in sums)
    for k in range(4):
        assert torch.equal(WeightParts(grad, sigma, *layers[k][2:]).dense(), written[0][k])
        assert torch.equal(sums[k], sums_2[k]) and torch.equal(alone[3][k], sums[k][-1:])
    # summed in the pass either way: each neighbourhood by one piece (the same bits), the schools per piece (the
    # pieces' cut moves to a household boundary too: the same up to rounding)
    assert torch.equal(sums[0], written[3][0])
    torch.testing.assert_close(sums[2], written[3][2], rtol=1e-5, atol=1e-4)
    assert written[3][1] is None and torch.equal(sums[1], _group_kernels.segment_sum(written[0][1], households,
                                                                                     layers[1][0].shape[-1]))
    expected = torch.zeros(B, layers[3][0].shape[-1], dtype=torch.float64).index_add_(1, everyone,
                                                                                        written[0][3].double())
    torch.testing.assert_close(sums[3].double(), expected, rtol=1e-5, atol=1e-3)


def test_vector_flags_follow_the_cpu_and_tune_for_fast_gathers_only_where_the_compiler_knows_the_target():
    """AVX-512 builds tune for Sapphire Rapids (vector gathers instead of scalar loads) only on CPUs with its fast
    gathers (AVX512-FP16) and a compiler that accepts the target; AVX2 and older CPUs keep their flags."""
    from agenttensor import native

    avx512 = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]
    assert native.vector_flags(["sse2"]) == ()
    assert native.vector_flags(["avx2", "fma"]) == ("-mavx2", "-mfma")
    plain = native.vector_flags(avx512)
    assert "-mavx512f" in plain and not any(f.startswith("-mtune") for f in plain)
    tuned = native.vector_flags(avx512 + ["avx512_fp16"])
    assert tuned[:len(plain)] == plain
    assert tuned[len(plain):] == (("-mtune=sapphirerapids",) if native._compiler_accepts("-mtune=sapphirerapids")
                                  else ())
    if shutil.which("c++") or shutil.which("g++"):
        assert not native._compiler_accepts("-mtune=no-such-processor")


def test_vector_flags_mark_amd_avx512_builds_for_the_kernels_zen_choices():
    """On AMD CPUs with AVX-512 (Zen 4, 5) the builds define AGENTTENSOR_ZEN (the kernels' Zen-tuned tiles and loads in
    place of vector gathers) and do not tune for Sapphire Rapids; AMD's AVX2 CPUs and Intel's keep their flags."""
    from agenttensor import native

    avx512 = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]
    zen = native.vector_flags(avx512, vendor="AuthenticAMD")
    assert zen == (*native.vector_flags(avx512), "-DAGENTTENSOR_ZEN")
    assert native.vector_flags(avx512 + ["avx512_fp16"], vendor="AuthenticAMD") == zen
    assert "-DAGENTTENSOR_ZEN" not in native.vector_flags(avx512, vendor="GenuineIntel")
    assert native.vector_flags(["avx2", "fma"], vendor="AuthenticAMD") == ("-mavx2", "-mfma")


def test_layered_force_backward_keeps_every_members_list_alive_while_its_kernel_runs(monkeypatch):
    """The backward's structs point into each few-member layer's list of members and of their slots, which the
    `_members` and `_member_slots` memos hold; a later layer's miss may clear a memo (it holds `limit` entries) in the
    same call, and an earlier layer's lists must still be alive when the kernel reads them (they were not: a use after
    free that made one group sum in 4 of a test run's first gradient differ, depending on how full the memo was).
    Here every miss clears the memos; each list the kernel reads is alive at the call, and the sums are
    `segment_sum`'s."""
    import gc
    import weakref

    from agenttensor._derived import Derived

    lists = []

    class Recorded(Derived):  # every member slots list it makes, recorded
        def get(self, tensor, compute, key=None):
            return super().get(tensor, lambda: (lambda m: lists.append(weakref.ref(m)) or m)(compute()), key)

    monkeypatch.setattr(_group_kernels, "_members", Derived(limit=1))
    monkeypatch.setattr(_group_kernels, "_member_slots", Recorded(limit=1))
    members_of = _group_kernels._members_of
    monkeypatch.setattr(_group_kernels, "_members_of",
                        lambda slot, groups: (lambda m: lists.append(weakref.ref(m)) or m)(members_of(slot, groups)))
    library = _group_kernels._library()
    alive_at_call = []

    class Checked:  # the library, with the force kernel's call checking the lists first
        def __getattr__(self, name):
            return getattr(library, name)

        def agenttensor_layered_force(self, *args):
            gc.collect()
            alive_at_call.append([ref() is not None for ref in lists])
            return library.agenttensor_layered_force(*args)

    monkeypatch.setattr(_group_kernels, "_library", lambda: Checked())
    g = torch.Generator().manual_seed(5)
    B, n = 2, 20_000
    schools = [torch.where(torch.rand(n, generator=g) < 0.8, S, torch.randint(0, S, (n,), generator=g)).to(torch.int32)
               for S in (40, 60)]  # two school-like layers: most agents in the last slot
    layers = [(torch.rand(1, S + 1, generator=g), s, None, None, None) for S, s in zip((40, 60), schools)]
    sigma, grad = torch.rand(B, n, generator=g), torch.randn(B, n, generator=g)
    weights, _, _, sums = _group_kernels.layered_force(sigma, layers, grad, False, ((False,) * 3,) * 2, (True, True))
    assert len(lists) == 4 and alive_at_call == [[True] * 4]
    for w, s, (table, slot, *_) in zip(weights, sums, layers):
        torch.testing.assert_close(s, _group_kernels.segment_sum(w, slot, table.shape[-1]), rtol=1e-5, atol=1e-4)

"""agenttensor.select: index pairs of the agents that satisfy a test, native kernel vs torch.nonzero."""

from __future__ import annotations

import pytest
import torch

from agenttensor import select


def _same(pairs, expected) -> bool:
    return all(x.dtype == torch.int64 and torch.equal(x, y) for x, y in zip(pairs, expected, strict=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 300_001), (3, 70_000), (2, 63), (1, 1)])
def test_pairs_equal_torch_nonzero(threads, shape):
    """uint8 and float32 masks, one or two of them, int16 equality and packed bits (one pass: each chunk's hits into a
    list of its own, no hit and every agent included); chunked counts with 2 threads (≥ 2^16 agents)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(shape[1])
        a = (torch.rand(shape, generator=g) < 0.01).to(torch.uint8)
        b = (torch.rand(shape, generator=g) < 0.02).to(torch.uint8)
        stage_end = torch.randint(-1, 30, shape, generator=g, dtype=torch.int16)
        assert _same(select.nonzero(a), a.nonzero(as_tuple=True))
        assert _same(select.nonzero(a, b), torch.logical_or(a, b).nonzero(as_tuple=True))
        assert _same(select.nonzero(a.float(), b.float()), torch.logical_or(a, b).nonzero(as_tuple=True))
        assert _same(select.equal(stage_end, 7), (stage_end == 7).nonzero(as_tuple=True))
        assert _same(select.equal(stage_end, -1), (stage_end == -1).nonzero(as_tuple=True))
        assert _same(select.equal(stage_end, 999), (stage_end == 999).nonzero(as_tuple=True))  # none
        assert _same(select.equal(stage_end.clamp_min(0) * 0, 0), torch.ones_like(a).nonzero(as_tuple=True))  # all
        assert select.count(a) == int(torch.count_nonzero(a)) == select.count(a.float())
        assert select.count(torch.ones(shape, dtype=torch.uint8)) == a.numel()
        flags = a | b << 1 | (torch.rand(shape, generator=g) < 0.5).to(torch.uint8) << 2  # packed memberships
        for bits in (0b011, 0b100, 0b001):
            assert _same(select.nonzero_bits(flags, bits), (flags & bits).nonzero(as_tuple=True))
        assert _same(select.nonzero_bits(flags, 0b011), torch.logical_or(a, b).nonzero(as_tuple=True))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("share", [0.001, 0.01, 0.3])
def test_sparse_selections_give_the_same_pairs_by_lists_or_by_counting(share, monkeypatch):
    """`equal` and `nonzero_bits` pick, from a sample of the entries, one pass into per-chunk lists (few hits) or
    counting and filling (many): each way gives torch's pairs, across rows and both threads' chunks."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        stage_end = torch.where(torch.rand(3, 90_001, generator=g) < share, 7, -1).to(torch.int16)
        flags = (torch.rand(3, 90_001, generator=g) < share).to(torch.uint8) * 0b110
        expected = ((stage_end == 7).nonzero(as_tuple=True), (flags & 0b010).nonzero(as_tuple=True))
        for dense_share in (2.0, -1.0, select._DENSE_SHARE):  # lists always, counting always, the sample's choice
            monkeypatch.setattr(select, "_DENSE_SHARE", dense_share)
            assert _same(select.equal(stage_end, 7), expected[0])
            assert _same(select.nonzero_bits(flags, 0b010), expected[1])
    finally:
        torch.set_num_threads(old)


def test_float_masks_count_any_nonzero_value():
    a = torch.tensor([[0.0, -0.0, 0.5, float("nan"), 1.0]])
    assert _same(select.nonzero(a), a.nonzero(as_tuple=True))  # −0 is zero; NaN is not
    assert select.count(a) == 3


def test_where_the_kernel_does_not_apply_torch_answers(monkeypatch):
    x = torch.tensor([[0, 3, 0], [1, 0, 2]], dtype=torch.int64)
    assert _same(select.nonzero(x), x.nonzero(as_tuple=True))
    assert _same(select.nonzero(x[:, ::2].to(torch.uint8)), x[:, ::2].nonzero(as_tuple=True))  # not contiguous
    assert _same(select.equal(x, 2), (x == 2).nonzero(as_tuple=True))
    x16 = x.to(torch.int16)
    assert _same(select.equal(x16, 2**20), (x16 == 2**20).nonzero(as_tuple=True))  # outside int16: torch's answer
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "0")
    m = x.to(torch.uint8)
    assert _same(select.nonzero(m, m), m.nonzero(as_tuple=True)) and select.count(m) == 3


@pytest.mark.parametrize("rows", [1, 3])
def test_values_at_and_put_at_are_two_index_gathers_and_puts(rows):
    """values_at / put_at_ by flat positions: the numbers and the derivative of x[b, i] and index_put_((b, i), ...),
    also for a non-contiguous x (put_at_ then takes the two-index path, still in place)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(rows, 50, generator=g)
    b, i = select.nonzero((torch.rand(rows, 50, generator=g) < 0.3).to(torch.uint8))
    source = x.clone().requires_grad_()
    picked = select.values_at(source, b, i)
    assert torch.equal(picked, x[b, i])
    weights = torch.rand(b.numel(), generator=g)
    (picked * weights).sum().backward()
    assert torch.equal(source.grad, torch.zeros_like(x).index_put_((b, i), weights))
    values = torch.rand(b.numel(), generator=g)
    for accumulate in (False, True):
        for target in (x.clone(), x.t().contiguous().t()):  # contiguous and not
            expect = target.clone().index_put_((b, i), values, accumulate=accumulate)
            out = select.put_at_(target, b, i, values, accumulate=accumulate)
            assert out is target and torch.equal(target, expect)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(1, 300_001), (3, 70_000), (2, 50)])
def test_range_counts_are_the_torch_range_sums(dtype, shape, threads):
    """Per-range counts of 0/1 fields and of (field, mask) products ([N], [1, N] and [B, N] masks), an empty range
    included: the values of torch's sums per range, as float32 [K, B, G]; a float field with a value other than 0 or 1
    (or a range list that does not tile the agents) gives None."""
    from agenttensor.transmission import range_sums

    torch.set_num_threads(threads)
    B, N = shape
    g = torch.Generator().manual_seed(6)
    cuts = sorted(torch.randint(0, N, (3,), generator=g).tolist())
    ranges = [(0, cuts[0]), (cuts[0], cuts[0]), (cuts[0], cuts[1]), (cuts[1], cuts[2]), (cuts[2], N)]
    fields = [(torch.rand(B, N, generator=g) < p).to(dtype) for p in (0.5, 0.01, 0.9)]
    masks = [(torch.rand(N, generator=g) < 0.7).to(dtype), (torch.rand(1, N, generator=g) < 0.7).to(dtype),
             (torch.rand(B, N, generator=g) < 0.7).to(dtype)]
    asked = [fields[0], (fields[1], masks[0]), (fields[2], masks[1]), (fields[0], masks[2]), fields[2]]
    expected = torch.stack([range_sums(x if isinstance(x, torch.Tensor) else x[0] * x[1], ranges, torch.float32)
                            for x in asked])
    got = select.range_counts(asked, ranges)
    assert got is not None and got.dtype == torch.float32 and torch.equal(got, expected)
    assert got[:, :, 1].eq(0).all() and got.sum() > 0
    if dtype == torch.float32:
        fractional = fields[0].clone()
        fractional[-1, -1] = 0.5
        assert select.range_counts([fields[1], fractional], ranges) is None
    assert select.range_counts(asked, ranges[:-1]) is None  # (does not reach N)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dense_use", [False, True], ids=["reads only", "and a dense use"])
def test_reads_passed_on_give_the_reads_derivatives(rows, dense_use, monkeypatch):
    """A tensor read at a few agents a day and passed on (`read_and_pass_on`, a week of reads): the values of
    `values_at` and the derivative of the same reads through it, also where a passed-on tensor is used densely too (its
    gradient buffer is then not the node's own: copied, not written into); with reads only, one [B, N] of zeros for
    the whole chain."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(rows, 40, generator=g)
    days = [select.nonzero((torch.rand(rows, 40, generator=g) < 0.25).to(torch.uint8)) for _ in range(5)]
    weights = [torch.rand(b.numel(), generator=g) for b, _ in days]
    dense_weight = torch.rand(rows, 40, generator=g)

    def derivative(pass_on: bool):
        source = logits.clone().requires_grad_()
        x, loss = torch.sigmoid(source), 0
        for k, ((b, i), w) in enumerate(zip(days, weights)):
            x, read = select.read_and_pass_on(x, b, i) if pass_on else (x, select.values_at(x, b, i))
            assert torch.equal(read, torch.sigmoid(logits)[b, i])
            loss = loss + (read * w).sum() + ((x * dense_weight).sum() if dense_use and k == 2 else 0)
        loss.backward()
        return source.grad

    made = []  # the [B, N] buffers the chain made: zero-filled or copied
    real_zeros, real_clone = torch.Tensor.new_zeros, torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "new_zeros", lambda self, *a, **k: made.append("zeros") or real_zeros(self, *a, **k))
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: made.append("copy") or real_clone(self, *a, **k))
    got = derivative(pass_on=True)
    monkeypatch.undo()
    assert torch.allclose(got, derivative(pass_on=False), rtol=1e-6, atol=1e-7) and bool(got.ne(0).any())
    # (the first copy is the test's own source; with a dense use, autograd may add that use's derivative into the
    # node's buffer, which stays the node's, or the buffer into the other, which is then copied)
    assert made[:2] == ["copy", "zeros"] and made[2:] in ([], ["copy"] if dense_use else []), made


@pytest.mark.parametrize("rows,factor_rows", [(1, 1), (3, 1), (3, 3), (1, 3)])
@pytest.mark.parametrize("dense_use", [False, True], ids=["products only", "and a dense use"])
def test_products_passed_on_give_the_products_derivatives(rows, factor_rows, dense_use):
    """A tensor scaled by a constant factor each day and passed on (`scale_and_pass_on`, a week of products whose values
    are kept): the product's values as given, the derivative of x · factor's through the chain, bit for bit (each day's
    addition in the order autograd adds the days' derivatives), the buffer written in place from the second node on
    where nobody else holds it; shapes that do not match x · factor's are an error; without autograd the values
    given."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(rows, 50, generator=g)
    factor = (torch.rand(factor_rows, 50, generator=g) < 0.7).float()
    weights = [torch.rand(rows, 50, generator=g) for _ in range(5)]
    dense_weight = torch.rand(rows, 50, generator=g)

    def derivative(pass_on: bool):
        source = logits.clone().requires_grad_()
        x, loss = torch.sigmoid(source), 0
        kept = (x.detach() * factor).clone()
        for k, w in enumerate(weights):
            x, product = select.scale_and_pass_on(x, factor, kept) if pass_on else (x, x * factor)
            assert torch.equal(product, torch.sigmoid(logits) * factor)
            loss = loss + (product * w).sum() + ((x * dense_weight).sum() if dense_use and k == 2 else 0)
        loss.backward()
        return source.grad

    written = []
    real = select._ScaleAndPassOn.backward

    def spy(ctx, passed, product):
        written.append(select.is_exclusive(passed))
        return real(ctx, passed, product)

    select._ScaleAndPassOn.backward = staticmethod(spy)
    try:
        got = derivative(pass_on=True)
    finally:
        select._ScaleAndPassOn.backward = staticmethod(real)
    assert torch.equal(got, derivative(pass_on=False)) and bool(got.ne(0).any())
    if factor_rows <= rows:  # (x broadcast along the rows: each day's derivative is summed into a fresh buffer)
        assert written[0] is False and (all(written[1:]) or dense_use) and sum(written) >= 3, written
    x = torch.rand(rows, 50, generator=g)
    with pytest.raises(ValueError, match="not x · factor's shape"):
        select.scale_and_pass_on(x.requires_grad_(), factor, torch.zeros(50))
    kept = torch.full(torch.broadcast_shapes((rows, 50), factor.shape), 7.0)  # without autograd: the values given
    assert select.scale_and_pass_on(x.detach(), factor, kept)[1] is kept


def test_zero_one_bytes_are_the_memberships_as_bytes_or_none():
    """`select.zero_one_bytes` (checkpointed segments compact their 0/1 inputs with it): x.to(uint8) where every value
    is 0 (-0.0 too) or 1, else None (a fraction, a NaN, a 2), natively and through the torch ops, at any size."""
    g = torch.Generator().manual_seed(3)
    for n in (7, 70_001, 300_000):
        x = (torch.rand(2, n, generator=g) < 0.3).float()
        x[0, n // 2] = -0.0
        out = select.zero_one_bytes(x)
        assert out is not None and out.dtype == torch.uint8 and torch.equal(out, x.to(torch.uint8))
        assert torch.equal(select.zero_one_bytes(x.double()), x.to(torch.uint8))  # the torch ops
        for bad in (0.5, float("nan"), 2.0):
            y = x.clone()
            y[1, n - 1] = bad
            assert select.zero_one_bytes(y) is None and select.zero_one_bytes(y.double()) is None, bad


@pytest.mark.parametrize("threads", [1, 2])
def test_fields_read_and_written_at_pairs_in_one_pass_are_torchs_numbers(threads):
    """`values_at_fields` and `put_at_fields_` (one native pass for several fields at the same pairs) give
    `values_at`'s and `put_at_`'s numbers, with and without accumulation, across rows and threads' halves; repeated
    or unsorted pairs and bad indices take torch's ops (sums of repeats, torch's errors), and versions move."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(11)
        fields = [torch.randn(3, 40_001, generator=g) for _ in range(4)]
        b, i = (torch.rand(3, 40_001, generator=g) < 0.3).nonzero(as_tuple=True)  # row-major, no repeats
        values = [torch.randn(b.numel(), generator=g) for _ in fields]
        read = select.values_at_fields(fields, b, i)
        assert all(torch.equal(r, select.values_at(x, b, i)) for r, x in zip(read, fields, strict=True))
        for accumulate in (False, True):
            here, there = [x.clone() for x in fields], [x.clone() for x in fields]
            versions = [x._version for x in here]
            select.put_at_fields_(here, b, i, values, accumulate=accumulate)
            for x, v in zip(there, values):
                select.put_at_(x, b, i, v, accumulate=accumulate)
            assert all(torch.equal(x, y) for x, y in zip(here, there)) and all(
                x._version > v for x, v in zip(here, versions))
        # repeats (an agent twice): summed as torch sums them, by torch's ops
        twice_b, twice_i = torch.cat([b[:5], b[:5]]), torch.cat([i[:5], i[:5]])
        ones = [torch.ones(10) for _ in fields]
        here = [x.clone() for x in fields]
        select.put_at_fields_(here, twice_b, twice_i, ones, accumulate=True)
        reference = [x.clone().index_put_((twice_b, twice_i), v, accumulate=True) for x, v in zip(fields, ones)]
        assert all(torch.equal(x, y) for x, y in zip(here, reference))
        assert not torch.equal(here[0], fields[0])
        with pytest.raises(IndexError):
            select.values_at_fields(fields, b[:3], torch.tensor([0, 5, 200_000]))
        # a field that carries a derivative under autograd: per-field reads, the derivative kept
        leaf = fields[0].clone().requires_grad_()
        (picked,) = select.values_at_fields([leaf], b, i)
        picked.sum().backward()
        assert float(leaf.grad.sum()) == b.numel()
    finally:
        torch.set_num_threads(old)

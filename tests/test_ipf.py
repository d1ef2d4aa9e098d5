"""Batched N-dimensional IPF and integerisation, cross-checked against the independent `ipfn` package."""

import numpy as np
import pytest
import torch

from agenttensor.errors import ConfigError, InputError
from agenttensor.ipf import integerise, ipf

ipfn = pytest.importorskip("ipfn.ipfn")


def _ipfn(seed, aggregates, dims):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return ipfn.ipfn(seed.copy(), aggregates, dims, convergence_rate=1e-12, max_iteration=5000).iteration()


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 2), (2, 3, 2, 3)])
def test_matches_ipfn_one_dimensional_marginals(shape):
    rng = np.random.default_rng(sum(shape))
    seed = rng.random(shape) + 0.05
    total = 100.0
    margs = []
    for axis, size in enumerate(shape):
        m = rng.random(size) + 0.1
        margs.append(m / m.sum() * total)
    expected = _ipfn(seed, margs, [[a] for a in range(len(shape))])
    fit = ipf(torch.from_numpy(seed)[None], [((a,), torch.from_numpy(m)[None]) for a, m in enumerate(margs)], tol=1e-12,
              max_iter=5000)
    assert fit.converged
    np.testing.assert_allclose(fit.table[0].numpy(), expected, rtol=1e-6, atol=1e-8)


def test_matches_ipfn_with_two_dimensional_marginal():
    rng = np.random.default_rng(7)
    seed = rng.random((3, 4, 2)) + 0.05
    ab = rng.random((3, 4))
    ab = ab / ab.sum() * 60
    c = np.array([25.0, 35.0])
    expected = _ipfn(seed, [ab, c], [[0, 1], [2]])
    fit = ipf(torch.from_numpy(seed)[None], [((0, 1), torch.from_numpy(ab)[None]), ((2,), torch.from_numpy(c)[None])],
              tol=1e-12)
    np.testing.assert_allclose(fit.table[0].numpy(), expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.table[0].sum(2).numpy(), ab, rtol=1e-9)


def test_batch_rows_are_independent_fits():
    rng = np.random.default_rng(3)
    seeds = rng.random((5, 4, 3)) + 0.01
    rows = rng.integers(1, 50, (5, 4)).astype(float)
    cols = rng.random((5, 3))
    cols = cols / cols.sum(1, keepdims=True) * rows.sum(1, keepdims=True)
    batched = ipf(torch.from_numpy(seeds), [((0,), torch.from_numpy(rows)), ((1,), torch.from_numpy(cols))], tol=1e-12)
    for i in range(5):
        single = ipf(torch.from_numpy(seeds[i:i + 1]), [((0,), torch.from_numpy(rows[i:i + 1])),
                                                        ((1,), torch.from_numpy(cols[i:i + 1]))], tol=1e-12)
        torch.testing.assert_close(batched.table[i], single.table[0])


def test_integerise_keeps_totals_and_repairs_marginals():
    rng = np.random.default_rng(11)
    b, shape = 20, (6, 2, 5)
    seed = torch.from_numpy(rng.random((b, *shape)) + 0.01)
    margs = [((a,), torch.from_numpy(rng.multinomial(137, np.ones(n) / n, size=b).astype(float))) for a, n in enumerate(shape)]
    fit = ipf(seed, margs, tol=1e-12)
    counts = integerise(fit.table, generator=torch.Generator().manual_seed(0), marginals=margs)
    assert counts.dtype == torch.int64 and (counts >= 0).all()
    assert (counts.flatten(1).sum(1) == 137).all()
    for axes, target in margs:
        other = tuple(1 + a for a in range(3) if a not in axes)
        assert torch.equal(counts.sum(dim=other), target.to(torch.int64))
    # no cell moves far from the fitted value
    assert (counts - fit.table).abs().max() < 3
    # reproducible with the same generator seed, different with another
    again = integerise(fit.table, generator=torch.Generator().manual_seed(0), marginals=margs)
    assert torch.equal(counts, again)


def test_integerise_without_marginals_preserves_row_totals():
    table = torch.tensor([[0.5, 0.5, 1.0], [2.2, 0.4, 0.4]], dtype=torch.float64)
    out = integerise(table, generator=torch.Generator().manual_seed(1))
    assert out.sum(1).tolist() == [2, 3]
    assert (out >= torch.floor(table).to(torch.int64)).all()


def test_errors_are_explicit():
    seed = torch.ones(1, 3, 2)
    with pytest.raises(ConfigError, match="shape"):
        ipf(seed, [((0,), torch.ones(1, 4))])
    with pytest.raises(ConfigError, match="axes"):
        ipf(seed, [((2,), torch.ones(1, 2))])
    with pytest.raises(InputError, match="negative"):
        ipf(seed, [((0,), -torch.ones(1, 3))])
    # inconsistent marginals (totals 3 vs 10) cannot converge
    with pytest.raises(ConfigError, match="did not converge"):
        ipf(seed, [((0,), torch.ones(1, 3)), ((1,), torch.full((1, 2), 5.0))], max_iter=20, strict=True)

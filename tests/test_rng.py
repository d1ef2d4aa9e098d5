import numpy as np
import pytest
import torch

from agenttensor.rng import Randomness, agent_hash, mix32, step_key


def _mix_numpy(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> np.uint32(16))
    y = y * np.uint32(0x7FEB352D)
    y = y ^ (y >> np.uint32(15))
    y = y * np.uint32(0x846CA68B)
    return y ^ (y >> np.uint32(16))


def test_mix32_matches_uint32_reference():
    x = torch.arange(-70_000, 70_000, 7, dtype=torch.int32) * 30_011
    ours = mix32(x).numpy().view(np.uint32)
    ref = _mix_numpy(x.numpy().view(np.uint32))
    assert np.array_equal(ours, ref)


def test_in_place_kernel_equals_the_definition():
    """The eager kernel (in place, two buffers) draws the bits of bits_to_uniform(mix32(base ^ key))."""
    from agenttensor.rng import _uniform_eager, uniform_of_hash

    base = agent_hash(torch.arange(5_000, dtype=torch.int32))
    keys = torch.tensor([[7], [-123_456_789], [2**31 - 1]], dtype=torch.int32)
    assert torch.equal(_uniform_eager(base.unsqueeze(0), keys), uniform_of_hash(base.unsqueeze(0), keys))
    selected = torch.tensor([3, 4_999, 0])
    assert torch.equal(_uniform_eager(base[selected], keys[:, 0]), uniform_of_hash(base[selected], keys[:, 0]))


def test_several_streams_at_selected_agents_in_one_pass():
    """uniforms_at(streams) row k equals uniform_at(stream k) at the same (batch, agent) pairs."""
    r = Randomness.for_agents([5, 6, 9], torch.arange(2_000, dtype=torch.int32))
    b, i = torch.tensor([0, 2, 2, 1]), torch.tensor([7, 7, 1_999, 0])
    rows = r.uniforms_at(11, ("symptoms", "death", 42), b, i)
    assert rows.shape == (3, 4)
    for k, stream in enumerate(("symptoms", "death", 42)):
        assert torch.equal(rows[k], r.uniform_at(11, stream, b, i))
    assert r.uniforms_at(11, ("death",), b[:0], i[:0]).shape == (1, 0)


def test_draws_depend_only_on_key():
    ids = torch.arange(1000, dtype=torch.int32)
    r = Randomness.for_agents([5, 6], ids)
    u = r.uniform(3, "infection")
    assert u.shape == (2, 1000) and u.dtype == torch.float32
    # same seed in a different batch layout -> same numbers
    assert torch.equal(Randomness.for_agents([6], ids).uniform(3, "infection")[0], u[1])
    # a subset of agents (e.g. one borough) draws the same numbers for the same ids
    sub = ids[200:300]
    assert torch.equal(Randomness.for_agents([5], sub).uniform(3, "infection")[0], u[0, 200:300])
    # uniform_at equals the dense draw
    b = torch.tensor([0, 1, 1]); i = torch.tensor([4, 999, 0])
    assert torch.equal(r.uniform_at(3, "infection", b, i), u[b, i])
    # different step / stream / seed -> different numbers
    assert not torch.equal(r.uniform(4, "infection"), u)
    assert not torch.equal(r.uniform(3, "recovery"), u)
    assert not torch.equal(u[0], u[1])


def test_uniform_statistics():
    u = Randomness.for_agents([0], torch.arange(200_000, dtype=torch.int32)).uniform(0, "x")[0]
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.003
    assert abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 19 dof; p ~ 1e-4
    # consecutive steps are uncorrelated
    v = Randomness.for_agents([0], torch.arange(200_000, dtype=torch.int32)).uniform(1, "x")[0]
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.01


def test_step_key_distinct():
    keys = {step_key(s, t, k) for s in range(4) for t in range(50) for k in range(3)}
    assert len(keys) == 4 * 50 * 3


def test_compiled_kernel_gives_the_same_bits():
    """The opt-in torch.compile kernel (AGENTTENSOR_COMPILE=1) must draw exactly the eager numbers."""
    from agenttensor import rng

    agents = torch.arange(10_000, dtype=torch.int32) * 7919
    eager = rng.Randomness.for_agents([0, 5], agents)
    expected = eager.uniform(3, "infection"), eager.uniform_at(3, "infection", torch.tensor([1, 0]), torch.tensor([9, 4]))
    try:
        if not rng.use_compiled_kernels(True):
            pytest.skip("torch.compile is not available here")
        got = eager.uniform(3, "infection"), eager.uniform_at(3, "infection", torch.tensor([1, 0]), torch.tensor([9, 4]))
    finally:
        rng.use_compiled_kernels(False)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert rng._uniform_kernel is rng._uniform_eager

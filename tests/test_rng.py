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


def test_compiled_kernel_gives_the_same_bits(monkeypatch):
    """The opt-in torch.compile kernel (AGENTTENSOR_COMPILE=1; used where the native kernel is not, here switched off)
    must draw exactly the eager numbers; its first call checks so itself."""
    from agenttensor import rng

    agents = torch.arange(10_000, dtype=torch.int32) * 7919
    eager = rng.Randomness.for_agents([0, 5], agents)
    expected = eager.uniform(3, "infection"), eager.uniform_at(3, "infection", torch.tensor([1, 0]), torch.tensor([9, 4]))
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "0")
    monkeypatch.setenv("AGENTTENSOR_COMPILE", "1")
    calls = dict(rng.uniform_kernel.calls)
    got = eager.uniform(3, "infection"), eager.uniform_at(3, "infection", torch.tensor([1, 0]), torch.tensor([9, 4]))
    if rng.uniform_kernel.off:
        pytest.skip(f"torch.compile is not available here: {rng.uniform_kernel.off}")
    assert rng.uniform_kernel.calls["compiled"] == calls["compiled"] + 2
    assert rng.uniform_kernel.calls["differs"] == 0
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---- native kernels (agenttensor/csrc/rng_kernels.cpp) ------------------------------------------------------------

def _definition(base: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    from agenttensor.rng import uniform_of_hash

    return uniform_of_hash(base.unsqueeze(0), keys.view(-1, 1))


@pytest.fixture(params=[1, 2])
def threads(request) -> int:
    """The test once with 1 and once with 2 torch threads (the kernels' chunks of agents; restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def test_native_uniforms_are_the_definitions_bits(threads):
    """Every agent and selected pairs, for several seeds and streams, with 1 and 2 threads (chunks of 2^15 agents)."""
    from agenttensor import _rng_kernels

    base = agent_hash(torch.arange(-3, 200_000, dtype=torch.int32) * 7)
    keys = torch.tensor([7, -123_456_789, 2**31 - 1, -2**31], dtype=torch.int32)
    dense = _rng_kernels.uniform(base, keys)
    assert dense is not None and torch.equal(dense, _definition(base, keys))
    g = torch.Generator().manual_seed(0)
    b, i = torch.randint(0, 4, (50_000,), generator=g), torch.randint(0, base.numel(), (50_000,), generator=g)
    streams = torch.stack([keys, keys.flip(0)])  # [S = 2, B = 4]
    at_pairs = _rng_kernels.uniform_at(base, streams, b, i)
    assert at_pairs is not None
    for s in range(2):
        assert torch.equal(at_pairs[s], _definition(base, streams[s])[b, i])


def test_randomness_draws_the_same_numbers_with_kernels_on_and_off(monkeypatch):
    r = Randomness.for_agents([3, 4], torch.arange(70_001, dtype=torch.int32))
    b, i = torch.tensor([1, 0, 1]), torch.tensor([70_000, 5, 0])
    on = r.uniform(9, "infection"), r.uniforms_at(9, ("a", "b"), b, i), r.uniform_at(9, "a", b, i)
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "0")
    off = r.uniform(9, "infection"), r.uniforms_at(9, ("a", "b"), b, i), r.uniform_at(9, "a", b, i)
    assert all(torch.equal(x, y) for x, y in zip(on, off))
    assert on[1].shape == (2, 3) and on[2].shape == (3,)


def test_out_of_range_pairs_index_as_torch_does():
    """The kernel leaves pairs outside [0, B) × [0, N) to the torch ops: negative indices wrap, others raise."""
    from agenttensor import _rng_kernels

    r = Randomness.for_agents([3, 4], torch.arange(100, dtype=torch.int32))
    keys = torch.tensor([[1, 2]], dtype=torch.int32)
    assert _rng_kernels.uniform_at(r.agent_base, keys, torch.tensor([0, 2]), torch.tensor([0, 1])) is None
    assert _rng_kernels.uniform_at(r.agent_base, keys, torch.tensor([0]), torch.tensor([-1])) is None
    assert torch.equal(r.uniform_at(5, "x", torch.tensor([1]), torch.tensor([-1])),
                       r.uniform_at(5, "x", torch.tensor([1]), torch.tensor([99])))
    with pytest.raises(IndexError):
        r.uniform_at(5, "x", torch.tensor([0]), torch.tensor([100]))


@pytest.mark.parametrize("kind", ["hard", "float"])
def test_native_events_equal_the_torch_ops(threads, kind):
    """Hard events 1[u < p] · where (uint8) and the gradient modes' events (the mask 1[u < p] and 1[u < p] · where as
    float32), each also with 1 − p, for p of every broadcast shape, where absent or holding values other than 0/1."""
    B, N = 3, 100_003
    r = Randomness.for_agents([1, 2, 3], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(1)
    if kind == "hard":  # a 2 stays a 2, as in the product
        where = torch.randint(0, 3, (B, N), generator=g, dtype=torch.uint8)
    else:  # −0.75, 0, 0.75, 1.5
        where = torch.randint(-1, 3, (B, N), generator=g).float() * 0.75
    u = r.uniform(4, "s")
    for p in (torch.rand(B, N, generator=g), torch.rand(B, 1, generator=g), torch.rand(1, N, generator=g),
              torch.rand(N, generator=g), torch.tensor(0.3), 0.7):
        for complement in (False, True):
            happened = (u < (1 - p if complement else p)).expand(B, N)
            for w in (where, None):
                if kind == "hard":
                    events = r.hard_event(4, "s", p, w, complement)
                    expected = happened.to(torch.uint8)
                    assert events is not None and events.dtype == torch.uint8
                    assert torch.equal(events, expected if w is None else expected * w)
                else:
                    drawn = r.float_event(4, "s", p, w, complement)
                    assert drawn is not None and drawn[0].dtype == torch.bool and drawn[1].dtype == torch.float32
                    assert torch.equal(drawn[0], happened)
                    assert torch.equal(drawn[1], happened.float() if w is None else happened.float() * w)
    draw = r.hard_event if kind == "hard" else r.float_event
    assert draw(4, "s", torch.rand(B, N, dtype=torch.float64), where) is None  # not for the kernel
    assert draw(4, "s", torch.rand(2, N), where) is None  # does not broadcast to [B, N]
    other = where.float() if kind == "hard" else where.to(torch.uint8)
    assert draw(4, "s", torch.rand(B, N), other) is None  # where of the other kind's dtype


def test_native_event_move_equals_the_events_moved_by_torch_ops(threads):
    """`float_event_move`: the mask and the events e of `float_event` (where = source), source − e and target + e
    as torch's ops give them, and e's nonzero pairs in row-major order; for p of every broadcast shape, source and
    target values other than 0/1, any thread count; None where the kernel does not apply."""
    B, N = 3, 100_003
    r = Randomness.for_agents([1, 2, 3], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(2)
    source = torch.randint(-1, 3, (B, N), generator=g).float() * 0.75  # −0.75, 0, 0.75, 1.5
    target = torch.randn(B, N, generator=g)
    for p in (torch.rand(B, N, generator=g), torch.rand(B, 1, generator=g), torch.rand(N, generator=g), 0.7):
        for complement in (False, True):
            happened, events = r.float_event(4, "s", p, source, complement)
            moved = r.float_event_move(4, "s", p, source, target, complement)
            assert moved is not None
            mask, source_after, target_after, (b, i) = moved
            assert torch.equal(mask, happened) and torch.equal(source_after, source - events)
            assert torch.equal(target_after, target + events)
            expected_b, expected_i = events.nonzero(as_tuple=True)
            assert torch.equal(b, expected_b) and torch.equal(i, expected_i) and 0 < b.numel() < B * N
            # in place: the same values, written into source and target themselves (at the moved agents), versions
            # moved (the step's per-borough counts and memos see the change)
            here = (source.clone(), target.clone())
            versions = tuple(x._version for x in here)
            mask_here, *fields, pairs = r.float_event_move(4, "s", p, *here, complement, in_place=True)
            assert fields[0] is here[0] and fields[1] is here[1] and torch.equal(mask_here, happened)
            assert torch.equal(here[0], source_after) and torch.equal(here[1], target_after)
            assert torch.equal(pairs[0], b) and torch.equal(pairs[1], i)
            assert all(x._version > v for x, v in zip(here, versions))
    assert r.float_event_move(4, "s", 0.5, source, target.double()) is None  # not for the kernel
    assert r.float_event_move(4, "s", 0.5, source.to(torch.uint8), target) is None
    assert r.float_event_move(4, "s", torch.rand(2, N), source, target) is None  # p does not broadcast
    nothing = r.float_event_move(4, "s", 0.0, source, target)  # no event: no pairs
    assert nothing[3][0].numel() == 0 and torch.equal(nothing[1], source - 0 * source)


def test_torch_exp_is_torchs_exp_bit_for_bit():
    """`native.torch_exp` (what the hazard kernels call inside their passes) gives torch.exp's bits, on values
    the self-check at load did not see; where this torch has MKL it is found."""
    import ctypes

    from agenttensor import native

    found = native.torch_exp()
    if found is None:
        assert not torch.backends.mkl.is_available() or native.torch_exp() is None  # (a torch whose exp is not MKL's)
        pytest.skip("torch's exp is not MKL's vmsExp here")
    g = torch.Generator().manual_seed(7)
    x = -torch.rand(300_001, generator=g).pow(4) * 30  # hazards' range, mostly small
    out = torch.empty_like(x)
    exp = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(found.function)
    exp(x.numel(), x.data_ptr(), out.data_ptr(), found.mode)
    assert torch.equal(out.view(torch.int32), x.exp().view(torch.int32))
    # MKL's low-accuracy and enhanced-performance modes give other bits on Intel CPUs (so the check can fail there);
    # on AMD's (Zen 3) MKL takes one code path for every mode and gives the same bits
    for mode in (0x1, 0x3):
        other = torch.empty_like(x)
        exp(x.numel(), x.data_ptr(), other.data_ptr(), mode)
        if "GenuineIntel" in _cpu_vendor():
            assert not torch.equal(other, out)


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def test_native_hazard_event_move_makes_exp_inside_with_the_same_numbers(threads):
    """`hazard_event_move`: exp(−h) made block by block inside the pass (torch's own exp) and the draws at it give the
    bits of ``float_event_move((-h).exp_(), complement=True)``: survival, mask, fields and pairs, in place and not,
    across rows and threads' chunks; None where the kernel does not apply (then the caller takes torch's exp)."""
    from agenttensor import native

    if native.torch_exp() is None:
        pytest.skip("torch's exp is not MKL's vmsExp here")
    B, N = 3, 100_003
    r = Randomness.for_agents([1, 2, 3], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(3)
    hazard = torch.rand(B, N, generator=g).pow(3) * 2
    source = torch.randint(-1, 3, (B, N), generator=g).float() * 0.75
    target = torch.randn(B, N, generator=g)
    survival = (-hazard).exp_()
    mask, source_after, target_after, (b, i) = r.float_event_move(4, "s", survival, source, target, complement=True)
    made = r.hazard_event_move(4, "s", hazard, source, target)
    assert made is not None and torch.equal(made[0].view(torch.int32), survival.view(torch.int32))
    assert torch.equal(made[1], mask) and torch.equal(made[2], source_after) and torch.equal(made[3], target_after)
    assert torch.equal(made[4][0], b) and torch.equal(made[4][1], i) and 0 < b.numel() < B * N
    here = (source.clone(), target.clone())
    versions = tuple(x._version for x in here)
    survival_here, mask_here, *fields, pairs = r.hazard_event_move(4, "s", hazard, *here, in_place=True)
    assert fields[0] is here[0] and fields[1] is here[1] and torch.equal(mask_here, mask)
    assert torch.equal(survival_here, survival) and torch.equal(here[0], source_after) and torch.equal(here[1], target_after)
    assert torch.equal(pairs[0], b) and torch.equal(pairs[1], i) and all(x._version > v for x, v in zip(here, versions))
    assert r.hazard_event_move(4, "s", hazard[:, :1], source, target) is None  # a broadcast hazard: torch's exp
    assert r.hazard_event_move(4, "s", hazard.t().contiguous().t(), source, target) is None  # not contiguous
    assert r.hazard_event_move(4, "s", hazard.double(), source, target) is None


def test_keys_hashed_on_the_device_from_a_step_tensor_are_the_hosts():
    """A step's number as a 0-dim tensor (`StepContext.clock`, a step a CUDA graph captures): the keys hashed from it
    by torch ops are `step_key`'s, bit for bit, at steps that wrap the 32-bit arithmetic too."""
    from agenttensor import rng

    randomness = rng.Randomness.for_agents([0, 7, 2**31 - 1], torch.arange(100, dtype=torch.int32))
    streams = ("infection", "duration-E", 99)
    for step in (0, 1, 29, 4096, 2**31 - 1):
        host = randomness._keys(step, streams)
        assert torch.equal(randomness._keys(torch.tensor(step, dtype=torch.int32), streams), host)
        assert host[0, 1].item() == rng.step_key(7, step, rng.stream_id("infection"))


@pytest.mark.parametrize("compiled", ["0", "1"], ids=["eager", "compiled"])
def test_hard_events_off_the_kernels_are_the_definitions_numbers(compiled, monkeypatch):
    """`rng.hard_events` and `rng.hard_hazard_events` (the hard events where the native kernels do not run: other
    devices, kernels off; one kernel each with ``AGENTTENSOR_COMPILE=1`` off the CPU, on it the compiled hash) give
    1[u < q] · where of `Randomness.uniform`'s u, and so the native kernel's numbers where it runs: for p of every
    broadcast shape, with q = p or 1 − p, where absent or holding a 2, and at p = exp(−hazard), complement."""
    from agenttensor import rng

    monkeypatch.setenv("AGENTTENSOR_COMPILE", compiled)
    B, N = 3, 20_011
    r = Randomness.for_agents([1, 2, 3], torch.arange(N, dtype=torch.int32))
    g = torch.Generator().manual_seed(2)
    where = torch.randint(0, 3, (B, N), generator=g, dtype=torch.uint8)
    keys, u = r._keys(4, ("s",)), r.uniform(4, "s")

    def expected(q, w):
        events = (u < q).to(torch.uint8).expand(B, N)
        return events if w is None else events * w

    for p in (torch.rand(B, N, generator=g), torch.rand(B, 1, generator=g), torch.rand(N, generator=g), 0.7):
        for complement in (False, True):
            for w in (where, None):
                events = rng.hard_events(r.agent_base, keys, p, w, complement)
                assert torch.equal(events, expected(1 - p if complement else p, w))
                native = r.hard_event(4, "s", p, w, complement)
                assert native is None or torch.equal(events, native)
    hazard = torch.rand(B, N, generator=g) * 0.5
    assert torch.equal(rng.hard_hazard_events(r.agent_base, keys, hazard, where), expected(1 - (-hazard).exp(), where))
    assert rng.hard_events.calls["compiled"] == 0  # (compiled off the CPU only: tests/test_cuda.py)

"""Sync-free hard days (`StepContext.sync_free`, ``simulate(..., sync_free=True)``): the torch-op path with the day's
sparse sets kept as [B, N] masks, so that a GPU's host never waits for the device within a day (what a CUDA graph
capture of a day needs). These tests check, on the CPU, the two things that make it so: the same numbers as the
standard path, and no operation in a day whose result the host must read."""

from __future__ import annotations

import pytest
import torch

import agenttensor as at
from agenttensor import Hard, Randomness, StepContext
from agenttensor.host_reads import HostReads
from agenttensor.interventions import compile_schedule
from models.covid import model as covid
from models.covid.model import MODEL, CovidParams

from test_covid_model import ALL_LEVERS, START, busy_params

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def env():
    return MODEL.setup(at.synthetic(12_000, seed=4), CovidParams().as_tensors(), "cpu")


def run(env, sync_free: bool, steps: int = 30):
    return at.simulate(MODEL, env=env, params=busy_params(transmission_scale=3.0), steps=steps, seeds=[0, 1],
                       start_date=START, interventions=ALL_LEVERS, progress=False, sync_free=sync_free)


@pytest.fixture
def gpu_path(monkeypatch):
    """The torch-op path as a GPU runs it: the native kernels off, and `CovidEnv.memo` (which compares small tensors,
    on the CPU only) computing its values."""
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "0")
    monkeypatch.setattr(covid.CovidEnv, "memo", lambda self, key, inputs, compute, values_only=False: compute())


def assert_same_run(reference, other, split_rounded: bool = True) -> None:
    """The same metrics and final state, bit for bit; with ``split_rounded`` the split of infections by layer equal
    to float rounding (summed over every agent, in another order, where no native pass sums it at the infected)."""
    for name, value in reference.metrics.items():
        if split_rounded and name.startswith("infections_"):
            torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-4, msg=name)
        else:
            assert torch.equal(other[name], value), name
    for name, value in reference.final_state.tensors().items():
        assert torch.equal(other.final_state.tensors()[name], value), name


@pytest.mark.parametrize("native", ["1", "0"], ids=["native-kernels", "torch-ops"])
def test_sync_free_runs_take_the_same_events(env, native, monkeypatch):
    """Every lever, two seeds, through the dense phase and the sparse one (most agents infected): the same
    trajectories bit for bit, with the native kernels (which a CPU run uses either way) and with the torch ops that a
    GPU runs. The one difference: without the native pass, the split of the day's infections by layer sums its shares
    over every agent instead of the infected ones, in another order (equal to float rounding)."""
    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", native)
    standard, sync_free = run(env, False), run(env, True)
    assert standard["S"][-1].max().item() * 4 < env.num_agents  # the sparse phase was reached
    assert_same_run(standard, sync_free, split_rounded=native == "0")


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync-free", "standard"])
def test_a_sync_free_day_reads_nothing_back_on_the_host(env, sync_free, gpu_path):
    """The torch-op path as a GPU runs it (native kernels off; `CovidEnv.memo`, which compares small tensors on the
    CPU only, computing its values): no operation of a day from the second on reads a value or a data-dependent
    shape, with every lever (vaccination, testing, closures, the weekly decisions and labour market). The standard
    path reads some every day (the exits', the infectious agents' and the infected agents' index lists): the check
    sees them."""
    days, seeds = 21, [0, 1]  # (every lever starts by day 17)
    params = busy_params().as_tensors()
    rng = Randomness.for_agents(seeds, env.agent_ids)
    schedule = compile_schedule([ALL_LEVERS] * len(seeds), levers=MODEL.levers, steps=days, start_date=START,
                                group_labels=env.group_labels, age_band_edges=MODEL.age_band_edges)

    def context(t: int) -> StepContext:
        return StepContext(step=t, env=env, rng=rng, sampler=Hard(), start_date=START, schedule=schedule,
                           sync_free=sync_free)

    state = MODEL.init(env, params, context(0))
    reads = []
    for t in range(days):
        with HostReads() as mode:
            state, _ = MODEL.step(state, params, context(t))
        reads.append(sum(mode.counts.values()))
    if sync_free:
        assert reads[1:] == [0] * (days - 1), reads
    else:
        assert min(reads[1:]) >= 3, reads


def test_the_device_path_benchmark_sees_the_host_reads_and_counts_the_hash_as_one_kernel(env, gpu_path):
    """benchmarks/device_path_day.py: it sees the standard path's host reads and none in the sync-free one, and with
    the hash counted as the fused kernel (``fused_hash``) a uniform draw is one operation that reads the agents' bases
    and writes its uniforms once, the same uniforms."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import device_path_day

    params = busy_params().as_tensors()
    for sync_free in (False, True):
        _, eager = device_path_day.days(env, params, sync_free, count="eager")
        _, fused = device_path_day.days(env, params, sync_free, count="fused")
        assert fused.ops < eager.ops and fused.bytes < eager.bytes
        assert (sum(eager.counts.values()) == 0) == sync_free
    randomness = Randomness.for_agents([0], env.agent_ids)
    with device_path_day.Dispatched() as mode, device_path_day.fused_hash(mode):
        u = randomness.uniform(3, "infection")
    assert mode.ops == 1 and mode.bytes == 4 * env.num_agents * 2 + 4  # agents' bases and uniforms, one key
    assert torch.equal(u, randomness.uniform(3, "infection"))
    x = torch.rand(1000)  # `PeakLive`: the most bytes a day's own allocations hold at once; in-place results add none
    with device_path_day.PeakLive() as peak:
        a = x * 2
        b = a + 1
        del a
        c = b * 3
        c.add_(1)
        torch.mul(c, 2, out=b)
        del b
        d = c.to(torch.float64)
    assert peak.peak == peak.bytes == 4000 + 8000  # c and d (a and b, 4000 each, freed before d was made)
    peak.new_day()
    with peak:
        e = d + 1
    assert peak.bytes == 8000 and peak.peak == 12000  # today's e only; the largest day's peak stays
    del c, e


def test_captured_days_replayed_on_other_days_take_those_days_events(env, gpu_path):
    """``simulate(..., cuda_graphs="emulate")``: each kind of day (school and work days, weekends; `day_kind`)
    captured once and replayed on the others, as a CUDA graph would be: the recorded operations re-run on the same
    input buffers with every Python value as recorded. With every lever, two seeds, 30 days through the dense phase
    and the sparse one, on the path a GPU runs (torch ops; `memo` computing), the trajectories are the plain run's:
    nothing a day depends on (its number, its draws' keys, the week's multiplier, the levers) is baked into a
    captured day."""
    params = busy_params(transmission_scale=3.0, transmission_multiplier=torch.tensor([1.0, 0.7, 1.3, 0.9, 1.1]))
    plain, replayed = (at.simulate(MODEL, env=env, params=params, steps=30, seeds=[0, 1], start_date=START,
                                   interventions=ALL_LEVERS, progress=False, **options)
                       for options in ({}, dict(cuda_graphs="emulate")))
    stats = replayed.timing["cuda_graphs"]
    assert stats["captured"] >= 2 and stats["replayed"] >= 15 and stats["failed"] == 0, stats
    assert stats["eager"] == 5  # the decision days 0, 7, 14, 21, 28
    assert_same_run(plain, replayed)


def test_compiled_kernels_take_the_same_events(env, monkeypatch):
    """With ``AGENTTENSOR_COMPILE=1`` the sync-free exits (`dense_exits`), the force of the group layers
    (`transmission.force_of_layers`), the split of infections by layer (`transmission.layer_shares`), the new
    infections' countdowns (`dense_countdowns`) and the infectiousness (`dense_iotas`) run compiled
    by torch.compile (`fused.on_request`; on a GPU fused kernels, here the CPU's), and so does the hash of the draws
    that the native kernels (here off) do not make: the same trajectories, bit for bit, as the standard path's eager
    operations, with every lever; each kernel's first call found so itself."""
    from agenttensor import rng, transmission

    monkeypatch.setenv("AGENTTENSOR_NATIVE_KERNELS", "0")
    standard = run(env, False, steps=21)
    monkeypatch.setenv("AGENTTENSOR_COMPILE", "1")
    kernels = (covid.dense_exits, transmission.force_of_layers, transmission.layer_shares, covid.dense_countdowns,
               covid.dense_iotas)
    before = [kernel.calls["compiled"] for kernel in kernels]
    sync_free = run(env, True, steps=21)
    assert [kernel.calls["compiled"] - n for kernel, n in zip(kernels, before)] == [21] * 5
    for kernel in (*kernels, rng.uniform_kernel):  # (the hard events compile off the CPU only: test_cuda.py)
        assert kernel.off is None and kernel.calls["differs"] == 0 and kernel.calls["checked"] >= 1, kernel.calls
    assert_same_run(standard, sync_free)


@pytest.mark.parametrize("refused", ["host read", "host data"])
def test_a_day_a_capture_refuses_turns_the_graphs_off_with_the_same_numbers(env, gpu_path, refused, monkeypatch,
                                                                            caplog):
    """A day with an operation that a CUDA capture refuses (added to the exits here: a value read back on the host, or
    a tensor made from Python values): its emulated capture fails as a CUDA one would, the run's graphs turn off,
    logged and counted, and every day runs eagerly with the plain run's numbers."""
    exits = covid.dense_exits

    def refusing(*args):
        torch.ones(1).sum().item() if refused == "host read" else torch.tensor([1.0, 2.0])
        return exits(*args)

    monkeypatch.setattr(covid, "dense_exits", refusing)
    plain = run(env, True)
    with caplog.at_level("WARNING", logger="agenttensor.graphs"):
        emulated = at.simulate(MODEL, env=env, params=busy_params(transmission_scale=3.0), steps=30, seeds=[0, 1],
                               start_date=START, interventions=ALL_LEVERS, progress=False, cuda_graphs="emulate")
    stats = emulated.timing["cuda_graphs"]
    assert stats == dict(captured=0, replayed=0, eager=29, failed=1), stats
    name = "_local_scalar_dense" if refused == "host read" else "lift_fresh"
    assert f"capture failed at step 1: RuntimeError: operation not permitted when stream is capturing (emulated): " \
           f"{name} x" in caplog.text
    assert_same_run(plain, emulated, split_rounded=False)


def test_graphs_refuse_learnable_parameters_and_replay_into_the_same_outputs(env, gpu_path):
    """A captured day's outputs are the graph's own, overwritten by each replay (a CUDA graph's fixed addresses,
    emulated): replayed days return the same tensors, the last replay's values in them, which is why `simulate`
    copies each day's record and clones the final state. Learnable parameters (whose autograd graph a replay would not
    rebuild) are refused up front."""
    from agenttensor.graphs import DayGraphs, _flatten

    params = busy_params(transmission_scale=3.0).as_tensors("cpu")
    with pytest.raises(at.ConfigError, match="without learnable parameters"):
        at.simulate(MODEL, env=env, params=params.replace(transmission_scale=torch.tensor(3.0, requires_grad=True)),
                    steps=3, seeds=[0], start_date=START, progress=False, cuda_graphs="emulate")
    graphs = DayGraphs(MODEL, params, backend="emulate")
    randomness = Randomness.for_agents([0, 1], env.agent_ids)
    schedule = compile_schedule([[], []], levers=MODEL.levers, steps=12, start_date=START,
                                group_labels=env.group_labels, age_band_edges=MODEL.age_band_edges)
    state = MODEL.init(env, params, StepContext(step=0, env=env, rng=randomness, sampler=Hard(), start_date=START,
                                               schedule=schedule))
    days = {}
    for step in range(1, 12):  # 2020-03-02 (a Monday) to 03-12: work days 1-5 and 8-11, one kind
        ctx = StepContext(step=step, env=env, rng=randomness, sampler=Hard(), start_date=START, schedule=schedule,
                          sync_free=True)
        state, record = graphs.step(state, ctx)
        outputs = _flatten(state, record)[0]  # the state's tensors and the record's blocks
        days[step] = outputs, [x.clone() for x in outputs]
    assert graphs.stats["captured"] == 2 and graphs.stats["replayed"] >= 7, graphs.stats
    (kept9, copied9), (kept11, copied11) = days[9], days[11]
    assert [x.data_ptr() for x in kept9] == [x.data_ptr() for x in kept11]
    assert all(torch.equal(x, y) for x, y in zip(kept9, copied11))  # day 9's outputs hold the last replay's values
    assert not all(torch.equal(x, y) for x, y in zip(copied9, copied11))

"""The same runs on CUDA as on CPU: hard-mode records, gradients, checkpointed gradients, calibration and
archetype behaviour. Skipped where torch sees no CUDA GPU (CI); run on a GPU machine with
``pytest tests/test_cuda.py``.

Random numbers are counter-based integer hashes, so CPU and CUDA draw the same uniforms bit for bit. Probabilities
differ by float rounding only (other exp/log implementations, atomic summation order), so a hard-mode event
could flip only where a uniform lies within ~1e-7 of its threshold: with the small populations and short runs
here that is rare enough that the records must be equal.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch

import agenttensor as at
from agenttensor import Hard, Intervention, Relaxed, StraightThrough, simulate

GPU = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

START = dt.date(2020, 3, 2)
SCENARIO = [Intervention("school_closure", 3, 400, 1.0, ages=(11, 17)),
            Intervention("workplace_closure", 5, 400, 0.3),
            Intervention("transmission_reduction", 4, 400, 0.2, layer="community")]


@pytest.fixture(scope="module")
def population():
    return at.synthetic(6_000, seed=3)


def assert_records_equal(cpu: dict, cuda: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        a, b = cpu[name].detach(), cuda[name].detach().cpu()
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(a, b), (name, (a != b).sum().item())


def covid_run(population, device: str, sampler, steps: int = 20, learn: tuple[str, ...] = (), **run):
    from models.covid.model import MODEL, CovidParams

    params = CovidParams(initial_prevalence=0.004, transmission_scale=0.6,
                         transmission_multiplier=torch.tensor([1.0, 1.2, 0.8]))
    params = params.as_tensors(device, learn=learn)
    res = simulate(MODEL, population, params, steps=steps, seeds=[0, 1, 2], sampler=sampler, device=device,
                   start_date=START, interventions=SCENARIO, progress=False, **run)
    return res, params


def test_covid_hard_records_on_cuda_equal_cpu(population):
    cpu, _ = covid_run(population, "cpu", Hard())
    cuda, _ = covid_run(population, GPU, Hard())
    assert cuda.metrics["new_infections"].device.type == torch.device(GPU).type
    assert cpu.metrics["new_infections"].sum() > 50  # an epidemic that grows, not a few cases
    assert_records_equal(cpu.metrics, cuda.metrics)
    assert_records_equal(cpu.final_state.tensors(), cuda.final_state.tensors())  # float fields: to rounding


def test_covid_sync_free_days_and_cuda_graphs_equal_the_plain_cuda_run(population):
    """The sync-free days (`StepContext.sync_free`) and the same days as CUDA graphs (`agenttensor.graphs`: captured
    once per kind of day, replayed on the others) take the plain CUDA run's events; every capture succeeded and the
    graphs replayed most days. (Written without a GPU to run it on: tests/test_sync_free.py checks the same on the
    CPU, with the capture and replay emulated.)"""
    plain, _ = covid_run(population, GPU, Hard(), steps=30)
    sync_free, _ = covid_run(population, GPU, Hard(), steps=30, sync_free=True)
    graphs, _ = covid_run(population, GPU, Hard(), steps=30, cuda_graphs=True)
    stats = graphs.timing["cuda_graphs"]
    assert stats["failed"] == 0 and stats["captured"] >= 2 and stats["replayed"] >= 15, stats
    for run in (sync_free, graphs):
        assert_records_equal(plain.metrics, run.metrics, rtol=1e-4, atol=1e-4)
        assert_records_equal(plain.final_state.tensors(), run.final_state.tensors())


def test_covid_compiled_kernels_in_cuda_graphs_equal_the_plain_cuda_run(population, monkeypatch):
    """``AGENTTENSOR_COMPILE=1`` on CUDA: the functions `fused.on_request` marks run as Triton kernels, compiled for
    eager numerics, inside the captured days too; each one's first call matched its eager call bit for bit, and the
    run takes the plain run's events. (Written without a GPU to run it on; the CPU's compiled kernels are checked in
    tests/test_sync_free.py.)"""
    from agenttensor import rng, transmission
    from models.covid import model as covid

    plain, _ = covid_run(population, GPU, Hard(), steps=30)
    monkeypatch.setenv("AGENTTENSOR_COMPILE", "1")
    compiled, _ = covid_run(population, GPU, Hard(), steps=30, cuda_graphs=True)
    stats = compiled.timing["cuda_graphs"]
    assert stats["failed"] == 0 and stats["captured"] >= 2 and stats["replayed"] >= 15, stats
    for kernel in (rng.uniform_kernel, covid.dense_exits, transmission.force_of_layers, transmission.layer_shares,
                   covid.dense_countdowns, covid.dense_iotas, rng.hard_events, rng.hard_hazard_events):
        assert kernel.off is None and kernel.calls["compiled"] > 0 and kernel.calls["differs"] == 0, \
            (kernel.__name__, kernel.calls, kernel.off)
    assert_records_equal(plain.metrics, compiled.metrics, rtol=1e-4, atol=1e-4)
    assert_records_equal(plain.final_state.tensors(), compiled.final_state.tensors())


@pytest.mark.parametrize("sampler", [StraightThrough(), Relaxed()], ids=["straight_through", "relaxed"])
def test_covid_gradients_on_cuda_equal_cpu(population, sampler):
    names = ("transmission_scale", "transmission_multiplier", "household_weight", "detection_rate")
    grads = {}
    for key, device in (("cpu", "cpu"), ("gpu", GPU)):
        res, params = covid_run(population, device, sampler, steps=14, learn=names)
        loss = (res["new_infections"].sum() + res["reported_cases"].sum() + res["hospital_admissions"].sum()
                + res["I_sym"].float().sum() * 0.1)
        loss.backward()
        grads[key] = {n: getattr(params, n).grad.detach().cpu() for n in names}
        grads[key]["records"] = {k: v.detach() for k, v in res.metrics.items()}
    assert_records_equal(grads["cpu"].pop("records"), grads["gpu"].pop("records"), rtol=1e-4, atol=1e-4)
    for n in names:
        assert grads["cpu"][n].abs().sum() > 0, n
        torch.testing.assert_close(grads["gpu"][n], grads["cpu"][n], rtol=2e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_cuda_runs_repeat_bit_for_bit():
    """Two straight-through runs on CUDA give identical records and gradients: no float sum depends on thread
    timing (group sums are scans, scatters sort their indices), which checkpointed recomputation relies on."""
    pop = at.synthetic(60_000, seed=5)
    names = ("transmission_scale", "community_weight")
    runs = []
    for _ in range(2):
        res, params = covid_run(pop, GPU, StraightThrough(), steps=12, learn=names)
        (res["new_infections"].sum() + res["reported_cases"].sum()).backward()
        runs.append(({k: v.detach().cpu() for k, v in res.metrics.items()},
                     torch.stack([getattr(params, n).grad for n in names]).cpu()))
    assert runs[0][0]["new_infections"].sum() > 500
    for name in runs[0][0]:
        assert torch.equal(runs[0][0][name], runs[1][0][name]), name
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("K", [5000, 70_000], ids=["index_put", "scan"])
def test_scatter_sum_on_cuda_equals_cpu(K):
    from agenttensor.transmission import scatter_sum

    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 7, (K,), generator=g)
    values = torch.rand(3, K, generator=g)
    expected = scatter_sum(torch.zeros(3, 7), index, values)
    got = scatter_sum(torch.zeros(3, 7, device=GPU), index.to(GPU), values.to(GPU))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    got_1d = scatter_sum(torch.zeros(7, device=GPU), index.to(GPU), values[0].to(GPU))
    torch.testing.assert_close(got_1d.cpu(), expected[0], rtol=1e-5, atol=1e-5)
    none = torch.zeros(0, dtype=torch.int64, device=GPU)
    assert torch.equal(scatter_sum(torch.ones(3, 7, device=GPU), none, torch.zeros(3, 0, device=GPU)).cpu(),
                       torch.ones(3, 7))


def test_covid_checkpointed_gradients_on_cuda_equal_stored(population):
    """Recomputing 5-day segments in the backward pass gives the stored run's gradients (on CUDA too)."""
    names = ("transmission_scale", "detection_rate")
    grads = []
    for every in (None, 5):
        res, params = covid_run(population, GPU, StraightThrough(), steps=15, learn=names,
                                grad_checkpoint_every=every)
        (res["new_infections"].sum() + res["reported_cases"].sum()).backward()
        grads.append(torch.stack([getattr(params, n).grad for n in names]).cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=0)


def test_seir_on_cuda_equals_cpu():
    from models.seir.model import MODEL, SEIRParams

    pop = at.synthetic(20_000, seed=0)
    out = {}
    for key, device in (("cpu", "cpu"), ("gpu", GPU)):
        params = SEIRParams(R0=2.5, initial_infected=40).as_tensors(device, learn=("R0",))
        res = simulate(MODEL, pop, params, steps=25, seeds=[0, 1], sampler=StraightThrough(), device=device,
                       progress=False)
        res["new_infections"].sum().backward()
        out[key] = ({k: v.detach() for k, v in res.metrics.items()}, params.R0.grad.cpu())
    assert out["cpu"][0]["new_infections"].sum() > 100
    assert_records_equal(out["cpu"][0], out["gpu"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["gpu"][1], out["cpu"][1], rtol=2e-4, atol=0)


def test_calibration_on_cuda_matches_cpu():
    import polars as pl

    from agenttensor.calibration import Learn, Observe, calibrate
    from agenttensor.population import BOROUGHS
    from models.seir.model import MODEL, SEIRParams

    pop = at.synthetic(20_000, seed=0, num_neighbourhoods=5)
    truth = SEIRParams(mixing="well-mixed", R0=2.0, initial_infected=60)
    res = simulate(MODEL, pop, truth, steps=14, seeds=[0, 1], start_date=START, progress=False)
    daily = res["new_infections_by_borough"].float().mean(1)
    targets = pl.DataFrame([dict(date=START + dt.timedelta(days=7 * w + 6), borough=b, metric="cases",
                                 value=float(daily[7 * w: 7 * w + 7, g].sum()))
                            for w in range(2) for g, b in enumerate(BOROUGHS)])
    fits = {}
    for key, device in (("cpu", "cpu"), ("gpu", GPU)):
        fits[key] = calibrate(MODEL, pop, targets, [Learn("R0", init=2.6)],
                                 observe=[Observe("cases", "new_infections_by_borough")],
                                 window=(START, START + dt.timedelta(days=13)), loss="mse_sqrt", epochs=6, lr=0.08,
                                 params=truth, seeds=[0, 1], device=device)
    assert fits["gpu"].loss_history[-1] < fits["gpu"].loss_history[0]
    np.testing.assert_allclose(fits["gpu"].loss_history, fits["cpu"].loss_history, rtol=1e-3)
    assert fits["gpu"].values["R0"] == pytest.approx(fits["cpu"].values["R0"], rel=1e-4)


def test_archetype_behaviour_on_cuda_equals_cpu(population):
    """LLM archetypes (a deterministic fake LLM here): the same prompts and the same behaviour on both devices."""
    from agenttensor.llm.cache import AnswerCache
    from models.covid.archetype_behavior import ArchetypeBehavior
    from models.covid.model import CovidParams, make_model

    class FakeLLM:
        model_id, settings, last_errors = "fake:cuda", {}, []

        def __init__(self):
            self.prompts = []

        def option_probabilities(self, prompts, options):
            self.prompts += prompts
            yes = np.array([0.15 + 0.7 * (hash(p) % 97) / 96 for p in prompts])
            return np.stack([yes, 1 - yes] + [np.zeros_like(yes)] * (len(options) - 2), 1)

    runs = {}
    for key, device in (("cpu", "cpu"), ("gpu", GPU)):
        llm = FakeLLM()
        model = make_model(behavior=ArchetypeBehavior(llm, cache=AnswerCache(":memory:")))
        res = simulate(model, population, CovidParams(initial_prevalence=0.01), steps=10, seeds=[0, 1],
                       device=device, start_date=START, progress=False)
        runs[key] = (res.metrics, llm.prompts)
    assert runs["cpu"][1] and sorted(runs["cpu"][1]) == sorted(runs["gpu"][1])
    assert_records_equal(runs["cpu"][0], runs["gpu"][0])

"""Intervention schedules: differentiable intensities and smooth (differentiable) ends."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import torch

from agenttensor import Intervention
from agenttensor.errors import ConfigError
from agenttensor.interventions import LeverSpec, compile_schedule

LEVERS = (LeverSpec("closure"), LeverSpec("masks", layers=("school",)))
LABELS = ["Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island"]
EDGES = (0, 18, 65)
START = dt.date(2020, 3, 1)


def compile_(per_batch, steps=30):
    return compile_schedule(per_batch, levers=LEVERS, steps=steps, start_date=START, group_labels=LABELS,
                            age_band_edges=EDGES)


def test_tensor_intensity_gives_the_same_schedule_and_exact_cell_gradient():
    """A tensor intensity compiles to the same values as the float; d(Σ cells)/d(intensity) = the
    number of cells it covers (batch × days × boroughs × age bands)."""
    float_iv = Intervention("closure", 3, 12, 0.4, boroughs=("Bronx", "Queens"), ages=(0, 17))
    intensity = torch.tensor(0.4, requires_grad=True)
    tensor_iv = dataclasses.replace(float_iv, intensity=intensity)
    plain = compile_([[float_iv]] * 2).values[("closure", None)]
    graph = compile_([[tensor_iv]] * 2).values[("closure", None)]
    assert torch.equal(plain, graph.detach())
    graph.sum().backward()
    assert intensity.grad.item() == 2 * 10 * 2 * 1


def test_overlapping_interventions_take_the_max_and_its_gradient():
    low, high = torch.tensor(0.2, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    schedule = compile_([[Intervention("closure", 0, 9, low), Intervention("closure", 5, 14, high)]])
    values = schedule.values[("closure", None)]
    assert torch.allclose(values[0, :5], torch.tensor(0.2)) and torch.allclose(values[0, 5:15], torch.tensor(0.7))
    values.sum().backward()
    cells = len(LABELS) * len(EDGES)
    assert low.grad.item() == 5 * cells and high.grad.item() == 10 * cells


def test_ramp_fades_out_smoothly_keeps_intensity_days_and_end_is_differentiable():
    end = torch.tensor(14.0, requires_grad=True)
    steps, ramp, intensity = 40, 2.0, 0.8
    values = compile_([[Intervention("closure", 5, end, intensity, ramp=ramp)]], steps=steps).values[("closure", None)]
    t = torch.arange(steps, dtype=torch.float32)
    expected = torch.where(t >= 5, intensity * torch.sigmoid((14.0 + 0.5 - t) / ramp), torch.zeros(()))
    assert torch.allclose(values[0, :, 0, 0], expected, atol=1e-6)
    # intensity-days of the ramped window ≈ those of the hard window 5..14 (10 days) when far from the run's ends
    assert values[0, :, 0, 0].sum().item() / intensity == pytest.approx(10.0, abs=0.02)
    values[0, :, 0, 0].sum().backward()
    s = torch.sigmoid((14.0 + 0.5 - t[5:]) / ramp)
    assert end.grad.item() == pytest.approx(float((intensity * s * (1 - s) / ramp).sum()), rel=1e-5)
    assert end.grad.item() == pytest.approx(intensity, rel=0.01)  # shifting the end by a day adds ~1 intensity-day
    # a tiny ramp is the hard window
    hard = compile_([[Intervention("closure", 5, 14, intensity)]], steps=steps).values[("closure", None)]
    sharp = compile_([[Intervention("closure", 5, 14, intensity, ramp=1e-3)]], steps=steps).values[("closure", None)]
    assert torch.allclose(hard, sharp)


def test_bad_tensor_intensity_and_ramp_are_config_errors():
    with pytest.raises(ConfigError, match="one-element tensor"):
        compile_([[Intervention("closure", 0, 5, torch.tensor([0.1, 0.2]))]])
    with pytest.raises(ConfigError, match="intensity"):
        compile_([[Intervention("closure", 0, 5, torch.tensor(1.5))]])
    with pytest.raises(ConfigError, match="ramp"):
        compile_([[Intervention("closure", 0, 5, 0.5, ramp=-1.0)]])


@pytest.mark.slow
def test_covid_lever_gradients_match_finite_differences():
    """Covid model (20,000 agents, 6 seeds): d(infections)/d(transmission-reduction intensity) and
    d(infections)/d(end of a ramped school closure) by straight-through vs central finite differences on
    common random numbers (`sensitivities`)."""
    import polars as pl

    import agenttensor as at
    from agenttensor.calibration import sensitivities
    from models.covid.model import MODEL, CovidParams

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        population = at.synthetic(20_000, seed=1)
        params = CovidParams(initial_prevalence=0.005)
        start = dt.date(2020, 9, 13)
        ivs = [Intervention("transmission_reduction", start, start + dt.timedelta(days=34), 0.3, name="masks"),
               Intervention("school_closure", start + dt.timedelta(days=8), start + dt.timedelta(days=22), 1.0,
                            ramp=3.0, name="schools")]
        table = sensitivities(MODEL, population, params, outcomes={"infections": "new_infections"}, steps=35,
                              seeds=list(range(6)), start_date=start, interventions=ivs,
                              fd_check=["masks.intensity", "schools.length"], fd_steps={"masks.intensity": 0.1})
    finally:
        torch.set_num_threads(threads)
    rows = {r["wrt"]: r for r in table.iter_rows(named=True)}
    masks, schools = rows["masks.intensity"], rows["schools.length"]
    assert masks["gradient"] < 0 and masks["fd_gradient"] < 0 and masks["rel_diff"] < 0.25, masks
    assert schools["gradient"] < 0 and schools["fd_gradient"] < 0, schools
    assert table.filter(pl.col("wrt") == "schools.intensity")["fd_gradient"].null_count() == 1

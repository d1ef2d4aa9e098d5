"""simulate(initial_state=, first_step=): a run continued from step k equals one continuous run
bit-for-bit (hard mode), for the SEIR and the covid model; broadcasting, validation errors,
checkpoint/resume."""

import datetime as dt

import pytest
import torch

import agenttensor as at
from agenttensor.errors import ConfigError, InputError
from agenttensor.interventions import compile_schedule
from models.covid.model import MODEL as COVID
from models.seir import MODEL as SEIR
from models.seir import SEIRParams

START = dt.date(2020, 3, 1)
SEIR_PARAMS = SEIRParams(R0=3.0, initial_infected=20, transmission_multiplier=torch.tensor([1.0] * 10 + [0.5]))
COVID_PARAMS = COVID.params_type().replace(initial_prevalence=0.01)


@pytest.fixture(scope="module")
def population():
    return at.synthetic(8_000, seed=3)


def assert_continuation_equal(full, continued, k):
    assert continued.first_step == k and continued.steps == full.steps - k
    for name, v in continued.metrics.items():
        assert torch.equal(v, full.metrics[name][k:]), name
    for name, v in continued.final_state.tensors().items():
        assert torch.equal(v, getattr(full.final_state, name)), name


@pytest.mark.parametrize("k", [1, 13])
def test_seir_continuation_is_bit_identical(population, k):
    seeds = [0, 1, 2]
    full = at.simulate(SEIR, population, SEIR_PARAMS, steps=30, seeds=seeds, start_date=START, progress=False)
    head = at.simulate(SEIR, population, SEIR_PARAMS, steps=k, seeds=seeds, start_date=START, progress=False)
    rest = at.simulate(SEIR, population, SEIR_PARAMS, steps=30, seeds=seeds, start_date=START, progress=False,
                       initial_state=head.final_state, first_step=k)
    assert_continuation_equal(full, rest, k)
    table = rest.to_polars()  # steps and dates keep the run's calendar
    assert table["step"].min() == k and table["date"].min() == START + dt.timedelta(days=k)
    assert table.height == (30 - k) * len(seeds)


@pytest.mark.parametrize("k", [10, 14])  # between decision days / on one (decisions every 7 days)
def test_covid_continuation_is_bit_identical_with_interventions(population, k):
    seeds = [4, 7]
    env = COVID.setup(population, COVID_PARAMS.as_tensors(), "cpu")
    interventions = [at.Intervention("school_closure", dt.date(2020, 3, 5), dt.date(2020, 3, 25), 1.0, ages=(5, 17)),
                     at.Intervention("stay_at_home", dt.date(2020, 3, 12), dt.date(2020, 3, 30), 0.6),
                     at.Intervention("vaccination", dt.date(2020, 3, 16), dt.date(2020, 3, 30), 0.02, ages=(65, 100))]
    # one schedule for the whole calendar (a run of k steps alone cannot hold interventions that start later)
    schedule = compile_schedule([interventions] * len(seeds), levers=COVID.levers, steps=30, start_date=START,
                                group_labels=env.group_labels, age_band_edges=COVID.age_band_edges)
    kw = dict(env=env, seeds=seeds, start_date=START, progress=False, interventions=schedule)
    full = at.simulate(COVID, None, COVID_PARAMS, steps=30, **kw)
    head = at.simulate(COVID, None, COVID_PARAMS, steps=k, **kw)
    rest = at.simulate(COVID, None, COVID_PARAMS, steps=30, initial_state=head.final_state, first_step=k, **kw)
    assert_continuation_equal(full, rest, k)
    assert int(full["new_infections"][k:].sum()) > 0  # the epidemic is running through the split


def test_a_single_state_is_broadcast_to_every_seed(population):
    one = at.simulate(SEIR, population, SEIR_PARAMS, steps=8, seeds=[5], progress=False).final_state
    broadcast = at.simulate(SEIR, population, SEIR_PARAMS, steps=20, seeds=[0, 1, 2], progress=False,
                            initial_state=one, first_step=8)
    repeated = at.simulate(SEIR, population, SEIR_PARAMS, steps=20, seeds=[0, 1, 2], progress=False,
                           initial_state=one.select_batch(torch.tensor([0, 0, 0])), first_step=8)
    for name, v in broadcast.metrics.items():
        assert torch.equal(v, repeated.metrics[name]), name
    assert not torch.equal(broadcast["I"][:, 0], broadcast["I"][:, 1])  # same start, own random numbers


def test_hard_state_continues_in_a_gradient_mode(population):
    """0/1 uint8 memberships of a hard run are cast to float; the forward path is the hard one."""
    head = at.simulate(SEIR, population, SEIR_PARAMS, steps=6, seeds=[0, 1], progress=False)
    hard = at.simulate(SEIR, population, SEIR_PARAMS, steps=15, seeds=[0, 1], progress=False,
                       initial_state=head.final_state, first_step=6)
    R0 = torch.tensor(3.0, requires_grad=True)
    soft = at.simulate(SEIR, population, SEIR_PARAMS.replace(R0=R0), steps=15, seeds=[0, 1], progress=False,
                       sampler=at.StraightThrough(), initial_state=head.final_state, first_step=6)
    assert torch.equal(soft["I"].detach().to(torch.int64), hard["I"])
    soft["new_infections"].sum().backward()
    assert R0.grad is not None and R0.grad > 0


def test_invalid_initial_states_and_first_steps(population):
    state = at.simulate(SEIR, population, SEIR_PARAMS, steps=3, seeds=[0, 1], progress=False)
    kw = dict(steps=10, progress=False)
    cases = [
        (dict(seeds=[0, 1], initial_state=state, first_step=3), "pass its .final_state"),
        (dict(seeds=[0, 1, 2], initial_state=state.final_state, first_step=3), "batch size 2"),
        (dict(seeds=[0, 1], initial_state=state.final_state, first_step=11), "outside the run"),
        (dict(seeds=[0, 1], initial_state=state.final_state, first_step=-1), "outside the run"),
        (dict(seeds=[0, 1], initial_state=state.final_state, first_step=True), "whole number"),
        (dict(seeds=[0, 1], first_step=3), "needs initial_state"),
        (dict(seeds=[0, 1], initial_state={"S": state.final_state.S}, first_step=3), "TensorState"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            at.simulate(SEIR, population, SEIR_PARAMS, **extra, **kw)
    covid_state = at.simulate(COVID, population, COVID_PARAMS, steps=1, seeds=[0, 1], progress=False).final_state
    with pytest.raises(ConfigError, match="CovidState.*SEIRState"):
        at.simulate(SEIR, population, SEIR_PARAMS, seeds=[0, 1], initial_state=covid_state, first_step=1, **kw)
    with pytest.raises(ConfigError, match="another population"):
        at.simulate(SEIR, at.synthetic(500, seed=0), SEIR_PARAMS, seeds=[0, 1], initial_state=state.final_state,
                    first_step=3, **kw)


def test_checkpoint_resume_equals_an_uninterrupted_run(population, tmp_path):
    path = tmp_path / "run.ckpt"
    full = at.simulate(SEIR, population, SEIR_PARAMS, steps=12, seeds=[0, 1], progress=False)
    # "interrupted" after 6 steps (checkpoints at 3 and 6), then the 12-step run resumes from step 6
    at.simulate(SEIR, population, SEIR_PARAMS, steps=6, seeds=[0, 1], progress=False, checkpoint_every=3,
                checkpoint_path=path)
    resumed = at.simulate(SEIR, population, SEIR_PARAMS, steps=12, seeds=[0, 1], progress=False, checkpoint_every=3,
                          checkpoint_path=path, resume=True)
    for name, v in full.metrics.items():
        assert torch.equal(v, resumed.metrics[name]), name
    # a run that itself started from a state resumes with its own first step
    head = at.simulate(SEIR, population, SEIR_PARAMS, steps=4, seeds=[0, 1], progress=False).final_state
    path2 = tmp_path / "from_state.ckpt"
    at.simulate(SEIR, population, SEIR_PARAMS, steps=8, seeds=[0, 1], progress=False, initial_state=head,
                first_step=4, checkpoint_every=2, checkpoint_path=path2)
    again = at.simulate(SEIR, population, SEIR_PARAMS, steps=12, seeds=[0, 1], progress=False, initial_state=head,
                        first_step=4, checkpoint_every=2, checkpoint_path=path2, resume=True)
    assert again.first_step == 4
    for name, v in again.metrics.items():
        assert torch.equal(v, full.metrics[name][4:]), name
    with pytest.raises(InputError, match="started at step 4"):
        at.simulate(SEIR, population, SEIR_PARAMS, steps=12, seeds=[0, 1], progress=False, checkpoint_path=path2,
                    resume=True)


def test_covid_state_changes_sampling_mode(population):
    """The covid state's gradient-only fields ([B, 0] in hard mode, [B, N] in gradient modes) are rebuilt when a
    state moves between modes; the forward path is unchanged either way."""
    kw = dict(seeds=[0, 1], progress=False, start_date=START)
    head = at.simulate(COVID, population, COVID_PARAMS, steps=6, **kw)
    assert head.final_state.household_exposure.shape == (2, 0)
    hard = at.simulate(COVID, population, COVID_PARAMS, steps=20, initial_state=head.final_state, first_step=6, **kw)
    beta = torch.tensor(float(COVID_PARAMS.transmission_scale), requires_grad=True)
    soft = at.simulate(COVID, population, COVID_PARAMS.replace(transmission_scale=beta), steps=20,
                       initial_state=head.final_state, first_step=6, sampler=at.StraightThrough(), **kw)
    assert soft.final_state.household_exposure.shape == (2, len(population))
    assert torch.equal(soft["new_infections"].detach().to(torch.int64), hard["new_infections"])
    soft["reported_cases"].sum().backward()
    assert beta.grad > 0
    back = at.simulate(COVID, population, COVID_PARAMS, steps=30, initial_state=soft.final_state.detach(),
                       first_step=20, **kw)
    assert back.final_state.household_latent.shape == (2, 0)

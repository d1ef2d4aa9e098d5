"""`PackedRecord` (a step's metrics as packed blocks) reads as the dict of tensors it stands for, and `simulate`'s
recorder stores packed records as it stores plain ones: the same names, order, dtypes and values."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

import agenttensor as at
from agenttensor import PackedLayout, PackedRecord
from agenttensor.model import StepContext
from agenttensor.run import _Recorder

COUNTS = PackedLayout(["a_by", "b_by"], totals=["a", "b"])
ROWS = PackedLayout(["x", "y", "z"])


def record(step: int) -> PackedRecord:
    g = torch.Generator().manual_seed(step)
    counts = torch.randint(0, 100, (2, 3, 5), generator=g)  # [K, B, G]
    return PackedRecord((COUNTS, counts), {"share": torch.rand(3, generator=g)}, (ROWS, torch.rand(3, 3, generator=g)))


def plain(rec: PackedRecord) -> dict[str, torch.Tensor]:
    return {k: rec[k].clone() for k in rec}


def test_a_packed_record_reads_as_its_dict():
    rec = record(0)
    counts, rows = rec.parts[0][1], rec.parts[2][1]
    assert list(rec) == ["a", "a_by", "b", "b_by", "share", "x", "y", "z"] and len(rec) == 8
    assert torch.equal(rec["a_by"], counts[0]) and torch.equal(rec["b"], counts[1].sum(-1))
    assert rec["a"].dtype == torch.int64 and rec["a"].shape == (3,)
    assert torch.equal(rec["z"], rows[2]) and torch.equal(rec["share"], rec.parts[1]["share"])
    assert "y" in rec and "w" not in rec and dict(rec).keys() == set(rec)
    with pytest.raises(KeyError):
        rec["w"]
    with pytest.raises(ValueError, match="rows"):
        PackedRecord((ROWS, torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="distinct"):
        PackedLayout(["x", "x"])


@pytest.mark.parametrize("order", ["packed", "plain first", "packed then plain"])
def test_the_recorder_stores_packed_records_as_plain_ones(order):
    records = [record(t) for t in range(6)]
    steps = [plain(r) if (order == "plain first" and t < 2) or (order == "packed then plain" and t >= 3) else r
             for t, r in enumerate(records)]
    recorder, reference = _Recorder(6, keep_graph=False), _Recorder(6, keep_graph=True)
    for step in steps:
        recorder.append(step)
    reference.extend(plain(r) for r in records)
    got, want = recorder.stacked(), reference.stacked()
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    for t in range(6):  # one step's record, as saved in a checkpoint
        assert {k: v for k, v in recorder[t].items()}.keys() == want.keys()
        assert all(torch.equal(recorder[t][k], want[k][t]) for k in want)


def test_the_covid_models_hard_records_stack_as_their_names():
    """The COVID model's hard-mode metrics (a `PackedRecord`) give the same [T, ...] tensors through the recorder's
    packed buffers as name by name."""
    from models.covid.model import MODEL, CovidParams

    env = MODEL.setup(at.synthetic(3000, seed=1), CovidParams().as_tensors("cpu"), "cpu")
    params = CovidParams(initial_prevalence=0.01).as_tensors("cpu")
    rng = at.Randomness.for_agents([0, 1], env.agent_ids)

    def ctx(t):
        return StepContext(step=t, env=env, rng=rng, start_date=dt.date(2020, 3, 2))

    state = MODEL.init(env, params, ctx(0))
    records = []
    for t in range(9):
        state, rec = MODEL.step(state, params, ctx(t))
        records.append(rec)
    assert isinstance(records[0], PackedRecord)
    recorder, reference = _Recorder(9, keep_graph=False), _Recorder(9, keep_graph=True)
    recorder.extend(records)
    reference.extend(plain(r) for r in records)
    got, want = recorder.stacked(), reference.stacked()
    assert list(got) == list(want) and "new_infections" in got and "infections_household" in got
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert got["new_infections"].sum() > 0  # an epidemic, not zeros
    assert torch.equal(got["new_infections"], got["new_infections_by_borough"].sum(-1))


def test_a_resumed_covid_run_records_what_one_run_does(tmp_path):
    """A run resumed from a checkpoint (its saved steps are plain dicts, the new ones `PackedRecord`s) gives the
    metrics of one uninterrupted run: the recorder's name-by-name path."""
    from models.covid.model import MODEL, CovidParams

    env = MODEL.setup(at.synthetic(3000, seed=2), CovidParams().as_tensors("cpu"), "cpu")
    params = CovidParams(initial_prevalence=0.01).as_tensors("cpu")
    run = dict(params=params, env=env, seeds=(0, 1), start_date=dt.date(2020, 3, 2), progress=False)
    whole = at.simulate(MODEL, steps=10, **run)
    path = tmp_path / "run.pt"
    at.simulate(MODEL, steps=4, checkpoint_every=4, checkpoint_path=path, **run)
    resumed = at.simulate(MODEL, steps=10, checkpoint_every=4, checkpoint_path=path, resume=True, **run)
    assert list(resumed.metrics) == list(whole.metrics)
    for name, value in whole.metrics.items():
        assert resumed.metrics[name].dtype == value.dtype and torch.equal(resumed.metrics[name], value), name
    assert whole.metrics["new_infections"].sum() > 0

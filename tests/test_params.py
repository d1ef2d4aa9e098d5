import dataclasses

import pytest
import torch

from agenttensor import ConfigError
from models.seir import SEIRParams


def test_overrides_parse_and_validate():
    p = SEIRParams().with_overrides({"R0": "1.7", "initial_infected": "5", "mixing": "well-mixed",
                                     "transmission_multiplier": "1,0.5,0.25"})
    assert p.R0 == 1.7 and p.initial_infected == 5 and p.mixing == "well-mixed"
    assert torch.equal(p.transmission_multiplier, torch.tensor([1.0, 0.5, 0.25]))
    with pytest.raises(ConfigError, match="not one of"):
        SEIRParams().with_overrides({"mixing": "soup"})
    with pytest.raises(ConfigError, match="finite"):
        SEIRParams(R0=float("inf"))
    with pytest.raises(ConfigError, match="minimum"):
        SEIRParams(transmission_multiplier=torch.tensor([1.0, -0.1]))


def test_roundtrip_and_learnable():
    p = SEIRParams(R0=2.2, transmission_multiplier=torch.tensor([1.0, 0.8]))
    q = SEIRParams.from_dict(p.to_dict())
    assert q.R0 == 2.2 and torch.equal(q.transmission_multiplier, p.transmission_multiplier)
    t = p.as_tensors(learn=("R0",))
    assert t.learnable().keys() == {"R0"} and t.R0.requires_grad
    assert t.at_step("transmission_multiplier", 0) == 1.0 and float(t.at_step("transmission_multiplier", 99)) == pytest.approx(0.8)
    assert dataclasses.is_dataclass(t) and t.mixing == "layered"


def test_time_varying_parameters_and_levers_read_at_a_step_tensor_are_those_at_the_step():
    """`Params.at_step` and `Schedule.at` with the step's number as a 0-dim tensor (`StepContext.clock`): the values at
    that step, clamped past the end as with an int."""
    import datetime as dt

    from agenttensor import Intervention
    from agenttensor.interventions import compile_schedule
    from models.covid.model import MODEL, CovidParams

    params = CovidParams(transmission_multiplier=torch.tensor([1.0, 0.5, 2.0])).as_tensors()
    schedule = compile_schedule([[Intervention("school_closure", 3, 9, 0.7)]], levers=MODEL.levers, steps=12,
                                start_date=dt.date(2020, 3, 2), group_labels=["a", "b"], age_band_edges=(0, 18))
    for step in (0, 6, 7, 13, 14, 40):
        clock = torch.tensor(step, dtype=torch.int32)
        assert torch.equal(params.at_step("transmission_multiplier", clock),
                           params.at_step("transmission_multiplier", step))
        assert torch.equal(schedule.at("school_closure", clock), schedule.at("school_closure", step))

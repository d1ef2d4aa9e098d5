"""`TensorState.replace`: dataclasses.replace's result without its init call."""

import dataclasses

import pytest
import torch

from agenttensor.state import TensorState


@dataclasses.dataclass(frozen=True)
class _Two(TensorState):
    a: torch.Tensor
    b: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Checked(TensorState):
    a: torch.Tensor

    def __post_init__(self):
        if self.a.dim() != 2:
            raise ValueError("a must be [B, N]")


def test_replace_gives_dataclasses_replace_result_and_leaves_the_old_state():
    old = _Two(torch.zeros(1, 3), torch.ones(1, 3))
    new_a = torch.full((1, 3), 2.0)
    new = old.replace(a=new_a)
    assert type(new) is _Two and new.a is new_a and new.b is old.b and new == dataclasses.replace(old, a=new_a)
    assert torch.equal(old.a, torch.zeros(1, 3))
    with pytest.raises(TypeError):
        old.replace(c=new_a)  # not a field: dataclasses.replace's error
    with pytest.raises(TypeError):
        old.replace(gradient_only=("a",))  # a class variable, not a field


def test_replace_runs_a_states_own_checks():
    with pytest.raises(ValueError):
        _Checked(torch.zeros(1, 3)).replace(a=torch.zeros(3))

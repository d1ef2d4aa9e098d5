"""Models: an ordered set of pure, vectorised substeps over a typed state.

A `Model` is built by composition (no subclassing):

- ``setup(population, params, device) -> env``: static tensors derived once from the population
  (group layers, ages, labels). Never changes during a run.
- ``init(env, params, ctx) -> state``: the state at step 0, shaped [B, N].
- ``substeps``: ordered `Substep` s, each a pure function ``(state, params, ctx) -> state``.
- ``metrics(previous, state, params, ctx) -> {name: [B] or [B, G]}``: what is recorded each step;
  [B, G] tensors are per group (labels in ``env.group_labels``).

Step order (the one place it is defined; `Model.step` implements it):

1. **observe** substeps read the state and environment (e.g. infection pressure per layer).
2. **decide** substeps set behaviour (e.g. isolation, going to work) from observations.
3. **transition** substeps apply events (infection, stage progression) using the pre-step state
   for all flows, so results do not depend on the order agents are processed.
4. ``metrics`` compares the previous and new state and records outputs.

Randomness is an explicit input: substeps draw ``ctx.uniform("stream-name")``, keyed by
(seed, step, stream, agent id).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from . import select
from .params import Params
from .rng import Randomness, Uniforms, hard_events, hard_hazard_events
from .sampling import EventDerivatives, Hard, Moved, Sampler
from .state import TensorState

SubstepKind = Literal["observe", "decide", "transition"]


@dataclass(frozen=True)
class StepContext:
    """Everything a substep may read besides state and params."""

    step: int
    env: Any
    rng: Randomness
    sampler: Sampler = Hard()
    start_date: dt.date | None = None
    scratch: dict = field(default_factory=dict)  # observations passed from observe to later substeps
    schedule: Any = None  # compiled interventions (agenttensor.interventions.Schedule) or None
    # the loop that owns the states its steps make (nobody else reads them after the next step), or None: a model
    # may update in place a state tensor that its previous step, or its ``init`` called with this context, made for
    # this owner (`owns` / `own`), as JAX's donated buffers; never a caller's state or a checkpointed segment's
    # input. `simulate` passes one owner per loop (``init`` included); a step called directly, without one, is pure.
    donate: object | None = None
    # no host synchronisation in the step (what a CUDA graph capture of it needs; on a GPU the host then runs ahead of
    # the device instead of waiting for it): hard-mode events drawn for every agent and sparse sets kept as [B, N]
    # masks, never as index lists whose length the host must read. The same numbers. Only the torch-op path reads it:
    # where the native CPU kernels run (they sync nothing a GPU would wait for) they run as before.
    sync_free: bool = False
    # the step number as a 0-dim int32 tensor on the run's device, in a step that a CUDA graph may capture and replay
    # on other days (`agenttensor.graphs`): the step's draws, time-varying parameters, levers and countdown
    # arithmetic read it (`now`), so a replay computes its own day; Python branches still read ``step``, and the
    # model's `Model.day_kind` says which steps take the same branches
    clock: Tensor | None = None

    def owns(self, x: Tensor) -> bool:
        """Whether this step may update x in place: x was made by an earlier step for this loop (`own`)."""
        return self.donate is not None and getattr(x, "_agenttensor_owner", None) is self.donate

    def own(self, x: Tensor) -> Tensor:
        """x, marked as made by this loop's step (the next step of the same loop may update it in place)."""
        if self.donate is not None:
            x._agenttensor_owner = self.donate
        return x

    @property
    def now(self) -> int | Tensor:
        """The step number for arithmetic and draws: `clock` where the step may be captured, else ``step``."""
        return self.step if self.clock is None else self.clock

    def lever(self, name: str, layer: str | None = None) -> Tensor | None:
        """Intervention intensity at this step, [B, G, A] (borough group × age band), or None."""
        return None if self.schedule is None else self.schedule.at(name, self.now, layer)

    @property
    def date(self) -> dt.date | None:
        return None if self.start_date is None else self.start_date + dt.timedelta(days=self.step)

    def uniform(self, stream: str) -> Tensor:
        """[B, N] uniforms for this step and stream."""
        return self.rng.uniform(self.now, stream)

    def bernoulli(self, p: Tensor, stream: str, where: Tensor | None = None) -> Tensor:
        """Event indicators 1[u < p] in the run's sampling mode, [B, N]; p broadcastable to [B, N].

        ``where`` [B, N] (0/1 membership) restricts events to those agents (``events * where``);
        in hard mode only those agents' numbers are drawn, which is faster when they are few.
        The draws are the same numbers either way (keyed by agent id).
        """
        if where is None or self.sampler.differentiable or not self.few(where):
            return self.dense_bernoulli(p, stream, where)
        return self._bernoulli_at_members(p, stream, where)

    def _bernoulli_at_members(self, p: Tensor | float, stream: str, where: Tensor) -> Tensor:
        """Hard ``bernoulli`` with p and u read at the members of ``where`` only."""
        b, i = select.nonzero(where)
        u = self.rng.uniform_at(self.step, stream, b, i)
        p_sel = p.expand(where.shape)[b, i] if isinstance(p, Tensor) and p.dim() > 0 else p
        events = torch.zeros_like(where)
        events[b, i] = (u < p_sel).to(where.dtype)
        return events

    def dense_bernoulli(self, p: Tensor | float, stream: str, where: Tensor | None = None, complement: bool = False
                        ) -> Tensor:
        """``bernoulli`` drawn for every agent: 1[u < p] · where [B, N] (``complement``: 1[u < 1 − p]). On CPU one
        native pass (uniforms, comparison and product), the same numbers: `Randomness.hard_event` in hard mode,
        `Randomness.float_event` in straight-through (`Sampler.event_among`)."""
        if not self.sampler.differentiable:
            events = self.rng.hard_event(self.now, stream, p, where, complement)
            if events is not None:
                return events
            if type(self.sampler) is Hard:  # (other devices, kernels off: one function, fused on request)
                return hard_events(self.rng.agent_base, self.rng._keys(self.now, (stream,)), p, where, complement)
        return self.sampler.event_among(p, Uniforms(self.rng, self.now, stream), where, complement)

    def few(self, where: Tensor) -> bool:
        """Whether at most a quarter of ``where`` [B, N] is non-zero: hard-mode events are then drawn at those agents
        only (``nonzero``, gathers, one scatter), else for every agent in one pass (always with `sync_free`: the count
        is a host synchronisation)."""
        return not self.sync_free and select.count(where) * 4 <= where.numel()

    def hazard_event(self, hazard: Tensor, stream: str, where: Tensor) -> Tensor:
        """Events at rate ``hazard`` [B, N] over this step among ``where`` (0/1): ``bernoulli(1 − exp(−hazard),
        stream, where)``, the same numbers; in gradient modes one fused node (`Sampler.hazard_event`)."""
        if self.sampler.differentiable:
            return self.sampler.hazard_event(hazard, Uniforms(self.rng, self.step, stream), where)
        if self.sync_free and type(self.sampler) is Hard:  # every agent: the hash, exp(−λ), the comparison and the
            # product as one function (`rng.hard_hazard_events`, fused with AGENTTENSOR_COMPILE=1), the same numbers
            return hard_hazard_events(self.rng.agent_base, self.rng._keys(self.now, (stream,)), hazard, where)
        survival = (-hazard).exp_()
        if not self.few(where):
            return self.dense_bernoulli(survival, stream, where, complement=True)
        return self._bernoulli_at_members(1 - survival, stream, where)

    def hazard_event_and_derivatives(self, hazard: Tensor, stream: str, where: Tensor
                                     ) -> tuple[Tensor, EventDerivatives | None]:
        """`hazard_event` and, in a gradient mode whose derivatives are a mask and a factor (straight-through), those
        (`EventDerivatives`: the events then carry no autograd graph, their derivatives are the caller's to apply;
        `Sampler.hazard_event_and_derivatives`); else ``(hazard_event(...), None)``."""
        if self.sampler.differentiable:
            return self.sampler.hazard_event_and_derivatives(hazard, Uniforms(self.rng, self.step, stream), where)
        return self.hazard_event(hazard, stream, where), None

    def hazard_move_and_derivatives(self, hazard: Tensor, stream: str, source: Tensor, target: Tensor,
                                    in_place: bool = False) -> Moved | None:
        """Gradient modes: `hazard_event_and_derivatives` among ``source`` with its events moved to ``target`` in the
        same pass (`Sampler.hazard_move_and_derivatives`; ``in_place``: into source and target themselves, for a
        caller that owns them and whose autograd nodes saved neither), or None (hard mode, other samplers, no native
        pass)."""
        if not self.sampler.differentiable:
            return None
        return self.sampler.hazard_move_and_derivatives(hazard, Uniforms(self.rng, self.step, stream), source, target,
                                                        in_place)


@dataclass(frozen=True)
class Substep:
    name: str
    kind: SubstepKind
    fn: Callable[[TensorState, Params, StepContext], TensorState]


_ORDER = {"observe": 0, "decide": 1, "transition": 2}


@dataclass(frozen=True)
class Model:
    name: str
    params_type: type[Params]
    setup: Callable[..., Any]
    init: Callable[[Any, Params, StepContext], TensorState]
    substeps: tuple[Substep, ...]
    metrics: Callable[[TensorState, TensorState, Params, StepContext], Mapping[str, Tensor]]  # a dict or `PackedRecord`
    default_population: Callable[..., Any] | None = None
    description: str = ""
    levers: tuple = ()  # LeverSpec s this model understands (see agenttensor.interventions)
    age_band_edges: tuple[int, ...] = (0,)  # lower age edges of the bands interventions can target
    configure: Callable[[dict], "Model"] | None = None  # CLI options (behavior, llm_url, ...) -> configured model
    run_info: Callable[[], dict] | None = None  # extra facts for summary.json (e.g. LLM call statistics)
    # steps whose Python branches agree get the same kind (any hashable), so that one captured CUDA graph serves them
    # (`agenttensor.graphs`); None: the step runs eagerly (e.g. a weekly decision). None here: no step is captured
    day_kind: Callable[[StepContext, Params], Any] | None = None

    def __post_init__(self) -> None:
        kinds = [_ORDER[s.kind] for s in self.substeps]
        if kinds != sorted(kinds):
            raise ValueError(f"model {self.name}: substeps must be ordered observe -> decide -> transition, got "
                             f"{[s.kind for s in self.substeps]}")

    def step(self, state: TensorState, params: Params, ctx: StepContext) -> tuple[TensorState, Mapping[str, Tensor]]:
        """One step: substeps in order, then metrics of (previous, new)."""
        previous = state
        for substep in self.substeps:
            state = substep.fn(state, params, ctx)
        return state, self.metrics(previous, state, params, ctx)

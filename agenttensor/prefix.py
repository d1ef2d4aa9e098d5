"""Shared-prefix execution for scenario batches.

On common random numbers, scenarios whose inputs agree on steps 0..d-1 are bit-identical up to
step d: the model, the environment, the seeds and therefore every random number are the same, and
a model reads its inputs at the current step only (``ctx.lever(name)`` → the schedule at
``ctx.step``; ``params.at_step(name, ctx.step)`` for time-varying parameters). `run_scenarios`
therefore runs steps first_step..d-1 once per seed (batch S), expands the final state to
scenarios × seeds (``index_select`` along the batch dim of every state tensor) and continues from
step d with `simulate(initial_state=..., first_step=d)`.

`shared_prefix_steps` finds d from the scenarios' parameters and their compiled lever schedules;
`sharing_blocker` says why sharing would not be exact (or would not help) for a pass.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .interventions import Schedule
from .params import Params


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and bool(torch.equal(a.detach().float(), b.detach().float()))
    return a == b


def shared_prefix_steps(per_scenario: Sequence[Params], schedule: Schedule | None, steps: int) -> tuple[int, str]:
    """(d, what): all scenarios have identical inputs on steps 0..d-1 (0 ≤ d ≤ steps), and the input
    that first differs ("" when d == steps).

    per_scenario: one `Params` per scenario. A time-varying parameter ([T] values, ``period`` steps
    each; a shorter series holds its last value, as in `batch_params`) limits d to the first step that
    reads a differing value; any other differing parameter gives d = 0. schedule: one row per scenario,
    ``values[(lever, layer)]`` [n, T, G, A]; d is limited to the first step at which rows differ.
    """
    d, what = steps, ""
    first = per_scenario[0]
    for name, f in first.spec().items():
        values = [getattr(p, name) for p in per_scenario]
        if all(_same(v, values[0]) for v in values[1:]):
            continue
        if not f.metadata.get("time_varying"):
            return 0, f"parameter {name}"
        series = [torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1) for v in values]
        if any(s.numel() == 0 for s in series):
            return 0, f"parameter {name}"
        length = max(s.numel() for s in series)
        padded = torch.stack([torch.cat([s, s[-1:].expand(length - s.numel())]) for s in series])  # [n, L]
        differs = (padded != padded[:1]).any(0).nonzero()
        if differs.numel():
            step = int(differs[0]) * int(f.metadata.get("period", 1) or 1)
            if step < d:
                d, what = step, f"parameter {name} from step {step}"
    if schedule is not None:
        for (lever, layer), v in schedule.values.items():  # [n, T, G, A]
            differs = (v.detach() != v.detach()[:1]).flatten(2).any(2).any(0).nonzero()
            if differs.numel():
                step = int(differs[0])
                if step < d:
                    d, what = step, f"lever {lever}{'/' + layer if layer else ''} from step {step}"
    return min(d, steps), what


def select_schedule(schedule: Schedule | None, rows: Sequence[int]) -> Schedule | None:
    """Rows of a compiled schedule along the batch dim: [n, T, G, A] → [len(rows), T, G, A] per lever."""
    if schedule is None:
        return None
    out = {}
    for key, v in schedule.values.items():
        out[key] = v.index_select(0, torch.as_tensor(list(rows), dtype=torch.int64, device=v.device))
    return Schedule(out, len(rows), schedule.groups, schedule.age_bands)


CHECKPOINT_KEYS = ("checkpoint_every", "checkpoint_path", "resume")


def sharing_blocker(*, env: Any, sampler: Any, per_scenario: Sequence[Params], schedule: Schedule | None,
                    simulate_kwargs: dict) -> str | None:
    """Why a shared prefix cannot be used exactly for this pass, or None.

    - gradient samplers, learnable parameters or interventions that carry gradients (the expanded
      state would tie every scenario's graph to one prefix; not supported),
    - checkpointing (one checkpoint file per run),
    - a behaviour source (``env.behavior``) that does not declare ``stateless = True``: a source
      that keeps per-batch-element state between steps would see the prefix batch (seeds) and then a
      larger batch (scenarios × seeds).
    """
    if getattr(sampler, "differentiable", False):
        return f"gradient sampler {type(sampler).__name__}"
    if any(p.learnable() for p in per_scenario):
        return "learnable parameters (requires_grad)"
    if schedule is not None and any(v.requires_grad for v in schedule.values.values()):
        return "interventions carry gradients"
    used = [k for k in CHECKPOINT_KEYS if simulate_kwargs.get(k)]
    if used:
        return f"checkpointing ({', '.join(used)})"
    behavior = getattr(env, "behavior", None)
    if behavior is not None and not getattr(behavior, "stateless", False):
        return (f"behaviour source {type(behavior).__name__} does not declare stateless = True "
                "(it may keep per-batch-element state between steps)")
    return None

"""`simulate`: the one entry point that runs a model for N steps and records its metrics."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .errors import ConfigError, InputError
from .model import Model, StepContext
from .params import Params
from .results import Results
from .rng import Randomness
from .sampling import Hard, Sampler


def resolve_device(device: str | torch.device) -> torch.device:
    """Validate a device string with an actionable error (e.g. cuda without a GPU)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available to torch; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    return dev


def simulate(model: Model, population: Any = None, params: Params | None = None, *, steps: int,
             seeds: Sequence[int] = (0,), sampler: Sampler = Hard(), device: str | torch.device = "cpu",
             env: Any = None, start_date: dt.date | None = None, progress: bool | None = None,
             checkpoint_every: int | None = None, checkpoint_path: str | Path | None = None, resume: bool = False,
             grad_checkpoint_every: int | None = None, interventions: Sequence[Any] | None = None) -> Results:
    """Run ``model`` for ``steps`` steps on a batch of seeds (one pass, leading batch dim B).

    population: a `Population` (or None for the model's default); env: a prebuilt environment
    (skips ``model.setup``); sampler: `Hard` (default) or a gradient mode; params may hold
    tensors that require grad — the returned metrics then carry gradients.
    checkpoint_every/checkpoint_path/resume: save the state every k steps and continue from the
    last save. grad_checkpoint_every: in gradient modes, recompute each k-step segment during the
    backward pass instead of storing it (exact, because randomness is counter-based).
    interventions: a list of `Intervention` (applied to every batch element) or one list per batch
    element (then len == len(seeds)); compiled against ``model.levers``.
    """
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if not seeds:
        raise ConfigError("at least one seed is required")
    dev = resolve_device(device)
    params = (params if params is not None else model.params_type()).validate()
    params = params.as_tensors(dev, learn=tuple(params.learnable()))
    t0 = time.perf_counter()
    if env is None:
        if population is None:
            if model.default_population is None:
                raise ConfigError(f"model {model.name} needs a population (pass --population PATH)")
            population = model.default_population()
        env = model.setup(population, params, dev)
    rng = Randomness.for_agents(list(seeds), env.agent_ids).to(dev)
    schedule = None
    if interventions:
        from .interventions import Intervention, compile_schedule

        per_batch = [list(interventions)] * len(seeds) if isinstance(interventions[0], Intervention) else interventions
        if len(per_batch) != len(seeds):
            raise ConfigError(f"{len(per_batch)} intervention lists for a batch of {len(seeds)}")
        schedule = compile_schedule(per_batch, levers=model.levers, steps=steps, start_date=start_date,
                                    group_labels=getattr(env, "group_labels", []) or ["all"],
                                    age_band_edges=model.age_band_edges).to(dev)
    setup_seconds = time.perf_counter() - t0

    ctx0 = StepContext(step=0, env=env, rng=rng, sampler=sampler, start_date=start_date, schedule=schedule)
    state = model.init(env, params, ctx0)
    keep_graph = sampler.differentiable or bool(params.learnable())
    history = _Recorder(steps, keep_graph)
    first = 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise InputError(f"cannot resume: checkpoint {ckpt} does not exist")
        saved = torch.load(ckpt, map_location=dev, weights_only=True)
        if list(saved["seeds"]) != list(seeds) or saved["model"] != model.name:
            raise InputError(f"checkpoint {ckpt} is for model {saved['model']} seeds {saved['seeds']}, not this run")
        state = state.replace(**saved["state"])
        history.extend(dict(h) for h in saved["history"])
        first = int(saved["step"])

    def run_steps(state, start: int, stop: int):
        records = []
        for t in range(start, stop):
            ctx = StepContext(step=t, env=env, rng=rng, sampler=sampler, start_date=start_date, schedule=schedule)
            state, rec = model.step(state, params, ctx)
            records.append(rec)
        return state, records

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=first, desc=model.name, unit="step", leave=False)
    t1 = time.perf_counter()
    t = first
    segment = grad_checkpoint_every if (grad_checkpoint_every and sampler.differentiable) else 1
    while t < steps:
        stop = min(steps, t + segment)
        if segment > 1:
            names = list(state.tensors())

            key_holder: list[str] = []

            def segment_fn(*tensors, _start=t, _stop=stop, _keys=key_holder):
                s, recs = run_steps(state.replace(**dict(zip(names, tensors))), _start, _stop)
                keys = list(recs[0])
                _keys[:] = keys
                return tuple(s.tensors().values()) + tuple(torch.stack([r[k] for r in recs]) for k in keys)

            out = grad_checkpoint(segment_fn, *state.tensors().values(), use_reentrant=False)
            new_tensors, stacked = out[:len(names)], out[len(names):]
            state = state.replace(**dict(zip(names, new_tensors)))
            for i in range(stop - t):
                history.append({k: v[i] for k, v in zip(key_holder, stacked)})
        else:
            state, recs = run_steps(state, t, stop)
            history.extend(recs)
        t = stop
        if bar is not None:
            bar.update(stop - bar.n)
        if ckpt is not None and checkpoint_every and (t % checkpoint_every == 0 or t == steps):
            _save_checkpoint(ckpt, model, seeds, t, state, history)
    if bar is not None:
        bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    run_seconds = time.perf_counter() - t1
    return Results.from_history(history.stacked(), model_name=model.name, params=params, seeds=list(seeds), env=env,
                                final_state=state, start_date=start_date,
                                timing=dict(setup_seconds=setup_seconds, run_seconds=run_seconds,
                                            seconds_per_step=run_seconds / max(steps - first, 1)),
                                sampler=type(sampler).__name__, device=str(dev))


class _Recorder:
    """Per-step metrics. Without gradients they are copied into buffers preallocated for the whole
    run ([T, ...] per metric), so a long run keeps no per-step allocations alive (thousands of small
    long-lived tensors fragment glibc's heap: a 500-step 1M-agent run grew by ~30 MB per step).
    With gradients the step tensors are kept as they are (they carry the graph)."""

    def __init__(self, steps: int, keep_graph: bool):
        self.steps, self.keep_graph = steps, keep_graph
        self.records: list[dict[str, torch.Tensor]] = []
        self.buffers: dict[str, torch.Tensor] | None = None
        self.count = 0

    def append(self, record: dict[str, torch.Tensor]) -> None:
        if self.keep_graph:
            self.records.append(record)
        else:
            if self.buffers is None:
                self.buffers = {k: torch.empty((self.steps, *v.shape), dtype=v.dtype, device=v.device)
                                for k, v in record.items()}
            for k, v in record.items():
                self.buffers[k][self.count].copy_(v)
        self.count += 1

    def extend(self, records) -> None:
        for r in records:
            self.append(r)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.keep_graph:
            return self.records[i]
        return {k: v[i] for k, v in (self.buffers or {}).items()}

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def stacked(self) -> dict[str, torch.Tensor]:
        if self.keep_graph:
            return {k: torch.stack([r[k] for r in self.records]) for k in (self.records[0] if self.records else {})}
        return {k: v[: self.count] for k, v in (self.buffers or {}).items()}


def _save_checkpoint(path: Path, model: Model, seeds, step: int, state, history) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(model=model.name, seeds=list(seeds), step=step,
                    state={k: v.detach().cpu() for k, v in state.tensors().items()},
                    history=[{k: v.detach().cpu() for k, v in h.items()} for h in history]), tmp)
    tmp.replace(path)

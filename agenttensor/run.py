"""`simulate`: the one entry point that runs a model for N steps and records its metrics."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from . import _cpu_cache, select
from .errors import ConfigError, InputError
from .model import Model, StepContext
from .params import Params
from .record import PackedRecord
from .results import Results
from .rng import Randomness
from .sampling import Hard, Sampler

log = logging.getLogger(__name__)


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


def _heap_only_without_gradients(fn):
    """Run ``fn`` (simulate) with large allocations served from the heap when no gradient is kept
    (see `agenttensor._malloc.heap_only`: removes per-step page faults at city scale)."""
    import functools

    from ._malloc import heap_only

    @functools.wraps(fn)
    def wrapper(model, population=None, params=None, *args, **kwargs):
        sampler = kwargs.get("sampler", Hard())
        learnable = params is not None and hasattr(params, "learnable") and bool(params.learnable())
        if getattr(sampler, "differentiable", False) or learnable:
            return fn(model, population, params, *args, **kwargs)
        with heap_only():
            return fn(model, population, params, *args, **kwargs)

    return wrapper


@_heap_only_without_gradients
def simulate(model: Model, population: Any = None, params: Params | None = None, *, steps: int,
             seeds: Sequence[int] = (0,), sampler: Sampler = Hard(), device: str | torch.device = "cpu",
             env: Any = None, start_date: dt.date | None = None, progress: bool | None = None,
             checkpoint_every: int | None = None, checkpoint_path: str | Path | None = None, resume: bool = False,
             grad_checkpoint_every: int | None = None, interventions: Sequence[Any] | Any = None,
             initial_state: Any = None, first_step: int = 0, sync_free: bool = False,
             cuda_graphs: bool | str = False) -> Results:
    """Run ``model`` for ``steps`` steps on a batch of seeds (one pass, leading batch dim B).

    population: a `Population` (or None for the model's default); env: a prebuilt environment
    (skips ``model.setup``); sampler: `Hard` (default) or a gradient mode; params may hold
    tensors that require grad — the returned metrics then carry gradients.
    checkpoint_every/checkpoint_path/resume: save the state every k steps and continue from the
    last save. grad_checkpoint_every: in gradient modes, recompute each k-step segment during the
    backward pass instead of storing it (exact, because randomness is counter-based).
    interventions: a list of `Intervention` (applied to every batch element), one list per batch
    element (then len == len(seeds)), or a compiled `Schedule` ([B, T, G, A] per lever); compiled
    against ``model.levers`` for steps 0..steps-1.

    initial_state / first_step: start from a model state at step ``first_step`` (e.g.
    ``Results.final_state`` of an earlier run, [B, N] with B = len(seeds), or B = 1 broadcast to
    every seed) and run steps first_step..steps-1 only. ``model.init`` is not used. Random numbers
    are keyed by (seed, step, stream, agent), so with the same seeds the continuation is
    bit-identical (hard mode) to steps first_step.. of one run from step 0. Steps keep their
    calendar: ``start_date`` is the date of step 0, interventions and time-varying parameters are
    indexed by absolute step, and ``Results.metrics[name][k]`` is step ``first_step + k``
    (``Results.first_step``). State tensors of the right batch are used as they are (models update
    in place only the states their own earlier steps made, `StepContext.donate`); a 0/1 state from
    a hard run is cast to float for gradient modes.

    sync_free: hard-mode steps that read nothing back on the host (`StepContext.sync_free`: masks instead of index
    lists; the same numbers), for a GPU, whose host may then queue days ahead of the device. CPU runs with the native
    kernels are unchanged by it.

    cuda_graphs: hard-mode CUDA runs only: each kind of day (`Model.day_kind`) captured as a CUDA graph once and
    replayed on the others (`agenttensor.graphs`; sync-free steps; the same numbers). ``"emulate"``: the same on any
    device, replaying recorded operations (for tests; slower than plain steps).
    """
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if not seeds:
        raise ConfigError("at least one seed is required")
    first_step = _check_first_step(first_step, steps, initial_state)
    dev = resolve_device(device)
    if cuda_graphs:
        if sampler.differentiable or (params is not None and params.learnable()):
            raise ConfigError("cuda_graphs: hard mode only, without learnable parameters (a gradient run's autograd "
                              "graph is built on the host, day by day)")
        if cuda_graphs not in (True, "emulate"):
            raise ConfigError(f"cuda_graphs must be True, False or 'emulate', got {cuda_graphs!r}")
        if cuda_graphs is True and dev.type != "cuda":
            raise ConfigError(f"cuda_graphs needs a CUDA device (--device cuda), not {dev}")
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
    if interventions is not None and not _is_intervention_list(interventions):
        schedule = interventions.to(dev)  # a compiled Schedule
        if schedule.batch != len(seeds):
            raise ConfigError(f"the intervention schedule has batch {schedule.batch}, the run {len(seeds)} seeds")
    elif interventions:
        from .interventions import Intervention, compile_schedule

        per_batch = [list(interventions)] * len(seeds) if isinstance(interventions[0], Intervention) else interventions
        if len(per_batch) != len(seeds):
            raise ConfigError(f"{len(per_batch)} intervention lists for a batch of {len(seeds)}")
        schedule = compile_schedule(per_batch, levers=model.levers, steps=steps, start_date=start_date,
                                    group_labels=getattr(env, "group_labels", []) or ["all"],
                                    age_band_edges=model.age_band_edges).to(dev)
    setup_seconds = time.perf_counter() - t0

    graphs = None
    if cuda_graphs:
        from .graphs import DayGraphs

        graphs = DayGraphs(model, params, backend="emulate" if cuda_graphs == "emulate" else "cuda")
        sync_free = True
    owner = object()  # this run reads no state its step made after the next step (`StepContext.donate`)
    ctx0 = StepContext(step=0, env=env, rng=rng, sampler=sampler, start_date=start_date, schedule=schedule,
                       donate=owner)  # the state init makes is the run's own (the first step may update it in place)
    if initial_state is None:
        state = model.init(env, params, ctx0)
    else:
        state = _given_state(model, env, params, sampler, start_date, initial_state, list(seeds), dev)
    keep_graph = sampler.differentiable or bool(params.learnable())
    if keep_graph:  # city-scale gradient runs: reuse freed [B, N] blocks instead of faulting in fresh pages
        _cpu_cache.enable_for(len(seeds) * int(rng.agent_base.numel()), dev)
    history = _Recorder(steps - first_step, keep_graph)
    first = first_step
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise InputError(f"cannot resume: checkpoint {ckpt} does not exist")
        saved = torch.load(ckpt, map_location=dev, weights_only=True)
        if list(saved["seeds"]) != list(seeds) or saved["model"] != model.name:
            raise InputError(f"checkpoint {ckpt} is for model {saved['model']} seeds {saved['seeds']}, not this run")
        if int(saved.get("first_step", 0)) != first_step:
            raise InputError(f"checkpoint {ckpt} is of a run that started at step {saved.get('first_step', 0)}, "
                             f"not {first_step}")
        state = state.replace(**saved["state"])
        history.extend(dict(h) for h in saved["history"])
        first = int(saved["step"])

    def run_steps(state, start: int, stop: int):
        records = []
        for t in range(start, stop):
            ctx = StepContext(step=t, env=env, rng=rng, sampler=sampler, start_date=start_date, schedule=schedule,
                              donate=owner, sync_free=sync_free)
            state, rec = model.step(state, params, ctx) if graphs is None else graphs.step(state, ctx)
            records.append(rec)
        return state, records

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=steps - first_step, initial=first - first_step, desc=model.name, unit="step", leave=False)
    t1 = time.perf_counter()
    t = first
    segment = grad_checkpoint_every if (grad_checkpoint_every and sampler.differentiable) else 1
    while t < steps:
        stop = min(steps, t + segment)
        if segment > 1:
            names = list(state.tensors())

            key_holder: list[str] = []

            # _template: this segment's input state (bound now). Closing over the loop variable `state`
            # would tie the checkpoint's recompute function to the final state, whose graph holds the
            # function: a reference cycle through autograd that Python cannot collect (every gradient run
            # leaked its state tensors: ~300 MB per calibration epoch at 175k agents × 2 seeds).
            carriers, values = _compact_inputs(list(state.tensors().values()))

            def segment_fn(*tensors, _start=t, _stop=stop, _keys=key_holder, _template=state, _values=values):
                tensors = [c if v is None else _Rebuilt.apply(v, c) for c, v in zip(tensors, _values)]
                s, recs = run_steps(_template.replace(**dict(zip(names, tensors))), _start, _stop)
                keys = list(recs[0])
                _keys[:] = keys
                return tuple(s.tensors().values()) + tuple(torch.stack([r[k] for r in recs]) for k in keys)

            out = grad_checkpoint(segment_fn, *carriers, use_reentrant=False)
            del carriers, values
            new_tensors, stacked = out[:len(names)], out[len(names):]
            state = state.replace(**dict(zip(names, new_tensors)))
            for i in range(stop - t):
                history.append({k: v[i] for k, v in zip(key_holder, stacked)})
        else:
            state, recs = run_steps(state, t, stop)
            history.extend(recs)
        t = stop
        if bar is not None:
            bar.update(stop - first_step - bar.n)
        if ckpt is not None and checkpoint_every and (t % checkpoint_every == 0 or t == steps):
            _save_checkpoint(ckpt, model, seeds, t, state, history, first_step)
    if bar is not None:
        bar.close()
    if graphs is not None:  # (the last day's state may be a graph's output buffers, which a replay would overwrite)
        state = state.map(torch.clone)
        log.info("cuda graphs: %s%s", graphs.stats, f" ({graphs.off})" if graphs.off else "")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    run_seconds = time.perf_counter() - t1
    return Results.from_history(history.stacked(), model_name=model.name, params=params, seeds=list(seeds), env=env,
                                final_state=state, start_date=start_date,
                                timing=dict(setup_seconds=setup_seconds, run_seconds=run_seconds,
                                            seconds_per_step=run_seconds / max(steps - first, 1),
                                            **({} if graphs is None else dict(cuda_graphs=dict(graphs.stats)))),
                                sampler=type(sampler).__name__, device=str(dev), first_step=first_step)


def _check_first_step(first_step: Any, steps: int, initial_state: Any) -> int:
    if isinstance(first_step, bool) or not isinstance(first_step, int):
        raise ConfigError(f"first_step must be a whole number of steps, got {first_step!r}")
    if initial_state is None and first_step != 0:
        raise ConfigError(f"first_step={first_step} needs initial_state= (the model state at that step)")
    if not 0 <= first_step <= steps:
        raise ConfigError(f"first_step={first_step} is outside the run: it must be in 0..{steps} (steps={steps})")
    return first_step


class _DerivativeCarrier(torch.autograd.Function):
    """Zeros shaped like x without x's storage (an expanded scalar); the gradient passes to x unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.new_zeros(()).expand(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _Rebuilt(torch.autograd.Function):
    """A compacted input rebuilt: the values (uint8) as the carrier's dtype, ``values + carrier``'s numbers (the carrier
    is zeros) in one pass; the gradient passes to the carrier."""

    @staticmethod
    def forward(ctx, values: Tensor, carrier: Tensor) -> Tensor:
        return values.to(carrier.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


def _all_zero_or_one(x: Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _compact_inputs(tensors: list[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
    """A checkpointed segment's input state, compacted: float tensors whose values are all 0 or 1 (memberships
    in the gradient modes) are kept as uint8 values plus a storage-free carrier of their derivative, rebuilt
    as ``values + carrier`` when the segment is recomputed (4 → 1 byte per agent and field). -> (segment
    inputs, uint8 values or None per input)."""
    carriers, values = [], []
    for x in tensors:
        compact = select.zero_one_bytes(x.detach()) if x.requires_grad and x.dtype.is_floating_point and x.numel() \
            else None  # (one native pass on CPU: the check and the bytes)
        if compact is not None:
            carriers.append(_DerivativeCarrier.apply(x))
            values.append(compact)
        else:  # an alias, not marked as the run's own: the segment's first step must not update it in place, the
            carriers.append(x.view_as(x))  # recomputation reads it (`StepContext.donate`)
            values.append(None)
    return carriers, values


def _is_intervention_list(interventions: Any) -> bool:
    return isinstance(interventions, (list, tuple))


def _given_state(model: Model, env: Any, params: Params, sampler: Sampler, start_date: dt.date | None,
                 given: Any, seeds: list[int], dev: torch.device) -> Any:
    """Check ``given`` against the state ``model.init`` makes (type, fields, per-element shapes, dtypes)
    and return it as a [B, ...] state on ``dev`` (B = 1 is broadcast to B = len(seeds))."""
    from .state import TensorState

    if isinstance(given, Results):
        raise ConfigError("initial_state is a Results; pass its .final_state")
    if not isinstance(given, TensorState):
        raise ConfigError(f"initial_state must be a model state (a TensorState), got {type(given).__name__}")
    ctx = StepContext(step=0, env=env, rng=Randomness.for_agents(seeds[:1], env.agent_ids).to(dev), sampler=sampler,
                      start_date=start_date)
    reference = model.init(env, params, ctx)  # B = 1: names, shapes and dtypes of this model's state
    if type(given) is not type(reference):
        raise ConfigError(f"initial_state is a {type(given).__name__}, but model {model.name} has states of type "
                          f"{type(reference).__name__}")
    B, batch = given.batch_size, len(seeds)
    if B not in (1, batch):
        raise ConfigError(f"initial_state has batch size {B}, but the run has {batch} seed(s); pass one state per "
                          "seed (in the order of seeds) or a batch of 1 (used for every seed)")
    out = {}
    for name, ref in reference.tensors().items():
        t = getattr(given, name)
        if name in type(reference).gradient_only and t.shape[1:] != ref.shape[1:]:
            t = torch.zeros((B, *ref.shape[1:]), dtype=ref.dtype)  # from a run in the other sampling mode
        if tuple(t.shape[1:]) != tuple(ref.shape[1:]):
            raise ConfigError(f"initial_state.{name} has shape {list(t.shape)}, but this run needs "
                              f"[{batch}, {', '.join(map(str, ref.shape[1:]))}] (a state of another population?)")
        if t.dtype != ref.dtype:
            if ref.dtype.is_floating_point and not t.dtype.is_floating_point:
                t = t.to(ref.dtype)  # 0/1 memberships of a hard run, continued in a gradient mode
            elif ref.dtype == torch.uint8 and t.dtype.is_floating_point and _all_zero_or_one(t):
                t = t.detach().to(ref.dtype)  # a gradient-mode state (values exactly 0/1), continued in hard mode
            else:
                raise ConfigError(f"initial_state.{name} has dtype {t.dtype}, but this run ({type(sampler).__name__}) "
                                  f"uses {ref.dtype}")
        t = t.to(dev)
        if B != batch:
            t = t.expand(batch, *t.shape[1:]).contiguous()
        out[name] = t
    return given.replace(**out)


class _Recorder:
    """Per-step metrics. Without gradients they are copied into buffers preallocated for the whole
    run ([T, ...] per metric), so a long run keeps no per-step allocations alive (thousands of small
    long-lived tensors fragment glibc's heap: a 500-step 1M-agent run grew by ~30 MB per step); a
    `PackedRecord`'s blocks in one copy each ([T, K, ...]), their names made once at the end (`stacked`).
    With gradients the step tensors are kept as they are (they carry the graph)."""

    def __init__(self, steps: int, keep_graph: bool):
        self.steps, self.keep_graph = steps, keep_graph
        self.records: list[Mapping[str, torch.Tensor]] = []
        self.buffers: dict[str, torch.Tensor] | None = None  # plain records: name -> [T, ...]
        self.parts: list | None = None  # packed records: per part (layout, [T, K, ...]) or {name: [T, ...]}
        self.count = 0

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty((self.steps, *x.shape), dtype=x.dtype, device=x.device)

    def append(self, record: Mapping[str, torch.Tensor]) -> None:
        if self.keep_graph:
            self.records.append(record)
            return
        if self.buffers is None and self.parts is None:
            if isinstance(record, PackedRecord):
                self.parts = [(p[0], self._empty(p[1])) if isinstance(p, tuple) else
                              {k: self._empty(v) for k, v in p.items()} for p in record.parts]
            else:
                self.buffers = {k: self._empty(v) for k, v in record.items()}
        i = self.count
        if self.buffers is not None:  # (a packed record after plain ones, e.g. a resumed run's saved steps: by name)
            for k, buffer in self.buffers.items():
                buffer[i].copy_(record[k])
        elif isinstance(record, PackedRecord) and self._same_form(record):
            for part, buffer in zip(record.parts, self.parts):
                if isinstance(part, dict):
                    for k, v in part.items():
                        buffer[k][i].copy_(v)
                else:
                    buffer[1][i].copy_(part[1])
        else:  # records that changed form: each part by name
            for buffer in self.parts:
                if isinstance(buffer, dict):
                    for k, b in buffer.items():
                        b[i].copy_(record[k])
                else:
                    buffer[1][i].copy_(torch.stack([record[name] for name in buffer[0].rows]))
        self.count += 1

    def _same_form(self, record: PackedRecord) -> bool:
        if len(record.parts) != len(self.parts):
            return False
        for part, buffer in zip(record.parts, self.parts):
            if isinstance(part, dict) != isinstance(buffer, dict) or \
                    (part.keys() != buffer.keys() if isinstance(part, dict) else part[0] is not buffer[0]):
                return False
        return True

    def extend(self, records) -> None:
        for r in records:
            self.append(r)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Mapping[str, torch.Tensor]:
        if self.keep_graph:
            return self.records[i]
        if self.parts is not None:
            return PackedRecord(*({k: v[i] for k, v in p.items()} if isinstance(p, dict) else (p[0], p[1][i])
                                  for p in self.parts))
        return {k: v[i] for k, v in (self.buffers or {}).items()}

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def stacked(self) -> dict[str, torch.Tensor]:
        if self.keep_graph:
            return {k: torch.stack([r[k] for r in self.records]) for k in (self.records[0] if self.records else {})}
        n = self.count
        if self.parts is not None:
            out: dict[str, torch.Tensor] = {}
            for p in self.parts:
                out.update({k: v[:n] for k, v in p.items()} if isinstance(p, dict) else p[0].unpack(p[1][:n]))
            return out
        return {k: v[:n] for k, v in (self.buffers or {}).items()}


def _save_checkpoint(path: Path, model: Model, seeds, step: int, state, history, first_step: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(model=model.name, seeds=list(seeds), step=step, first_step=first_step,
                    state={k: v.detach().cpu() for k, v in state.tensors().items()},
                    history=[{k: v.detach().cpu() for k, v in h.items()} for h in history]), tmp)
    tmp.replace(path)

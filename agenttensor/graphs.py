"""Hard-mode days as CUDA graphs: each kind of day captured once, replayed on the others.

One run's day at city scale is a few hundred small kernels; issuing them from Python costs the host more than the GPU
takes to run them (an H100 ran full NYC's hard day in ~3.9 ms of kernels but 11.7 ms of wall time). A CUDA graph
replays a captured day's kernels in one launch. A day can be captured when it reads nothing back on the host
(`StepContext.sync_free`) and takes every per-day value from device memory (`StepContext.clock`: the step's number,
from which the draws' keys, the time-varying parameters and the levers are read there). The model's `Model.day_kind`
names the steps whose Python branches agree (e.g. school day, work day), so that one graph serves them all; a step
it marks None (e.g. a weekly decision) runs eagerly.

`DayGraphs.step` runs the first day of each kind eagerly on the graph's own input buffers (the warm-up that a capture
needs, on a side stream; its result is that day's), then captures the same call. Later days of that kind copy the
state into those buffers, set the clock and replay. A capture that fails (an operation CUDA graphs do not allow)
turns the graphs off for the run, logged and counted: the days then run eagerly, with the same numbers.

``backend="emulate"`` replays on any device by recording the day's aten operations with their arguments and
re-running them on the same input buffers (`_Replayed`): what a CUDA graph replays, so a test on the CPU checks that
no per-day value is baked into a captured day. Its capture refuses what a CUDA capture refuses, on any device: an
operation whose result the host reads (`host_reads.HOST_READS`) and a tensor made from host data (``torch.tensor``
of Python values, a copy between devices).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable
from typing import Any, Callable

import torch
from torch import Tensor

from .host_reads import HostReads
from .record import PackedRecord

log = logging.getLogger(__name__)


def _flatten(state, record) -> tuple[list[Tensor], Callable[[list[Tensor]], tuple[Any, Any]]]:
    """The step's outputs as a list of tensors, and the function that rebuilds (state, record) from such a list."""
    names = list(state.tensors())
    if isinstance(record, PackedRecord):
        shapes = [(part[0], None) if isinstance(part, tuple) else (None, list(part)) for part in record.parts]
        leaves = [part[1] if isinstance(part, tuple) else v for part in record.parts
                  for v in ((part[1],) if isinstance(part, tuple) else part.values())]
    else:
        shapes, leaves = list(record), list(record.values())

    def rebuild(flat: list[Tensor]):
        built = state.replace(**dict(zip(names, flat[:len(names)])))
        rest = iter(flat[len(names):])
        if isinstance(record, PackedRecord):
            return built, PackedRecord(*[(layout, next(rest)) if layout is not None else {k: next(rest) for k in keys}
                                         for layout, keys in shapes])
        return built, dict(zip(shapes, rest))

    return [getattr(state, name) for name in names] + leaves, rebuild


HOST_DATA = frozenset({"lift_fresh", "lift_fresh_copy", "lift"})  # aten's names for a tensor made from host values


def _crosses_devices(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "_to_copy" and kwargs.get("device") is not None:
        return torch.device(kwargs["device"]) != args[0].device
    return name == "copy_" and isinstance(args[1], Tensor) and args[0].device != args[1].device


class _Recording(HostReads):
    """Records every aten operation dispatched while active, with its arguments and results; counts (``counts``)
    those a CUDA capture refuses: host reads, tensors made from host data, copies between devices."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        self.seen(func._overloadpacket.__name__, args, kwargs, out)
        return out

    def seen(self, name: str, args: tuple, kwargs: dict, out) -> None:
        super().seen(name, args, kwargs, out)
        if name in HOST_DATA or _crosses_devices(name, args, kwargs):
            self.counts[name] += 1


class _Replayed:
    """The emulated graph: ``fn``'s aten operations, recorded once, re-run on replay with the tensors they made then
    replaced by the ones they make now (the inputs made before the recording, e.g. the input buffers, stay the same
    tensors, as a CUDA graph's addresses do; every Python value stays the recorded one). Its outputs are the
    recorded ones, overwritten by each replay, as a CUDA graph's are: a caller that kept a replayed day's output
    finds the next replay's values in it."""

    def __init__(self, fn: Callable[[], list[Tensor]]):
        with _Recording() as recording:
            self.outputs = fn()
        if recording.counts:
            refused = ", ".join(f"{name} x{n}" for name, n in sorted(recording.counts.items()))
            raise RuntimeError(f"operation not permitted when stream is capturing (emulated): {refused}")
        self.ops = recording.ops

    def replay(self) -> list[Tensor]:
        made: dict[int, Tensor] = {}

        def now(x):
            if isinstance(x, Tensor):
                return made.get(id(x), x)
            if isinstance(x, (list, tuple)):
                return type(x)(now(v) for v in x)
            return x

        for func, args, kwargs, out in self.ops:
            new = func(*now(args), **{k: now(v) for k, v in kwargs.items()})
            for old, fresh in zip(out if isinstance(out, (list, tuple)) else (out,),
                                  new if isinstance(new, (list, tuple)) else (new,)):
                if isinstance(old, Tensor):
                    made[id(old)] = fresh
        for recorded in self.outputs:
            if now(recorded) is not recorded:
                recorded.copy_(now(recorded))
        return self.outputs


class _Cuda:
    """A CUDA graph of ``fn`` (captured, not run: its first run is the caller's warm-up)."""

    def __init__(self, fn: Callable[[], list[Tensor]]):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self) -> list[Tensor]:
        self.graph.replay()
        return self.outputs


class _Day:
    """One kind of day: its input buffers (the state's tensors, cloned), its clock, and its graph. Made, it has run
    the day ``ctx.step`` on them (``first``: its outputs; on CUDA on a side stream, the warm-up a capture needs);
    `capture` then captures the same call."""

    def __init__(self, model, params, state, ctx, backend: str):
        self.inputs = state.replace(**{name: x.clone() for name, x in state.tensors().items()})
        self.clock = torch.tensor(ctx.step, dtype=torch.int32, device=next(iter(state.tensors().values())).device)
        self.ctx = dataclasses.replace(ctx, clock=self.clock, sync_free=True, donate=None, scratch={})
        self.model, self.params, self.backend = model, params, backend
        self.rebuild = None
        if backend == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.first = self._day()
            torch.cuda.current_stream().wait_stream(side)
            for x in self.first:  # (made on the side stream, used on this one: not reused before this one is done)
                x.record_stream(torch.cuda.current_stream())
        else:
            self.first = self._day()

    def _day(self) -> list[Tensor]:
        flat, self.rebuild = _flatten(*self.model.step(self.inputs, self.params, dataclasses.replace(self.ctx,
                                                                                                  scratch={})))
        return flat

    def capture(self) -> None:
        self.graph = _Cuda(self._day) if self.backend == "cuda" else _Replayed(self._day)

    def replay(self, state, step: int):
        for name, x in state.tensors().items():
            buffer = getattr(self.inputs, name)
            if buffer is not x:
                buffer.copy_(x)
        self.clock.fill_(step)
        return self.rebuild(self.graph.replay())


class DayGraphs:
    """Runs a model's hard days as graphs (module docstring). ``backend``: "cuda", or "emulate" (`_Replayed`: any
    device, for tests). ``stats``: days captured, replayed and run eagerly, and failed captures."""

    def __init__(self, model, params, backend: str = "cuda"):
        if backend not in ("cuda", "emulate"):
            raise ValueError(f"graph backend {backend!r}: expected 'cuda' or 'emulate'")
        self.model, self.params, self.backend = model, params, backend
        self.days: dict[Hashable, _Day] = {}
        self.stats = dict(captured=0, replayed=0, eager=0, failed=0)
        self.off: str | None = None if model.day_kind is not None else f"model {model.name} names no kinds of day"
        if self.off:
            log.warning("CUDA graphs off for this run (%s); its days run eagerly", self.off)

    def step(self, state, ctx):
        """(state, record) of the step ``ctx.step`` (a hard, sync-free step: ``ctx.sync_free``)."""
        kind = None if self.off else self.model.day_kind(ctx, self.params)
        if kind is None:
            self.stats["eager"] += 1
            return self.model.step(state, self.params, ctx)
        day = self.days.get(kind)
        if day is not None:
            self.stats["replayed"] += 1
            return day.replay(state, ctx.step)
        day = _Day(self.model, self.params, state, ctx, self.backend)  # this day, run on the graph's buffers
        try:
            day.capture()
        except Exception as e:  # an operation a capture does not allow: this run's other days run eagerly
            self.off = f"capture failed at step {ctx.step}: {type(e).__name__}: {e}"
            self.stats["failed"] += 1
            log.warning("CUDA graphs off for this run (%s); its days run eagerly, with the same numbers", self.off)
            return day.rebuild(day.first)
        self.days[kind] = day
        self.stats["captured"] += 1
        return day.rebuild(day.first)

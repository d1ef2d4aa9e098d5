"""Counter-based randomness keyed by (seed, step, stream, agent id).

A draw is a pure function of its key, so it does not depend on batch layout, device, the
order substeps run in, or how agents are partitioned: two scenarios with the same seed see the
same numbers (common random numbers), and a subset of agents can be drawn alone.

The hash is Chris Wellons' ``lowbias32`` integer mixer, evaluated in int32 arithmetic with
wrap-around multiplication and logical shifts emulated by masks; `tests/test_rng.py` checks it
bit-for-bit against a NumPy uint32 reference. On CPU the draws run as native kernels (`_rng_kernels`, the same bits).
"""

from __future__ import annotations

from collections.abc import Sequence

import array
import functools
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _rng_kernels, fused

_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)  # as signed int32
_M32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """lowbias32 on a Python int (uint32 semantics)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def _to_i32(x: int) -> int:
    x &= _M32
    return x - (1 << 32) if x >= (1 << 31) else x


def mix32(x: Tensor) -> Tensor:
    """lowbias32 on an int32 tensor (bits interpreted as uint32). Shape preserved."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2
    x = x ^ ((x >> 16) & 0xFFFF)
    return x


@functools.lru_cache(maxsize=4096)
def stream_id(name: str) -> int:
    """Stable 32-bit id of a named random stream (e.g. "infection")."""
    return zlib.crc32(name.encode())


@functools.lru_cache(maxsize=1024)
def _stream_ids(streams: tuple[str | int, ...]) -> tuple[int, ...]:
    """The streams' 32-bit ids (`stream_id` of a name, an int as uint32 bits)."""
    return tuple((stream_id(s) if isinstance(s, str) else int(s)) & _M32 for s in streams)


@functools.lru_cache(maxsize=64)
def _seed_keys(seeds: tuple[int, ...], device: torch.device) -> Tensor:
    """The seeds' `_seed_key` s as int32 [B] on ``device`` (made once: a CUDA graph's capture may not copy from the
    host)."""
    return torch.tensor([_to_i32(_seed_key(seed)) for seed in seeds], dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=1024)
def _seed_key(seed: int) -> int:
    """The seed's part of `step_key`."""
    return _mix32_int(seed ^ 0x9E3779B9)


def step_key(seed: int, step: int, stream: int) -> int:
    """Key of one (seed, step, stream) as a signed int32."""
    k = _seed_key(seed)
    k = _mix32_int(k ^ (step & _M32))
    k = _mix32_int(k ^ (stream & _M32))
    return _to_i32(k)


def agent_hash(agent_ids: Tensor) -> Tensor:
    """Per-agent base hash, computed once per population. [N] int32 -> [N] int32."""
    return mix32(agent_ids.to(torch.int32) ^ 0x5BD1E995)


def bits_to_uniform(h: Tensor) -> Tensor:
    """Top 24 bits of a hash -> float32 uniform strictly inside (0, 1)."""
    return (((h >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (2.0**-24)


def uniform_of_hash(base: Tensor, keys: Tensor) -> Tensor:
    """Uniforms of hashed (base ^ key) pairs, broadcasting: the definition (and what the compiled kernel fuses)."""
    return bits_to_uniform(mix32(base ^ keys))


def _uniform_eager(base: Tensor, keys: Tensor) -> Tensor:
    """`uniform_of_hash` computed in place in two buffers, the same bits with 3 allocations instead of 14 (8.7M agents: 49 → 23 ms per draw)."""
    x = base ^ keys
    t = torch.empty_like(x)
    for shift, mask, factor in ((16, 0xFFFF, _C1), (15, 0x1FFFF, _C2), (16, 0xFFFF, None)):  # mix32
        torch.bitwise_right_shift(x, shift, out=t).bitwise_and_(mask)
        x.bitwise_xor_(t)
        if factor is not None:
            x.mul_(factor)
    torch.bitwise_right_shift(x, 8, out=t).bitwise_and_(0xFFFFFF)  # bits_to_uniform
    del x
    return t.to(torch.float32).add_(0.5).mul_(2.0**-24)


# the hash to uniforms: `uniform_of_hash` compiled into one kernel with AGENTTENSOR_COMPILE=1 (`fused.on_request`: one
# pass over memory instead of ~13, the same bits), else `_uniform_eager`; for where the native CPU kernel
# (`_rng_kernels`, used first) does not run: other devices, or AGENTTENSOR_NATIVE_KERNELS=0
uniform_kernel = fused.on_request(uniform_of_hash, eager=_uniform_eager)


def hashed(base: Tensor, keys: Tensor) -> Tensor:
    """The uniforms of hashed (base ^ key) pairs inside a function marked `fused.on_request`: `uniform_of_hash`'s
    operations where it is being compiled (fused into its kernel), `uniform_kernel` where it runs eagerly (the same
    bits)."""
    return (uniform_of_hash if torch.compiler.is_compiling() else uniform_kernel)(base, keys)


def _hard_events(agent_base: Tensor, keys: Tensor, p: Tensor | float, where: Tensor | None, complement: bool
                 ) -> Tensor:
    """Hard events for every agent, uint8 [B, N]: ``(u < q).to(uint8) · where`` (where None: 1), u the uniforms of
    ``agent_base`` [N] and ``keys`` [1, B] (`Randomness.uniform`'s), q = p or 1 − p with ``complement``: the numbers
    of `sampling.Hard`'s events (`_rng_kernels.hard_event`'s on CPU). One pass with ``AGENTTENSOR_COMPILE=1`` off the
    CPU (on it, the compiled hash and eager comparisons: inductor's C++ writes the comparison's bytes ~10× slower)."""
    events = (hashed(agent_base.unsqueeze(0), keys.view(-1, 1)) < (1 - p if complement else p)).to(torch.uint8)
    return events if where is None else events * where


hard_events = fused.on_request(_hard_events, cpu=False)


@fused.on_request(cpu=False)
def hard_hazard_events(agent_base: Tensor, keys: Tensor, hazard: Tensor, where: Tensor) -> Tensor:
    """`hard_events` at p = 1 − exp(−hazard) [B, N] among ``where``, exp(−hazard) made in the same pass: the numbers
    of `StepContext.hazard_event`'s hard events. One pass with ``AGENTTENSOR_COMPILE=1`` off the CPU."""
    return _hard_events(agent_base, keys, (-hazard).exp(), where, True)


@dataclass(frozen=True)
class Randomness:
    """Random numbers for a batch of seeds over a fixed set of agents.

    seeds: one seed per batch element (B). agent_base: [N] int32 from `agent_hash`.
    """

    seeds: tuple[int, ...]
    agent_base: Tensor

    @classmethod
    def for_agents(cls, seeds: tuple[int, ...] | list[int], agent_ids: Tensor) -> "Randomness":
        return cls(tuple(int(s) for s in seeds), agent_hash(agent_ids))

    def to(self, device) -> "Randomness":
        return Randomness(self.seeds, self.agent_base.to(device))

    def _keys(self, step: int | Tensor, streams: Sequence[str | int]) -> Tensor:
        """[S, B] int32: the key of each stream (rows) and seed (columns) at this step (`step_key`; the seed and step
        part once per seed). ``step`` may be a 0-dim integer tensor on the agents' device (a step that a CUDA graph
        captures, `StepContext.clock`): the same keys, hashed on the device from it (`mix32`), nothing read on the
        host."""
        ids = _stream_ids(tuple(streams))
        if isinstance(step, Tensor):
            prefixes = mix32(_seed_keys(self.seeds, self.agent_base.device) ^ step.to(torch.int32))  # [B]
            return torch.stack([mix32(prefixes ^ _to_i32(sid)) for sid in ids])
        prefixes = [_mix32_int(_seed_key(seed) ^ (step & _M32)) for seed in self.seeds]
        # uint32 values read as int32: the bits of `step_key`'s signed keys
        keys = array.array("I", [_mix32_int(k ^ sid) for sid in ids for k in prefixes])
        out = torch.frombuffer(keys, dtype=torch.int32).view(len(ids), len(self.seeds))  # (keeps `keys` alive)
        return out if self.agent_base.is_cpu else out.to(self.agent_base.device)

    def uniform(self, step: int, stream: str | int) -> Tensor:
        """Uniforms for every agent: [B, N] float32 in (0, 1)."""
        keys = self._keys(step, (stream,))
        native = _rng_kernels.uniform(self.agent_base, keys[0])  # one native pass on CPU where built (the same bits)
        if native is not None:
            return native
        return uniform_kernel(self.agent_base.unsqueeze(0), keys.view(-1, 1))

    def hard_event(self, step: int, stream: str | int, p: Tensor | float, where: Tensor | None = None,
                   complement: bool = False) -> Tensor | None:
        """Hard events 1[u < p] · where for every agent, uint8 [B, N], drawing u in the same pass (1 − p with
        ``complement``): the numbers of ``(uniform(step, stream) < p).to(uint8) * where`` in one native pass on CPU.
        None where that kernel does not apply (other devices, dtypes or shapes, kernels off): draw `uniform`."""
        return _rng_kernels.hard_event(self.agent_base, self._keys(step, (stream,))[0], p, where, complement)

    def float_event(self, step: int, stream: str | int, p: Tensor | float, where: Tensor | None = None,
                    complement: bool = False) -> tuple[Tensor, Tensor] | None:
        """Events for every agent as gradient modes hold them, drawing u in the same pass: (happened bool [B, N],
        ``(uniform(step, stream) < p).to(float32) * where`` [B, N]; 1 − p with ``complement``), the same numbers. None
        where that native pass does not apply (other devices, dtypes or shapes, kernels off): draw `uniform`."""
        return _rng_kernels.float_event(self.agent_base, self._keys(step, (stream,))[0], p, where, complement)

    def float_event_move(self, step: int, stream: str | int, p: Tensor | float, source: Tensor, target: Tensor,
                         complement: bool = False, in_place: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]] | None:
        """`float_event` with ``where`` = ``source``, its events e moved from ``source`` to ``target`` in the same
        pass (e.g. infections from S to E): (happened, source − e, target + e, e's (batch, agent) pairs), the same
        numbers (``in_place``: written into source and target). None where the native pass does not apply."""
        return _rng_kernels.float_event_move(self.agent_base, self._keys(step, (stream,))[0], p, source, target,
                                             complement, in_place)

    def hazard_event_move(self, step: int, stream: str | int, hazard: Tensor, source: Tensor, target: Tensor,
                          in_place: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor]] | None:
        """`float_event_move` at p = exp(−hazard), complement, with exp(−hazard) made in the same pass: (exp(−hazard),
        happened, source − e, target + e, e's pairs), the same numbers. None where the native pass does not apply."""
        return _rng_kernels.hazard_event_move(self.agent_base, self._keys(step, (stream,))[0], hazard, source, target,
                                              in_place)

    def uniforms_at(self, step: int, streams: Sequence[str | int], batch_index: Tensor, agent_index: Tensor) -> Tensor:
        """`uniform_at` for several streams at the same (batch, agent) pairs in one hash pass: [S, M] (row k:
        stream k). The same numbers; one kernel call instead of S (a step's fixed cost at small N)."""
        keys = self._keys(step, streams)  # [S, B]
        native = _rng_kernels.uniform_at(self.agent_base, keys, batch_index, agent_index)
        if native is not None:
            return native
        return uniform_kernel(self.agent_base[agent_index].unsqueeze(0), keys[:, batch_index])

    def uniform_at(self, step: int, stream: str | int, batch_index: Tensor, agent_index: Tensor) -> Tensor:
        """Uniforms for selected (batch, agent) pairs only: [M] -> [M]; equal to `uniform(...)[b, i]`."""
        return self.uniforms_at(step, (stream,), batch_index, agent_index)[0]


@dataclass(frozen=True)
class Uniforms:
    """A step's uniforms of one stream for every agent, not drawn yet: `tensor` draws them ([B, N] float32);
    `float_event` draws them inside the pass that compares them (no [B, N] of uniforms written and read back)."""

    rng: Randomness
    step: int
    stream: str | int

    def tensor(self) -> Tensor:
        return self.rng.uniform(self.step, self.stream)

    def float_event(self, p: Tensor | float, where: Tensor | None, complement: bool = False
                    ) -> tuple[Tensor, Tensor] | None:
        """`Randomness.float_event` of these uniforms."""
        return self.rng.float_event(self.step, self.stream, p, where, complement)

    def float_event_move(self, p: Tensor | float, source: Tensor, target: Tensor, complement: bool = False,
                         in_place: bool = False) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]] | None:
        """`Randomness.float_event_move` of these uniforms."""
        return self.rng.float_event_move(self.step, self.stream, p, source, target, complement, in_place)

    def hazard_event_move(self, hazard: Tensor, source: Tensor, target: Tensor, in_place: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor]] | None:
        """`Randomness.hazard_event_move` of these uniforms."""
        return self.rng.hazard_event_move(self.step, self.stream, hazard, source, target, in_place)


def drawn(u: "Tensor | Uniforms") -> Tensor:
    """u as a tensor (`Uniforms` drawn)."""
    return u.tensor() if isinstance(u, Uniforms) else u


"""Native CPU kernels for group sums, gathers and the layered force of infection
(agenttensor/csrc/group_kernels.cpp), used by `agenttensor.transmission` where they apply: float32 values on
CPU, int32 or int64 slots; every function returns None elsewhere and the caller runs torch ops.

torch's CPU ``index_add_`` / ``index_select`` along dim 1 take 10-30 ms at 8.7M agents (the full-NYC layers),
these loops 3-10 ms; `benchmarks/covid_step.py --without-native` measures the whole step both ways. Each row is
summed in agent order over two fixed halves (or, where every group is one contiguous run of agents, each group
by one thread), so results do not depend on the thread count or on the batch a row runs in; where most agents
are in the last slot (a layer's non-members, e.g. schools), that slot is summed in a vectorised pass and only
the members one by one, with the same additions in the same order (full NYC, 2 threads: school 5.5 → 2.1 ms,
workplace 6.2 → 5.0 ms per sum). Slots are
bounds-checked once per slot tensor (and again if it is modified in place). ``AGENTTENSOR_NATIVE_KERNELS=0``
turns the kernels off; without a C++ compiler the torch ops are used (logged once; `agenttensor.native`).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import native
from ._derived import Derived

SOURCE = native.CSRC / "group_kernels.cpp"
_P, _I = ctypes.c_void_p, ctypes.c_int64

LONG_RUNS = 256  # mean agents per contiguous group from which `layered_force`'s backward sums the group in its pass
_checked = Derived(limit=256)  # slot -> (max + 1, contiguous)
_members = Derived(limit=64)  # (slot, number of groups) -> sorted int32 indices of the agents not in the last slot
_member_slots = Derived(limit=64)  # members (`_members`) -> their slots, int32


def _declare(library: ctypes.CDLL) -> None:
    for suffix in ("", "_i32"):  # int64 slots, int32 slots
        getattr(library, f"agenttensor_segment_sum{suffix}").argtypes = [_P, _I, _P, _I, _I, _I, _P, _I, _I, _P, _I]
        getattr(library, f"agenttensor_contiguous_groups{suffix}").argtypes = [_P, _I, _I]
        getattr(library, f"agenttensor_contiguous_groups{suffix}").restype = _I
        getattr(library, f"agenttensor_gather{suffix}").argtypes = [_P, _I, _P, _I, _I, _P, _I]
        getattr(library, f"agenttensor_others_scaled{suffix}").argtypes = [_P, _P, _I, _P, _I, _P, _I, _I, _P, _I]
    library.agenttensor_layered_force.argtypes = [_I, _I, _I, ctypes.POINTER(ForceLayer), _P, _I,
                                                  ctypes.POINTER(SigmaTable), _P, _P, _P, _I]
    library.agenttensor_layered_shares_at.argtypes = [_I, _I, ctypes.POINTER(ForceLayer), _I, _P, _P, _P]


class SigmaTable(ctypes.Structure):  # SigmaTable in group_kernels.cpp
    _fields_ = [("table", _P), ("stride", _I), ("size", _I), ("index", _P)]


BY_GROUP = "_agenttensor_by_group"  # σ's attribute (`by_group`)


def by_group(sigma: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """Mark ``sigma`` [B | 1, N] (or [N]) as ``table`` [B | 1, size] read at ``index`` [N] (uint8: e.g. the age groups),
    the caller's promise: the native layered force then reads σ through the byte per agent, 1 byte per agent instead of
    4 (the same values). Returns sigma."""
    setattr(sigma, BY_GROUP, (table.detach(), index))
    return sigma


def _sigma_table(sigma: Tensor, B: int, N: int) -> tuple[SigmaTable, list] | None:
    """`by_group`'s table of ``sigma`` as the kernel's struct (and the tensors it points into), or None: σ's array."""
    marked = getattr(sigma, BY_GROUP, None)
    if marked is None:
        return None
    table, index = marked
    table = table.reshape(-1, table.shape[-1])
    if table.dtype != torch.float32 or table.shape[0] not in (1, B) or index.dtype != torch.uint8 \
            or index.shape != (N,) or table.shape[-1] > 256:
        return None
    table, index = table.contiguous(), index.contiguous()
    size = table.shape[-1]
    return SigmaTable(table.data_ptr(), 0 if table.shape[0] == 1 else size, size, index.data_ptr()), [table, index]


class ForceLayer(ctypes.Structure):  # ForceLayer in group_kernels.cpp
    _fields_ = [("table", _P), ("table_stride", _I), ("slot", _P), ("slot_i32", _I), ("presence", _P),
                ("presence_stride", _I), ("factor", _P), ("factor_stride", _I), ("factor_all", _P), ("factor_all_stride", _I),
                ("weight", _P), ("d_presence", _P), ("d_factor", _P), ("d_factor_all", _P), ("sums", _P), ("groups", _I),
                ("contiguous", _I), ("members", _P), ("member_count", _I), ("last_constant", _I), ("member_slots", _P)]


def _library() -> ctypes.CDLL | None:
    # no floating-point contraction: the layered force must give the numbers torch's elementwise ops give
    return native.load(SOURCE, "agenttensor_group_kernels", _declare, flags=("-O3", "-ffp-contract=off"))


def _kernel(name: str, slot: Tensor):
    """The entry point `name` for the slot tensor's index type (int64, or the ``_i32`` twin)."""
    return getattr(_library(), name + ("_i32" if slot.dtype == torch.int32 else ""))


def enabled() -> bool:
    """Whether the kernels are on (``AGENTTENSOR_NATIVE_KERNELS`` is not 0) and built."""
    return _library() is not None


def _slot_facts(slot: Tensor) -> tuple[int, bool]:
    """(max slot + 1, or -1 if any is negative; whether each group is one contiguous run), computed once per
    slot tensor and again if it is modified in place."""
    def compute() -> tuple[int, bool]:
        n = slot.numel()
        bound = (int(slot.max()) + 1 if int(slot.min()) >= 0 else -1) if n else 0
        return bound, bound > 0 and bool(_kernel("agenttensor_contiguous_groups", slot)(slot.data_ptr(), n, bound))

    return _checked.get(slot, compute)


def contiguous_groups(slot: Tensor) -> bool:
    """Whether every group of ``slot`` (a CPU int32 or int64 [N] of non-negative ids, kernels on) is one contiguous
    run of agents (e.g. households of agents sorted by household), checked once per slot tensor."""
    return (enabled() and slot.is_cpu and slot.dtype in (torch.int32, torch.int64) and slot.dim() == 1
            and slot.is_contiguous() and _slot_facts(slot)[1])


def _slot_ok(slot: Tensor, num_groups: int) -> bool:
    """slot: a CPU int32 or int64 contiguous [N] with every value in [0, num_groups)."""
    if (not slot.is_cpu or slot.dtype not in (torch.int32, torch.int64) or slot.dim() != 1
            or not slot.is_contiguous()):
        return False
    return 0 <= _slot_facts(slot)[0] <= num_groups


def _rows(x: Tensor, n: int) -> int | None:
    """Row stride of a float32 CPU [B, n] tensor with unit column stride (0 for a broadcast row), else None."""
    if not x.is_cpu or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != n:
        return None
    if n > 1 and x.stride(1) != 1:
        return None
    return x.stride(0) if x.shape[0] > 1 else 0


def _members_of(slot: Tensor, num_groups: int) -> Tensor | None:
    """The agents whose slot is not the last (num_groups − 1), as sorted int32 indices, where they are at most half
    of the agents (a layer most agents are not members of, e.g. schools: its group sums then add the non-members'
    slot in a vectorised pass and only the members one by one); else None. Once per slot tensor."""
    def compute() -> Tensor | None:
        n = slot.numel()
        if n == 0 or num_groups < 2 or n >= 2**31:
            return None
        members = (slot != num_groups - 1).nonzero().view(-1)
        return members.to(torch.int32) if 2 * members.numel() <= n else None

    return _members.get(slot, compute, key=num_groups)


def segment_sum(values: Tensor, slot: Tensor, num_groups: int) -> Tensor | None:
    """[B, N] -> [B, G] per-group sums, or None where the kernel does not apply (the caller falls back)."""
    stride = _rows(values, slot.shape[0]) if slot.dim() == 1 else None
    if stride is None or not enabled() or not _slot_ok(slot, num_groups):
        return None
    B, N = values.shape
    out = torch.empty(B, num_groups, dtype=torch.float32)
    contiguous = _slot_facts(slot)[1]
    members = None if contiguous else _members_of(slot, num_groups)
    _kernel("agenttensor_segment_sum", slot)(values.data_ptr(), stride, slot.data_ptr(), B, N, num_groups,
                                            out.data_ptr(), torch.get_num_threads(), int(contiguous),
                                            None if members is None else members.data_ptr(),
                                            0 if members is None else members.numel())
    return out


def gather(table: Tensor, slot: Tensor) -> Tensor | None:
    """table [B, G] -> [B, N] with out[b, i] = table[b, slot[i]], or None where the kernel does not apply."""
    if table.dim() != 2 or slot.dim() != 1:
        return None
    stride = _rows(table, table.shape[1])
    if stride is None or not enabled() or not _slot_ok(slot, table.shape[1]):
        return None
    B, N = table.shape[0], slot.shape[0]
    out = torch.empty(B, N, dtype=torch.float32)
    _kernel("agenttensor_gather", slot)(table.data_ptr(), stride, slot.data_ptr(), B, N, out.data_ptr(),
                                       torch.get_num_threads())
    return out


def others_scaled(grad: Tensor, scale: Tensor, slot: Tensor, sums: Tensor | None = None) -> Tensor | None:
    """(Σ_{j in g(i)} grad_j − grad_i) scale[g(i)]: grad [B, N], scale [B | 1, G] -> [B, N], or None. ``sums``:
    the group sums of grad [B, G] where the caller has them."""
    G = scale.shape[-1] if scale.dim() == 2 else -1
    if not enabled() or not _slot_ok(slot, G):
        return None
    if sums is None:
        sums = segment_sum(grad, slot, G) if G > 0 else None
    if sums is None or sums.shape != (grad.shape[0], G) or _rows(sums, G) != (G if grad.shape[0] > 1 else 0):
        return None
    grad, scale = grad.contiguous(), scale.contiguous()
    if _rows(scale, G) is None or scale.shape[0] not in (1, grad.shape[0]):
        return None
    B, N = grad.shape
    out = torch.empty(B, N, dtype=torch.float32)
    _kernel("agenttensor_others_scaled", slot)(grad.data_ptr(), sums.data_ptr(), G, scale.data_ptr(),
                                              G if scale.shape[0] > 1 else 0, slot.data_ptr(), B, N, out.data_ptr(),
                                              torch.get_num_threads())
    return out


def layered_force(sigma: Tensor, layers: list[tuple], grad: Tensor | None = None, want_sigma: bool = False,
                  want: tuple[tuple[bool, bool, bool], ...] = (), sums: tuple[bool, ...] = (),
                  constant_last: tuple[bool, ...] = (), keep: list | None = None,
                  unwritten: tuple[bool, ...] = ()) -> tuple | Tensor | None:
    """Forward (grad None): σ Σ_l ((table_l[slot_l] presence_l) factor_l) factor_all_l -> [B, N]. Backward: (per-layer
    weights grad σ presence factors [B, N], per-layer (d_presence, d_factor, d_factor_all) with None where not in
    ``want[l]``, d_sigma or None, per-layer group sums of the weights [B, S] where ``sums[l]`` and the layer's groups
    are contiguous runs of ``LONG_RUNS`` agents or more on average or it has few members (`_members_of`), else None
    (then a pass of its own, `segment_sum`, is faster): deterministic, though not always `segment_sum`'s bits).
    ``constant_last[l]``: the layer's table's last slot (its non-members') is a constant (`ForceTerm.
    last_slot_constant`): a layer of few members then leaves that slot's sum 0, without the non-members' pass.
    ``unwritten[l]`` (backward): the layer's weights are not written (None in their place) and its group sums always
    come from the pass (households: the runs summed in agent order, `segment_sum`'s bits), for a caller that forms
    the weights itself.
    ``layers``: (table [B | 1, S], slot [N], presence, factor, factor_all), the last three
    [B | 1, N] or None. ``keep`` (forward): a list the layers' native form is appended to, with the tensors it points
    into, for `layered_shares_at`. None where the kernel does not apply."""
    marked = sigma
    if sigma.dim() == 1:  # one value per agent
        sigma = sigma[None]
    if not enabled() or sigma.dim() != 2:
        return None
    if grad is None:
        forward = forward_layers(sigma, layers, constant_last)
        if forward is None:
            return None
        B, N, array, sigma_rows = forward
        force = torch.empty(B, N)
        if keep is not None:
            keep.append((B, array, layers))
        table = _sigma_table(marked, B, N)
        _library().agenttensor_layered_force(B, N, len(layers), array, *sigma_rows,
                                             None if table is None else ctypes.byref(table[0]), None,
                                             force.data_ptr(), None, torch.get_num_threads())
        return force
    B = max([sigma.shape[0]] + [x.shape[0] for layer in layers for x in (layer[0], *layer[2:]) if x is not None])
    N = sigma.shape[1]
    if grad.shape != (B, N) or _rows(grad, N) is None:
        return None
    structs = []

    def out(wanted: bool) -> Tensor | None:
        return torch.empty(B, N) if wanted else None

    sigma_rows = term_rows(sigma, B, N)
    if sigma_rows is None:
        return None
    weights, derivatives, group_sums = [], [], []
    held = []  # the members lists (and their slots) the structs point into: alive until the kernel returns (the memos
    # may drop them)
    for index, (table, slot, presence, factor, factor_all) in enumerate(layers):
        parts = [term_rows(table, B, table.shape[-1]), term_rows(presence, B, N), term_rows(factor, B, N),
                 term_rows(factor_all, B, N)]
        if any(part is None for part in parts) or slot.shape != (N,) or not _slot_ok(slot, table.shape[-1]):
            return None
        asked = want[index] if index < len(want) else (False, False, False)
        lazy = index < len(unwritten) and unwritten[index]
        weight = out(not lazy)
        d = tuple(out(asked[k] and x is not None) for k, x in enumerate((presence, factor, factor_all)))
        S = table.shape[-1]
        summed = members = member_slots = None
        contiguous = _slot_facts(slot)[1]  # (memoised per slot tensor) a tile inside one group reads its value once
        if lazy or (index < len(sums) and sums[index]):  # in the pass where that beats a pass of its own
            members = None if contiguous else _members_of(slot, S)
            if lazy or (contiguous and N >= LONG_RUNS * S) or members is not None:
                summed = torch.empty(B, S)
            if members is not None:  # each member's slot, read in order where slot[member] was read at random
                member_slots = _member_slots.get(members, lambda: slot.index_select(0, members).to(torch.int32))
            held.append((members, member_slots))
        weights.append(weight)
        derivatives.append(d)
        group_sums.append(summed)
        structs.append(ForceLayer(parts[0][0], parts[0][1], slot.data_ptr(), int(slot.dtype == torch.int32),
                                  *parts[1], *parts[2], *parts[3],
                                  *(None if x is None else x.data_ptr() for x in (weight, *d, summed)), S,
                                  int(bool(contiguous)), None if members is None else members.data_ptr(),
                                  0 if members is None else members.numel(),
                                  int(index < len(constant_last) and bool(constant_last[index])),
                                  None if member_slots is None else member_slots.data_ptr()))
    array = (ForceLayer * len(structs))(*structs)
    d_sigma = out(want_sigma)
    table = _sigma_table(marked, B, N)
    _library().agenttensor_layered_force(B, N, len(structs), array, sigma_rows[0], sigma_rows[1],
                                         None if table is None else ctypes.byref(table[0]), grad.data_ptr(),
                                         None, None if d_sigma is None else d_sigma.data_ptr(), torch.get_num_threads())
    del held
    return weights, derivatives, d_sigma, group_sums


def term_rows(x: Tensor | None, B: int, n: int) -> tuple[int | None, int] | None:
    """A ForceLayer field's (pointer, row stride) for a float32 CPU [B | 1, n] ``x`` with unit column stride ((None, 0)
    for None), else None."""
    if x is None:
        return None, 0
    stride = _rows(x, n)
    return None if stride is None or x.shape[0] not in (1, B) else (x.data_ptr(), stride)


def forward_layers(sigma: Tensor, layers: list[tuple], constant_last: tuple[bool, ...] = ()) -> tuple | None:
    """The forward pass's native arguments for `layered_force`'s ``sigma`` [B | 1, N] and ``layers``: (B, N, the
    layers' ForceLayer array, (σ's pointer, row stride)), the array pointing into the tensors, or None where the
    kernel does not apply. (`layered_force` calls the kernel with them; the covid model's hard-mode force, which
    makes the tables in the same native call, keeps them from one day to the next.)"""
    if sigma.dim() == 1:
        sigma = sigma[None]
    if not enabled() or sigma.dim() != 2:
        return None
    B = max([sigma.shape[0]] + [x.shape[0] for layer in layers for x in (layer[0], *layer[2:]) if x is not None])
    N = sigma.shape[1]
    sigma_rows = term_rows(sigma, B, N)
    if sigma_rows is None:
        return None
    structs = []
    for index, (table, slot, presence, factor, factor_all) in enumerate(layers):
        parts = [term_rows(table, B, table.shape[-1]), term_rows(presence, B, N), term_rows(factor, B, N),
                 term_rows(factor_all, B, N)]
        if any(part is None for part in parts) or slot.shape != (N,) or not _slot_ok(slot, table.shape[-1]):
            return None
        structs.append(ForceLayer(*parts[0], slot.data_ptr(), int(slot.dtype == torch.int32), *parts[1], *parts[2],
                                  *parts[3], None, None, None, None, None, table.shape[-1],
                                  int(bool(_slot_facts(slot)[1])), None, 0,
                                  int(index < len(constant_last) and bool(constant_last[index]))))
    return B, N, (ForceLayer * len(structs))(*structs), sigma_rows


def layered_shares_at(kept: tuple, b: Tensor, i: Tensor) -> Tensor | None:
    """Each layer's share of the force at the pairs (b [M], i [M]) int64, summed per batch element: [L, B] float32,
    Σ_m term_l / max(Σ_l' term_l', 1e-30) with term_l = ((table_l[slot_l] presence_l) factor_l) factor_all_l (σ cancels).
    ``kept``: what `layered_force` appended to its ``keep`` list for these layers. The numbers of the same torch ops
    (the terms' gathers and products, their sum, clamp and division, and ``index_add``'s sequential sums); None where
    the kernel does not apply."""
    B, array, layers = kept
    if not (enabled() and all(x.is_cpu and x.dtype == torch.int64 and x.dim() == 1 and x.is_contiguous()
                              for x in (b, i))):
        return None
    out = torch.zeros(len(layers), B)
    _library().agenttensor_layered_shares_at(B, len(layers), array, b.numel(), b.data_ptr(), i.data_ptr(),
                                             out.data_ptr())
    return out

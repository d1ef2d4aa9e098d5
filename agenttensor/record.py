"""`PackedRecord`: one step's metrics (name -> tensor) held as a few packed blocks of rows plus other values.

A model's step returns its metrics as a mapping. The COVID model reports 32 of them a day (flows and stage counts, each
in total [B] and per borough [B, G], the infections by layer, shares); as a dict of separate tensors that is ~30 views
made by the step and 32 copies made by `simulate`'s recorder. Packed, the step makes a few blocks, the recorder copies
each once, and a name's tensor is made when it is read (`PackedRecord[name]`: the same numbers). At 2,000 agents the
packing alone took 8 % off the step's instructions (callgrind; benchmarks/HISTORY.md, twenty-ninth round).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor


class PackedLayout:
    """The names of a packed block's rows: row k of a [K, ...] block is the metric ``rows[k]``; with ``totals``, row k
    summed over its last dim (e.g. the groups) is the metric ``totals[k]``, and the keys are listed as (totals[k],
    rows[k]) pairs, in order."""

    def __init__(self, rows: Sequence[str], totals: Sequence[str] | None = None):
        names = [*rows, *(totals or ())]
        if (totals is not None and len(totals) != len(rows)) or len(set(names)) != len(names):
            raise ValueError(f"a packed layout needs distinct names (and one total per row): {list(rows)}, "
                             f"{None if totals is None else list(totals)}")
        self.rows, self.totals = tuple(rows), None if totals is None else tuple(totals)
        self.keys = self.rows if totals is None else tuple(n for pair in zip(self.totals, self.rows) for n in pair)
        self.index = {**{name: (k, False) for k, name in enumerate(self.rows)},
                      **{name: (k, True) for k, name in enumerate(self.totals or ())}}

    def unpack(self, blocks: Tensor) -> dict[str, Tensor]:
        """Steps' blocks stacked [T, K, ...] -> {name: [T, ...]} in key order (the totals in one sum)."""
        rows = blocks.unbind(1)
        if self.totals is None:
            return dict(zip(self.rows, rows))
        totals = blocks.sum(-1).unbind(1)
        return {name: x for k in range(len(self.rows)) for name, x in ((self.totals[k], totals[k]),
                                                                         (self.rows[k], rows[k]))}


Part = tuple[PackedLayout, Tensor] | dict[str, Tensor]


class PackedRecord(Mapping):
    """One step's metrics as ``parts``, in key order: packed blocks, each a ``(layout, block)`` pair (a read makes a
    row's view, or its total: a sum, exact for integer counts), and dicts of other values (name -> tensor)."""

    __slots__ = ("parts",)

    def __init__(self, *parts: Part):
        for part in parts:
            if isinstance(part, tuple) and part[1].shape[0] != len(part[0].rows):
                raise ValueError(f"a packed block of {part[1].shape[0]} rows for a layout of {len(part[0].rows)}")
        self.parts = parts

    def __getitem__(self, name: str) -> Tensor:
        for part in self.parts:
            if isinstance(part, dict):
                if name in part:
                    return part[name]
                continue
            hit = part[0].index.get(name)
            if hit is not None:
                row = part[1][hit[0]]
                return row.sum(-1) if hit[1] else row
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        for part in self.parts:
            yield from part if isinstance(part, dict) else part[0].keys

    def __len__(self) -> int:
        return sum(len(part) if isinstance(part, dict) else len(part[0].keys) for part in self.parts)

    def __contains__(self, name: object) -> bool:
        return any(name in (part if isinstance(part, dict) else part[0].index) for part in self.parts)

    def __repr__(self) -> str:
        return f"PackedRecord({list(self)})"

"""`PackedRecord`: one step's metrics (name -> tensor) held as one packed block of counts plus a few other values.

A model's step returns its metrics as a mapping. A city model reports ~40 of them a day (flows and stage counts, each
in total [B] and per group [B, G]); as a dict of separate tensors that is ~40 views made by the step and ~40 copies made
by `simulate`'s recorder, ~0.2 ms a day, most of a small population's day. Packed, the step makes one [K, B, G] block,
the recorder copies it once, and a name's tensor is made when it is read (`PackedRecord[name]`: the same numbers).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor


class PackedLayout:
    """The names of a packed block's rows: row k of a [K, ..., G] block is the metric ``by_group[k]``, and its sum over
    the last dim (the groups) is the metric ``totals[k]``. Keys are listed as (totals[k], by_group[k]) pairs, in order."""

    def __init__(self, totals: Sequence[str], by_group: Sequence[str]):
        if len(totals) != len(by_group) or len({*totals, *by_group}) != 2 * len(totals):
            raise ValueError(f"a packed layout needs distinct names, one total and one by-group name per row: "
                             f"{list(totals)}, {list(by_group)}")
        self.totals, self.by_group = tuple(totals), tuple(by_group)
        self.keys = tuple(name for pair in zip(self.totals, self.by_group) for name in pair)
        self.index = {**{name: (k, True) for k, name in enumerate(self.totals)},
                      **{name: (k, False) for k, name in enumerate(self.by_group)}}


class PackedRecord(Mapping):
    """One step's metrics: ``block`` [K, ..., G] (rows named by ``layout``: per group, and summed over the groups for
    the totals) and ``values`` (name -> tensor, the others). Keys: the layout's, then the values'. A read makes the
    tensor: a row of the block (a view) or its total (a sum: exact for integer counts)."""

    __slots__ = ("layout", "block", "values")

    def __init__(self, layout: PackedLayout, block: Tensor, values: dict[str, Tensor]):
        if block.shape[0] != len(layout.totals):
            raise ValueError(f"a packed block of {block.shape[0]} rows for a layout of {len(layout.totals)}")
        self.layout, self.block, self.values = layout, block, values

    def __getitem__(self, name: str) -> Tensor:
        hit = self.layout.index.get(name)
        if hit is None:
            return self.values[name]
        row = self.block[hit[0]]
        return row.sum(-1) if hit[1] else row

    def __iter__(self) -> Iterator[str]:
        yield from self.layout.keys
        yield from self.values

    def __len__(self) -> int:
        return len(self.layout.keys) + len(self.values)

    def __contains__(self, name: object) -> bool:
        return name in self.layout.index or name in self.values

    def __repr__(self) -> str:
        return f"PackedRecord({list(self)})"


def unpack_stacked(layout: PackedLayout, blocks: Tensor) -> dict[str, Tensor]:
    """Steps' packed blocks stacked [T, K, ..., G] -> {name: [T, ..., G] per group, [T, ...] totals}, in the layout's
    key order (the totals in one sum)."""
    totals = blocks.sum(-1)
    out: dict[str, Tensor] = {}
    for k, (total, by_group) in enumerate(zip(layout.totals, layout.by_group)):
        out[total], out[by_group] = totals[:, k], blocks[:, k]
    return out

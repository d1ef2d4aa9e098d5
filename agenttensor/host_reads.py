"""Which torch operations make the host wait for the device: a check that a step is sync-free.

On a GPU, kernels run asynchronously: the host queues them and goes on, unless an operation's result must be read on
the host (a value: ``item``, ``bool``, ``torch.equal``; or a shape that depends on the data: ``nonzero``, boolean
indexing, ``unique``). Each such read waits until the device has run everything queued before it, so the host cannot
queue further work meanwhile, and a CUDA graph cannot capture it. `HostReads` counts them by name while it is active,
on any device (the operations are the same on the CPU), so a model's step can be checked without a GPU:

    with HostReads() as reads:
        state, record = model.step(state, params, ctx)
    assert not reads.counts, reads.counts
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

# aten operations whose result the host reads
HOST_READS = frozenset({"nonzero", "_local_scalar_dense", "is_nonzero", "equal", "masked_select", "unique", "_unique",
                        "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "item"})


class HostReads(TorchDispatchMode):
    """While active, counts the dispatched operations in `HOST_READS` by name (``counts``). A subclass may see every
    operation with its result by overriding `seen` (calling this one)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.seen(func._overloadpacket.__name__, args, kwargs, out)
        return out

    def seen(self, name: str, args: tuple, kwargs: dict, out) -> None:
        if name in HOST_READS:
            self.counts[name] += 1

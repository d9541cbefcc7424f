"""What a piece of tensor code reads from and writes to memory, counted op by op as it runs.

Usage::

    traffic = count_traffic(lambda: augment(images))
    traffic.bytes, traffic.ops      # e.g. 11.1e9 bytes and 838 ops for a Stage I batch (GPU JPEG, float32)

Why: ``DeviceAugment`` is a long chain of small element-wise ops, and on a GPU each one reads
its inputs from memory and writes its output back, so its time is about its bytes over the
memory bandwidth. The count needs no GPU: it says on any machine whether a change moved fewer
bytes, and on a GPU the bytes over the measured milliseconds say how near the bandwidth the
code runs (``jobs.benchmark gpu`` prints both).

An estimate, by these rules: every distinct tensor an op takes is read once and every tensor it
returns or writes is written once; a broadcast (stride 0) dimension counts once; views and bare
allocations move nothing; a gather (``index_select``, ``gather``, ``index``) reads what it
picks; ``index_copy_`` writes what it copies; an in-place op reads and writes its tensor, a
fill, a copy or an ``out=`` only writes it. Caches are ignored: a tensor two ops read counts
twice, as two kernels read it twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GATHERS = frozenset({"index_select", "gather", "index"})
WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_", "exponential_"})
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
# what the counted bytes are read against: these GPUs' memory bandwidth at its peak
H100_BYTES_PER_S = 3.35e12  # H100 SXM
H200_BYTES_PER_S = 4.8e12


@dataclass
class Traffic:
    bytes: int = 0
    ops: int = 0  # ops dispatched that move data (views and bare allocations aside)


def count_traffic(fn: Callable[[], object]) -> Traffic:
    """Runs ``fn()`` once and counts the bytes its ops read and write (module docstring)."""
    counter = _Counter()
    with counter:
        fn()
    return counter.traffic


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements ``t`` holds, a broadcast (stride 0) dimension once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        n *= size if stride else 1
    return n * t.element_size()


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _tensors(value: object) -> Iterator[torch.Tensor]:
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, torch.Tensor):
            yield item


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not func.is_view and name not in ALLOCATIONS:
            self.traffic.bytes += op_bytes(func, name, args, kwargs, out)
            self.traffic.ops += 1
        return out


def op_bytes(func, name: str, args: tuple, kwargs: dict, out: object) -> int:
    """One op's reads and writes by the module docstring's rules."""
    if name == "index_copy_":  # (self, dim, index, source): the source read, then written into the picked rows
        return 2 * distinct_bytes(args[3]) + distinct_bytes(args[2])
    reads, writes = {}, {}
    for i, spec in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(spec.name)
        written = spec.alias_info is not None and spec.alias_info.is_write
        for t in _tensors(value):
            if written:
                writes[_key(t)] = t
            if not written or not (spec.is_out or name in WRITE_ONLY):  # an in-place op reads its tensor first
                reads[_key(t)] = t
    for t in _tensors(out):
        writes.setdefault(_key(t), t)
    if name in GATHERS:  # the source is read where picked: as much as the op returns
        reads.pop(_key(args[0]), None)
        reads.update({("picked", i): t for i, t in enumerate(_tensors(out))})
    return sum(distinct_bytes(t) for t in (*reads.values(), *writes.values()))

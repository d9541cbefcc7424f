"""Host memory of the training process and its DataLoader workers.

Usage::

    keep_freed_memory()      # train._build_state, once per process: True where applied (Linux, glibc)
    DataLoader(..., worker_init_fn=freeze_inherited_objects)   # every loader whose workers fork
    with frozen_heap(): ...  # a measurement in a process with a big heap (jobs.benchmark input)

Why: glibc's malloc serves large blocks (above a threshold it raises as it goes, at most 32 MiB)
with fresh ``mmap`` pages and returns freed memory at the top of the heap to the OS. A training
step frees and reallocates the same hundreds of MB every step (activations, gradients set to
None), so the kernel faults in and zeroes those pages again each time: on this 2-core CPU,
ResNet-50 at 64 px, batch 16, took 21,000 page faults and ~70 ms of a 430 ms step in the kernel.
With freed memory kept (no trimming, no mmap for large blocks) it took under 2,000 faults and
the step 350 ms, with the same peak resident memory (1.77 GB against 1.76). This is what PyTorch's CPU tuning guide gets from preloading
jemalloc or tcmalloc, done with glibc's own ``mallopt`` so nothing is installed or preloaded.

The process then keeps its peak host memory until it exits, which a training process reaches
every step anyway. ``runtime.keep_freed_memory=false`` leaves glibc's defaults.

A Ray Train worker runs the training function on a thread of its own, and glibc gives threads
their own arenas, which unmap whole heaps when they empty whatever ``mallopt`` says (measured:
still 20,000 faults a step). Those processes need the settings from their start, in
``GLIBC_TUNABLES`` with one arena for all threads: ``worker_env()``, which the local Ray the jobs
start passes to its workers (``jobs.common.init_ray``). On a cluster, pass it in the job's
runtime environment (README, "Host memory").

A DataLoader worker is forked from the training process and inherits its Python heap (about
340,000 objects with torch, torchvision and a ResNet-50 loaded). Python's full garbage
collection walks every object it tracks and writes to each one's header, so the first full
collection in a worker copies those pages from the parent and stalls the worker while it runs.
``freeze_inherited_objects``, the loaders' ``worker_init_fn``, moves the inherited objects to the
collector's permanent generation (``gc.freeze``, which relinks a list and touches nothing else),
so the worker's collections walk only what the worker made. Measured in a worker forked from a
process holding ResNet-50's training state, over 2,000 strong-augmented faces: without it one
full collection took 300-470 ms and the worker's private memory grew from 1 to 100 MB; with it,
no full collection and 22 MB. Nothing the worker makes is frozen, so its own garbage is collected
as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
from collections.abc import Iterator

# mallopt's parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; 2 GiB of free top-of-heap before trimming is "never" here

_applied = False
# The same for a process about to start: one arena (threads share the main heap, which the two
# settings govern), no mmap for large blocks, no trimming.
WORKER_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   f"glibc.malloc.trim_threshold={_NEVER_TRIM}")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True where that was done (now or
    before), False on other C libraries and systems, where nothing changes."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # Both: with the trim threshold set by hand glibc stops raising its mmap threshold, so that
    # alone would send every block over 128 KiB to mmap (measured: 10x the faults, step 2x slower).
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _applied


def freed_memory_kept() -> bool:
    """Whether this process keeps freed memory (``keep_freed_memory`` ran and took)."""
    return _applied


def worker_env() -> dict[str, str]:
    """Environment for worker processes to start with freed memory kept: empty where glibc is not
    the C library or ``GLIBC_TUNABLES`` is set already (the user's choice stands)."""
    if _glibc() is None or "GLIBC_TUNABLES" in os.environ:
        return {}
    return {"GLIBC_TUNABLES": WORKER_TUNABLES}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def freeze_inherited_objects(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the objects the worker inherited from the process that forked
    it go to the collector's permanent generation (see the module's docstring)."""
    gc.freeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The process's objects so far frozen for a ``with`` block, as a loader worker's inherited ones
    are: a measurement inside it is not interrupted by full collections walking the whole heap
    (125-190 ms each with torch loaded, landing on whichever side was running). Unfrozen after."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

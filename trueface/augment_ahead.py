"""The loader's batches on the training device, augmented one batch ahead of the training step.

Usage (``train_one_epoch``)::

    with training_batches(loader, runtime, augment, limit=micro_steps) as batches:
        for images, labels, indices in batches:   # images: on the device, augmented, normalised
            ...

Why: on an H200, ``DeviceAugment`` on a Stage I batch (200 images of 224 px) took 54 ms, more
than the model's own step (45 ms), and most of it is host work the GPU waits on, not GPU work:
torchvision's CUDA JPEG encoder synchronises its stream twice per image, its decoder parses the
bytes on the host, and the masked ops then read their masks with ``nonzero``. Run inline, the model
waited for all of it every step (engine 1,961 img/s against 4,431 for the model alone,
``python -m jobs.benchmark gpu``). Here a background thread copies the next batch to the device
and augments it on a high-priority side stream while the main thread runs the current step, so
the two overlap; the step's stream waits on an event, never on the host. (With it, Stage I went
from 1,961 to 2,850 img/s and Stage II from 154 to 202 on the H200, when ``DeviceAugment`` still
used nvJPEG; ``trueface.jpeg_tensor`` has since taken most of the host work away, and
``DeviceAugment`` reads its masks back once a batch instead of 21 times.)

On a CPU, or without batched augmentation, batches are prepared inline: a thread there would
only take cores from the model. The augmented batches are the same either way: one thread calls
the augmentation, in the loader's order, with the epoch's one generator (a test checks it).

``InputTimes`` says where the input path's time goes on either path: how long the training loop
waited for its next batch (the input starving the step), and, on the side that prepares batches,
how long it waited on the DataLoader and how long the copy and augmentation took on the host. The
progress lines and ``jobs.benchmark gpu`` report them.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from trueface.precision import Runtime

DEPTH = 2  # batches prepared ahead: one in use by the step, one ready (more only holds memory)
_END = object()
_POLL_S = 0.1  # how often a blocked producer looks for the consumer having left


@dataclass
class InputTimes:
    """Host seconds spent on the input path, summed from creation (readers difference two
    snapshots). Written by the thread that prepares batches and by the training loop; a float sum
    under the GIL needs no lock."""

    batches: int = 0  # batches handed to the training loop
    waited_s: float = 0.0  # the training loop blocked for its next batch: the input starving the step
    loader_s: float = 0.0  # the preparing side blocked on the DataLoader (its workers decoding)
    prepare_s: float = 0.0  # the preparing side's host time for the copy and the augmentation

    def snapshot(self) -> "InputTimes":
        return InputTimes(self.batches, self.waited_s, self.loader_s, self.prepare_s)

    def wait_share(self, seconds: float) -> float:
        """The share of ``seconds`` of wall time the training loop spent waiting (0 for none)."""
        return self.waited_s / seconds if seconds > 0 else 0.0

    def since(self, before: "InputTimes") -> "InputTimes":
        return InputTimes(self.batches - before.batches, self.waited_s - before.waited_s,
                          self.loader_s - before.loader_s, self.prepare_s - before.prepare_s)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def to_device(images: torch.Tensor, runtime: Runtime, augment: Callable | None = None) -> torch.Tensor:
    """The loader's batch on the training device: copied asynchronously (pinned on CUDA), then, on
    the batched path, ``augment`` (an ``EpochAugment``) turns the uint8 batch into the augmented,
    normalised float one."""
    images = images.to(runtime.device, non_blocking=True)
    return images if augment is None else augment(images)


def runs_ahead(runtime: Runtime, augment: Callable | None) -> bool:
    """Augment ahead in a thread only where it pays: batched augmentation on a CUDA device."""
    return augment is not None and runtime.device.type == "cuda"


@contextlib.contextmanager
def training_batches(loader: Iterable, runtime: Runtime, augment: Callable | None, limit: int,
                     ahead: bool | None = None, times: InputTimes | None = None) -> Iterator[Iterator[tuple]]:
    """(images on the device, labels, indices) for the first ``limit`` batches of ``loader``.
    ``ahead`` None asks ``runs_ahead``; leaving the ``with`` block (a break, an error) stops the
    thread and the loader's iteration. ``times`` (if given) adds up where the time went."""
    prepare = lambda images: to_device(images, runtime, augment)  # noqa: E731
    times = InputTimes() if times is None else times
    if not (runs_ahead(runtime, augment) if ahead is None else ahead):
        yield _waited_for(prepared(loader, prepare, limit, times), times)
        return
    worker = AheadThread(loader, prepare, limit, runtime.device, times)
    try:
        yield _waited_for(iter(worker), times)
    finally:
        worker.close()


def prepared(loader: Iterable, prepare: Callable, limit: int, times: InputTimes) -> Iterator[tuple]:
    """The loader's first ``limit`` batches through ``prepare``, timing the wait for each and its
    preparation; never asks the loader for a batch past the limit."""
    batches = iter(loader)
    for _ in range(limit):
        start = time.perf_counter()
        item = next(batches, None)
        if item is None:
            return
        images, labels, indices = item
        loaded = time.perf_counter()
        ready = prepare(images)
        times.loader_s += loaded - start
        times.prepare_s += time.perf_counter() - loaded
        yield ready, labels, indices


def _waited_for(batches: Iterator[tuple], times: InputTimes) -> Iterator[tuple]:
    """``batches``, adding the time the consumer blocks on each to ``times.waited_s``."""
    while True:
        start = time.perf_counter()
        item = next(batches, None)
        times.waited_s += time.perf_counter() - start
        if item is None:
            return
        times.batches += 1
        yield item


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's one high-priority stream for the augmentation, the same for every epoch: a new
    ``torch.cuda.Stream`` each epoch would take the next of the pool's 32, and cuBLAS keeps a
    workspace for every stream it has run on (the JPEG's DCT and RandAugment's geometric ops
    multiply matrices there) for the life of the process."""
    return torch.cuda.Stream(device=device, priority=-1)


class AheadThread:
    """Prepares up to ``DEPTH`` batches ahead on a background thread (on CUDA: on its own
    high-priority stream, handing each batch over with an event). Errors reach the consumer as
    they were raised; ``close`` stops the thread wherever it is."""

    def __init__(self, loader: Iterable, prepare: Callable, limit: int, device: torch.device,
                 times: InputTimes | None = None) -> None:
        self.loader, self.prepare, self.limit = loader, prepare, limit
        self.times = InputTimes() if times is None else times
        self.cuda = device.type == "cuda"
        self.stream = side_stream(device) if self.cuda else None
        self.queue: queue.Queue = queue.Queue(maxsize=DEPTH)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="trueface-augment-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                batches = prepared(self.loader, self.prepare, self.limit, self.times)
                while not self.stopping.is_set():  # never a batch after close()
                    item = next(batches, None)
                    if item is None:
                        self._put(_END)
                        return
                    ready, labels, indices = item
                    event = torch.cuda.Event() if self.cuda else None
                    if event is not None:
                        event.record(self.stream)
                    if not self._put((ready, labels, indices, event)):
                        return
        except BaseException as error:  # handed to the consumer, who raises it
            self._put(_Failed(error))

    def _put(self, item: object) -> bool:
        """Blocks while the queue is full; False once the consumer has left."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            images, labels, indices, event = item
            if event is not None:
                current = torch.cuda.current_stream(images.device)
                current.wait_event(event)
                # made on the side stream, used on this one: its memory must not go back to the
                # side stream's pool before this stream is done with it
                images.record_stream(current)
            yield images, labels, indices

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(queue.Empty):
            while True:  # frees a producer blocked on a full queue, and the batches it held
                self.queue.get_nowait()
        self.thread.join()

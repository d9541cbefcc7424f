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
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

from trueface.precision import Runtime

DEPTH = 2  # batches prepared ahead: one in use by the step, one ready (more only holds memory)
_END = object()
_POLL_S = 0.1  # how often a blocked producer looks for the consumer having left


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
                     ahead: bool | None = None) -> Iterator[Iterator[tuple]]:
    """(images on the device, labels, indices) for the first ``limit`` batches of ``loader``.
    ``ahead`` None asks ``runs_ahead``; leaving the ``with`` block (a break, an error) stops the
    thread and the loader's iteration."""
    prepare = lambda images: to_device(images, runtime, augment)  # noqa: E731
    if not (runs_ahead(runtime, augment) if ahead is None else ahead):
        yield _inline(loader, prepare, limit)
        return
    worker = AheadThread(loader, prepare, limit, runtime.device)
    try:
        yield iter(worker)
    finally:
        worker.close()


def _inline(loader: Iterable, prepare: Callable, limit: int) -> Iterator[tuple]:
    for i, (images, labels, indices) in enumerate(loader):
        if i >= limit:
            return
        yield prepare(images), labels, indices


class AheadThread:
    """Prepares up to ``DEPTH`` batches ahead on a background thread (on CUDA: on its own
    high-priority stream, handing each batch over with an event). Errors reach the consumer as
    they were raised; ``close`` stops the thread wherever it is."""

    def __init__(self, loader: Iterable, prepare: Callable, limit: int, device: torch.device) -> None:
        self.loader, self.prepare, self.limit = loader, prepare, limit
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device, priority=-1) if self.cuda else None
        self.queue: queue.Queue = queue.Queue(maxsize=DEPTH)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="trueface-augment-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                batches = iter(self.loader)
                for _ in range(self.limit):  # never a batch past the limit, nor one after close()
                    if self.stopping.is_set():
                        return
                    item = next(batches, None)
                    if item is None:
                        break
                    images, labels, indices = item
                    ready = self.prepare(images)
                    event = torch.cuda.Event() if self.cuda else None
                    if event is not None:
                        event.record(self.stream)
                    if not self._put((ready, labels, indices, event)):
                        return
            self._put(_END)
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

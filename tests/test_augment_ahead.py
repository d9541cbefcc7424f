"""``training_batches``: the batches a training step gets are the same whether the augmentation
runs inline or a batch ahead on a thread (as on CUDA); the thread never reads past the epoch's
limit, hands errors to the consumer and stops when the consumer leaves early; ``InputTimes`` puts
each wait where it happened."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import trueface.augment_ahead as ahead_mod
from trueface.augment_ahead import AheadThread, InputTimes, runs_ahead, training_batches
from trueface.augment_device import DeviceAugment
from trueface.config import load_config
from trueface.precision import Runtime
from trueface.train import EpochAugment

CPU = Runtime.create("cpu", "fp32")


def uint8_loader(batches: int, size: int = 16, batch: int = 4, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen),
             torch.arange(batch) % 2, torch.arange(i * batch, (i + 1) * batch)) for i in range(batches)]


def epoch_augment(seed: int = 3) -> EpochAugment:
    cfg = load_config("paper", ["stage1.augment.strength=1.0"])
    return EpochAugment(DeviceAugment(cfg.stage1.augment), torch.Generator().manual_seed(seed), strong=True)


def collect(ahead: bool, loader, limit: int) -> list[tuple]:
    with training_batches(loader, CPU, epoch_augment(), limit, ahead=ahead) as batches:
        return [(x.clone(), y, i) for x, y, i in batches]


def test_ahead_and_inline_give_the_same_augmented_batches_in_the_same_order():
    loader = uint8_loader(6)
    inline, threaded = collect(False, loader, 5), collect(True, loader, 5)
    assert len(inline) == len(threaded) == 5  # the limit, not the loader's 6
    for (xa, ya, ia), (xb, yb, ib) in zip(inline, threaded):
        assert xa.dtype == torch.float32 and torch.equal(xa, xb)
        assert torch.equal(ya, yb) and torch.equal(ia, ib)
    assert not torch.equal(inline[0][0], inline[1][0])  # the strong ops ran (each batch drew its own)
    # a loader shorter than the limit ends the epoch early on both paths
    assert len(collect(True, loader[:2], 5)) == len(collect(False, loader[:2], 5)) == 2


class CountingLoader:
    """Yields uint8 batches and counts how many were taken; can fail at a given batch."""

    def __init__(self, batches: int, fail_at: int | None = None) -> None:
        self.batches, self.fail_at = uint8_loader(batches), fail_at
        self.taken = 0
        self.finished = threading.Event()

    def __iter__(self):
        try:
            for i, b in enumerate(self.batches):
                if i == self.fail_at:
                    raise OSError(f"image {i} unreadable")
                self.taken += 1
                yield b
        finally:
            self.finished.set()


def test_the_thread_reads_no_further_than_the_limit():
    loader = CountingLoader(50)
    with training_batches(loader, CPU, epoch_augment(), 3, ahead=True) as batches:
        assert len(list(batches)) == 3
    assert loader.taken == 3


def test_an_error_in_the_loader_reaches_the_consumer_as_raised():
    loader = CountingLoader(10, fail_at=2)
    seen = []
    with pytest.raises(OSError, match="image 2 unreadable"):
        with training_batches(loader, CPU, epoch_augment(), 10, ahead=True) as batches:
            for x, _, _ in batches:
                seen.append(x)
    assert len(seen) == 2


def test_a_consumer_that_leaves_early_stops_the_thread_even_while_it_waits_on_a_full_queue():
    loader = CountingLoader(100)
    worker = AheadThread(loader, lambda images: images, 100, torch.device("cpu"))
    batches = iter(worker)
    next(batches)
    for _ in range(500):  # the thread fills the queue, then blocks on it
        if worker.queue.full():
            break
        threading.Event().wait(0.01)
    assert worker.queue.full()
    worker.close()
    assert not worker.thread.is_alive()
    assert loader.finished.wait(5)  # it left the loader's iteration (a DataLoader's workers then stop)
    assert loader.taken <= 1 + ahead_mod.DEPTH + 1  # taken, queued, and the one it was putting


def test_leaving_the_with_block_on_an_error_stops_the_thread():
    loader = CountingLoader(100)
    with pytest.raises(KeyError):
        with training_batches(loader, CPU, None, 100, ahead=True) as batches:
            next(batches)
            raise KeyError("the step failed")
    assert loader.finished.wait(5)
    assert not any(t.name == "trueface-augment-ahead" for t in threading.enumerate())
    assert loader.taken < 100


def test_the_thread_only_runs_for_batched_augmentation_on_cuda():
    assert not runs_ahead(CPU, epoch_augment())
    assert not runs_ahead(CPU, None)
    cuda = Runtime(torch.device("cuda", 0), "bf16", None)
    assert runs_ahead(cuda, epoch_augment()) and not runs_ahead(cuda, None)


def test_train_one_epoch_ahead_matches_inline(monkeypatch):
    """The engine's epoch with the thread forced on (as on CUDA) gives the loss it gives inline."""
    from trueface.distributed import DistInfo
    from trueface.train import _build_state, _step_plan, train_one_epoch
    from trueface.tensorboard import NullLogger
    from trueface.train import _ProgressWindow

    cfg = load_config("paper", ["model.weights=none", "model.arch=resnet18", "stage1.image_size=32",
                                "stage1.batch_size=4", "stage1.accum_steps=1", "runtime.device=cpu",
                                "runtime.precision=fp32"])
    losses = {}
    for ahead in (False, True):
        monkeypatch.setattr(ahead_mod, "runs_ahead", lambda runtime, augment, on=ahead: on and augment is not None)
        torch.manual_seed(0)
        state = _build_state(cfg, 1, None, DistInfo(0, 1))
        plan = _step_plan(cfg.stage1, "stage1", 12, DistInfo(0, 1))
        window = _ProgressWindow(NullLogger(), 10**6, "stage1", DistInfo(0, 1))
        out = train_one_epoch(state, plan, uint8_loader(3, size=32), 0, 5, window, np.random.default_rng(1),
                              epoch_augment())
        losses[ahead] = (out["train/loss"], out["step"])
    assert losses[True] == losses[False] and losses[True][1] == 3


class SleepyLoader:
    """``batches`` uint8 batches, each after ``sleep_s`` (workers decoding)."""

    def __init__(self, batches: int, sleep_s: float) -> None:
        self.batches, self.sleep_s = uint8_loader(batches), sleep_s

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.sleep_s)
            yield b


def sleepy_augment(sleep_s: float):
    def augment(images):
        time.sleep(sleep_s)
        return images.float()
    return augment


def consume(loader, augment, ahead: bool, step_s: float = 0.0) -> InputTimes:
    times = InputTimes()
    with training_batches(loader, CPU, augment, 10, ahead=ahead, times=times) as batches:
        for _ in batches:
            time.sleep(step_s)  # the training step
    return times


def test_inline_the_loop_waits_for_the_loader_and_the_augmentation_each_counted_apart():
    times = consume(SleepyLoader(4, 0.05), sleepy_augment(0.03), ahead=False)
    assert times.batches == 4
    assert 0.2 <= times.loader_s < 0.2 + 0.15 and 0.12 <= times.prepare_s < 0.12 + 0.15
    assert times.waited_s >= times.loader_s + times.prepare_s  # inline, the loop itself does both


def test_ahead_a_slow_step_hides_the_input_and_a_slow_input_shows_as_the_loops_wait():
    hidden = consume(SleepyLoader(4, 0.0), sleepy_augment(0.03), ahead=True, step_s=0.15)
    assert hidden.batches == 4 and hidden.prepare_s >= 0.12
    assert hidden.waited_s < 0.15  # the first batch's 0.03 s and the thread's start; not the steps' 0.6 s
    starved = consume(SleepyLoader(4, 0.1), sleepy_augment(0.0), ahead=True)
    assert starved.loader_s >= 0.4 and starved.waited_s >= 0.3  # the loop waited on the loader each batch


def test_the_progress_line_gives_the_share_of_time_the_loop_waited_for_input(capsys):
    from trueface.distributed import DistInfo
    from trueface.train import _ProgressWindow

    class Scalars:
        keeps_images = False

        def __init__(self):
            self.seen = {}

        def scalar(self, name, value, step):
            self.seen[(name, step)] = value

    logger = Scalars()
    window = _ProgressWindow(logger, 1, "stage1", DistInfo(0, 1))
    window.start = time.time() - 2.0
    window.input.waited_s += 0.5
    window.add(torch.tensor(1.0), 4)
    window.step_done(1, 0, 0.1, 0.9)
    assert logger.seen[("train/input_wait_share", 1)] == pytest.approx(0.25, abs=0.01)
    window.start = time.time() - 1.0  # the next line counts only what came after the last
    window.input.waited_s += 0.1
    window.add(torch.tensor(1.0), 4)
    window.step_done(2, 0, 0.1, 0.9)
    assert logger.seen[("train/input_wait_share", 2)] == pytest.approx(0.10, abs=0.01)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("img/s, input wait 25%") and lines[1].endswith("img/s, input wait 10%")

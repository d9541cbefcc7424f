"""How busy the GPU was in a torch.profiler Chrome trace, and on what: ``gpu --trace``'s summary.

Usage::

    summary = gpu_time(read_trace(Path("results/bench-gpu/trace-stage1.json.gz")))
    summary.busy_share            # the share of the window some kernel or copy ran, on any stream
    summary.by_range              # device ms launched inside each named range, "other" outside them
    summary is None               # a trace without GPU work (a CPU run)

Why: the GPU busy row reads nvml, which needs pynvml and a driver that answers; a trace has every
kernel's start and duration, so it gives the same share without either, and says what the busy
time went to. Each kernel and copy is put under the named range its launch was made in
(``trueface.augment``, ``trueface.train_step``, ``trueface.optimizer_step``,
``trueface.ema_update``, through the launch's correlation id; the backward's, which autograd
launches from a thread of its own on CUDA, under the training step), and the time of each stream is
summed, so one trace says how much of a step's GPU time the augmentation takes and how much of
it ran beside the training step on its own stream (``trueface.augment_ahead``).

The window runs from the first device event to the last: idle time between them counts, idle
time before the first and after the last does not. The events follow Kineto's Chrome trace
format: complete events (``ph`` "X") with ``ts`` and ``dur`` in microseconds; device work in the
categories ``kernel``, ``gpu_memcpy`` and ``gpu_memset``, with ``args.stream`` and
``args.correlation``; launches in ``cuda_runtime`` or ``cuda_driver`` with the same correlation;
named ranges in ``user_annotation``.
"""

from __future__ import annotations

import bisect
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

RANGES = ("trueface.augment", "trueface.train_step", "trueface.optimizer_step", "trueface.ema_update")
OTHER = "other"  # device work launched outside the named ranges (the batch's copy to the device, ...)
STEP_RANGE = "trueface.train_step"
DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
LAUNCH_CATEGORIES = frozenset({"cuda_runtime", "cuda_driver"})


@dataclass(frozen=True)
class GpuTime:
    window_ms: float  # first device event's start to the last one's end
    busy_ms: float  # the window's time with at least one kernel or copy running
    steps: int  # training steps (``STEP_RANGE``) in the trace
    by_stream: dict[int, float]  # stream -> ms it had work
    by_range: dict[str, float]  # named range (or OTHER) -> device ms launched inside it

    @property
    def busy_share(self) -> float:
        return self.busy_ms / self.window_ms if self.window_ms > 0 else 0.0

    @property
    def side_by_side_ms(self) -> float:
        """Time streams ran at once (for two streams, the time both had work)."""
        return sum(self.by_stream.values()) - self.busy_ms

    def describe(self) -> str:
        per = max(self.steps, 1)
        streams = ", ".join(f"stream {s} {ms:.1f} ms" for s, ms in sorted(self.by_stream.items()))
        ranges = ", ".join(f"{name} {ms / per:.2f} ms" for name, ms in self.by_range.items())
        return (f"GPU busy {100 * self.busy_share:.1f}% of {self.window_ms:.1f} ms ({self.steps} steps; kernels and "
                f"copies on any stream, from the trace); by stream: {streams} (side by side {self.side_by_side_ms:.1f} "
                f"ms); device time a step by the range that launched it: {ranges}")


def read_trace(path: Path) -> list[dict]:
    """The events of a Chrome trace file, gzipped (``.gz``) or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def gpu_time(events: list[dict]) -> GpuTime | None:
    """The trace's GPU time (module docstring), or None where it holds no device work."""
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
    if not device:
        return None
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in device]
    streams: dict[int, list[tuple[float, float]]] = defaultdict(list)
    launched_in = _launch_ranges(events)
    by_range = {name: 0.0 for name in (*RANGES, OTHER)}
    for e, (start, end) in zip(device, spans, strict=True):
        args = e.get("args", {})
        streams[int(args.get("stream", e.get("tid", -1)))].append((start, end))
        by_range[launched_in.get(args.get("correlation"), OTHER)] += (end - start) / 1e3
    steps = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                and e.get("name") == STEP_RANGE)
    window = max(end for _, end in spans) - min(start for start, _ in spans)
    return GpuTime(window / 1e3, union_us(spans) / 1e3, steps,
                   {s: union_us(v) / 1e3 for s, v in streams.items()}, by_range)


def union_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the [start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _launch_ranges(events: list[dict]) -> dict[object, str]:
    """Correlation id -> the named range (``RANGES``) that holds the launch: on the launching
    thread where it has named ranges of its own (the training loop, the augmentation thread), else
    on the training loop's thread (the one with ``STEP_RANGE``) at the launch's time. On CUDA,
    autograd runs the backward on a device thread of its own, which has no ranges: its launches
    belong to the training step whose ``backward()`` waits for them (on a CPU the calling thread
    runs the backward itself)."""
    ranges: dict[tuple, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") in RANGES:
            ranges[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"]))
    for spans in ranges.values():
        spans.sort()
    loop = next((thread for thread, spans in ranges.items() if any(name == STEP_RANGE for *_, name in spans)), None)
    found = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in LAUNCH_CATEGORIES or "correlation" not in e.get("args", {}):
            continue
        spans, ts = ranges.get((e.get("pid"), e.get("tid"))) or ranges.get(loop, []), float(e["ts"])
        i = bisect.bisect_right(spans, (ts, float("inf"), "")) - 1  # the last range starting at or before the launch
        if i >= 0 and spans[i][0] <= ts < spans[i][1]:
            found[e["args"]["correlation"]] = spans[i][2]
    return found

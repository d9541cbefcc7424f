"""trueface.bench.trace_gpu on a hand-made Kineto trace whose answers are worked out below: the
busy share, the time per stream and side by side, and each kernel put under the named range its
launch was made in (on the launching thread, through the correlation id; a thread without ranges
of its own, as autograd's backward thread on CUDA, by the training loop's); and on a CPU's trace."""

from __future__ import annotations

import gzip
import json

import pytest

from trueface.bench.trace_gpu import OTHER, gpu_time, read_trace, union_us

HOST, DEVICE = 100, 0
LOOP, AHEAD, AUTOGRAD = 10, 11, 12  # host threads: the training loop, the augmentation thread, autograd's


def _range(name, tid, start, end):
    return {"ph": "X", "cat": "user_annotation", "name": name, "pid": HOST, "tid": tid, "ts": start, "dur": end - start}


def _launch(tid, ts, correlation, cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "pid": HOST, "tid": tid, "ts": ts, "dur": 2,
            "args": {"correlation": correlation}}


def _device(correlation, stream, start, end, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": f"k{correlation}", "pid": DEVICE, "tid": stream, "ts": start,
            "dur": end - start, "args": {"stream": stream, "correlation": correlation, "device": 0}}


EVENTS = [
    # host: two training steps on the loop's thread (the second launches nothing), the augmentation on its own
    _range("trueface.augment", AHEAD, 50, 120),
    _range("trueface.train_step", LOOP, 100, 200),
    _range("trueface.optimizer_step", LOOP, 200, 210),
    _range("trueface.ema_update", LOOP, 210, 215),
    _range("trueface.train_step", LOOP, 300, 310),
    _range("ProfilerStep#1", LOOP, 0, 1000),  # not one of ours: launches under it alone count as other
    _launch(LOOP, 110, 1),
    _launch(LOOP, 205, 2),
    _launch(LOOP, 212, 3, cat="cuda_driver"),  # a Triton kernel's launch
    _launch(AHEAD, 60, 4),
    _launch(AHEAD, 40, 5),  # before the augmentation's range: the batch's copy to the device
    _launch(AUTOGRAD, 110, 6),  # the backward's (no ranges of its own): the loop is in a train_step then
    _launch(AUTOGRAD, 250, 10),  # ... and here in none of ours
    _launch(AHEAD, 150, 9),  # inside the loop's train_step, but the augmentation thread has ranges: its own say other
    _launch(LOOP, 120, 8),  # launch 8's kernel is missing from the trace: ignored
    # device: the training stream 7, the augmentation's side stream 25 (running beside it 1200-1320)
    _device(1, 7, 1000, 1300),
    _device(2, 7, 1300, 1320),
    _device(3, 7, 1400, 1410),
    _device(4, 25, 1200, 1350),
    _device(5, 25, 900, 950, cat="gpu_memcpy"),
    _device(6, 7, 1500, 1520, cat="gpu_memset"),
    _device(9, 25, 1600, 1620, cat="gpu_memcpy"),
    _device(10, 30, 1400, 1405),
    {"ph": "X", "cat": "kernel", "name": "k?", "pid": DEVICE, "tid": 7, "ts": 1320, "dur": 10, "args": {"stream": 7}},
    {"ph": "i", "cat": "kernel", "name": "instant", "pid": DEVICE, "tid": 7, "ts": 5000},  # not a complete event
]


def test_busy_streams_and_ranges_are_those_worked_out_by_hand():
    t = gpu_time(EVENTS)
    assert t.window_ms == pytest.approx(0.720)  # 900 (the first copy) to 1620 (the last)
    # the union: 900-950, 1000-1350, 1400-1410 (stream 30's 1400-1405 inside it), 1500-1520, 1600-1620
    assert t.busy_ms == pytest.approx(0.450) and t.busy_share == pytest.approx(450 / 720)
    # stream 7: 1000-1330 (the kernel without a correlation at 1320-1330 included), 1400-1410, 1500-1520
    assert t.by_stream == pytest.approx({7: 0.360, 25: 0.220, 30: 0.005})
    # stream 25's 1200-1350 beside stream 7's 1200-1330, stream 30's 1400-1405 beside stream 7's
    assert t.side_by_side_ms == pytest.approx(0.135)
    assert t.steps == 2
    assert t.by_range == pytest.approx({"trueface.augment": 0.150, "trueface.train_step": 0.300 + 0.020,
                                        "trueface.optimizer_step": 0.020, "trueface.ema_update": 0.010,
                                        # the copies before and after the augmentation, autograd's outside a
                                        # step, the kernel without a correlation
                                        OTHER: 0.050 + 0.020 + 0.005 + 0.010})
    line = t.describe()
    assert line.startswith("GPU busy 62.5% of 0.7 ms (2 steps;")
    assert "stream 7 0.4 ms, stream 25 0.2 ms, stream 30 0.0 ms (side by side 0.1 ms)" in line
    assert "trueface.augment 0.07 ms, trueface.train_step 0.16 ms" in line  # a step: halves of the totals


def test_a_trace_without_device_work_has_no_gpu_time():
    host_only = [e for e in EVENTS if e["pid"] == HOST]
    assert gpu_time(host_only) is None


def test_union_counts_overlaps_and_nested_spans_once():
    assert union_us([]) == 0
    assert union_us([(0, 10), (5, 15), (20, 30)]) == 25
    assert union_us([(0, 100), (10, 20), (30, 40)]) == 100  # nested
    assert union_us([(10, 20), (0, 10)]) == 20  # touching, unsorted


def test_read_trace_reads_a_gzipped_or_a_plain_file_and_a_bare_event_list(tmp_path):
    gz, plain, bare = tmp_path / "t.json.gz", tmp_path / "t.json", tmp_path / "bare.json"
    gz.write_bytes(gzip.compress(json.dumps({"traceEvents": EVENTS}).encode()))
    plain.write_text(json.dumps({"traceEvents": EVENTS, "deviceProperties": []}))
    bare.write_text(json.dumps(EVENTS))
    assert read_trace(gz) == read_trace(plain) == read_trace(bare) == EVENTS

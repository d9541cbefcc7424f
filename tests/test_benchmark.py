"""``python -m jobs.benchmark train``: the rows it writes, and that each side really trains.

No speed is asserted (the machine is shared): only that the figures exist, are consistent and
come from the loops they claim to measure."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trueface.train
from jobs import benchmark
from trueface.bench import report as bench_report
from trueface.bench import train as bench_train


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _changed(before: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.fixture
def quick_cfg(tmp_path):
    return bench_train.bench_config(dict(bench_train.QUICK), 1, str(tmp_path))


def test_engine_loop_runs_the_engines_step(quick_cfg, monkeypatch):
    mixups = []
    real_mixup = trueface.train.mixup
    monkeypatch.setattr(trueface.train, "mixup", lambda *a: mixups.append(1) or real_mixup(*a))
    engine = bench_train.EngineLoop(quick_cfg)
    model_before, ema_before = _params(engine.state.model), _params(engine.state.ema.module)
    loss = engine.run(bench_train.make_batches(32, 4, count=3))
    assert engine.step == 3 and math.isfinite(loss)
    first = next(iter(engine.state.optimizer.state.values()))
    assert int(first["step"]) == 3  # three optimizer steps
    assert _changed(model_before, engine.state.model)
    assert _changed(ema_before, engine.state.ema.module)  # the EMA update ran
    assert len(mixups) == 3 and quick_cfg.stage1.mixup_alpha > 0


def test_plain_loop_trains(quick_cfg):
    plain = bench_train.PlainLoop(quick_cfg)
    before = _params(plain.model)
    loss = plain.run(bench_train.make_batches(32, 4, count=2))
    assert math.isfinite(loss) and loss > 0
    assert _changed(before, plain.model)
    assert int(next(iter(plain.optimizer.state.values()))["step"]) == 2


def test_the_ray_worker_rebuilds_the_same_batches():
    a, b = bench_train.make_batches(32, 4, count=2), bench_train.make_batches(32, 4, count=2)
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    assert not torch.equal(a[0][0], a[1][0])


def test_sizes_from_arguments():
    args = argparse.Namespace(quick=True, image_size=48, batch_size=None, images=20)
    assert bench_train.bench_size(args) == {"image_size": 48, "batch_size": 4, "steps": 5}
    with pytest.raises(SystemExit, match="--batch-size"):
        bench_train.bench_size(argparse.Namespace(quick=False, image_size=None, batch_size=1, images=None))


@pytest.mark.ray
def test_train_benchmark_writes_both_rows(ray_session, tmp_path, capsys):
    handler = signal.getsignal(signal.SIGINT)
    assert benchmark.main(["train", "--quick", "--results-dir", str(tmp_path)]) == 0
    # jobs.ray_train.fit put the driver's Ctrl-C handler back, so the finished run's controller
    # (Ray Train's handler held it) is gone
    assert signal.getsignal(signal.SIGINT) is handler
    assert _alive_train_controllers(ray_session) == 0
    assert "## Benchmark `train`" in capsys.readouterr().out
    bench = json.loads((tmp_path / "bench-train" / "bench.json").read_text())
    rows = {r["what"]: r for r in bench["rows"]}
    spare = {SPARE_ROW} if bench["context"]["threads"] >= 2 else set()  # one thread under make test's processes
    assert set(rows) == {"engine vs plain loop", "engine under Ray Train, 1 worker vs engine"} | spare
    for row in rows.values():
        assert row["unit"] == "img/s" and row["target"] == 0.95
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("project", "reference"))
        assert row["ratio"] == pytest.approx(row["project"] / row["reference"])
        assert row["met"] == (row["ratio"] >= 0.95)
    # Both rows compare against the same driver-side engine figure.
    assert rows["engine vs plain loop"]["project"] == rows["engine under Ray Train, 1 worker vs engine"]["reference"]
    assert "EMA" in rows["engine vs plain loop"]["note"] and "ray.init" in rows["engine under Ray Train, 1 worker vs engine"]["note"]
    # the load beside each side's steps, measured in the worker and in the driver (Linux: /proc/stat)
    shares = re.findall(r"kept (\d+\.\d)% of the machine's CPUs busy during the (worker's|driver's) steps",
                        rows["engine under Ray Train, 1 worker vs engine"]["note"])
    assert sorted(side for _, side in shares) == ["driver's", "worker's"]
    assert all(0 <= float(share) <= 100 for share, _ in shares)
    ctx = bench["context"]
    assert (ctx["model"], ctx["image_size"], ctx["batch"], ctx["steps"]) == ("resnet50", 32, 4, 2)
    assert ctx["precision"] in ("fp32", "bf16", "fp16") and ctx["threads"] >= 1


def _alive_train_controllers(ray, wait_s: float = 20.0) -> int:
    """How many Ray Train controller actors are alive, once those on their way out have gone."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s
    while True:
        alive = list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
        if not alive or time.monotonic() > deadline:
            return len(alive)
        time.sleep(0.5)


QUICK_ARGS = argparse.Namespace(quick=True, image_size=None, batch_size=None, images=None)
SPARE_ROW = "engine under Ray Train, 1 worker with a core to spare vs engine"
SPLIT_ROWS = ("of which a resting local Ray: engine beside it vs engine",
              "of which Ray Train: under Ray Train vs engine beside a resting Ray")


@pytest.mark.parametrize("ray_started", [True, False])
def test_the_ray_row_splits_into_resting_ray_and_ray_train_where_the_bench_started_ray(ray_started):
    # A stand-in for jobs.bench_train_ray: the worker's rate is made up, the driver's steps beside
    # the resting Ray are the engine's own (run through the callback, as a Ray it started runs them).
    rounds_seen = []

    def fake_ray_rate(cfg, size, rounds, while_ray_idles):
        if ray_started:
            while_ray_idles()
        rounds_seen.append(rounds)
        return 5.0, "made up"

    rows = {r.what: r for r in bench_train.run(QUICK_ARGS, ray_rate=fake_ray_rate).rows}
    whole = rows["engine under Ray Train, 1 worker vs engine"]
    assert (whole.project, whole.reference) == (5.0, rows["engine vs plain loop"].project)
    if not ray_started:  # a running Ray (a test session's) was up for every driver step: no split
        assert not set(SPLIT_ROWS) & set(rows)
        return
    beside, train_part = (rows[w] for w in SPLIT_ROWS)
    assert beside.reference == whole.reference and beside.project > 0 and beside.project != whole.reference
    assert (train_part.project, train_part.reference) == (5.0, beside.project)
    assert whole.ratio == pytest.approx(beside.ratio * train_part.ratio)  # the two parts make the whole
    assert beside.target is None and train_part.target is None  # the target stays on the whole row
    assert f"median of {rounds_seen[0]} driver steps" in beside.note and "% of the machine's CPUs" in beside.note


def test_with_a_core_to_spare_the_worker_and_the_driver_run_one_thread_fewer(monkeypatch):
    # A stand-in for jobs.bench_train_ray, called twice: for the main row with every thread, then
    # for the spare-core row, whose config and driver steps must both have one thread fewer.
    calls, steps = [], []

    def fake_ray_rate(cfg, size, rounds, while_ray_idles):
        calls.append((cfg.scaling.cpus_per_worker, torch.get_num_threads()))
        steps.append("ray")
        return 5.0 + len(calls), "made up"

    real_timed = bench_train.timed_rate
    for cls, name in ((bench_train.EngineLoop, "E"), (bench_train.PlainLoop, "P")):
        real_run = cls.run
        monkeypatch.setattr(cls, "run", lambda self, b, run=real_run, name=name: steps.append(name) or run(self, b))
    monkeypatch.setattr(bench_train, "timed_rate", lambda loop, b: steps.append("timed") or real_timed(loop, b))
    with bench_report.torch_threads(2):
        rows = {r.what: r for r in bench_train.run(QUICK_ARGS, ray_rate=fake_ray_rate).rows}
        threads_after = torch.get_num_threads()
    assert calls == [(2, 2), (1, 1)] and threads_after == 2  # and the threads are given back
    # after each Ray run, every loop timed next first runs one untimed step (the pause slows the first)
    after = ["".join(steps[i + 1:]).split("timed")[0] for i, s in enumerate(steps) if s == "ray"]
    assert after == ["EP", "E"]
    spare, whole = rows[SPARE_ROW], rows["engine under Ray Train, 1 worker vs engine"]
    assert spare.project == 7.0 and spare.target == bench_train.TARGET
    assert spare.reference > 0 and spare.reference != whole.reference  # the driver's own one-thread steps
    assert f"median of {bench_train.QUICK['steps']} steps" in spare.note and "1 of the 2 cores" in spare.note
    with bench_report.torch_threads(1):  # nothing to spare
        assert SPARE_ROW not in {r.what for r in bench_train.run(QUICK_ARGS, ray_rate=fake_ray_rate).rows}


def _stand_in_ray(monkeypatch, events: list, running: bool, fit) -> None:
    """jobs.bench_train_ray without Ray: a local Ray started (``running`` False) or found, its
    start, stop, Train run (``fit``) and wait for quiet logged in ``events``."""
    from jobs import bench_train_ray

    monkeypatch.setattr(bench_train_ray.ray, "is_initialized", lambda: running)
    monkeypatch.setattr(bench_train_ray.ray, "shutdown", lambda: events.append("shutdown"))
    monkeypatch.setattr(bench_train_ray, "init_ray", lambda *a, **k: events.append("init"))
    monkeypatch.setattr(bench_train_ray, "fit", fit)
    monkeypatch.setattr(bench_train_ray, "wait_for_quiet", lambda: events.append("quiet") or 0.8)


@pytest.mark.parametrize("running", [False, True])
def test_the_ray_rate_runs_the_resting_steps_on_a_ray_it_started_before_stopping_it(quick_cfg, monkeypatch, running):
    from jobs import bench_train_ray

    events = []
    metrics = {"img_per_s": 3.0, "rates": [3.0], "threads": 1, "omp_threads": "1", "measure_s": 1.0, "other_load": 0.1}
    _stand_in_ray(monkeypatch, events, running,
                  lambda *a, **k: events.append("fit") or argparse.Namespace(metrics=metrics))
    rate, note = bench_train_ray.ray_engine_rate(quick_cfg, dict(bench_train.QUICK), 2, lambda: events.append("rest"))
    assert rate == 3.0 and "ray.init" in note
    # the driver's later steps wait for the Ray it stopped to finish exiting; a Ray left running is not waited for
    assert events == (["fit"] if running else ["init", "fit", "rest", "shutdown", "quiet"])
    assert ("0.8 s after ray.shutdown()" in note) != running


def test_a_failed_ray_train_run_still_waits_for_the_ray_it_stopped(quick_cfg, monkeypatch):
    # the rows after a failed Ray row are timed all the same: Ray's exiting processes must not be in them
    from jobs import bench_train_ray

    events = []

    def failing_fit(*a, **k):
        events.append("fit")
        raise RuntimeError("worker died (simulated)")

    _stand_in_ray(monkeypatch, events, False, failing_fit)
    with pytest.raises(RuntimeError, match="simulated"):
        bench_train_ray.ray_engine_rate(quick_cfg, dict(bench_train.QUICK), 2, lambda: events.append("rest"))
    assert events == ["init", "fit", "shutdown", "quiet"]


def test_waiting_for_quiet_ends_at_the_first_quiet_window_or_gives_up(monkeypatch):
    from jobs import bench_train_ray

    shares = iter([0.52, 0.5, 0.04, 0.5])  # Ray's processes exiting, then the machine at rest

    class FakeLoad:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.share = next(shares)

    monkeypatch.setattr(bench_report, "OtherLoad", FakeLoad)
    monkeypatch.setattr(bench_report, "QUIET_WINDOW_S", 0.01)
    waited = bench_report.wait_for_quiet()
    assert 0.03 <= waited < 1.0 and next(shares) == 0.5  # three windows, the fourth never measured
    shares = iter([0.5] * 1000)
    start = time.perf_counter()
    assert bench_report.wait_for_quiet(max_s=0.05) is None  # never quiet: gives up, and says so
    assert 0.05 <= time.perf_counter() - start < 0.5
    assert "never fell under 10%" in bench_train_ray.settle_text(None)
    shares = iter([None])  # no /proc/stat: nothing to wait for
    assert bench_report.wait_for_quiet() < 0.05


def test_other_load_counts_other_processes_and_not_this_one(monkeypatch):
    # The arithmetic, on made-up clocks: 4 CPUs over 2 s = 8 CPU-s; the machine was busy 5 CPU-s,
    # 3 of them this process's own: the others kept 2 / 8 = 25% busy.
    clocks = {"busy": iter([100.0, 105.0]), "own": iter([10.0, 13.0]), "wall": iter([50.0, 52.0])}
    monkeypatch.setattr(bench_report, "_machine_busy_s", lambda: next(clocks["busy"]))
    monkeypatch.setattr(bench_report.time, "process_time", lambda: next(clocks["own"]))
    monkeypatch.setattr(bench_report.time, "perf_counter", lambda: next(clocks["wall"]))
    monkeypatch.setattr(bench_report.os, "cpu_count", lambda: 4)
    with bench_report.OtherLoad() as load:
        pass
    monkeypatch.undo()  # the real clocks back before anything else reads them
    assert load.share == pytest.approx(0.25)
    assert bench_report.share_text(load.share) == "25.0%" and "unknown" in bench_report.share_text(None)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_other_load_sees_a_busy_child_process():
    with bench_report.OtherLoad() as load:
        child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
        child.wait()
    # one core of os.cpu_count() spun for most of the block (more if another test ran beside it)
    assert load.share >= 0.6 / (os.cpu_count() or 1)


def test_every_ratio_reads_how_many_times_better_the_project_is():
    Row = bench_report.Row
    time = Row("strong", 2.0, 8.0, "ms/img", 3.0)  # 4x less time: 4x better
    rate = Row("engine", 90.0, 100.0, "img/s", 0.95)  # 10% slower: 0.90x
    traffic = Row("augmentation memory traffic", 8.14, 11.1, "GB a batch", lower_is_better=True)
    assert (time.lower_is_better, time.ratio, time.met) == (True, 4.0, True)
    assert (rate.lower_is_better, rate.ratio, rate.met) == (False, pytest.approx(0.9), False)
    assert traffic.ratio == pytest.approx(11.1 / 8.14) and traffic.ratio > 1  # fewer bytes: better
    assert Row("peak", 3.0, None, "GiB", 4.0).met is True and Row("busy", 80.0, None, "%", 90.0).met is False
    for unit in ("GB a batch", "s", "s/epoch", "bytes"):  # a unit of no known direction is never guessed
        with pytest.raises(ValueError, match="say whether lower is better"):
            Row("x", 1.0, 2.0, unit)
    bench = bench_report.Bench("t", rows=[traffic, Row("engine", 1.0, None, "img/s", no_target="none: why")])
    assert "| 1.36x |" in bench.markdown() and "| none: why |" in bench.markdown()


def test_a_ray_failure_costs_only_the_ray_rows_and_the_parts_after_still_run(tmp_path, monkeypatch, capsys):
    # Ray that cannot start (or a worker that dies) in train's Ray row and in infer --ray: the
    # rows measured without Ray are written and printed, each failure is one line saying what to
    # do, the parts after still run, and the exit status says not everything was measured
    from jobs import bench_infer_ray, bench_train_ray
    from trueface.bench import infer as bench_infer

    def broken(*a, **k):
        raise RuntimeError("the GCS did not come up (simulated)")

    monkeypatch.setattr(bench_train_ray, "ray_engine_rate", broken)
    monkeypatch.setattr(bench_infer_ray, "ray_predict_rate", broken)
    argv = ["train", "infer", "--ray", "--quick", "--images", "4", "--results-dir", str(tmp_path)]
    assert benchmark.main(argv) == 1
    why = "not measured (RuntimeError: the GCS did not come up (simulated))"
    for part, rows, failure in (
            ("train", ["engine vs plain loop"], f"{bench_train.RAY_ROW}: {why}; {bench_train.RAY_FIX}"),
            ("infer", ["jobs.predict vs naive per-image predictor"], f"{bench_infer.RAY_ROW}: {why}; {bench_infer.RAY_FIX}")):
        payload = json.loads((tmp_path / f"bench-{part}" / "bench.json").read_text())
        assert [r["what"] for r in payload["rows"]] == rows and payload["rows"][0]["project"] > 0
        assert payload["failures"] == [failure]
        assert f"- {failure}" in (tmp_path / f"bench-{part}" / "bench.md").read_text()
    assert "ray start --head" in bench_train.RAY_FIX and "leave out --ray" in bench_infer.RAY_FIX
    out, err = capsys.readouterr()
    assert out.count("**Not measured:**") == 2 and "not everything was measured in: train, infer" in err


def test_a_ray_failure_in_the_spare_core_run_keeps_the_first_ray_row():
    calls = []

    def ray_rate(cfg, size, rounds, while_ray_idles):
        calls.append(cfg.scaling.cpus_per_worker)
        if len(calls) == 2:
            raise RuntimeError("worker died (simulated)")
        return 5.0, "made up"

    with bench_report.torch_threads(2):
        bench = bench_train.run(QUICK_ARGS, ray_rate=ray_rate)
    assert calls == [2, 1] and [r.what for r in bench.rows] == ["engine vs plain loop", bench_train.RAY_ROW]
    assert bench.failures == [f"{SPARE_ROW}: not measured (RuntimeError: worker died (simulated)); {bench_train.RAY_FIX}"]

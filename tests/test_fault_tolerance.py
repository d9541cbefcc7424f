"""What clusters do to a run: a Train worker SIGKILLed mid-stage, the driver SIGKILLed between stages.

The job runs as ``python -m jobs.pipeline`` in a process of its own (with its own local Ray), as a
user would run it, so the test can kill it, or one of its workers, the way a cluster does.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import JobProcess, tiny_overrides, write_tiny_root

pytestmark = [pytest.mark.slow]

DOMAINS = {"140k-real-vs-fake": "upper", "dalle": "lower"}


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``, read from /proc."""
    parents, cmdlines = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while we looked
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append((child, cmdlines[child]))
                frontier.append(child)
    return found


def stage_history(run_dir: Path, stage: int) -> list[dict]:
    return json.loads((run_dir / f"stage{stage}" / "stage.json").read_text())["history"]


def pipeline_args(tmp_path: Path, run_name: str, *extra: str) -> list[str]:
    root = write_tiny_root(tmp_path / "data", DOMAINS, per_class=16, size=64)
    return ["--config", "demo", *tiny_overrides(root, tmp_path, run_name), *extra]


@pytest.mark.timeout(900)
def test_a_killed_worker_resumes_from_its_checkpoint_and_a_killed_driver_reruns_without_stage_one(tmp_path):
    """One run, two failures: the Train worker SIGKILLed right after Stage I's first checkpoint
    (Ray Train restarts it, max_failures=1), then the driver SIGKILLed once Stage I has finished
    (the user reruns the command)."""
    # 4 epochs of 8 steps at 64 px: seconds each, so the kill lands inside Stage I
    args = pipeline_args(tmp_path, "ft", "scaling.max_failures=1", "stage1.epochs=4", "stage1.patience=0",
                         "stage1.image_size=64", "stage1.samples_per_epoch=64")
    run_dir = tmp_path / "runs" / "ft"
    job = JobProcess("jobs.pipeline", args, tmp_path / "first.log")
    job.wait_until((run_dir / "stage1" / "last.pt").is_file, 400, "Stage I checkpoint")
    workers = [pid for pid, cmd in descendants(job.proc.pid) if "RayTrainWorker" in cmd]
    assert len(workers) == 1, f"expected one Train worker, found {workers}"
    os.kill(workers[0], signal.SIGKILL)
    job.wait_until((run_dir / "stage1" / "stage.json").is_file, 400, "the end of Stage I")
    job.proc.kill()  # the driver, SIGKILL: no handler runs, nothing is tidied up
    job.finish(timeout=60)
    out = job.output()
    assert "stage1: resumed from" in out, "the restarted worker did not resume from the checkpoint"
    resumed_at = int(out.split("stage1: resumed from", 1)[1].split("at epoch", 1)[1].split(",")[0])
    assert 1 <= resumed_at < 4
    history = stage_history(run_dir, 1)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # no epoch trained twice or skipped
    assert [h["step"] for h in history] == [8, 16, 24, 32]  # the global step went on, not from zero

    stage1_before = {p.name: p.read_bytes() for p in (run_dir / "stage1").iterdir()}
    rc, out = JobProcess("jobs.pipeline", args, tmp_path / "second.log").finish(timeout=500)
    assert rc == 0, out[-4000:]
    assert "stage 1: already finished" in out and "stage 2: training" in out
    assert {p.name: p.read_bytes() for p in (run_dir / "stage1").iterdir()} == stage1_before
    rows = pq.read_table(tmp_path / "results" / "ft" / "metrics.parquet").to_pylist()
    assert sorted({r["domain"] for r in rows}) == sorted([*DOMAINS, "combined"])
    # kept: the best and the last checkpoint of each stage, no partial file from the killed worker,
    # and beside Stage II's best.pt the thresholds the evaluation chose for it
    for stage, extra in ((1, []), (2, ["thresholds.json"])):
        expected = sorted(["best.pt", "last.pt", "stage.json", *extra])
        assert sorted(p.name for p in (run_dir / f"stage{stage}").iterdir()) == expected

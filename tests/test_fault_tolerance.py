"""What clusters do to a run kept in S3: a Train worker SIGKILLed mid-stage, the driver SIGKILLed
between stages, then the rerun on a machine without the working copy.

The job runs as ``python -m jobs.pipeline`` in a process of its own (with its own local Ray), as a
user would run it, so the test can kill it, or one of its workers, the way a cluster does; the
rerun is another driver, here in the test's process on the suite's Ray. Its runs and results go
to moto's S3 server on 127.0.0.1 (tests/conftest.py's ``s3_server``), with the credentials in the
environment as users give them: one run checks the failures and the storage (the two used to be
two runs of their own, 3 minutes each on these machines).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import evaluate as evaluate_job
from jobs import pipeline
from tests.conftest import JobProcess, s3_keys, s3_object, tiny_overrides, write_tiny_root

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DOMAINS = {"140k-real-vs-fake": "upper", "dalle": "lower"}
RUN = "e2e/runs/ft/"  # the run's folder in the bucket
RESULTS = "e2e/results/ft/"


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


def _stage_objects(s3_server, stage: int) -> dict[str, bytes]:
    prefix = f"{RUN}stage{stage}/"
    return {k[len(prefix):]: s3_object(s3_server, k) for k in s3_keys(s3_server, prefix)}


@pytest.fixture(scope="module")
def killed_run(s3_server, ray_session, module_tmp):
    """One run, two failures: the Train worker SIGKILLed right after Stage I's first checkpoint
    reached the bucket (Ray Train restarts it, max_failures=1), then the driver SIGKILLed once
    Stage I has finished; then the working copy is deleted (a new machine) and the user reruns
    the command, which finds Stage I finished in the bucket and trains Stage II. The first run is a
    process of its own with its own Ray, so that it can be killed; the rerun needs only another
    driver and runs in this process, on the suite's Ray (which has the credentials from the
    environment, as a cluster's workers do)."""
    tmp = module_tmp
    root = write_tiny_root(tmp / "data", DOMAINS, per_class=16, size=64)
    cache = tmp / "cache"
    # 2 epochs of 8 steps at 64 px on a ResNet-18 (what goes to the bucket is the same for either
    # arch; each upload 2.3x smaller): seconds each, so the kill lands inside Stage I's second epoch
    args = ["--config", "demo", "--storage", "s3://trueface-test/e2e",
            *[o for o in tiny_overrides(root, tmp, "ft") if not o.startswith("output.")],
            f"data.cache_dir={cache}", "scaling.max_failures=1", "stage1.epochs=2", "stage1.patience=0",
            "stage1.image_size=64", "stage1.samples_per_epoch=64"]
    job = JobProcess("jobs.pipeline", args, tmp / "first.log")
    job.wait_until(lambda: f"{RUN}stage1/last.pt" in s3_keys(s3_server, RUN), 400, "Stage I checkpoint in the bucket")
    workers = [pid for pid, cmd in descendants(job.proc.pid) if "RayTrainWorker" in cmd]
    assert len(workers) == 1, f"expected one Train worker, found {workers}"
    os.kill(workers[0], signal.SIGKILL)
    job.wait_until(lambda: f"{RUN}stage1/stage.json" in s3_keys(s3_server, RUN), 400, "the end of Stage I")
    job.proc.kill()  # the driver, SIGKILL: no handler runs, nothing is tidied up
    job.finish(timeout=60)
    stage1_before = _stage_objects(s3_server, 1)

    shutil.rmtree(cache)  # a new machine: the run resumes from the bucket alone
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = pipeline.main(args)
    return {"tmp": tmp, "root": root, "cache": cache, "first": job.output(), "rc": rc,
            "rerun": printed.getvalue(), "stage1_before": stage1_before}


@pytest.mark.timeout(900)
def test_a_killed_worker_resumes_from_its_checkpoint(killed_run, s3_server):
    out = killed_run["first"]
    assert "stage1: resumed from" in out, "the restarted worker did not resume from the checkpoint"
    resumed_at = int(out.split("stage1: resumed from", 1)[1].split("at epoch", 1)[1].split(",")[0])
    assert resumed_at == 1
    history = json.loads(s3_object(s3_server, f"{RUN}stage1/stage.json"))["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # no epoch trained twice or skipped
    assert [h["step"] for h in history] == [8, 16]  # the global step went on, not from zero


@pytest.mark.timeout(900)
def test_a_killed_driver_reruns_from_the_bucket_without_stage_one(killed_run, s3_server):
    rc, out = killed_run["rc"], killed_run["rerun"]
    assert rc == 0, out[-4000:]
    assert "stage 1: already finished" in out and "stage 2: training" in out
    assert f"results:     s3://trueface-test/{RESULTS}summary.md" in out
    assert _stage_objects(s3_server, 1) == killed_run["stage1_before"]  # byte for byte
    rows = pq.read_table(killed_run["cache"] / "staging" / "s3" / "trueface-test" / RESULTS / "metrics.parquet")
    assert sorted(set(rows.column("domain").to_pylist())) == sorted([*DOMAINS, "combined"])


@pytest.mark.timeout(900)
def test_the_bucket_holds_the_run_and_no_partial_file_or_secret(killed_run, s3_server):
    keys = s3_keys(s3_server, "e2e/")
    # kept: the best and the last checkpoint of each stage, no partial file from the killed
    # worker, and beside Stage II's best.pt the thresholds the evaluation chose for it
    for stage, extra in ((1, []), (2, ["thresholds.json"])):
        prefix = f"{RUN}stage{stage}/"
        assert sorted(k[len(prefix):] for k in keys if k.startswith(prefix)) == sorted(
            ["best.pt", "last.pt", "stage.json", *extra]), sorted(keys)
    assert not [k for k in keys if k.endswith(".tmp")]
    for name in ("config.yaml", "manifest.parquet"):
        assert RUN + name in keys, name
    for stage in (1, 2):
        assert any(k.startswith(f"{RUN}tensorboard/stage{stage}/events.out.tfevents") for k in keys)
    for name in ("summary.md", "metrics.parquet", "metrics.csv"):
        assert RESULTS + name in keys, name
    # the thresholds went up beside best.pt, stamped with the bytes best.pt still has (never rewritten)
    thresholds = json.loads(s3_object(s3_server, RUN + "stage2/thresholds.json"))
    best_sha = hashlib.sha256(s3_object(s3_server, RUN + "stage2/best.pt")).hexdigest()
    assert thresholds["checkpoint"]["sha256"] == best_sha and set(thresholds["thresholds"]) == {"raw", "ema"}
    # credentials: from the environment only, never written to the bucket or printed
    secret = s3_server["env"]["AWS_SECRET_ACCESS_KEY"]
    assert secret not in killed_run["first"] and secret not in killed_run["rerun"]
    for key in keys:
        if not key.endswith(".pt"):
            assert secret.encode() not in s3_object(s3_server, key), key


@pytest.mark.timeout(300)
def test_evaluate_reads_the_checkpoint_from_the_bucket_and_writes_there(killed_run, s3_server, capsys):
    best_sha = hashlib.sha256(s3_object(s3_server, RUN + "stage2/best.pt")).hexdigest()
    assert evaluate_job.main(["--checkpoint", f"s3://trueface-test/{RUN}stage2/best.pt",
                              "--data-root", str(killed_run["root"]), "--out", "s3://trueface-test/e2e/results/again",
                              "--no-ray"]) == 0
    assert "results: s3://trueface-test/e2e/results/again/summary.md" in capsys.readouterr().out
    assert "e2e/results/again/metrics.parquet" in s3_keys(s3_server, "e2e/results/again/")
    again = pq.read_table(killed_run["cache"] / "staging" / "s3" / "trueface-test" / "e2e" / "results" / "again"
                          / "metrics.parquet")
    assert all("read from" in p for p in again.column("threshold_policy").to_pylist())  # the bucket's thresholds.json
    assert hashlib.sha256(s3_object(s3_server, RUN + "stage2/best.pt")).hexdigest() == best_sha

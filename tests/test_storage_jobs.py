"""The jobs with their runs and results kept in S3 (moto's server on 127.0.0.1), credentials in the
environment as users give them. The jobs run as processes of their own, with their own local Ray,
which inherit that environment as a cluster's workers would."""

from __future__ import annotations

import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest

from jobs import evaluate as evaluate_job
from tests.conftest import JobProcess, s3_keys, tiny_overrides, write_tiny_root

pytestmark = [pytest.mark.slow]

DOMAINS = {"140k-real-vs-fake": "upper", "dalle": "lower"}


def local_overrides(root, tmp_path, run_name):
    """The tiny demo, minus its local output folders: --storage chooses those. On a ResNet-18: what
    goes to the bucket is the same, every checkpoint 2.3 times smaller (a ResNet-50 epoch uploads
    0.5 GB through moto, the bulk of these tests' time)."""
    return [o for o in tiny_overrides(root, tmp_path, run_name) if not o.startswith("output.")] + ["model.arch=resnet18"]


@pytest.mark.timeout(900)
def test_pipeline_keeps_checkpoints_logs_and_results_in_s3_and_resumes_from_there(s3_server, tmp_path, capsys):
    root = write_tiny_root(tmp_path / "data", DOMAINS, per_class=8)
    cache = tmp_path / "cache"
    args = ["--config", "demo", "--storage", "s3://trueface-test/e2e", *local_overrides(root, tmp_path, "s3run"),
            f"data.cache_dir={cache}", "stage1.epochs=1"]  # each epoch uploads its checkpoints
    rc, out = JobProcess("jobs.pipeline", args, tmp_path / "first.log").finish(timeout=500)
    assert rc == 0, out[-4000:]
    assert "results:     s3://trueface-test/e2e/results/s3run/summary.md" in out
    keys = s3_keys(s3_server, "e2e/")
    run, results = "e2e/runs/s3run/", "e2e/results/s3run/"
    for name in ("config.yaml", "manifest.parquet", "stage1/best.pt", "stage1/stage.json",
                 "stage2/best.pt", "stage2/last.pt", "stage2/stage.json"):
        assert run + name in keys, name
    assert any(k.startswith(run + "tensorboard/stage1/events.out.tfevents") for k in keys)
    assert any(k.startswith(run + "tensorboard/stage2/events.out.tfevents") for k in keys)
    for name in ("summary.md", "metrics.parquet", "metrics.csv"):
        assert results + name in keys, name
    assert not [k for k in keys if k.endswith(".tmp")]
    # the thresholds went up beside best.pt, stamped with the bytes best.pt still has (never rewritten)
    thresholds = json.loads(_object(s3_server, run + "stage2/thresholds.json"))
    best_sha = hashlib.sha256(_object(s3_server, run + "stage2/best.pt")).hexdigest()
    assert thresholds["checkpoint"]["sha256"] == best_sha and set(thresholds["thresholds"]) == {"raw", "ema"}
    # credentials: from the environment only, never written to the bucket or printed
    secret = s3_server["env"]["AWS_SECRET_ACCESS_KEY"]
    assert secret not in out
    for key in keys:
        if not key.endswith(".pt"):
            body = s3_server["client"].get_object(Bucket="trueface-test", Key=key)["Body"].read()
            assert secret.encode() not in body, key

    # a new machine: no working copy. The run resumes from the bucket alone: both stages are done.
    shutil.rmtree(cache)
    rc, out = JobProcess("jobs.pipeline", args, tmp_path / "second.log").finish(timeout=500)
    assert rc == 0, out[-4000:]
    assert "stage 1: already finished" in out and "stage 2: already finished" in out

    # jobs.evaluate reads the checkpoint from the bucket and writes its tables there
    assert evaluate_job.main(["--checkpoint", "s3://trueface-test/e2e/runs/s3run/stage2/best.pt",
                              "--data-root", str(root), "--out", "s3://trueface-test/e2e/results/again", "--no-ray"]) == 0
    assert "results: s3://trueface-test/e2e/results/again/summary.md" in capsys.readouterr().out
    assert "e2e/results/again/metrics.parquet" in s3_keys(s3_server, "e2e/results/again/")
    again = pq.read_table(cache / "staging" / "s3" / "trueface-test" / "e2e" / "results" / "again" / "metrics.parquet")
    assert all("read from" in p for p in again.column("threshold_policy").to_pylist())  # the bucket's thresholds.json
    assert hashlib.sha256(_object(s3_server, run + "stage2/best.pt")).hexdigest() == best_sha
    rows = pq.read_table(cache / "staging" / "s3" / "trueface-test" / "e2e" / "results" / "s3run" / "metrics.parquet")
    assert sorted(set(rows.column("domain").to_pylist())) == sorted([*DOMAINS, "combined"])


def _object(s3_server, key: str) -> bytes:
    return s3_server["client"].get_object(Bucket=s3_server["bucket"], Key=key)["Body"].read()


@pytest.mark.timeout(60)
def test_a_bucket_that_cannot_be_written_stops_the_pipeline_before_ray_starts(s3_server, tmp_path):
    root = write_tiny_root(tmp_path / "data", DOMAINS, per_class=2)
    from jobs import pipeline

    with pytest.raises(SystemExit, match="storage error: output.runs_dir: cannot write to s3://no-such-bucket"):
        pipeline.main(["--storage", "s3://no-such-bucket/x", *local_overrides(root, tmp_path, "nb")])


@pytest.mark.timeout(900)
def test_a_search_kept_in_s3_is_aggregated_from_there_on_another_machine(s3_server, tmp_path, capsys, monkeypatch):
    root = write_tiny_root(tmp_path / "data", DOMAINS, per_class=8)
    (tmp_path / "space.yaml").write_text("params:\n  stage1.lr: {loguniform: [3.0e-4, 3.0e-3]}\n")
    cache = tmp_path / "cache"
    args = ["--space", str(tmp_path / "space.yaml"), "--storage", "s3://trueface-test/tune", "--name", "s3tune",
            "--num-samples", "2", "--max-concurrent", "1", *local_overrides(root, tmp_path, "t"),
            f"output.results_dir={tmp_path / 'results'}", f"data.cache_dir={cache}", "stage1.epochs=1"]
    rc, out = JobProcess("jobs.tune", args, tmp_path / "tune.log").finish(timeout=600)
    assert rc == 0, out[-4000:]
    keys = s3_keys(s3_server, "tune/s3tune/")
    assert "tune/s3tune/trueface-tune.json" in keys
    trials = {k.split("/")[2] for k in keys if k.endswith("/config.yaml")}
    assert len(trials) == 2
    for trial in trials:
        prefix = f"tune/s3tune/{trial}/"
        for name in ("result.json", "stage1/best.pt", "stage1/stage.json"):  # Tune's reports and ours
            assert prefix + name in keys, prefix + name
        assert any(k.startswith(prefix + "tensorboard/stage1/events.out.tfevents") for k in keys)
        assert prefix + "stage1/last.pt" not in keys  # pruned: the trial is over
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"] not in out

    # another machine, no working copy: the report is rebuilt from the bucket
    shutil.rmtree(cache)
    monkeypatch.chdir(tmp_path)  # the aggregator's working copy goes to ./.cache/trueface
    from jobs import aggregate as aggregate_job

    assert aggregate_job.main(["s3://trueface-test/tune/s3tune", "--out", str(tmp_path / "again")]) == 0
    rows = pq.read_table(tmp_path / "again" / "trials.parquet").to_pylist()
    assert sorted(r["trial"] for r in rows) == sorted(trials)
    assert rows[0]["checkpoint"] == f"s3://trueface-test/tune/s3tune/{rows[0]['trial']}/stage1/best.pt"
    assert (tmp_path / "again" / "test" / "metrics.parquet").is_file()  # the best checkpoint, fetched and scored
    assert f"tensorboard --logdir {tmp_path}/.cache/trueface/staging/s3/trueface-test/tune/s3tune" in capsys.readouterr().out

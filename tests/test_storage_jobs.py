"""The jobs with their runs and results kept in S3 (moto's server on 127.0.0.1), credentials in the
environment as users give them. The jobs run as processes of their own, with their own local Ray,
which inherit that environment as a cluster's workers would. The pipeline's run in the bucket
(checkpoints, resume from the bucket alone, jobs.evaluate from and to it) is checked by
tests/test_fault_tolerance.py, on the run it kills."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from tests.conftest import JobProcess, s3_keys, tiny_overrides, write_tiny_root

pytestmark = [pytest.mark.slow]

DOMAINS = {"140k-real-vs-fake": "upper", "dalle": "lower"}


def local_overrides(root, tmp_path, run_name):
    """The tiny demo, minus its local output folders: --storage chooses those."""
    return [o for o in tiny_overrides(root, tmp_path, run_name) if not o.startswith("output.")]


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
            "--num-samples", "2", "--max-concurrent", "2", *local_overrides(root, tmp_path, "t"),
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

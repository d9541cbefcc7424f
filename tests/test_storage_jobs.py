"""The jobs with their runs and results kept in S3 (moto's server on 127.0.0.1), credentials in the
environment as users give them. A bucket that cannot be written is refused here; the pipeline's
run in the bucket (checkpoints, resume from the bucket alone, jobs.evaluate from and to it) is
checked by tests/test_fault_tolerance.py, on the run it kills, and a search kept in the bucket
(interrupted, resumed, aggregated again on another machine) by tests/test_tune_ray.py."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_overrides, write_tiny_root

DOMAINS = {"140k-real-vs-fake": "upper", "dalle": "lower"}


def local_overrides(root, tmp_path, run_name):
    """The tiny demo, minus its local output folders: --storage chooses those."""
    return [o for o in tiny_overrides(root, tmp_path, run_name) if not o.startswith("output.")]


@pytest.mark.timeout(60)
def test_a_bucket_that_cannot_be_written_stops_the_pipeline_before_ray_starts(s3_server, tmp_path):
    root = write_tiny_root(tmp_path / "data", DOMAINS, per_class=2)
    from jobs import pipeline

    with pytest.raises(SystemExit, match="storage error: output.runs_dir: cannot write to s3://no-such-bucket"):
        pipeline.main(["--storage", "s3://no-such-bucket/x", *local_overrides(root, tmp_path, "nb"),
                       "stage1.samples_per_epoch=16"])  # a step of 8 from 2 images per class

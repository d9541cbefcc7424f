"""The pipeline as users run it: jobs.pipeline on a local Ray (real Train workers), then
jobs.evaluate and jobs.predict on its checkpoint. Shares one ray.init; each Ray test has a timeout."""

import glob
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import evaluate as evaluate_job
from jobs import pipeline
from jobs import predict as predict_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.checkpoint import load_checkpoint
from trueface.robustness import PERTURBATIONS, SPEC_FILE
from trueface.robustness_report import sweep_table
from trueface.thresholds import read_thresholds

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _fail_fast_ray_env(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")


@pytest.mark.timeout(600)
def test_demo_preset_end_to_end_on_ray_train_then_resume_evaluate_predict(ray_session, tmp_path, capsys, monkeypatch):
    root = write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    monkeypatch.chdir(tmp_path)  # relative output folders, as users give them: Ray workers run elsewhere
    # Two Train workers (1 CPU each): the real TorchTrainer path with DDP, gathered validation
    # scores and rank-0 checkpoints, as on a 2-GPU cluster.
    # data.prepared: the images decoded once on Ray tasks, then read by both ranks from the shards
    args = ["--data-root", "data", *tiny_overrides(root, Path("."), "e2e")[1:], "scaling.max_failures=0",
            "scaling.num_workers=2", "data.prepared=uint8"]
    assert pipeline.main(args) == 0
    out = capsys.readouterr().out
    assert "prepared cache (decode size 32): 64 images prepared" in out  # train + valid of both domains
    run, results = tmp_path / "runs" / "e2e", tmp_path / "results" / "e2e"
    # the table printed at the end, and the files behind it
    assert "combined" in out and "dalle" in out and str(results) in out and "tensorboard --logdir" in out
    rows = pq.read_table(results / "metrics.parquet").to_pylist()
    assert {(r["weights"], r["domain"]) for r in rows} == {
        (w, d) for w in ("raw", "ema") for d in ("140k-real-vs-fake", "dalle", "combined")}
    assert {r["role"] for r in rows if r["domain"] == "dalle"} == {"trained (Stage II), held-out test split"}
    for name in ("summary.md", "metrics.csv", "roc_raw.png", "confusion_ema.png", "config.yaml", "predictions.parquet"):
        assert (results / name).is_file(), name
    # both stages ran on Ray Train workers, reported checkpoints, and logged to TensorBoard
    for stage in (1, 2):
        assert (run / f"stage{stage}" / "best.pt").is_file()
        assert glob.glob(str(run / "ray" / f"e2e-stage{stage}" / "checkpoint_*" / "checkpoint.pt"))
        assert glob.glob(str(run / "tensorboard" / f"stage{stage}" / "events.out.tfevents.*"))
        history = json.loads((run / f"stage{stage}" / "stage.json").read_text())["history"]
        assert {h["world_size"] for h in history} == {2}, "the stage did not train on two ranks"
    best2 = load_checkpoint(run / "stage2" / "best.pt")
    assert best2["stage"] == 2 and "thresholds" not in best2
    saved = read_thresholds(run / "stage2" / "best.pt")  # beside best.pt; refused were it chosen for other bytes
    assert set(saved.pooled) == {"raw", "ema"} and saved.chosen_by == "jobs.pipeline (run e2e)"
    best2_sha = hashlib.sha256((run / "stage2" / "best.pt").read_bytes()).hexdigest()
    assert best2["config"]["stage2"]["domains"] == ["140k-real-vs-fake", "dalle"]
    # a local Ray's stages run without Ray Train's preemption watcher (jobs.common.LOCAL_ENV): no
    # actor of that class was ever started on this Ray, by this test or before it
    from ray.util.state import list_actors
    assert not list_actors(filters=[("class_name", "=", "PreemptionWatcher")], raise_on_missing_output=False)

    # the same command again resumes: both stages are skipped, only the evaluation reruns
    mtime = (run / "stage1" / "best.pt").stat().st_mtime
    assert pipeline.main(args) == 0
    out = capsys.readouterr().out
    assert "stage 1: already finished" in out and "stage 2: already finished" in out
    assert (run / "stage1" / "best.pt").stat().st_mtime == mtime
    assert hashlib.sha256((run / "stage2" / "best.pt").read_bytes()).hexdigest() == best2_sha  # evaluated again, unchanged

    # jobs.evaluate: the checkpoint on another root with other domain names, on a Ray worker. Two
    # training images copied into its test split: refused, then counted with --allow-overlap.
    other = write_tiny_root(tmp_path / "other", {"midjourney": "lower"}, per_class=4)
    for label in ("real", "fake"):
        trained = sorted((root / "dalle" / "train" / label).glob("*.png"))[0]
        (other / "midjourney" / "test" / label / "copied.png").write_bytes(trained.read_bytes())
    eval_args = ["--checkpoint", str(run / "stage2" / "best.pt"), "--data-root", str(other),
                 "--out", str(tmp_path / "eval-other")]
    with pytest.raises(SystemExit, match=r"(\d+) test images of .* are also in the checkpoint's training data") as refused:
        evaluate_job.main(eval_args)
    overlapping = int(str(refused.value).split("error: ")[1].split()[0])
    assert overlapping == 2 and not (tmp_path / "eval-other" / "metrics.parquet").exists()
    assert evaluate_job.main(eval_args + ["--allow-overlap", "--robustness"]) == 0
    printed = capsys.readouterr().out
    rows = pq.read_table(tmp_path / "eval-other" / "metrics.parquet").to_pylist()
    assert {(r["domain"], r["train_overlap"]) for r in rows} == {("midjourney", 2), ("combined", 2)}
    assert f"test images also in the training data**: {overlapping}" in (tmp_path / "eval-other" / "summary.md").read_text()
    assert {r["domain"] for r in rows} == {"midjourney", "combined"}
    assert {r["role"] for r in rows if r["domain"] == "midjourney"} == {"held out (never trained on)"}
    assert hashlib.sha256((run / "stage2" / "best.pt").read_bytes()).hexdigest() == best2_sha

    # --robustness, in the same Train worker run: the test split perturbed by Ray tasks into the cache, each
    # copy scored at the clean thresholds. No AUC direction is asserted here: this 3-epoch checkpoint is at
    # chance on its own test split; tests/test_robustness.py checks JPEG-30 on a detector that works.
    sweep = pq.read_table(tmp_path / "eval-other" / "robustness" / "robustness.parquet").to_pylist()
    severities = {("clean", "clean")} | {(p.kind, p.label) for p in PERTURBATIONS}
    assert {(r["perturbation"], r["severity"], r["weights"], r["domain"]) for r in sweep} == {
        (k, s, w, d) for k, s in severities for w in ("raw", "ema") for d in ("midjourney", "combined")}
    clean = {(r["weights"], r["domain"]): r for r in rows}
    assert all((r["threshold"], r["n"]) == (clean[(r["weights"], r["domain"])]["threshold"],
                                             clean[(r["weights"], r["domain"])]["n"]) for r in sweep)
    cache = Path(best2["config"]["data"]["cache_dir"])
    assert len(glob.glob(str(cache / "robustness" / "other-*" / "*" / SPEC_FILE))) == len(PERTURBATIONS)
    assert sweep_table(sweep, "ema") in printed and (tmp_path / "eval-other" / "robustness" / "robustness.md").is_file()

    # jobs.predict: a folder with one broken file; the others are still scored, into a CSV
    images = other / "midjourney" / "test" / "fake"
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    csv_path = tmp_path / "pred.csv"
    assert predict_job.main(["--checkpoint", str(run / "stage2" / "best.pt"), str(images), "--out", str(csv_path)]) == 1
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ("path,p_generated,p_calibrated,label,threshold,threshold_source,temperature,"
                        "temperature_source,error")
    assert len(lines) == 1 + 6 and sum(",error," in ln for ln in lines) == 1
    assert "broken.png" in capsys.readouterr().err


PAPER_TINY = ["--config", "paper", "data.synthetic.train_per_class=2", "data.synthetic.valid_per_class=1",
              "data.synthetic.test_per_class=1", "data.synthetic.image_size=16"]


def test_dry_run_prints_plan_and_trains_nothing(tmp_path, capsys):
    # 12 training images: Stage I's batch of 200 takes its epochs of 400 drawn from them
    assert pipeline.main([*PAPER_TINY, "--dry-run", f"output.runs_dir={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache",
                          "stage1.samples_per_epoch=400"]) == 0
    out = capsys.readouterr().out
    assert "image_size: 1024" in out and "mixup_alpha: 0.2" in out and "ema_decay: 0.9999" in out
    assert "stage 1: 224 px on 140k-real-vs-fake" in out and "stage 2: 1024 px" in out
    assert not (tmp_path / "runs").exists()


def test_bad_key_fails_before_ray_starts(monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although the config is invalid")

    monkeypatch.setattr(pipeline, "init_ray", no_ray)
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["stage2.mixup_alfa=0.3"])
    assert "stage2.mixup_alfa" in str(exc.value) and "did you mean 'stage2.mixup_alpha'" in str(exc.value)


def test_batches_the_workers_cannot_share_fail_before_ray_starts(tmp_path, monkeypatch):
    """The worker refuses these too, but Stage II's only after Stage I has trained: the README's
    8-GPU recipe raises Stage I's batch and keeps Stage II's 12, which 8 workers cannot share."""
    monkeypatch.setattr(pipeline, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    base = [*PAPER_TINY, f"data.cache_dir={tmp_path}/cache", "stage1.samples_per_epoch=800"]
    with pytest.raises(SystemExit) as exc:
        pipeline.main([*base, "scaling.num_workers=8", "stage1.batch_size=400"])
    assert str(exc.value) == ("config error:\n  stage2.batch_size=12 is the global batch and must be divisible by "
                              "workers x accum_steps = 8 x 1; change one of them")
    with pytest.raises(SystemExit, match=r"stage2.mixup_alpha=0.2 mixes the images within each worker's micro-batch"
                                         r".* 6 x 2 leaves one image in it"):
        pipeline.main([*base, "scaling.num_workers=6", "stage2.accum_steps=2", "stage1.batch_size=240"])
    with pytest.raises(SystemExit, match=r"stage1: 4 samples per epoch is less than one step of 200 \(the global batch\)"):
        pipeline.main([*PAPER_TINY, f"data.cache_dir={tmp_path}/cache"])


def test_flag_values_are_text_as_given():
    """--data-root, --run-name (and --storage, through the same override) are not read as YAML: a
    '#' began a comment that cut the path, 'on' became true, a date a date."""
    import argparse

    from jobs.common import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--data-root", "/data/faces #2", "--run-name", "on"]))
    assert (cfg.data.root, cfg.run_name) == ("/data/faces #2", "on")
    assert config_from_args(parser.parse_args(["--run-name", "2024-06-01"])).run_name == "2024-06-01"
    with pytest.raises(SystemExit, match="--data-root is empty .*leave the flag out to use the embedded"):
        config_from_args(parser.parse_args(["--data-root", ""]))  # $DATA unset: not the embedded set silently


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"data error: data root .*nowhere does not exist"):
        pipeline.main(["--data-root", str(tmp_path / "nowhere")])

"""jobs.tune as users run it: a tiny search kept in S3 (moto's server on 127.0.0.1, credentials in
the environment as users give them) is interrupted, resumed on the shared local Ray, and aggregated
again from the bucket alone on "another machine"; then ``--stage 2 --init`` from a Stage I
checkpoint, and a search whose trials all fail. Every Ray test has a timeout."""

from __future__ import annotations

import glob
import json
import shutil
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from jobs import aggregate as aggregate_job
from jobs import pipeline
from jobs import tune as tune_job
from tests.conftest import JobProcess, s3_keys, s3_object, tiny_overrides, write_tiny_root
from trueface.config import load_config
from trueface.data.layout import discover_layout
from trueface.train import run_stage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPACE = """description: tiny
params:
  stage1.lr: {loguniform: [3.0e-4, 3.0e-3]}
  stage1.ema_decay: {decay: [0.1, 0.5]}   # the tiny Stage I has 4 steps: these differ from step 1
  stage1.mixup_alpha: {choice: [0.0, 0.4]}
"""


@pytest.fixture(autouse=True)
def _fail_fast_ray_env(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")


BUCKET = "s3://trueface-test/tune"
EXP_KEYS = "tune/tiny/"  # the search's folder in the bucket


def trial_results(s3_server) -> dict[str, str]:
    """Trial folder -> the text of its result.json in the bucket."""
    return {key.split("/")[2]: s3_object(s3_server, key).decode()
            for key in s3_keys(s3_server, EXP_KEYS) if key.endswith("/result.json")}


def finished_trials(s3_server) -> dict[str, str]:
    """``trial_results`` of the trials whose last report ended their training."""
    return {trial: text for trial, text in trial_results(s3_server).items()
            if text.strip() and json.loads(text.splitlines()[-1]).get("stage_done")}


def interrupted_search(args: list[str], s3_server, log: Path) -> tuple[int, str]:
    """Run ``python -m jobs.tune`` as users do and press Ctrl-C (SIGINT) once its first trial has
    finished; returns its exit status and output. A process of its own with its own Ray, like a
    user's: its trials reach the bucket with the credentials the environment gives them, and what an
    interrupted search leaves reserved in Ray ends with its driver, not with this test session."""
    job = JobProcess("jobs.tune", args, log)
    job.wait_until(lambda: finished_trials(s3_server), 500, "finished trial in the bucket")
    job.proc.send_signal(signal.SIGINT)
    return job.finish(timeout=120)


@pytest.fixture(scope="module")
def search(s3_server, ray_session, module_tmp):
    """A 3-trial search kept in the bucket, interrupted after its first trial finished, then resumed to
    its end. ``exp`` is the working copy of the search on this machine (reports, configs and
    TensorBoard files; the checkpoints stay in the bucket)."""
    tmp = module_tmp
    root = write_tiny_root(tmp / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    (tmp / "space.yaml").write_text(SPACE)
    cache = tmp / "cache"
    args = ["--space", str(tmp / "space.yaml"), "--storage", BUCKET, "--name", "tiny", "--num-samples", "3",
            "--max-concurrent", "1", *tiny_overrides(root, tmp), f"data.cache_dir={cache}",
            "scaling.max_failures=0", "stage1.patience=0"]
    first, log = interrupted_search(args, s3_server, tmp / "tune.log")
    before = finished_trials(s3_server)
    rungs = saved_rungs(s3_server)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # --resume reads the search's spec into ./.cache/trueface (the default cache)
        resumed = tune_job.main(["--resume", "tiny", "--storage", BUCKET])
    return {"tmp": tmp, "exp": cache / "staging" / "s3" / "trueface-test" / "tune" / "tiny", "cache": cache,
            "results": tmp / "results" / "tiny", "first": first, "log": log, "resumed": resumed,
            "before": before, "root": root, "rungs": rungs}


def saved_rungs(s3_server) -> list[dict]:
    """ASHA's rung records as the interrupted search's experiment checkpoint holds them (Tune's
    callback states, jobs.tune_algorithms.RungKeeper's among them): each rung's trial id -> score."""
    import pickle

    files = [k for k in s3_keys(s3_server, EXP_KEYS) if k.rsplit("/", 1)[-1].startswith("callback-states-")]
    assert len(files) == 1, files
    states = [s for s in pickle.loads(s3_object(s3_server, files[0])).values() if s and "brackets" in s]
    assert len(states) == 1, states
    return [recorded for bracket in states[0]["brackets"] for _, recorded in bracket]


@pytest.mark.timeout(900)
def test_interrupted_search_resumes_without_rerunning_finished_trials(search, s3_server):
    assert search["first"] == 130  # interrupted
    assert search["resumed"] == 0
    assert search["before"], "no trial had finished when the search was interrupted"
    after = trial_results(s3_server)
    for trial, results in search["before"].items():
        assert after[trial] == results, f"{trial} was trained again after the resume"
    assert len(after) == 3  # every trial reported (finished, or stopped by ASHA)
    # ASHA's rungs went into the checkpoint the interruption wrote, so the resumed search judged its
    # trials against the finished one's scores (Tune saves no scheduler state of its own)
    finished_ids = {json.loads(text.splitlines()[-1])["trial_id"] for text in search["before"].values()}
    assert finished_ids <= {trial_id for rung in search["rungs"] for trial_id in rung}


@pytest.mark.timeout(60)
def test_trials_table_lists_every_trial_with_its_values_and_scores(search, s3_server):
    rows = pq.read_table(search["results"] / "trials.parquet").to_pylist()
    assert len(rows) == 3 and [r["rank"] for r in rows] == [1, 2, 3]
    scores = [r["objective"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert 3e-4 <= r["stage1.lr"] <= 3e-3 and 0.1 <= r["stage1.ema_decay"] <= 0.5
        # the objective is the best best/select_auc_ema the trial reported, epoch by epoch
        results = aggregate_job.read_results(search["exp"] / r["trial"] / "result.json")
        assert r["objective"] == max(x["best/select_auc_ema"] for x in results)
        assert [x["objective_epoch"] for x in results] == [x["epoch"] for x in results]
        assert r["stage1.mixup_alpha"] in (0.0, 0.4)
        assert r["outcome"] == "completed" or r["outcome"].startswith("stopped by ASHA")
        config = yaml.safe_load((search["exp"] / r["trial"] / "config.yaml").read_text())
        assert config["stage1"]["lr"] == pytest.approx(r["stage1.lr"])
        assert load_config(search["exp"] / r["trial"] / "config.yaml").run_name == r["trial"]  # rerunnable as is
        assert config["stage1"]["ema_decay"] == pytest.approx(r["stage1.ema_decay"])
    assert rows[0]["checkpoint"] == f"{BUCKET}/tiny/{rows[0]['trial']}/stage1/best.pt"
    # in the bucket, each trial's reports (Tune's and ours), TensorBoard curves and best.pt; the resume
    # checkpoints of trials that are over were deleted
    keys = s3_keys(s3_server, EXP_KEYS)
    assert f"{EXP_KEYS}trueface-tune.json" in keys
    for r in rows:
        prefix = f"{EXP_KEYS}{r['trial']}/"
        for name in ("config.yaml", "result.json", "stage1/best.pt"):
            assert prefix + name in keys, prefix + name
        assert (prefix + "stage1/stage.json" in keys) == (r["outcome"] == "completed")  # a stage ASHA stopped never ended
        assert any(k.startswith(prefix + "tensorboard/stage1/events.out.tfevents") for k in keys)
        assert prefix + "stage1/last.pt" not in keys
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"] not in search["log"]  # credentials never printed
    for name in ("summary.md", "trials.csv", "params.png", "best_config.yaml", "test/summary.md", "test/metrics.parquet"):
        assert (search["results"] / name).is_file(), name
    assert "## Parameter importances" in (search["results"] / "summary.md").read_text()


@pytest.mark.timeout(60)
def test_every_trial_has_tensorboard_curves_and_an_hparams_session(search):
    trials = sorted(p.parent for p in search["exp"].glob("*/config.yaml"))
    assert len(trials) == 3
    for trial in trials:
        curves = EventAccumulator(str(trial / "tensorboard" / "stage1"))
        curves.Reload()
        assert {"train/loss", "val/auc_ema", "val/select_auc_ema", "best/select_auc_ema"} <= set(curves.Tags()["scalars"])
        session = EventAccumulator(str(trial / "tensorboard"))
        session.Reload()
        content = session.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        values = {k: v.number_value for k, v in start.session_start_info.hparams.items()}
        config = yaml.safe_load((trial / "config.yaml").read_text())
        assert values["stage1.lr"] == pytest.approx(config["stage1"]["lr"])
        assert values["stage1.ema_decay"] == pytest.approx(config["stage1"]["ema_decay"])
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert ("stage1", "best/select_auc_ema") in {(m.name.group, m.name.tag) for m in experiment.metric_infos}


@pytest.mark.timeout(120)
def test_best_config_loads_back_and_the_pipeline_accepts_it(search, capsys):
    rows = pq.read_table(search["results"] / "trials.parquet").to_pylist()
    path = search["results"] / "best_config.yaml"
    cfg = load_config(path)
    assert cfg.run_name == "tiny-best"
    assert cfg.stage1.lr == pytest.approx(rows[0]["stage1.lr"])
    assert cfg.stage1.ema_decay == pytest.approx(rows[0]["stage1.ema_decay"])
    assert cfg.stage1.mixup_alpha == rows[0]["stage1.mixup_alpha"]
    assert pipeline.main(["--config", str(path), "--dry-run"]) == 0
    assert "run tiny-best" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_aggregate_rebuilds_the_report_from_the_bucket_on_another_machine(search, tmp_path, capsys, monkeypatch):
    # another machine: no working copy, only the bucket (the tests above this one have read the copy)
    shutil.rmtree(search["cache"])
    monkeypatch.chdir(tmp_path)  # the aggregator's working copy goes to ./.cache/trueface
    assert aggregate_job.main([f"{BUCKET}/tiny", "--out", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "best_config.yaml" in out and "on the test splits" in out
    assert f"tensorboard --logdir {tmp_path}/.cache/trueface/staging/s3/trueface-test/tune/tiny" in out
    a = pq.read_table(search["results"] / "trials.parquet").to_pylist()
    b = pq.read_table(tmp_path / "again" / "trials.parquet").to_pylist()
    assert [r["trial"] for r in a] == [r["trial"] for r in b]
    assert (tmp_path / "again" / "test" / "metrics.parquet").is_file()  # the best checkpoint, fetched and scored


@pytest.mark.timeout(600)
def test_stage_two_trials_start_from_a_fixed_stage_one_checkpoint(ray_session, tmp_path, capsys):
    root = write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    cfg = load_config("demo", tiny_overrides(root, tmp_path) + ["stage1.epochs=1"])
    layout = discover_layout(root)
    stage1 = run_stage(cfg, 1, layout.gather(["140k-real-vs-fake"], "train"),
                       layout.gather(["140k-real-vs-fake"], "valid"), tmp_path / "s1")
    (tmp_path / "space.yaml").write_text("params:\n  stage2.mixup_alpha: {uniform: [0.0, 0.8]}\n")
    args = ["--space", str(tmp_path / "space.yaml"), "--storage", str(tmp_path / "tune"), "--name", "s2",
            "--stage", "2", "--init", stage1.best_checkpoint, "--num-samples", "1",
            *tiny_overrides(root, tmp_path), "scaling.max_failures=0"]
    assert tune_job.main(args) == 0
    rows = pq.read_table(tmp_path / "results" / "s2" / "trials.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["final_stage"] == 2 and "/stage2/best.pt" in rows[0]["checkpoint"]
    assert "fine-tuned Stage II from" in (tmp_path / "results" / "s2" / "best_config.yaml").read_text()


@pytest.mark.timeout(300)
def test_a_search_whose_trials_all_fail_says_where_the_errors_are(ray_session, tmp_path, capsys):
    root = write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper"}, per_class=4)
    (tmp_path / "space.yaml").write_text(SPACE)
    # a GPU asked of a cluster without one (use_gpu auto): every trial fails inside its Train worker
    args = ["--space", str(tmp_path / "space.yaml"), "--storage", str(tmp_path / "tune"), "--name", "bad",
            "--num-samples", "1", *tiny_overrides(root, tmp_path), "scaling.max_failures=0", "runtime.device=cuda"]
    assert tune_job.main(args) == 1
    out = capsys.readouterr().out
    assert "1 trial(s) failed" in out and "error.txt" in out and "--resume bad" in out
    error_files = glob.glob(str(tmp_path / "tune" / "bad" / "*" / "error.txt"))
    assert error_files and "runtime.device=cuda, but Ray gave this worker no GPU" in Path(error_files[0]).read_text()

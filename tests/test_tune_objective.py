"""What a search compares: the final stage's score at equal epochs of that stage, never a Stage I one.

A fake trainable reports scripted scores through ``jobs.ray_tune.trial_result`` (what Ray Train's
workers report through) to the real Optuna searcher and ASHA scheduler of ``make_tuner``: no
training, seconds. Then the trials' rows as jobs.aggregate ranks them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobs import aggregate, ray_tune
from trueface.checkpoint import StageResult
from trueface.config import load_config, to_dict
from trueface.config.search_space import parse_search_space
from trueface.search_report import rank_trials

# Per trial, in the order trials start (one at a time): its best/select_auc_ema after each epoch
# of Stage I, then of Stage II (never falling, as the engine reports it).
SCRIPTS = {
    "A": ([0.90, 0.95], [0.60, 0.61, 0.62, 0.63]),  # strong in Stage I, weak in Stage II
    "B": ([0.50, 0.55], [0.80, 0.82, 0.84, 0.86]),  # weak in Stage I, strong in Stage II
    "C": ([0.97, 0.99], [0.55, 0.56, 0.57, 0.58]),  # best Stage I of all, worst Stage II
    "D": ([0.52, 0.53], [0.79, 0.81, 0.81, 0.81]),
}
ORDER = "ABCD"
GRACE, RF = 1, 2  # with Stage II's 4 epochs: ASHA compares at Stage II epochs 1 and 2


def fake_trial(params: dict, counter: str) -> None:
    """Claims the next script (trials run one at a time) and reports it epoch by epoch."""
    from ray import tune

    path = Path(counter)
    index = int(path.read_text()) if path.exists() else 0
    path.write_text(str(index + 1))
    name = ORDER[index]
    offset = 0
    for stage, scores in zip((1, 2), SCRIPTS[name]):
        for epoch, score in enumerate(scores, 1):
            metrics = {"stage": stage, "epoch": epoch, "val/select_auc_ema": score, "best/select_auc_ema": score,
                       "val/auc_ema": score, "val/auc": score, "stage_done": float(epoch == len(scores)), "script": index}
            tune.report(ray_tune.trial_result(metrics, offset, final_stage=stage == 2))
        offset += len(scores)


def search_spec(tmp_path: Path) -> dict:
    cfg = load_config("demo", ["stage1.epochs=2", "stage2.epochs=4"])
    space = parse_search_space({"params": {"stage2.mixup_alpha": {"uniform": [0.0, 0.8]}}}, "s.yaml")
    return {"version": ray_tune.SPEC_VERSION, "name": "fake", "storage": str(tmp_path / "tune"), "stages": [1, 2],
            "config": to_dict(cfg), "base_config": to_dict(cfg), "space": space.to_dict(), "space_source": "s.yaml",
            "init": None, "num_samples": len(SCRIPTS), "seed": 0, "startup_trials": 2, "grace_period": GRACE,
            "reduction_factor": RF, "steps_per_epoch": {"1": 10, "2": 10}}


@pytest.fixture(scope="module")
def fake_search(ray_session, tmp_path_factory):
    from ray import tune

    tmp = tmp_path_factory.mktemp("objective")
    spec = search_spec(tmp)
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # as ray_tune.disable_default_loggers, for this test only
    try:
        trainable = tune.with_resources(tune.with_parameters(fake_trial, counter=str(tmp / "counter")), {"CPU": 0.1})
        searcher, scheduler = ray_tune.make_search(spec)
        grid = ray_tune.make_tuner(spec, trainable, max_concurrent=1, search=(searcher, scheduler)).fit()
    finally:
        mp.undo()
    results = {r.metrics["trial_id"]: r for r in grid}
    names = {tid: ORDER[int(r.metrics["script"])] for tid, r in results.items()}
    return {"spec": spec, "grid": grid, "results": results, "names": names, "searcher": searcher,
            "scheduler": scheduler, "exp": Path(spec["storage"]) / spec["name"]}


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_asha_rungs_hold_only_final_stage_scores_at_final_stage_epochs(fake_search):
    assert not any(r.error for r in fake_search["grid"]), [str(r.error) for r in fake_search["grid"] if r.error]
    names = fake_search["names"]
    rungs = {milestone: {names[tid]: value for tid, value in recorded.items()}
             for milestone, recorded in fake_search["scheduler"]._brackets[0]._rungs}
    # Ray keeps a milestone at max_t too, where it only records the trials that completed.
    assert ray_tune.asha_rungs(GRACE, 4, RF) == [1, 2] and sorted(rungs) == [1, 2, 4]
    # Each recorded value is the trial's Stage II score at Stage II epoch == the rung, nothing else.
    assert rungs[1] == {n: SCRIPTS[n][1][0] for n in "ABCD"}
    assert rungs[2] == {n: SCRIPTS[n][1][1] for n in "ABD"}  # C was stopped at rung 1
    assert rungs[4] == {n: SCRIPTS[n][1][3] for n in "ABD"}


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_stage_one_runs_to_its_end_and_asha_stops_only_in_stage_two(fake_search):
    for tid, result in fake_search["results"].items():
        name = fake_search["names"][tid]
        history = result.metrics_dataframe
        stage1 = history[history["stage"] == 1]
        assert list(stage1["epoch"]) == [1, 2], name  # Stage I ran its whole budget, even for C
        assert stage1["objective"].isna().all() and (stage1["objective_epoch"] == 0).all()
        stage2 = history[history["stage"] == 2]
        assert list(stage2["objective_epoch"]) == list(stage2["epoch"])
        assert list(stage2["objective"]) == SCRIPTS[name][1][:len(stage2)]
    last = {fake_search["names"][tid]: r.metrics for tid, r in fake_search["results"].items()}
    # C, the best Stage I of all, was stopped at Stage II epoch 1 for its Stage II score (0.55 < the
    # median 0.70 of A and B there); the others trained Stage II to its end.
    assert (last["C"]["stage"], last["C"]["objective_epoch"]) == (2, 1)
    assert all(last[n]["objective_epoch"] == 4 for n in "ABD")


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_optuna_learns_each_trial_s_last_final_stage_score(fake_search):
    searcher, names = fake_search["searcher"], fake_search["names"]
    study = searcher._ot_study
    told = {names[tid]: study.trials[ot.number] for tid, ot in searcher._ot_trials.items()}
    assert {n: t.value for n, t in told.items()} == {"A": 0.63, "B": 0.86, "C": 0.55, "D": 0.81}
    # C, stopped by ASHA at Stage II epoch 1, is pruned there: TPE ranks it below the trials that finished
    assert {n: t.state.name for n, t in told.items()} == {"A": "COMPLETE", "B": "COMPLETE", "C": "PRUNED",
                                                          "D": "COMPLETE"}
    assert told["C"].intermediate_values == {1: 0.55}
    assert told["A"].intermediate_values == dict(enumerate(SCRIPTS["A"][1], 1))  # by Stage II epoch


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_the_report_ranks_by_the_final_stage_objective(fake_search):
    exp = fake_search["exp"]
    (exp / ray_tune.SPEC_FILE).write_text(json.dumps(fake_search["spec"]))
    infos = aggregate.load_trials(ray_tune.experiment_mirror(fake_search["spec"]))
    rows = rank_trials([aggregate.trial_row(info, fake_search["spec"]) for info in infos])
    by_trial = {info.path.name: fake_search["names"][info.trial_id] for info in infos}
    assert [by_trial[r["trial"]] for r in rows] == ["B", "D", "A", "C"]  # A, strong in Stage I only, below B
    assert [r["objective"] for r in rows] == [0.86, 0.81, 0.63, 0.55]
    assert rows[-1]["outcome"] == "stopped by ASHA at Stage II epoch 1"


def test_a_resumed_finished_trial_reports_what_its_last_epoch_did():
    """run_trial's one report for a trial whose stages had all finished (after a driver crash)."""
    history = [{"stage": 2.0, "epoch": float(e), "val/select_auc_ema": v, "best/select_auc_ema": b}
               for e, v, b in ((1, 0.7, 0.7), (2, 0.8, 0.8), (3, 0.75, 0.8))]
    done = StageResult(2, 0.8, 2, 3, False, "best.pt", "last.pt", "mean_domain", history)
    live = ray_tune.trial_result({**history[-1], "stage_done": 1.0}, epoch_offset=5, final_stage=True)
    resumed = ray_tune.finished_trial_result(done, epoch_offset=5)
    for key in (ray_tune.OBJECTIVE, ray_tune.OBJECTIVE_EPOCH, ray_tune.TRIAL_EPOCH, "stage", "stage_done"):
        assert resumed[key] == live[key], key
    assert (resumed[ray_tune.OBJECTIVE], resumed[ray_tune.OBJECTIVE_EPOCH], resumed[ray_tune.TRIAL_EPOCH]) == (0.8, 3, 8)


def test_only_the_final_stage_reports_a_number_and_the_pipeline_reports_neither_key():
    metrics = {"stage": 1, "epoch": 2, "best/select_auc_ema": 0.9}
    earlier = ray_tune.trial_result(metrics, 0, final_stage=False)
    assert math.isnan(earlier[ray_tune.OBJECTIVE]) and earlier[ray_tune.OBJECTIVE_EPOCH] == 0
    final = ray_tune.trial_result({**metrics, "stage": 2}, 4, final_stage=True)
    assert (final[ray_tune.OBJECTIVE], final[ray_tune.OBJECTIVE_EPOCH], final[ray_tune.TRIAL_EPOCH]) == (0.9, 2, 6)
    pipeline = ray_tune.trial_result(metrics, 0)
    assert ray_tune.OBJECTIVE not in pipeline and ray_tune.OBJECTIVE_EPOCH not in pipeline

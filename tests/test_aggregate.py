"""jobs.aggregate's reading of Tune's trial folders, without Ray: scores, outcomes, best config."""

from __future__ import annotations

import dataclasses

import json
import math

import pytest

from jobs import aggregate, ray_tune
from trueface.config import load_config, to_dict
from trueface.config.search_space import parse_search_space
from trueface.search_report import rank_trials

SPACE = parse_search_space({"params": {"stage1.lr": {"loguniform": [1e-4, 1e-2]},
                                       "stage1.ema_decay": {"decay": [0.9, 0.99]}}}, "s.yaml")


def spec(stages=(1,)) -> dict:
    cfg = load_config("demo", ["stage1.epochs=4", "stage2.epochs=3"])
    return {"name": "s", "storage": "s3://bucket/tune", "stages": list(stages), "config": to_dict(cfg), "base_config": to_dict(cfg),
            "space": SPACE.to_dict(), "space_source": "s.yaml", "init": None}


def trial(tmp_path, reports: list[dict], status="TERMINATED", torn_tail=False) -> aggregate.TrialInfo:
    path = tmp_path / "abc_s1.lr=0.001"
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in reports)
    (path / "result.json").write_text(text + ('{"stage": 1, "ep' if torn_tail else ""))
    return aggregate.TrialInfo("abc", path, status, {"stage1.lr": 0.001, "1-stage1.ema_decay": 0.05})


def report(stage, epoch, auc_ema, auc, done=0.0, offset=0, final=True, select=None):
    """One result.json line as a trial reports it (through ray_tune.trial_result); ``select``: the
    stage's best/select_auc_ema so far (default: auc_ema - 0.05, apart from the pooled AUC)."""
    metrics = {"stage": stage, "epoch": epoch, "val/auc_ema": auc_ema, "val/auc": auc, "stage_done": done,
               "best/select_auc_ema": auc_ema - 0.05 if select is None else select, "time_total_s": 60.0 * (offset + epoch)}
    return ray_tune.trial_result(metrics, offset, final)


def test_a_completed_trial_row(tmp_path):
    info = trial(tmp_path, [report(1, e, 0.5 + e / 10, 0.4 + e / 10, float(e == 4)) for e in range(1, 5)], torn_tail=True)
    row = aggregate.trial_row(info, spec())
    assert row["stage1.lr"] == 0.001 and row["stage1.ema_decay"] == pytest.approx(0.95)
    assert row["objective"] == pytest.approx(0.85)  # best/select_auc_ema, not the pooled AUC
    assert row["best_auc_ema"] == pytest.approx(0.9) and row["best_auc"] == pytest.approx(0.8)
    assert row["outcome"] == "completed" and row["epochs"] == 4 and row["wall_min"] == 4.0
    assert row["final_stage"] == 1 and row["checkpoint"] is None  # no best.pt in this fake folder
    # where the experiment holds the trial's best.pt, the row gives its location (here a URI)
    row = aggregate.trial_row(info, spec(), {"abc_s1.lr=0.001/stage1/best.pt"})
    assert row["checkpoint"] == "s3://bucket/tune/s/abc_s1.lr=0.001/stage1/best.pt"


def test_outcomes(tmp_path):
    early = [report(1, 1, 0.6, 0.6), report(1, 2, 0.5, 0.5, done=1.0)]
    assert aggregate.trial_row(trial(tmp_path / "a", early), spec())["outcome"] == "early-stopped (patience, stage 1)"
    stopped = [report(1, 1, 0.6, 0.6), report(1, 2, 0.5, 0.5)]
    assert aggregate.trial_row(trial(tmp_path / "b", stopped), spec())["outcome"] == "stopped by ASHA at Stage I epoch 2"
    assert aggregate.trial_row(trial(tmp_path / "c", stopped, "ERROR"), spec())["outcome"] == "error"
    assert aggregate.trial_row(trial(tmp_path / "d", stopped, "RUNNING"), spec())["outcome"] == "unfinished"
    # --stage both: Stage I ending is not the trial ending; scored on Stage II's reports only
    both = [report(1, 1, 0.9, 0.9, done=1.0, final=False), report(2, 1, 0.7, 0.6, offset=1)]
    row = aggregate.trial_row(trial(tmp_path / "e", both), spec((1, 2)))
    assert row["outcome"] == "stopped by ASHA at Stage II epoch 1"
    assert row["final_stage"] == 2 and row["best_auc_ema"] == pytest.approx(0.7)
    assert row["objective"] == pytest.approx(0.65)
    # a searched stage1.epochs: each trial's own epochs tell completed from stopped by patience
    searched = {**spec(), "space": parse_search_space({"params": {"stage1.epochs": {"int": [2, 4]}}}, "s.yaml").to_dict()}
    ran_both = trial(tmp_path / "f", [report(1, 1, 0.6, 0.6), report(1, 2, 0.7, 0.7, done=1.0)])
    ran_both = dataclasses.replace(ran_both, params={"stage1.epochs": 2})
    assert aggregate.trial_row(ran_both, searched)["outcome"] == "completed"
    patience = trial(tmp_path / "g", [report(1, e, 0.6, 0.6, done=float(e == 3)) for e in (1, 2, 3)])
    patience = dataclasses.replace(patience, params={"stage1.epochs": 4})
    assert aggregate.trial_row(patience, searched)["outcome"] == "early-stopped (patience, stage 1)"


def test_a_both_stages_trial_is_ranked_on_stage_two_alone(tmp_path):
    """Strong in Stage I, weak in Stage II ranks below weak in Stage I, strong in Stage II; a trial
    that never reached Stage II has no objective at all, however good its Stage I."""
    def both(stage1, stage2):
        return ([report(1, e, v, v, done=float(e == 2), final=False, select=v) for e, v in enumerate(stage1, 1)]
                + [report(2, e, v, v, done=float(e == 2), offset=2, select=v) for e, v in enumerate(stage2, 1)])

    a = trial(tmp_path / "a", both([0.9, 0.95], [0.6, 0.62]))
    b = trial(tmp_path / "b", both([0.5, 0.55], [0.8, 0.82]))
    c = trial(tmp_path / "c", both([0.97, 0.99], [])[:2], status="ERROR")
    rows = {name: aggregate.trial_row(info, spec((1, 2))) for name, info in (("a", a), ("b", b), ("c", c))}
    assert rows["a"]["objective"] == pytest.approx(0.62) and rows["b"]["objective"] == pytest.approx(0.82)
    assert math.isnan(rows["c"]["objective"])
    ranked = rank_trials([{**r, "trial": name} for name, r in rows.items()])
    assert [r["trial"] for r in ranked] == ["b", "a", "c"]


def test_a_trial_without_reports_has_nan_scores(tmp_path):
    row = aggregate.trial_row(trial(tmp_path, [], "ERROR"), spec())
    assert math.isnan(row["objective"]) and math.isnan(row["best_auc_ema"])
    assert row["outcome"] == "error" and row["final_stage"] is None


def test_best_config_is_the_base_config_with_the_best_values(tmp_path):
    info = trial(tmp_path, [report(1, 1, 0.8, 0.7, done=1.0)])
    text = aggregate.best_config_yaml(spec(), info, {"objective": 0.75, "best_auc_ema": 0.8, "best_auc": 0.7, "final_stage": 1})
    path = tmp_path / "best.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.run_name == "s-best" and cfg.stage1.lr == 0.001 and cfg.stage1.ema_decay == pytest.approx(0.95)
    assert cfg.stage2 == load_config("demo").stage2
    assert text.startswith("# Best trial of search s") and "objective (Stage 1 best/select_auc_ema, validation) 0.7500" in text


def test_a_folder_that_is_not_a_search_is_named(tmp_path):
    with pytest.raises(SystemExit, match="is not a TrueFace search"):
        aggregate.aggregate(tmp_path)


def test_a_damaged_search_spec_is_named_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_file = tmp_path / ray_tune.SPEC_FILE
    spec_file.write_text('{"name": "s", "conf')  # cut short
    with pytest.raises(SystemExit, match=r"trueface-tune.json: not readable JSON .*Restore it"):
        aggregate.aggregate(tmp_path)
    spec_file.write_text('{"name": "s", "space": {}}')  # keys missing
    with pytest.raises(SystemExit, match=r"trueface-tune.json lacks config, results_dir, stages, space_source, "
                                         r"num_samples; it is not a complete search spec"):
        aggregate.aggregate(tmp_path)
    spec_file.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="expected a JSON object .*got list"):
        aggregate.aggregate(tmp_path)

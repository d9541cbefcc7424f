"""The search report: ranking, console table, files (tables, plot, best config)."""

from __future__ import annotations

import csv
import math

import pyarrow.parquet as pq
import pytest
from PIL import Image

from trueface.config.search_space import parse_search_space
from trueface.search_report import format_trials, param_importances, rank_trials, write_search_report

KEYS = ["stage1.lr", "stage1.ema_decay"]
SPACE = parse_search_space({"params": {"stage1.lr": {"loguniform": [1e-4, 1e-2]},
                                       "stage1.ema_decay": {"decay": [0.9, 0.999]},
                                       "stage1.mixup_alpha": {"choice": [0.0, 0.4]}}}, "s.yaml")


def row(trial, auc, final_stage=1, outcome="completed", lr=1e-3, decay=0.99, mixup=0.0):
    """A trial's row; its pooled AUC columns are set apart from the objective, so ranking on them shows."""
    return {"trial": trial, "stage1.lr": lr, "stage1.ema_decay": decay, "stage1.mixup_alpha": mixup, "objective": auc,
            "best_auc_ema": 1 - auc, "best_auc": 1 - auc, "final_stage": final_stage, "epochs": 3, "outcome": outcome,
            "wall_min": 1.5, "checkpoint": f"/x/{trial}/stage{final_stage}/best.pt"}


def test_ranking_puts_the_furthest_stage_first_then_the_best_score_and_nan_last():
    rows = [row("a", 0.7), row("b", math.nan), row("c", 0.9), row("d", 0.6, final_stage=2), row("e", 0.8)]
    ranked = rank_trials(rows)
    assert [r["trial"] for r in ranked] == ["d", "c", "e", "a", "b"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5]
    # a trial that failed (diverged, crashed) after scoring well is no best config: it goes last
    ranked = rank_trials([*rows, row("f", 0.97, final_stage=2, outcome="error")])
    assert [r["trial"] for r in ranked] == ["d", "c", "e", "a", "b", "f"]


def test_console_table_lists_every_trial_and_parameter():
    text = format_trials(rank_trials([row("a_s1.lr=1", 0.7), row("b_s1.lr=2", 0.75, outcome="stopped by ASHA at epoch 1")]), KEYS)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["rank", "trial", "stage1.lr", "stage1.ema_decay", "objective"]
    assert lines[2].split()[:2] == ["1", "b"] and "stopped by ASHA at epoch 1" in lines[2]
    assert len(lines) == 4


def test_report_files(tmp_path):
    rows = rank_trials([row("a", 0.7, lr=1e-4, decay=0.9), row("b", 0.8, lr=1e-3, decay=0.99),
                        row("c", math.nan, outcome="error", lr=3e-3, decay=0.95)])
    files = write_search_report(tmp_path, rows, [("stage1.lr", True), ("stage1.ema_decay", True)],
                                "run_name: best\n", {"search": "s1"}, "TEST TABLE")
    assert set(files) == {"trials.csv", "trials.parquet", "best_config.yaml", "params.png", "summary.md"}
    assert "importances" not in (tmp_path / "summary.md").read_text().lower()  # none asked for
    table = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert [r["trial"] for r in table] == ["b", "a", "c"]
    assert table[0]["checkpoint"] == "/x/b/stage1/best.pt" and table[0]["stage1.lr"] == 1e-3
    with open(tmp_path / "trials.csv") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["b", "a", "c"]
    summary = (tmp_path / "summary.md").read_text()
    assert "TEST TABLE" in summary and "python -m jobs.pipeline --config" in summary and "| b |" in summary
    with Image.open(tmp_path / "params.png") as img:
        assert img.width > 600 and img.height > 200


def test_importances_find_the_parameter_that_drives_the_objective(tmp_path, capfd):
    """The objective follows log(lr) and ignores the decay and MixUp: lr gets nearly all the importance.
    A decay is given to Optuna as 1 - decay on its own log scale, as it was sampled."""
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-4, 5e-4, 2e-3, 5e-3, 8e-3]
    rows = [row(f"t{i}", 0.5 + 0.1 * math.log10(lr / 1e-4), lr=lr, decay=(0.9, 0.999, 0.99)[i % 3], mixup=(0.0, 0.4)[i % 2])
            for i, lr in enumerate(lrs)]
    rows.append(row("stopped-in-stage-1", math.nan, lr=1e-2))  # no objective: left out
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default, as in jobs.tune
    imp = param_importances(rows, SPACE)
    # its throwaway study is not announced under the search's report; the user's verbosity stays
    assert "A new study created" not in capfd.readouterr().err
    assert optuna.logging.get_verbosity() == optuna.logging.INFO
    assert imp.trials == 10 and set(imp.values) == {"stage1.lr", "stage1.ema_decay", "stage1.mixup_alpha"}
    assert list(imp.values)[0] == "stage1.lr" and imp.values["stage1.lr"] > 0.8
    assert sum(imp.values.values()) == pytest.approx(1.0)
    files = write_search_report(tmp_path, rank_trials(rows), [(k, True) for k in KEYS] + [("stage1.mixup_alpha", False)],
                                "x: 1\n", {"search": "s"}, None, importances=imp)
    summary = (tmp_path / "summary.md").read_text()
    assert "## Parameter importances" in summary and "over the 10 trials" in summary
    assert f"| stage1.lr | {imp.values['stage1.lr']:.3f} |" in summary
    with Image.open(files["importances.png"]) as img:
        assert img.width > 300 and img.height > 100


@pytest.mark.parametrize("objectives, note", [
    ([0.7, 0.8], "2 trial(s) have an objective; parameter importances need at least 3"),
    ([0.7, 0.8, math.nan, math.nan], "2 trial(s) have an objective"),
    ([0.75, 0.75, 0.75, 0.75], "all 4 trials have the same objective (0.75)"),
])
def test_too_few_or_alike_trials_give_a_note_instead_of_importances(tmp_path, objectives, note):
    rows = [row(f"t{i}", v, lr=1e-4 * (i + 1)) for i, v in enumerate(objectives)]
    imp = param_importances(rows, SPACE)
    assert imp.values == {} and note in imp.note
    (tmp_path / "importances.png").write_bytes(b"an earlier report's")
    files = write_search_report(tmp_path, rank_trials(rows), [(k, True) for k in KEYS], "x: 1\n", {}, None, importances=imp)
    assert "importances.png" not in files and not (tmp_path / "importances.png").exists()
    assert f"None: {imp.note}." in (tmp_path / "summary.md").read_text()

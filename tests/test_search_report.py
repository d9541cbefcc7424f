"""The search report: ranking, console table, files (tables, plot, best config)."""

from __future__ import annotations

import csv
import math

import pyarrow.parquet as pq
from PIL import Image

from trueface.search_report import format_trials, rank_trials, write_search_report

KEYS = ["stage1.lr", "stage1.ema_decay"]


def row(trial, auc, final_stage=1, outcome="completed", lr=1e-3, decay=0.99):
    return {"trial": trial, "stage1.lr": lr, "stage1.ema_decay": decay, "best_auc_ema": auc, "best_auc": auc - 0.01,
            "final_stage": final_stage, "epochs": 3, "outcome": outcome, "wall_min": 1.5,
            "checkpoint": f"/x/{trial}/stage{final_stage}/best.pt"}


def test_ranking_puts_the_furthest_stage_first_then_the_best_score_and_nan_last():
    rows = [row("a", 0.7), row("b", math.nan), row("c", 0.9), row("d", 0.6, final_stage=2), row("e", 0.8)]
    ranked = rank_trials(rows)
    assert [r["trial"] for r in ranked] == ["d", "c", "e", "a", "b"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5]


def test_console_table_lists_every_trial_and_parameter():
    text = format_trials(rank_trials([row("a_s1.lr=1", 0.7), row("b_s1.lr=2", 0.75, outcome="stopped by ASHA at epoch 1")]), KEYS)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["rank", "trial", "stage1.lr", "stage1.ema_decay"]
    assert lines[2].split()[:2] == ["1", "b"] and "stopped by ASHA at epoch 1" in lines[2]
    assert len(lines) == 4


def test_report_files(tmp_path):
    rows = rank_trials([row("a", 0.7, lr=1e-4, decay=0.9), row("b", 0.8, lr=1e-3, decay=0.99),
                        row("c", math.nan, outcome="error", lr=3e-3, decay=0.95)])
    files = write_search_report(tmp_path, rows, [("stage1.lr", True), ("stage1.ema_decay", True)],
                                "run_name: best\n", {"search": "s1"}, "TEST TABLE")
    assert set(files) == {"trials.csv", "trials.parquet", "best_config.yaml", "params.png", "summary.md"}
    table = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert [r["trial"] for r in table] == ["b", "a", "c"]
    assert table[0]["checkpoint"] == "/x/b/stage1/best.pt" and table[0]["stage1.lr"] == 1e-3
    with open(tmp_path / "trials.csv") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["b", "a", "c"]
    summary = (tmp_path / "summary.md").read_text()
    assert "TEST TABLE" in summary and "python -m jobs.pipeline --config" in summary and "| b |" in summary
    with Image.open(tmp_path / "params.png") as img:
        assert img.width > 600 and img.height > 200

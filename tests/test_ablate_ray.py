"""jobs.ablate as users run it, on the shared local Ray: a Stage I ablation of EMA and strong
augmentation over 2 seeds (2 trained configs x 2 seeds = 4 trials, 4 table rows), then
``--resume`` of the finished ablation, which rebuilds the report without training. The tests read
its outputs: the trials it trained, the intervals recomputed by hand from the per-seed CSV, which
weights each row read, and jobs.aggregate rebuilding the same table from ``results/<name>``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from scipy import stats as scipy_stats

from jobs import ablate as ablate_job
from jobs import aggregate as aggregate_job
from tests.conftest import tiny_overrides, write_tiny_root

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROWS = ["full", "no-ema", "no-strong-augmentation", "plain"]
TRAINED = {"full-seed0", "full-seed1", "no-strong-augmentation-seed0", "no-strong-augmentation-seed1"}


@pytest.fixture(autouse=True)
def _fail_fast_ray_env(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")


@pytest.fixture(scope="module")
def ablation(ray_session, module_tmp):
    tmp = module_tmp
    root = write_tiny_root(tmp / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    storage = tmp / "abl"
    # The default config (tune-demo) shrunk: 2 Stage I epochs of which 1 light, so strong
    # augmentation acts in epoch 2 (an ablation of a knob that never acted would compare nothing).
    rc = ablate_job.main(["--components", "ema,strong-augmentation", "--seeds", "2", "--stage", "1",
                          "--name", "abl", "--storage", str(storage), *tiny_overrides(root, tmp)])
    trials = storage / "abl" / "trials"
    best = {p: p.stat().st_mtime_ns for p in trials.glob("*/stage1/best.pt")}
    results = tmp / "results" / "abl"
    summary_before = (results / "summary.md").read_text() if (results / "summary.md").is_file() else ""
    (results / "forest.png").unlink(missing_ok=True)  # the resume must write it again
    resumed = ablate_job.main(["--resume", "abl", "--storage", str(storage)])
    return {"tmp": tmp, "rc": rc, "resumed": resumed, "trials": trials, "results": results, "best": best,
            "summary_before": summary_before}


def _csv_rows(results: Path) -> list[dict]:
    with open(results / "comparison.csv", newline="") as f:
        return list(csv.DictReader(f))


def _seed_aucs(row: dict) -> list[float]:
    return [float(row[k]) for k in sorted(row) if k.startswith("auc_seed") and row[k] not in ("", "nan")]


@pytest.mark.timeout(900)
def test_ablation_trains_each_config_once_per_seed(ablation):
    assert ablation["rc"] == 0 and ablation["resumed"] == 0
    assert {p.name for p in ablation["trials"].iterdir()} == TRAINED
    configs = {p.name: yaml.safe_load((p / "config.yaml").read_text()) for p in ablation["trials"].iterdir()}
    assert {n: c["seed"] for n, c in configs.items()} == {n: int(n[-1]) for n in TRAINED}
    assert {n: c["stage1"]["augment"]["strength"] == 0 for n, c in configs.items()} == {
        n: n.startswith("no-strong") for n in TRAINED}
    # Apart from the seed, the run name and the knob, the four configs are one config.
    def rest(c):
        c = json.loads(json.dumps(c))
        for key in ("seed", "run_name"):
            c.pop(key)
        c["stage1"]["augment"].pop("strength")
        return c
    assert len({json.dumps(rest(c), sort_keys=True) for c in configs.values()}) == 1
    assert len(ablation["best"]) == 4


@pytest.mark.timeout(900)
def test_ablation_json_names_every_row_and_its_weights(ablation):
    data = json.loads((ablation["results"] / "ablation.json").read_text())
    assert data["reference"] == "full"
    assert [v["name"] for v in data["variants"]] == ROWS
    weights = {v["name"]: {e["weights"] for e in v["evaluations"]} for v in data["variants"]}
    assert weights == {"full": {"ema"}, "no-ema": {"raw"}, "no-strong-augmentation": {"ema"}, "plain": {"raw"}}
    dirs = {v["name"]: [e["dir"] for e in v["evaluations"]] for v in data["variants"]}
    assert dirs["no-ema"] == dirs["full"] and dirs["plain"] == dirs["no-strong-augmentation"]
    assert [e["seed"] for e in data["variants"][0]["evaluations"]] == [0, 1]


@pytest.mark.timeout(900)
def test_rows_read_their_weights_from_their_trials_evaluations(ablation):
    """Each row's per-seed AUC is the AUC its evaluation report holds for its weights."""
    res = ablation["results"]
    source = {"full": ("full", "ema"), "no-ema": ("full", "raw"),
              "no-strong-augmentation": ("no-strong-augmentation", "ema"), "plain": ("no-strong-augmentation", "raw")}
    for row in _csv_rows(res):
        folder, weights = source[row["unit"]]
        for k in (0, 1):
            m = pq.read_table(res / "evals" / folder / f"seed{k}" / "metrics.parquet").to_pylist()
            want = next(r["auc"] for r in m if r["weights"] == weights and r["domain"] == row["domain"])
            assert float(row[f"auc_seed{k}"]) == pytest.approx(want, abs=1e-12), (row["unit"], row["domain"], k)
    # EMA and raw weights of one trial score differently, or no-ema would compare nothing.
    full = pq.read_table(res / "evals" / "full" / "seed0" / "metrics.parquet").to_pylist()
    assert {r["weights"] for r in full} == {"ema", "raw"}


@pytest.mark.timeout(900)
def test_intervals_match_a_hand_computation_from_the_per_seed_csv(ablation):
    rows = _csv_rows(ablation["results"])
    cell = {(r["unit"], r["domain"]): r for r in rows}
    t = scipy_stats.t.ppf(0.975, 1)  # 2 seeds: 1 degree of freedom
    checked = 0
    for r in rows:
        aucs = np.array(_seed_aucs(r))
        assert len(aucs) == 2 and r["auc_method"].startswith("t")
        half = t * aucs.std(ddof=1) / math.sqrt(2)
        assert float(r["auc_mean"]) == pytest.approx(aucs.mean(), abs=1e-9)
        # an AUC's interval is clipped to [0, 1]
        assert float(r["auc_low"]) == pytest.approx(max(0.0, aucs.mean() - half), abs=1e-9)
        assert float(r["auc_high"]) == pytest.approx(min(1.0, aucs.mean() + half), abs=1e-9)
        if r["unit"] == "full":
            assert r["diff_words"] == "the reference"
            continue
        d = aucs - np.array(_seed_aucs(cell[("full", r["domain"])]))
        dhalf = t * d.std(ddof=1) / math.sqrt(2)
        assert float(r["diff_mean"]) == pytest.approx(d.mean(), abs=1e-9)
        assert float(r["diff_low"]) == pytest.approx(d.mean() - dhalf, abs=1e-9)
        assert float(r["diff_high"]) == pytest.approx(d.mean() + dhalf, abs=1e-9)
        includes_zero = d.mean() - dhalf <= 0 <= d.mean() + dhalf
        assert ("no evidence of a difference" in r["diff_words"]) == includes_zero, r
        checked += 1
    assert checked == 3 * 3  # three rows against full, on two domains and combined


@pytest.mark.timeout(900)
def test_resume_of_a_finished_ablation_rebuilds_the_report_without_training(ablation):
    after = {p: p.stat().st_mtime_ns for p in ablation["trials"].glob("*/stage1/best.pt")}
    assert after == ablation["best"]
    res = ablation["results"]
    summary = (res / "summary.md").read_text()
    assert ablation["summary_before"] and "## Difference to full" in summary
    for row in ROWS[1:]:
        assert f"| {row} |" in summary
    assert "--components ema,strong-augmentation" in summary  # the command that made it
    for png in ("forest.png", "heatmap.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_aggregate_rebuilds_the_same_table_from_the_results_folder(ablation, tmp_path):
    assert aggregate_job.main([str(ablation["results"]), "--out", str(tmp_path / "agg")]) == 0
    mine = {(r["unit"], r["domain"]): r for r in _csv_rows(ablation["results"])}
    again = {(r["unit"], r["domain"]): r for r in _csv_rows(tmp_path / "agg")}
    assert again.keys() == mine.keys()
    for key, r in again.items():
        for col in ("auc_mean", "auc_low", "auc_high", "diff_mean", "diff_low", "diff_high"):
            a, b = float(r[col] or "nan"), float(mine[key][col] or "nan")
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), (key, col)

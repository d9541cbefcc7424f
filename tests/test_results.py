"""trueface.results: evaluation rows, console table, atomic report files."""

import csv
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

import trueface.results as results
from trueface.calibration import UNCALIBRATED, Temperatures, apply_temperature
from trueface.metrics import METRIC_KEYS, binary_metrics, brier_score, expected_calibration_error
from trueface.results import (
    COMBINED,
    Predictions,
    evaluation_rows,
    format_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROLES = {"stylegan": "trained (Stage I+II)", "sdxl": "held out (never trained on)"}


def _predictions(seed: int) -> Predictions:
    """Two domains with both classes in each; scores depend on the seed (one set of weights)."""
    rng = np.random.default_rng(seed)
    domains = ["stylegan"] * 12 + ["sdxl"] * 8
    labels = np.array([0, 1] * 6 + [0, 0, 1, 1, 1, 0, 1, 0])
    scores = np.clip(0.35 * labels + rng.uniform(0.0, 0.65, len(labels)), 0.0, 1.0)
    paths = [f"{d}/{i:03d}.png" for i, d in enumerate(domains)]
    return Predictions(paths=paths, domains=domains, labels=labels, scores=scores)


HEADER = {"run name": "demo", "checkpoint": "ckpt/best.pt", "threshold chosen on": "validation split"}
CONFIG = "model:\n  arch: resnet50\n"


@pytest.fixture
def test_preds() -> dict[str, Predictions]:
    return {"raw": _predictions(1), "ema": _predictions(2)}


@pytest.fixture
def rows(test_preds) -> list[dict]:
    return evaluation_rows(test_preds, {"raw": 0.5, "ema": 0.42}, "youden", ROLES)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report shared by the read-only checks (plotting is the slow part)."""
    preds = {"raw": _predictions(1), "ema": _predictions(2)}
    rows = evaluation_rows(preds, {"raw": 0.5, "ema": 0.42}, "youden", ROLES)
    out = tmp_path_factory.mktemp("report") / "new" / "run"
    paths = write_report(out, rows, preds, CONFIG, HEADER)
    return out, paths, rows, preds


# --------------------------------------------------------------------------- Predictions


def test_subset_and_arrow(test_preds):
    preds = test_preds["raw"]
    sub = preds.subset("sdxl")
    assert len(sub) == 8
    assert set(sub.domains) == {"sdxl"}
    assert sub.labels.tolist() == [0, 0, 1, 1, 1, 0, 1, 0]
    np.testing.assert_array_equal(sub.scores, preds.scores[12:])
    assert sub.paths == preds.paths[12:]
    table = preds.to_arrow("raw")
    assert table.column_names == ["path", "domain", "label", "score", "weights"]
    assert table.num_rows == 20
    assert set(table.column("weights").to_pylist()) == {"raw"}
    assert table.column("score").to_pylist() == preds.scores.tolist()


def test_subset_unknown_domain(test_preds):
    with pytest.raises(ValueError, match="'midjourney'.*stylegan"):
        test_preds["raw"].subset("midjourney")


def test_predictions_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        Predictions(paths=["a", "b"], domains=["d"], labels=np.array([0, 1]), scores=np.array([0.1, 0.2]))


# --------------------------------------------------------------------------- rows


def test_evaluation_rows_shape_and_order(rows):
    # 2 weights x (2 domains + combined)
    assert len(rows) == 2 * (2 + 1)
    assert [(r["weights"], r["domain"]) for r in rows] == [
        ("raw", "stylegan"), ("raw", "sdxl"), ("raw", COMBINED),
        ("ema", "stylegan"), ("ema", "sdxl"), ("ema", COMBINED),
    ]
    assert list(rows[0]) == ["weights", "domain", "role", "threshold_policy", "threshold_scope", "threshold_source",
                             "threshold_file", *METRIC_KEYS]
    assert {r["threshold_policy"] for r in rows} == {"youden"}
    assert {(r["threshold_scope"], r["threshold_source"]) for r in rows} == {("pooled", "pooled validation")}
    assert rows[1]["role"] == "held out (never trained on)"
    assert rows[2]["role"] == "all test domains"


def test_evaluation_rows_metrics_match_subsets(rows, test_preds):
    thresholds = {"raw": 0.5, "ema": 0.42}
    for row in rows:
        preds = test_preds[row["weights"]]
        part = preds if row["domain"] == COMBINED else preds.subset(row["domain"])
        expected = binary_metrics(part.labels, part.scores, thresholds[row["weights"]])
        assert {k: row[k] for k in METRIC_KEYS} == expected


def test_combined_row_sums_domains(rows):
    for weights in ("raw", "ema"):
        mine = [r for r in rows if r["weights"] == weights]
        combined = mine[-1]
        assert combined["domain"] == COMBINED
        for key in ("n", "n_real", "n_fake", "tn", "fp", "fn", "tp"):
            assert combined[key] == sum(r[key] for r in mine[:-1])
        assert combined["n"] == 20


def test_evaluation_rows_missing_role_or_threshold(test_preds):
    with pytest.raises(ValueError, match="no role for domain.*sdxl"):
        evaluation_rows(test_preds, {"raw": 0.5, "ema": 0.5}, "youden", {"stylegan": "trained"})
    with pytest.raises(ValueError, match="no threshold for weights.*ema"):
        evaluation_rows(test_preds, {"raw": 0.5}, "youden", ROLES)


def test_evaluation_rows_reserved_domain_name():
    preds = Predictions(["a", "b"], [COMBINED, COMBINED], np.array([0, 1]), np.array([0.2, 0.8]))
    with pytest.raises(ValueError, match="reserved"):
        evaluation_rows({"raw": preds}, {"raw": 0.5}, "youden", {COMBINED: "x"})


def test_format_table(rows):
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].split() == ["weights", "domain", "role", "n", "auc", "accuracy", "precision",
                                "recall", "f1", "ece", "threshold", "threshold_source"]
    # Aligned: the numbers end, and the (left-aligned) threshold source starts, at one column in every row.
    assert len({line.index(" pooled validation") for line in lines[2:]}) == 1
    assert f"{rows[0]['auc']:.4f}" in lines[2]
    assert "0.4200" in lines[-1]


def test_calibrated_rows_and_table(test_preds, rows):
    temps = Temperatures({"raw": 2.0, "ema": 0.5})
    calibrated = evaluation_rows(test_preds, {"raw": 0.5, "ema": 0.42}, "youden", ROLES, calibration=temps)
    assert list(calibrated[0])[-4:] == ["ece_calibrated", "brier_calibrated", "temperature", "temperature_source"]
    for row, plain in zip(calibrated, rows):
        preds = test_preds[row["weights"]]
        part = preds if row["domain"] == COMBINED else preds.subset(row["domain"])
        after = apply_temperature(part.scores, temps.pooled[row["weights"]])
        assert row["ece_calibrated"] == expected_calibration_error(part.labels, after)
        assert row["brier_calibrated"] == brier_score(part.labels, after) != row["brier"]
        assert (row["temperature"], row["temperature_source"]) == (temps.pooled[row["weights"]], "pooled validation")
        assert {k: row[k] for k in plain} == plain  # AUC, threshold, decisions: those of the raw scores
    header = format_table(calibrated).splitlines()[0].split()
    assert header[header.index("ece"):] == ["ece", "ece_calibrated", "temperature", "threshold", "threshold_source"]
    identity = evaluation_rows(test_preds, {"raw": 0.5, "ema": 0.42}, "youden", ROLES,
                               calibration=Temperatures.identity(["raw", "ema"]))
    assert all((r["ece_calibrated"], r["temperature"], r["temperature_source"]) == (r["ece"], 1.0, UNCALIBRATED)
               for r in identity)


def test_format_table_nan_auc():
    preds = Predictions(["a", "b"], ["d", "d"], np.array([1, 1]), np.array([0.2, 0.8]))
    rows = evaluation_rows({"raw": preds}, {"raw": 0.5}, "fixed:0.5", {"d": "held out"})
    assert " nan " in format_table(rows)


# --------------------------------------------------------------------------- report


def test_write_report_files(report):
    out, paths, rows, _ = report
    expected = {
        "summary.md", "metrics.csv", "metrics.parquet", "predictions.parquet", "config.yaml",
        "roc_raw.png", "roc_ema.png", "confusion_raw.png", "confusion_ema.png", "reliability_raw.png",
        "reliability_ema.png",
    }
    assert set(paths) == expected
    assert {p.name for p in out.iterdir()} == expected  # and no temporary files left
    for name, path in paths.items():
        assert path == out / name and path.stat().st_size > 0
    for name in expected:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "config.yaml").read_text() == CONFIG

    summary = (out / "summary.md").read_text()
    assert "- **checkpoint**: ckpt/best.pt" in summary
    assert "- **threshold chosen on**: validation split" in summary
    assert "| weights | domain | role |" in summary
    assert "(roc_ema.png)" in summary and "(confusion_raw.png)" in summary and "(reliability_ema.png)" in summary
    # One confusion table per row; the first is raw/stylegan.
    assert summary.count("| true \\ predicted | real | fake |") == len(rows)
    r = rows[0]
    assert f"| **real** | {r['tn']} | {r['fp']} |\n| **fake** | {r['fn']} | {r['tp']} |" in summary


def test_metrics_files_round_trip(report):
    out, _, rows, _ = report
    assert pq.read_table(out / "metrics.parquet").to_pylist() == rows
    with open(out / "metrics.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == len(rows)
    for got, want in zip(csv_rows, rows):
        assert list(got) == list(want)
        assert float(got["auc"]) == want["auc"] and int(got["tp"]) == want["tp"]
        assert got["domain"] == want["domain"]


def test_predictions_parquet(report):
    out, _, _, test_preds = report
    table = pq.read_table(out / "predictions.parquet")
    assert table.num_rows == 40
    assert table.column("weights").to_pylist() == ["raw"] * 20 + ["ema"] * 20
    assert table.column("score").to_pylist()[20:] == test_preds["ema"].scores.tolist()
    assert table.column("label").to_pylist()[:20] == test_preds["raw"].labels.tolist()


def test_report_with_one_class_domain(tmp_path):
    preds = Predictions(["a", "b", "c", "d"], ["x", "x", "y", "y"], np.array([0, 1, 1, 1]),
                        np.array([0.2, 0.7, 0.6, 0.9]))
    rows = evaluation_rows({"raw": preds}, {"raw": 0.5}, "youden", {"x": "trained", "y": "held out"})
    assert math.isnan(rows[1]["auc"])
    write_report(tmp_path, rows, {"raw": preds}, "", {})
    assert math.isnan(pq.read_table(tmp_path / "metrics.parquet").column("auc").to_pylist()[1])
    assert (tmp_path / "roc_raw.png").read_bytes()[:8] == PNG_MAGIC


def test_write_report_closes_figures(tmp_path, rows, test_preds):
    before = len(results.plt.get_fignums())
    write_report(tmp_path, rows, test_preds, "", {})
    assert len(results.plt.get_fignums()) == before


def test_unsafe_weights_name(tmp_path, test_preds):
    bad = {"../evil": test_preds["raw"]}
    with pytest.raises(ValueError, match="safe file names"):
        write_report(tmp_path, [], bad, "", {})


# --------------------------------------------------------------------------- atomicity


def test_failed_report_keeps_earlier_report(tmp_path, rows, test_preds, monkeypatch):
    write_report(tmp_path, rows, test_preds, "first: 1\n", {})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def bad_png(weights, preds):
        raise RuntimeError("plot failed")

    # The second report dies half-way (after csv/parquet/config, at the first plot).
    monkeypatch.setattr(results, "_roc_png", bad_png)
    changed = [dict(r, auc=0.0) for r in rows]
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(tmp_path, changed, test_preds, "second: 2\n", {})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(after) == set(before)  # no temporary files
    # Files written before the failure are complete new versions; the rest are the old ones.
    assert after["summary.md"] == before["summary.md"]
    assert after["roc_raw.png"] == before["roc_raw.png"]
    assert pq.read_table(tmp_path / "metrics.parquet").column("auc").to_pylist() == [0.0] * len(rows)

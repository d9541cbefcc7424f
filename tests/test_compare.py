"""trueface.compare and ``python -m jobs.aggregate PATH PATH ...``: the cross-domain comparison table,
on evaluation reports written by hand (synthetic scores; nothing trains)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.stats import t as student_t

from jobs import aggregate
from tests.conftest import s3_keys
from trueface.compare import (CompareError, SeedReport, Unit, compare, comparison_markdown, comparison_rows,
                              units_from_ablation, units_from_paths)
from trueface.config import Config, to_yaml
from trueface.metrics import roc_auc
from trueface.results import Predictions, evaluation_rows, write_report
from trueface.stats import bootstrap_auc, paired_bootstrap_auc_diff

DOMAINS = ("dalle", "tpdne")
ROLES = {"dalle": "trained (Stage I + Stage II), held-out test split", "tpdne": "held out (never trained on)"}
PER_CLASS = 30  # per domain


def predictions(strength: float, seed: int, jitter: float = 1.0) -> Predictions:
    """The same test images for every unit and seed; scores whose separation is ``strength``;
    ``jitter`` scales the seed's noise."""
    images = np.random.default_rng(123)  # the images' own difficulty: shared by every model
    hard = images.normal(0, 1, 2 * PER_CLASS * len(DOMAINS))
    noise = np.random.default_rng(seed + 1000 * int(strength * 100)).normal(0, jitter, hard.size)
    labels = np.tile(np.repeat([0, 1], PER_CLASS), len(DOMAINS))
    domains = np.repeat(DOMAINS, 2 * PER_CLASS)
    logits = strength * (labels - 0.5) * 2 + hard + noise
    return Predictions([f"/data/{d}/test/{i}.png" for i, d in enumerate(domains)], list(domains), labels,
                       1 / (1 + np.exp(-logits)))


def write_evaluation(folder: Path, strength: float, seed: int, run_name: str = "x", raw_strength: float = 0.2,
                     results_dir: Path | None = None) -> Path:
    """An evaluation report as trueface.evaluation writes it: raw and EMA weights, config.yaml with
    the run name and seed."""
    test = {"raw": predictions(raw_strength, seed), "ema": predictions(strength, seed)}
    rows = evaluation_rows(test, {"raw": 0.5, "ema": 0.5}, "youden", ROLES)
    cfg = replace(Config(), run_name=run_name, seed=seed)
    if results_dir is not None:
        cfg = replace(cfg, output=replace(cfg.output, results_dir=str(results_dir)))
    write_report(folder, rows, test, to_yaml(cfg), {"written by": "test"})
    return folder


def seeds_unit(tmp_path: Path, label: str, strength: float, seeds=(0, 1, 2)) -> Unit:
    return Unit(label, tuple(SeedReport(write_evaluation(tmp_path / label / f"seed{s}", strength, s), s)
                             for s in seeds))


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> list[Unit]:
    """Read only: 2 units x 3 seeds and a single-seed unit (written once: each report draws 4 PNGs)."""
    folder = tmp_path_factory.mktemp("units")
    return [seeds_unit(folder, "full", 1.2), seeds_unit(folder, "weak", 0.3),
            seeds_unit(folder, "one-seed", 1.2, seeds=(0,))]


@pytest.fixture(scope="module")
def ablation_folder(tmp_path_factory) -> Path:
    """Read only: an ablation's results folder (copy it to change it)."""
    return write_ablation(tmp_path_factory.mktemp("abl") / "abl-x")


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def t_by_hand(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_the_table_recomputed_by_hand_from_the_per_seed_csv(units, tmp_path):
    result = compare(units, tmp_path / "out", reference="full", n_boot=500)
    rows = read_csv(tmp_path / "out" / "comparison.csv")
    assert [(r["unit"], r["domain"]) for r in rows] == [(u, d) for u in ("full", "weak", "one-seed")
                                                         for d in (*DOMAINS, "combined")]
    table = {(r["unit"], r["domain"]): r for r in rows}
    for unit in ("full", "weak"):
        for domain in (*DOMAINS, "combined"):
            row = table[(unit, domain)]
            per_seed = [float(row[f"auc_seed{s}"]) for s in range(3)]
            # each seed's AUC is that seed's report's, recomputed from its predictions
            for s in range(3):
                preds = predictions(1.2 if unit == "full" else 0.3, s)
                part = preds if domain == "combined" else preds.subset(domain)
                assert per_seed[s] == pytest.approx(roc_auc(part.labels, part.scores))
            mean, low, high = t_by_hand(per_seed)
            assert [float(row[k]) for k in ("auc_mean", "auc_low", "auc_high")] == pytest.approx([mean, low, high])
            assert row["auc_method"] == "t over seeds" and row["n_seeds"] == "3" and row["seeds"] == "0,1,2"
            if unit == "weak":
                ref = [float(table[("full", domain)][f"auc_seed{s}"]) for s in range(3)]
                d_mean, d_low, d_high = t_by_hand([a - b for a, b in zip(per_seed, ref)])
                assert [float(row[k]) for k in ("diff_mean", "diff_low", "diff_high")] == pytest.approx(
                    [d_mean, d_low, d_high])
                assert row["diff_method"] == "paired t over seeds" and row["diff_pairing"] == "seeds 0,1,2"
                assert d_high < 0 and row["diff_words"] == "lower than full"
    assert table[("full", "combined")]["diff_words"] == "the reference"
    # the parquet holds the same rows (NaN where a unit has no such seed or difference)
    stored = pq.read_table(tmp_path / "out" / "comparison.parquet").to_pylist()
    assert [nan_as_none(r) for r in stored] == [nan_as_none(r) for r in result.rows]


def nan_as_none(row: dict) -> dict:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def test_a_single_seed_unit_gets_bootstrap_intervals_over_images(units, tmp_path):
    rows = {(r["unit"], r["domain"]): r for r in comparison_rows(units, "full", n_boot=500)}
    one = rows[("one-seed", "dalle")]
    part = predictions(1.2, 0).subset("dalle")
    assert one["auc_method"] == "bootstrap over images" and one["n_seeds"] == 1 and one["auc_n"] == 2 * PER_CLASS
    assert one["auc_mean"] == pytest.approx(roc_auc(part.labels, part.scores)) == one["auc_seed0"]
    assert one["auc_low"] < one["auc_mean"] < one["auc_high"]
    assert math.isnan(one["auc_seed1"])  # seeds it does not have
    # against a 3-seed reference: the seed they share, paired over the images both scored
    assert one["diff_method"] == "paired bootstrap over images"
    assert one["diff_pairing"] == f"seed 0 vs seed 0, {2 * PER_CLASS} images in common"
    # the same model and seed as full's seed 0: no difference at all
    assert one["diff_mean"] == pytest.approx(0.0) and one["diff_words"].startswith("interval includes 0")
    # the combined column pools two domains whose counts the test set fixes: resampled within each
    # (domain, class) cell, for the AUC and for the paired difference alike
    both, full = rows[("one-seed", "combined")], predictions(1.2, 0)
    domains = np.asarray(full.domains, dtype=object)
    by_domain = bootstrap_auc(full.labels, full.scores, 500, strata=domains)
    by_class = bootstrap_auc(full.labels, full.scores, 500)
    assert (both["auc_low"], both["auc_high"]) == pytest.approx((by_domain.low, by_domain.high))
    assert (both["auc_low"], both["auc_high"]) != pytest.approx((by_class.low, by_class.high))
    weak, order = predictions(0.3, 0), np.argsort(full.paths)  # paired by path: in path order
    diff = paired_bootstrap_auc_diff(full.labels[order], full.scores[order], weak.scores[order], 500,
                                     strata=domains[order])
    got = {(r["unit"], r["domain"]): r for r in comparison_rows(units, "weak", n_boot=500)}[("one-seed", "combined")]
    assert (got["diff_low"], got["diff_high"]) == pytest.approx((diff.low, diff.high))


def test_noise_between_units_is_reported_as_no_evidence(units, tmp_path):
    """Two units of the same model whose seeds differ only by noise: every interval includes 0."""
    b = Unit("b", tuple(SeedReport(write_evaluation(tmp_path / "b" / f"seed{s}", 1.2, s + 10), s) for s in range(3)))
    rows = comparison_rows([units[0], b], reference="full")
    diffs = [r for r in rows if r["unit"] == "b"]
    assert all(r["diff_low"] < 0 < r["diff_high"] for r in diffs)
    assert {r["diff_words"] for r in diffs} == {"interval includes 0: no evidence of a difference"}


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float]:
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = student_t.ppf(0.975, df) * math.sqrt(va + vb)
    mean = float(np.mean(a) - np.mean(b))
    return mean, mean - half, mean + half


def renumbered(unit: Unit, label: str, offset: int) -> Unit:
    """The same reports under other seed numbers (as a run family against an ablation may have)."""
    return Unit(label, tuple(SeedReport(e.dir, e.seed + offset, e.weights) for e in unit.evaluations))


def test_units_without_2_seeds_in_common_are_compared_unpaired_over_all_their_seeds(units, tmp_path):
    """Seeds 10,11,12 against 0,1,2: a Welch t over every seed of both (training noise included),
    not one seed of each with a bootstrap over images, which is blind to it."""
    later = renumbered(units[1], "weak-later", 10)
    rows = comparison_rows([units[0], later, units[2]], "full", n_boot=100)
    table = {(r["unit"], r["domain"]): r for r in rows}
    for domain in (*DOMAINS, "combined"):
        row, ref = table[("weak-later", domain)], table[("full", domain)]
        mine = [row[f"auc_seed{s}"] for s in (10, 11, 12)]
        theirs = [ref[f"auc_seed{s}"] for s in (0, 1, 2)]
        assert row["diff_method"] == "Welch t over seeds" and row["diff_n"] == 6
        assert row["diff_pairing"] == "seeds 10,11,12 vs seeds 0,1,2 (unpaired)"
        assert [row["diff_mean"], row["diff_low"], row["diff_high"]] == pytest.approx(welch_by_hand(mine, theirs))
        # the difference is the table's own means', every seed counted
        assert row["diff_mean"] == pytest.approx(row["auc_mean"] - ref["auc_mean"])
        assert row["diff_words"] == ("lower than full" if row["diff_high"] < 0 else
                                     "interval includes 0: no evidence of a difference")
    assert table[("weak-later", "combined")]["diff_words"] == "lower than full"
    # a unit with one seed still gets the images of one seed each
    assert table[("one-seed", "dalle")]["diff_method"] == "paired bootstrap over images"
    text = comparison_markdown(rows, "full", n_boot=100)
    assert "| Welch t over seeds | seeds 10,11,12 vs seeds 0,1,2 (unpaired) |" in text
    assert "- Welch t over seeds (unpaired: both units have 2 or more seeds but fewer than 2 in common)" in text
    # the same runs under other numbers: exactly no difference
    same = comparison_rows([units[0], renumbered(units[0], "full-later", 10)], "full", n_boot=100)
    assert {r["diff_mean"] for r in same if r["unit"] == "full-later"} == {0.0}
    # one seed in common (2 against 0,1,2) is still fewer than 2: unpaired too
    shifted = comparison_rows([units[0], renumbered(units[1], "weak-shifted", 2)], "full", n_boot=100)
    assert {r["diff_method"] for r in shifted if r["unit"] == "weak-shifted"} == {"Welch t over seeds"}


def test_unpaired_seeds_scored_on_other_images_are_not_compared(units, tmp_path):
    """A Welch t compares AUCs like the paired t: one seed of the unit scored other images (another
    data root), so no difference is given."""
    for s in (0, 1, 2):
        shutil.copytree(units[1].evaluations[s].dir, tmp_path / f"seed{s}")
    other = Unit("other", tuple(SeedReport(tmp_path / f"seed{s}", s + 10) for s in (0, 1, 2)))
    _rewrite_predictions(other.evaluations[2], lambda r: {**r, "path": r["path"].replace("/data/", "/other-root/")})
    rows = [r for r in comparison_rows([units[0], other], "full", n_boot=100) if r["unit"] == "other"]
    assert {r["diff_words"] for r in rows} == {"not comparable (scored on different test images)"}
    assert all(math.isnan(r["diff_mean"]) and r["diff_method"] == "Welch t over seeds" for r in rows)
    assert rows[0]["diff_pairing"] == "seeds 10,11,12 vs seeds 0,1,2 (unpaired); its seed 12 scored other images than its seed 10"


def _set_aucs(report_dir: Path, domain: str, auc: float) -> None:
    metrics = pq.read_table(report_dir / "metrics.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([{**r, "auc": auc} if r["domain"] == domain and r["weights"] == "ema" else r
                                         for r in metrics]), report_dir / "metrics.parquet")


def test_an_auc_interval_over_seeds_stays_within_0_and_1(units, tmp_path):
    """Seeds 0.995, 0.999, 0.990: the t interval would end at 1.006; an AUC cannot, so it ends at 1.
    The difference to the reference is not clipped."""
    for s, auc in zip((0, 1, 2), (0.995, 0.999, 0.990)):
        shutil.copytree(units[0].evaluations[s].dir, tmp_path / f"seed{s}")
        _set_aucs(tmp_path / f"seed{s}", "dalle", auc)
    high = Unit("high", tuple(SeedReport(tmp_path / f"seed{s}", s) for s in (0, 1, 2)))
    rows = comparison_rows([units[1], high], "weak", n_boot=100)
    row = next(r for r in rows if r["unit"] == "high" and r["domain"] == "dalle")
    mean, low, unclipped = t_by_hand([0.995, 0.999, 0.990])
    assert unclipped > 1.005
    assert (row["auc_mean"], row["auc_low"], row["auc_high"]) == pytest.approx((mean, low, 1.0))
    assert row["auc_high"] == 1.0
    weak = next(r for r in rows if r["unit"] == "weak" and r["domain"] == "dalle")
    d_mean, d_low, d_high = t_by_hand([a - weak[f"auc_seed{s}"] for s, a in zip((0, 1, 2), (0.995, 0.999, 0.990))])
    assert (row["diff_mean"], row["diff_low"], row["diff_high"]) == pytest.approx((d_mean, d_low, d_high))
    assert "its bounds clipped to [0, 1]" in comparison_markdown(rows, "weak", n_boot=100)


def test_markdown_tables_say_the_method_and_the_words(units, tmp_path):
    result = compare(units, tmp_path / "out", reference="full", n_boot=500)
    text = (tmp_path / "out" / "comparison.md").read_text()
    assert text == result.markdown
    row = next(r for r in result.rows if r["unit"] == "weak" and r["domain"] == "tpdne")
    cell = f"{row['auc_mean']:.3f} [{row['auc_low']:.3f}, {row['auc_high']:.3f}]"
    weak_line = next(line for line in text.splitlines() if line.startswith("| weak | t over 3 seeds |"))
    assert cell in weak_line
    assert "| one-seed | bootstrap over images (1 seed) |" in text
    diff = f"{row['diff_mean']:.3f} [{row['diff_low']:.3f}, {row['diff_high']:.3f}]"
    assert f"| weak | tpdne | {diff} | paired t over seeds | seeds 0,1,2 | lower than full |" in text
    assert "- tpdne: held out (never trained on)" in text
    for method in ("t over seeds:", "bootstrap over images (one seed):", "paired t over seeds:",
                   "paired bootstrap over images (one seed each):"):
        assert f"- {method}" in text
    assert "500 resamples" in text


def test_heatmap_and_forest_pngs(units, tmp_path):
    compare(units, tmp_path / "out", reference="full", n_boot=200)
    for name in ("heatmap.png", "forest.png"):
        with Image.open(tmp_path / "out" / name) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float64)
        assert pixels.shape[0] > 150 and pixels.shape[1] > 300, name
        assert pixels.std() > 10, f"{name} is blank"
    # without a reference there is nothing to draw a forest of
    compare(units, tmp_path / "plain", n_boot=200)
    assert not (tmp_path / "plain" / "forest.png").exists()
    assert "diff_mean" not in read_csv(tmp_path / "plain" / "comparison.csv")[0]


def write_ablation(folder: Path, name="abl-x") -> Path:
    for variant, strength in (("full", 1.2), ("no-mixup", 0.8)):
        for s in (0, 1):
            write_evaluation(folder / "evals" / variant / f"seed{s}", strength, s, raw_strength=0.1)
    data = {"name": name, "kind": "ablation", "reference": "full", "variants": [
        {"name": "full", "description": "the full recipe",
         "evaluations": [{"seed": s, "dir": f"evals/full/seed{s}", "weights": "ema"} for s in (0, 1)]},
        {"name": "no-ema", "description": "EMA off: the raw weights",  # reads full's reports, raw weights
         "evaluations": [{"seed": s, "dir": f"evals/full/seed{s}", "weights": "raw"} for s in (0, 1)]},
        {"name": "no-mixup", "description": "MixUp off",
         "evaluations": [{"seed": s, "dir": f"evals/no-mixup/seed{s}"} for s in (0, 1)]},
    ], "dropped": []}
    (folder / "ablation.json").write_text(json.dumps(data))
    return folder


def test_an_ablation_folder_gives_one_unit_per_variant(ablation_folder):
    folder = ablation_folder
    found = units_from_ablation(str(folder))
    assert found.reference == "full" and [u.label for u in found.units] == ["full", "no-ema", "no-mixup"]
    assert found.units[1].description == "EMA off: the raw weights"
    assert "- no-ema: EMA off: the raw weights" in comparison_markdown(comparison_rows(found.units, n_boot=100))
    rows = {(r["unit"], r["domain"]): r for r in comparison_rows(found.units, found.reference, n_boot=200)}
    for s in (0, 1):  # no-ema reads the raw weights of full's reports
        assert rows[("no-ema", "combined")][f"auc_seed{s}"] == pytest.approx(
            roc_auc(predictions(0.1, s).labels, predictions(0.1, s).scores))
    assert rows[("no-ema", "combined")]["weights"] == "raw" and rows[("no-mixup", "dalle")]["weights"] == "ema"
    # two seeds: t over seeds, and differences paired by seed
    assert rows[("no-mixup", "dalle")]["auc_method"] == "t over seeds"
    assert rows[("no-ema", "dalle")]["diff_method"] == "paired t over seeds"
    # through units_from_paths, a caller's reference wins over the file's (see jobs.aggregate)
    assert units_from_paths([folder]).reference == "full"


def test_a_broken_ablation_file_is_named(tmp_path):
    folder = tmp_path / "abl"
    folder.mkdir()
    (folder / "ablation.json").write_text(json.dumps({"name": "abl", "variants": [{"name": "full"}]}))
    with pytest.raises(CompareError, match=r"ablation.json: not a valid ablation file .*'evaluations'"):
        units_from_paths([folder])


def write_run(tmp_path: Path, name: str, strength: float, seed: int = 0) -> Path:
    """A run folder as jobs.pipeline leaves it: config.yaml and stage1/ under runs/<name>, the
    evaluation under results/<name>."""
    results = tmp_path / "results"
    write_evaluation(results / name, strength, seed, run_name=name, results_dir=results)
    run = tmp_path / "runs" / name
    (run / "stage1").mkdir(parents=True)
    cfg = replace(Config(), run_name=name, seed=seed)
    (run / "config.yaml").write_text(to_yaml(replace(cfg, output=replace(cfg.output, results_dir=str(results)))))
    return run


def test_the_cli_compares_two_run_folders(tmp_path, capsys):
    a, b = write_run(tmp_path, "run-a", 1.2), write_run(tmp_path, "run-b", 0.4)
    out = tmp_path / "cmp"
    assert aggregate.main([str(a), str(b), "--out", str(out), "--reference", "run-a"]) == 0
    printed = capsys.readouterr().out
    assert "| run-a | bootstrap over images (1 seed) |" in printed and "comparison.md" in printed
    rows = {(r["unit"], r["domain"]): r for r in read_csv(out / "comparison.csv")}
    metrics = {r["domain"]: r for r in pq.read_table(tmp_path / "results" / "run-b" / "metrics.parquet").to_pylist()
               if r["weights"] == "ema"}
    for domain in (*DOMAINS, "combined"):
        assert float(rows[("run-b", domain)]["auc_mean"]) == pytest.approx(metrics[domain]["auc"])
    assert rows[("run-b", "combined")]["diff_words"] == "lower than run-a"
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.md", "comparison.parquet",
                                                    "forest.png", "heatmap.png"]
    # --weights raw reads the other weights of the same reports
    assert aggregate.main([str(a), str(b), "--out", str(tmp_path / "raw"), "--weights", "raw"]) == 0
    raw = {(r["unit"], r["domain"]): r for r in read_csv(tmp_path / "raw" / "comparison.csv")}
    assert float(raw[("run-a", "combined")]["auc_mean"]) == pytest.approx(
        roc_auc(predictions(0.2, 0).labels, predictions(0.2, 0).scores))


def test_an_evaluation_folder_and_repeated_labels(ablation_folder, tmp_path):
    shutil.copytree(ablation_folder, tmp_path / "abl-y")
    evaluation = write_evaluation(tmp_path / "by-hand", 1.0, 7, run_name="my-run")
    found = units_from_paths([ablation_folder, tmp_path / "abl-y", evaluation])
    assert [u.label for u in found.units] == ["full", "no-ema", "no-mixup", "abl-y/full", "abl-y/no-ema",
                                              "abl-y/no-mixup", "my-run"]
    rows = comparison_rows(found.units, "full", n_boot=200)
    mine = next(r for r in rows if r["unit"] == "my-run" and r["domain"] == "dalle")
    assert mine["seeds"] == "7"  # the seed of its config.yaml
    # no seed in common with full (0, 1): each one's first seed, over the images both scored
    assert mine["diff_pairing"] == f"seed 7 vs seed 0, {2 * PER_CLASS} images in common"


def test_an_ablations_reference_renamed_for_a_taken_label_is_still_its_reference(ablation_folder, tmp_path):
    other = write_run(tmp_path, "full", 0.3)  # a run named like the ablation's reference row, given first
    found = units_from_paths([other, ablation_folder])
    assert [u.label for u in found.units] == ["full", "abl-x/full", "no-ema", "no-mixup"]
    assert found.reference == "abl-x/full"  # the ablation's rows are compared with its own full row
    # --weights raw acts on the run; on ablations alone it would act on nothing, and says so
    with pytest.raises(CompareError, match="weights raw: every path given is an ablation"):
        units_from_paths([ablation_folder], weights="raw")
    assert units_from_paths([other, ablation_folder], weights="raw").units[0].evaluations[0].weights == "raw"


def test_a_domain_fewer_seeds_were_tested_on_says_its_own_interval_method(tmp_path):
    # seed 0 tested on every domain, seeds 1 and 2 on dalle alone: dalle's is a t over 3 seeds,
    # the other domains' a bootstrap of seed 0's images, and the interval column says each
    reports = [SeedReport(write_evaluation(tmp_path / f"seed{s}", 1.2, s), s) for s in (0, 1, 2)]
    for report in reports[1:]:
        table = pq.read_table(report.dir / "predictions.parquet").to_pylist()
        pq.write_table(pa.Table.from_pylist([r for r in table if r["domain"] == "dalle"]),
                       report.dir / "predictions.parquet")
        metrics = pq.read_table(report.dir / "metrics.parquet").to_pylist()
        pq.write_table(pa.Table.from_pylist([r for r in metrics if r["domain"] == "dalle"]),
                       report.dir / "metrics.parquet")
    rows = comparison_rows([Unit("A", tuple(reports))], n_boot=100)
    assert {r["domain"]: r["n_seeds"] for r in rows}["dalle"] == 3
    line = next(x for x in comparison_markdown(rows, n_boot=100).splitlines() if x.startswith("| A |"))
    assert "dalle: t over 3 seeds" in line and "bootstrap over images (1 seed)" in line


def _rewrite_predictions(report: SeedReport, change) -> None:
    table = pq.read_table(report.dir / "predictions.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([change(r) for r in table]), report.dir / "predictions.parquet")


def test_seeds_scored_on_other_images_are_not_compared(tmp_path):
    """A t over seeds pairs AUCs: B's seeds scored the same domains' other images (another data
    root), so a difference to A means nothing, however large; so is combined over another set of
    domains. The same AUC-level numbers on the same images are compared as before."""
    a = seeds_unit(tmp_path, "A", 1.2, seeds=(0, 1))
    b = seeds_unit(tmp_path, "B", 0.3, seeds=(0, 1))
    for report in b.evaluations:
        _rewrite_predictions(report, lambda r: {**r, "path": r["path"].replace("/data/", "/other-root/")})
    rows = comparison_rows([a, b], "A", n_boot=100)
    words = {r["domain"]: r["diff_words"] for r in rows if r["unit"] == "B"}
    assert words == {d: "not comparable (scored on different test images)" for d in (*DOMAINS, "combined")}
    assert all(math.isnan(r["diff_mean"]) for r in rows if r["unit"] == "B")
    assert "seed 0 scored other images" in next(r for r in rows if r["unit"] == "B")["diff_pairing"]
    # C's seed 1 was tested on dalle alone: dalle compares, combined (over other domains) does not
    c = seeds_unit(tmp_path, "C", 0.3, seeds=(0, 1))
    c1 = c.evaluations[1].dir
    for name in ("predictions.parquet", "metrics.parquet"):
        table = pq.read_table(c1 / name).to_pylist()
        pq.write_table(pa.Table.from_pylist([r for r in table if r["domain"] != "tpdne"]), c1 / name)
    words = {r["domain"]: r["diff_words"] for r in comparison_rows([a, c], "A", n_boot=100) if r["unit"] == "C"}
    assert not words["dalle"].startswith("not comparable")
    assert words["combined"] == "not comparable (scored on different test images)"


def test_a_domain_a_unit_was_not_tested_on_says_so_in_the_interval_column(tmp_path):
    a = seeds_unit(tmp_path, "A", 1.2, seeds=(0,))
    report = a.evaluations[0]
    _rewrite_predictions(report, lambda r: r)  # unchanged: A has both domains
    b = Unit("B", (SeedReport(write_evaluation(tmp_path / "B", 1.2, 0), 0),))
    metrics = pq.read_table(b.evaluations[0].dir / "metrics.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([r for r in metrics if r["domain"] != "tpdne"]),
                   b.evaluations[0].dir / "metrics.parquet")
    line = next(x for x in comparison_markdown(comparison_rows([a, b], n_boot=100), n_boot=100).splitlines()
                if x.startswith("| B |"))
    assert "tpdne: not tested" in line and "dalle: bootstrap over images (1 seed)" in line


def test_unknown_paths_and_missing_pieces_get_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"empty: nothing to compare there; expected an evaluation report"):
        aggregate.main([str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="nope does not exist"):
        aggregate.main([str(tmp_path / "nope"), str(empty)])
    run = write_run(tmp_path, "run-a", 1.0)
    (tmp_path / "results" / "run-a" / "metrics.parquet").unlink()
    with pytest.raises(CompareError, match=r"run run-a .* has no evaluation at .*results/run-a yet"):
        units_from_paths([run])
    with pytest.raises(SystemExit):
        aggregate.main([str(run), "--no-test"])
    assert "--no-test applies to one search" in capsys.readouterr().err


def test_damaged_job_files_and_reports_exit_cleanly_naming_the_file(tmp_path, monkeypatch):
    """A truncated trueface-tune.json (one search, or compared), a spec without results_dir, a
    truncated trueface-ablate.json and a damaged metrics.parquet: an error naming the file and
    what to do, not a traceback."""
    monkeypatch.chdir(tmp_path)  # working copies under ./.cache
    other = tmp_path / "other"
    other.mkdir()
    cut = tmp_path / "search-cut"
    cut.mkdir()
    (cut / "trueface-tune.json").write_text('{"name": "s", "resul')
    with pytest.raises(SystemExit, match=r"search-cut/trueface-tune.json: not readable JSON .*python -m jobs.tune"):
        aggregate.main([str(cut)])
    with pytest.raises(SystemExit, match=r"error: .*search-cut/trueface-tune.json: not readable JSON"):
        aggregate.main([str(cut), str(other)])
    nokey = tmp_path / "search-nokey"
    nokey.mkdir()
    (nokey / "trueface-tune.json").write_text('{"name": "s"}')
    with pytest.raises(SystemExit, match=r"search-nokey/trueface-tune.json names no results_dir"):
        aggregate.main([str(nokey), str(other)])
    (nokey / "trueface-tune.json").write_text('["s"]')
    with pytest.raises(CompareError, match=r"trueface-tune.json: expected a JSON object .*got list"):
        units_from_paths([nokey, other])
    storage = tmp_path / "abl-storage"
    storage.mkdir()
    (storage / "trueface-ablate.json").write_text('{"results_dir": ')
    with pytest.raises(SystemExit, match=r"abl-storage/trueface-ablate.json: not readable JSON .*jobs.ablate"):
        aggregate.main([str(storage), str(other)])
    damaged = tmp_path / "eval"
    damaged.mkdir()
    (damaged / "metrics.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit, match=r"eval/metrics.parquet: not a readable Parquet file .*ArrowInvalid.*again"):
        aggregate.main([str(damaged), "--out", str(tmp_path / "o")])


def test_bad_units_are_refused(units, tmp_path):
    with pytest.raises(CompareError, match="reference 'nope' is not one of the units: full, weak, one-seed"):
        comparison_rows(units, "nope")
    twice = Unit("twice", (SeedReport(units[0].evaluations[0].dir), SeedReport(units[0].evaluations[0].dir)))
    with pytest.raises(CompareError, match=r"unit 'twice' has seed\(s\) \[0\] more than once"):
        comparison_rows([twice])
    stale = Unit("stale", (SeedReport(units[0].evaluations[0].dir, 0, "swa"),))
    with pytest.raises(CompareError, match="weights 'swa' must be one of ema, raw"):
        comparison_rows([stale])
    with pytest.raises(CompareError, match="no units to compare"):
        comparison_rows([])
    # the reference alone: a table, but no differences to plot
    alone = compare(units[:1], tmp_path / "alone", reference="full", n_boot=100)
    assert "forest.png" not in alone.files and not (tmp_path / "alone" / "forest.png").exists()
    assert len(alone.rows) == 3 and {r["diff_words"] for r in alone.rows} == {"the reference"}


def test_one_search_path_still_aggregates_that_search(tmp_path, monkeypatch):
    search = tmp_path / "runs" / "tune" / "s"
    search.mkdir(parents=True)
    (search / "trueface-tune.json").write_text("{}")
    called = []
    monkeypatch.setattr(aggregate, "_aggregate_search", lambda *args: called.append(args) or 0)
    assert aggregate.main([str(search), "--no-test"]) == 0
    assert called == [(str(search), None, True)]
    with pytest.raises(SystemExit):
        aggregate.main([str(search), "--reference", "x"])


def test_a_search_report_folder_reads_its_test_report(tmp_path):
    report = tmp_path / "results" / "s"
    write_evaluation(report / "test", 1.0, 3, run_name="s-trial")
    (report / "trials.parquet").write_bytes(b"")
    found = units_from_paths([report])
    assert [u.label for u in found.units] == ["s"] and found.units[0].evaluations[0].dir == report / "test"
    spec_folder = tmp_path / "runs" / "tune" / "s"
    spec_folder.mkdir(parents=True)
    (spec_folder / "trueface-tune.json").write_text(json.dumps({"name": "s", "results_dir": str(tmp_path / "r2")}))
    with pytest.raises(CompareError, match=r"search s: no test report at .*r2/test; run python -m jobs.aggregate"):
        units_from_paths([spec_folder, report])


def test_a_test_report_of_a_trial_no_longer_best_is_not_shown_as_the_best_ones(tmp_path, capsys):
    """An aggregation that scored no trial (--no-test) keeps test/ of the trial that was best
    before: neither the console nor a comparison may present it as the new best trial's."""
    from trueface.search_report import stale_test_report

    report = tmp_path / "results" / "s"
    write_evaluation(report / "test", 1.0, 3, run_name="s-T1")
    (report / "test" / "evaluated.json").write_text(json.dumps({"trial": "T1", "checkpoint": "T1/stage1/best.pt"}))
    pq.write_table(pa.Table.from_pylist([{"trial": "T1"}, {"trial": "T2"}]), report / "trials.parquet")
    assert stale_test_report(report) == "" and units_from_paths([report]).units[0].label == "s"
    pq.write_table(pa.Table.from_pylist([{"trial": "T2"}, {"trial": "T1"}]), report / "trials.parquet")
    assert "trial T1, which was best when it was scored; the best trial is now T2" in stale_test_report(report)
    with pytest.raises(CompareError, match=r"search s .*test/ holds the test scores of trial T1.*without --no-test"):
        units_from_paths([report])
    experiment = tmp_path / "runs" / "tune" / "s"
    experiment.mkdir(parents=True)
    (experiment / "trueface-tune.json").write_text(json.dumps({"space": {"params": {"stage1.lr": {"loguniform": [1e-4, 1e-2]}}},
                                                                  "space_source": "test"}))
    pq.write_table(pa.Table.from_pylist([{"trial": t, "stage1.lr": 1e-3, "objective": 0.9} for t in ("T2", "T1")]),
                   report / "trials.parquet")
    from trueface.storage import Mirror

    aggregate.print_summary(Mirror(report), Mirror(experiment))
    out = capsys.readouterr().out
    assert "no test table: its test/ holds the test scores of trial T1" in out and "on the test splits" not in out


def test_an_ablation_kept_in_s3_is_compared_into_s3(s3_server, ablation_folder, tmp_path, monkeypatch, capsys):
    client, bucket = s3_server["client"], s3_server["bucket"]
    for path in ablation_folder.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"cmp/abl-x/{path.relative_to(ablation_folder).as_posix()}",
                              Body=path.read_bytes())
    monkeypatch.chdir(tmp_path)  # the working copies go to ./.cache/trueface
    assert aggregate.main(["s3://trueface-test/cmp/abl-x", "--out", "s3://trueface-test/cmp/report"]) == 0
    assert "| no-mixup | t over 2 seeds |" in capsys.readouterr().out
    keys = s3_keys(s3_server, "cmp/report/")
    assert {f"cmp/report/{n}" for n in ("comparison.md", "comparison.csv", "comparison.parquet", "heatmap.png",
                                        "forest.png")} <= set(keys)
    # the same numbers as from the local folder
    local = comparison_rows(units_from_ablation(str(ablation_folder)).units, "full", n_boot=2000)
    remote = pq.read_table(tmp_path / ".cache/trueface/staging/s3/trueface-test/cmp/report/comparison.parquet")
    assert [nan_as_none(r) for r in remote.to_pylist()] == [nan_as_none(r) for r in local]


def test_a_difference_without_a_value_says_why():
    from trueface.compare import plain_words
    from trueface.stats import Interval

    nan = math.nan
    assert plain_words(Interval(nan, nan, nan, 0, "paired bootstrap over images"), "full") == (
        "not comparable (no test images in common: scored on different data)")
    assert plain_words(Interval(nan, nan, nan, 40, "paired bootstrap over images"), "full") == (
        "not comparable (AUC undefined: one class only)")
    assert plain_words(Interval(0.1, 0.05, 0.15, 40, "paired bootstrap over images"), "full") == "higher than full"
    assert plain_words(Interval(nan, nan, nan, 0, "Welch t over seeds"), "full") == (
        "not comparable (scored on different test images)")
    assert plain_words(Interval(nan, nan, nan, 6, "Welch t over seeds"), "full") == (
        "not comparable (AUC undefined: one class only)")

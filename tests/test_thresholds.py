"""Thresholds kept beside the checkpoint (never in it), pooled or per domain; stale files refused."""

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs import predict as predict_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.checkpoint import load_checkpoint, save_checkpoint
from trueface.config import ConfigError, load_config, to_dict
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint, load_models
from trueface.inference import predict_scores
from trueface.metrics import METRIC_KEYS, binary_metrics, choose_threshold, roc_auc
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.predict import Predictor
from trueface.results import COMBINED, FALLBACK_SOURCE, PER_IMAGE_SOURCE, POOLED_SOURCE, Predictions, evaluation_rows
from trueface.run import resolve_run
from trueface.thresholds import (ThresholdsError, choose_thresholds, read_thresholds, stamp, thresholds_path,
                                 write_thresholds)


def _domain(name: str, n: int, real: tuple[float, float], fake: tuple[float, float], seed: int):
    """n real + n fake scores drawn uniformly from the given ranges."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n + [1] * n)
    scores = np.concatenate([rng.uniform(*real, n), rng.uniform(*fake, n)])
    return [name] * (2 * n), labels, scores


def _validation():
    """Two domains whose scores sit at different heights: 'low' separates near 0.2, 'high' near 0.7,
    so no single threshold suits both; 'onlyreal' has one class (no policy is defined on it)."""
    parts = [_domain("low", 30, (0.0, 0.25), (0.15, 0.45), 1), _domain("high", 30, (0.45, 0.75), (0.65, 1.0), 2),
             _domain("onlyreal", 5, (0.1, 0.3), (0.1, 0.3), 3)]
    domains = [d for p in parts for d in p[0]][:-5]  # drop the 5 'fakes' of onlyreal
    labels = np.concatenate([p[1] for p in parts])[:-5]
    scores = np.concatenate([p[2] for p in parts])[:-5]
    return domains, labels, scores


# --------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("policy", ["youden", "max_f1", "max_accuracy"])
def test_per_domain_thresholds_are_each_domains_own_choice(policy):
    domains, labels, scores = _validation()
    ema = scores ** 1.1  # a second set of weights with other scores
    chosen = choose_thresholds(labels, domains, {"raw": scores, "ema": ema}, policy, "per_domain")
    names = np.array(domains)
    for weights, s in (("raw", scores), ("ema", ema)):
        own = chosen.per_domain[weights]
        assert set(own) == {"low", "high"}  # onlyreal has one class: no threshold of its own
        for d in ("low", "high"):
            assert own[d] == choose_threshold(labels[names == d], s[names == d], policy)
        assert own["low"] < 0.5 < own["high"]  # the domains' distributions differ, so do their thresholds
        assert chosen.pooled[weights] == choose_threshold(labels, s, policy)
    assert chosen.validation == {"low": {"real": 30, "fake": 30}, "high": {"real": 30, "fake": 30},
                                 "onlyreal": {"real": 5, "fake": 0}}


def test_pooled_scope_chooses_what_the_evaluation_chose_before():
    domains, labels, scores = _validation()
    chosen = choose_thresholds(labels, domains, {"ema": scores}, "youden", "pooled")
    assert chosen.per_domain == {} and chosen.pooled == {"ema": choose_threshold(labels, scores, "youden")}
    assert chosen.threshold("ema", "low") == (chosen.pooled["ema"], POOLED_SOURCE)
    with pytest.raises(ValueError, match="scope 'global'"):
        choose_thresholds(labels, domains, {"ema": scores}, "youden", "global")


# --------------------------------------------------------------------------- table rows


def _test_predictions() -> Predictions:
    """Test images of low, high and a held-out domain that has no validation split."""
    parts = [_domain("low", 10, (0.0, 0.25), (0.15, 0.45), 11), _domain("high", 10, (0.45, 0.75), (0.65, 1.0), 12),
             _domain("held", 6, (0.2, 0.6), (0.4, 0.9), 13)]
    domains = [d for p in parts for d in p[0]]
    return Predictions([f"{d}/{i}.png" for i, d in enumerate(domains)], domains,
                       np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


ROLES = {"low": "trained", "high": "trained", "held": "held out (never trained on)"}


def test_per_domain_rows_use_each_domains_threshold_and_label_the_fallback():
    preds = _test_predictions()
    pooled, own = {"ema": 0.5}, {"ema": {"low": 0.2, "high": 0.7}}
    rows = {r["domain"]: r for r in evaluation_rows({"ema": preds}, pooled, "youden", ROLES, per_domain=own,
                                                     threshold_file="runs/x/stage2/thresholds.json")}
    assert {r["threshold_scope"] for r in rows.values()} == {"per_domain"}
    assert {r["threshold_file"] for r in rows.values()} == {"runs/x/stage2/thresholds.json"}
    for domain, t, source in (("low", 0.2, "low validation"), ("high", 0.7, "high validation"),
                              ("held", 0.5, FALLBACK_SOURCE)):
        part = preds.subset(domain)
        assert rows[domain]["threshold_source"] == source
        assert {k: rows[domain][k] for k in METRIC_KEYS} == binary_metrics(part.labels, part.scores, t)
    combined = rows[COMBINED]
    assert combined["threshold_source"] == PER_IMAGE_SOURCE and math.isnan(combined["threshold"])
    for key in ("n", "n_real", "n_fake", "tn", "fp", "fn", "tp"):  # each image decided at its domain's threshold
        assert combined[key] == sum(rows[d][key] for d in ("low", "high", "held"))
    assert combined["accuracy"] == (combined["tp"] + combined["tn"]) / combined["n"]
    assert combined["auc"] == roc_auc(preds.labels, preds.scores)  # threshold-free metrics from the scores
    assert combined["ece"] == binary_metrics(preds.labels, preds.scores, 0.5)["ece"]


def test_pooled_rows_reproduce_the_single_threshold_numbers():
    preds = _test_predictions()
    rows = evaluation_rows({"ema": preds}, {"ema": 0.42}, "youden", ROLES)
    for row in rows:
        part = preds if row["domain"] == COMBINED else preds.subset(row["domain"])
        assert {k: row[k] for k in METRIC_KEYS} == binary_metrics(part.labels, part.scores, 0.42)
        assert (row["threshold_scope"], row["threshold_source"]) == ("pooled", POOLED_SOURCE)


# --------------------------------------------------------------------------- the file


def test_file_beside_the_checkpoint_round_trips_and_refuses_other_bytes(tmp_path):
    assert thresholds_path(tmp_path / "best.pt") == tmp_path / "thresholds.json"
    assert thresholds_path(tmp_path / "last.pt") == tmp_path / "last.thresholds.json"
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights of the first training")
    assert read_thresholds(ckpt) is None
    domains, labels, scores = _validation()
    chosen = stamp(choose_thresholds(labels, domains, {"ema": scores}, "youden", "per_domain"), ckpt, "test", "/data")
    assert write_thresholds(ckpt, chosen) == tmp_path / "thresholds.json"
    assert read_thresholds(ckpt) == chosen
    assert chosen.checkpoint["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    ckpt.write_bytes(b"weights of the other training")  # same size, other bytes: retrained
    with pytest.raises(ThresholdsError, match=r"thresholds.json is stale.*sha256.*jobs.evaluate"):
        read_thresholds(ckpt)
    (tmp_path / "thresholds.json").write_text("{not json")
    with pytest.raises(ThresholdsError, match="not a TrueFace thresholds file"):
        read_thresholds(ckpt)


def test_config_rejects_an_unknown_scope():
    assert load_config("demo").eval.threshold_scope == "pooled"
    assert load_config("demo", ["eval.threshold_scope=per_domain"]).eval.threshold_scope == "per_domain"
    with pytest.raises(ConfigError, match=r"eval\.threshold_scope: 'domain' must be pooled .* or per_domain"):
        load_config("demo", ["eval.threshold_scope=domain"])


# --------------------------------------------------------------------------- a real checkpoint, no training


@pytest.fixture
def run(tmp_path):
    """An untrained Stage II best.pt on a root with two trained domains and one held out (test only)."""
    root = write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=4)
    write_tiny_root(root, {"tpdne": "lower"}, per_class=4, splits=("test",))
    # fp32, no flip: scoring is what these tests pay for, and neither changes what they check
    overrides = [*tiny_overrides(root, tmp_path), "runtime.precision=fp32", "eval.hflip_tta=false"]
    cfg, layout = resolve_run(load_config("demo", overrides))
    torch.manual_seed(0)
    weights = build_model(dataclasses.replace(cfg.model, weights="none")).state_dict()
    ckpt = tmp_path / "runs" / "t" / "stage2" / "best.pt"
    save_checkpoint(ckpt, {"model": weights, "ema": weights, "stage": 2, "config": to_dict(cfg)})  # one copy on disk
    return cfg, layout, ckpt


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_pipelines_evaluation_and_jobs_evaluate_never_rewrite_best_pt(run, tmp_path, capsys):
    cfg, layout, ckpt = run
    before = _sha256(ckpt)
    report = evaluate_checkpoint(ckpt, layout, tmp_path / "results",
                                 thresholds=ThresholdRequest("valid", save=True, chosen_by="jobs.pipeline (test)"))  # what the pipeline's evaluation does
    assert _sha256(ckpt) == before and "thresholds" not in load_checkpoint(ckpt)
    saved = json.loads(thresholds_path(ckpt).read_text())
    assert saved["checkpoint"] == {"file": "best.pt", "sha256": before, "bytes": ckpt.stat().st_size}
    assert saved["thresholds"]["ema"] == {"pooled": report.thresholds["ema"]} and saved["scope"] == "pooled"
    assert saved["validation"]["domains"] == {"140k-real-vs-fake": {"real": 4, "fake": 4}, "dalle": {"real": 4, "fake": 4}}
    assert saved["chosen"]["by"] == "jobs.pipeline (test)" and saved["policy"] == "youden"
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert f"- **threshold file**: {ckpt.parent / 'thresholds.json'}" in summary
    assert "- **threshold scope**: pooled: one threshold per weights" in summary

    # jobs.evaluate: auto reads the saved file, "checkpoint" is the old name of "saved"
    for how in ("auto", "checkpoint"):
        out = tmp_path / f"again-{how}"
        assert evaluate_job.main(["--checkpoint", str(ckpt), "--data-root", str(layout.root), "--out", str(out),
                                  "--no-ray", "--threshold-from", how]) == 0
        rows = pq.read_table(out / "metrics.parquet").to_pylist()
        assert {r["threshold"] for r in rows if r["weights"] == "ema"} == {report.thresholds["ema"]}
        assert "read from" in rows[0]["threshold_policy"]
    assert _sha256(ckpt) == before


def test_a_test_domain_the_root_lacks_stops_jobs_evaluate_before_it_scores(run, tmp_path, monkeypatch):
    cfg, layout, ckpt = run
    monkeypatch.setattr(evaluate_job, "evaluate_checkpoint", lambda *a, **k: pytest.fail("images were scored"))
    with pytest.raises(SystemExit, match=r"error: test domain\(s\) tpdn not found under .*found: 140k-real-vs-fake"):
        evaluate_job.main(["--checkpoint", str(ckpt), "--data-root", str(layout.root), "--out", str(tmp_path / "r"),
                           "--no-ray", "--test-domains", "dalle, tpdn"])


def test_per_domain_scope_end_to_end_and_predict_picks_a_domain(run, tmp_path, capsys):
    cfg, layout, ckpt = run
    assert evaluate_job.main(["--checkpoint", str(ckpt), "--data-root", str(layout.root), "--out", str(tmp_path / "r"),
                              "--no-ray", "--threshold-from", "valid", "--threshold-scope", "per_domain",
                              "--save-thresholds"]) == 0
    chosen = read_thresholds(ckpt)
    assert chosen.scope == "per_domain" and chosen.domains() == ["140k-real-vs-fake", "dalle"]
    # each domain's own threshold is the policy on ITS validation scores
    # channels_last, as the evaluation runs it: on an AVX-512 CPU oneDNN's fp32 kernels for the two
    # layouts round a score differently (3e-8 apart, measured; alike on AVX2 machines)
    models = {k: m.to(memory_format=torch.channels_last) for k, m in load_models(load_checkpoint(ckpt), cfg).items()}
    runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
    for d in ("140k-real-vs-fake", "dalle"):
        samples = layout.samples(d, "valid")
        scores = predict_scores(models["ema"], samples, cfg.stage2.image_size, runtime, cfg)
        assert chosen.per_domain["ema"][d] == choose_threshold([s.label for s in samples], scores, "youden")
    rows = {(r["weights"], r["domain"]): r for r in pq.read_table(tmp_path / "r" / "metrics.parquet").to_pylist()}
    assert {r["threshold_scope"] for r in rows.values()} == {"per_domain"}
    assert rows["ema", "dalle"]["threshold"] == chosen.per_domain["ema"]["dalle"]
    assert rows["ema", "dalle"]["threshold_source"] == "dalle validation"
    held = rows["ema", "tpdne"]  # no validation split: the pooled threshold, and the row says so
    assert (held["threshold"], held["threshold_source"]) == (chosen.pooled["ema"], FALLBACK_SOURCE)
    assert rows["ema", COMBINED]["threshold_source"] == PER_IMAGE_SOURCE
    assert "per_domain: each test domain" in (tmp_path / "r" / "summary.md").read_text()

    assert Predictor.from_checkpoint(ckpt).threshold == chosen.pooled["ema"]
    images = layout.root / "dalle" / "test" / "fake"
    csv_path = tmp_path / "pred.csv"
    assert predict_job.main(["--checkpoint", str(ckpt), str(images), "--domain", "dalle", "--out", str(csv_path)]) == 0
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ("path,p_generated,p_calibrated,label,threshold,threshold_source,temperature,"
                        "temperature_source,error")
    assert all(f",{chosen.per_domain['ema']['dalle']:.6f},dalle validation," in ln for ln in lines[1:])
    assert all(f",{chosen.calibration.per_domain['ema']['dalle']:.6g},dalle validation," in ln for ln in lines[1:])
    assert "the ema weights' dalle validation threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"no threshold for 'tpdne'.*domains with their own: 140k-real-vs-fake, dalle"):
        predict_job.main(["--checkpoint", str(ckpt), str(images), "--domain", "tpdne"])


def test_a_retrained_checkpoint_refuses_its_old_thresholds(run, tmp_path):
    cfg, layout, ckpt = run
    evaluate_checkpoint(ckpt, layout, tmp_path / "results", thresholds=ThresholdRequest("valid", save=True))
    state = load_checkpoint(ckpt)
    state["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(ckpt, state)  # the stage trained again into the same folder
    with pytest.raises(ThresholdsError, match="stale"):
        Predictor.from_checkpoint(ckpt)
    with pytest.raises(SystemExit, match="stale"):
        predict_job.main(["--checkpoint", str(ckpt), str(layout.root / "dalle" / "test")])
    with pytest.raises(SystemExit, match=r"stale.*--threshold-from valid"):
        evaluate_job.main(["--checkpoint", str(ckpt), "--data-root", str(layout.root), "--no-ray",
                           "--out", str(tmp_path / "stale")])

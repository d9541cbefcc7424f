"""Temperature scaling: the fit, the file beside the checkpoint, the tables, the plot and jobs.predict."""

import dataclasses
import json
import math
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import predict as predict_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.augment import eval_transform
from trueface.calibration import UNCALIBRATED, Temperatures, apply_temperature, fit_temperature, logit
from trueface.checkpoint import load_checkpoint, save_checkpoint
from trueface.config import load_config, to_dict
from trueface.data.dataset import ImageDataset
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint, load_models
from trueface.inference import predict_scores
from trueface.metrics import brier_score, expected_calibration_error, reliability_bins, roc_auc
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.predict import Predictor
from trueface.results import COMBINED, FALLBACK_SOURCE, PER_IMAGE_TEMPERATURE, Predictions, evaluation_rows
from trueface.run import resolve_run
from trueface.thresholds import ThresholdsError, choose_thresholds, read_thresholds, stamp, thresholds_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _overconfident(n: int, temperature: float, seed: int):
    """Labels drawn from sigmoid(z) and scores sigmoid(temperature * z): calibrated at exactly ``temperature``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < _sigmoid(z)).astype(np.int64)
    return labels, _sigmoid(temperature * z)


# --------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("true_t", [8.0, 0.5])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    labels, scores = _overconfident(20_000, true_t, seed=1)
    t = fit_temperature(labels, scores)
    assert t == pytest.approx(true_t, rel=0.05)
    # it is the NLL's minimum: a step either way costs likelihood
    signed = logit(scores) * np.where(labels == 1, 1.0, -1.0)
    nll = [np.logaddexp(0.0, -signed / (t * f)).mean() for f in (1.0, 1.01, 1 / 1.01)]
    assert nll[0] < nll[1] and nll[0] < nll[2]


def test_fit_temperature_at_the_edges():
    assert fit_temperature([0, 1, 0, 1], [0.5] * 4) == 1.0  # nothing to scale
    assert fit_temperature([0, 1, 0, 1], [0.2, 0.8, 0.3, 0.7]) == 1e-3  # perfectly ordered: sharpen to the bound
    assert fit_temperature([0, 1, 0, 1], [0.8, 0.2, 0.7, 0.3]) == 1e3  # backwards: every probability to ~0.5
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        fit_temperature([0, 1], [0.2, 1.5])


def test_a_very_confident_score_keeps_its_own_logit_and_calibrates_exactly():
    # sigmoid(logit(p) / T) = p**(1/T) / (p**(1/T) + (1-p)**(1/T)): about p**(1/T) for a tiny p
    assert logit(1e-300) < logit(1e-30) < logit(1e-20) < logit(2.0**-53)
    assert logit(1e-30) == pytest.approx(math.log(1e-30), rel=1e-12) and np.isfinite(logit(0.0))
    for p, t in ((1e-30, 2.0), (1e-300, 4.0), (1e-30, 20.0)):
        want = p ** (1 / t) / (p ** (1 / t) + (1 - p) ** (1 / t))
        assert float(apply_temperature(p, t)) == pytest.approx(want, rel=1e-9)


def test_apply_temperature_is_monotone_and_keeps_every_decision():
    scores = np.array([0.0, 1e-20, 0.01, 0.3, 0.5, 0.6, 0.999, 1.0])
    assert apply_temperature(scores, 1.0).tolist() == scores.tolist()  # uncalibrated: the very same numbers
    soft = apply_temperature(scores, 4.0)
    assert np.all(np.diff(soft) >= 0) and soft[4] == 0.5
    assert soft[2] == pytest.approx(_sigmoid(math.log(0.01 / 0.99) / 4))
    for t in (0.2, 0.5, 0.6):  # a threshold on raw scores is the mapped threshold on calibrated ones
        assert ((scores >= t) == (soft >= apply_temperature(t, 4.0))).all()
    per_image = apply_temperature([0.9, 0.9], [1.0, 3.0])
    assert per_image[0] == 0.9 and per_image[1] == pytest.approx(_sigmoid(math.log(9) / 3))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        apply_temperature(scores, 0.0)


def test_brier_and_reliability_bins_by_hand():
    labels, probs = [1, 0, 1, 0], [0.9, 0.2, 0.4, 0.6]
    assert brier_score(labels, probs) == pytest.approx((0.01 + 0.04 + 0.36 + 0.36) / 4)
    bins = reliability_bins(labels, probs, n_bins=4)  # confidences 0.9 R, 0.8 R, 0.6 W, 0.6 W
    assert bins.count.tolist() == [0, 0, 2, 2]
    assert bins.confidence[2:].tolist() == pytest.approx([0.6, 0.85]) and bins.accuracy[2:].tolist() == [0.0, 1.0]
    assert math.isnan(bins.confidence[0]) and math.isnan(bins.accuracy[1])
    assert bins.ece == pytest.approx(expected_calibration_error(labels, probs, n_bins=4)) == pytest.approx(0.375)


# --------------------------------------------------------------------------- scope and table rows


def _three_domains():
    """'sharp' scores 8x over-confident, 'soft' 2x, 'onlyreal' one class (no temperature of its own)."""
    parts = [("sharp", *_overconfident(4000, 8.0, 2)), ("soft", *_overconfident(4000, 2.0, 3))]
    labels = np.concatenate([p[1] for p in parts] + [np.zeros(50, dtype=np.int64)])
    scores = np.concatenate([p[2] for p in parts] + [np.full(50, 0.3)])
    domains = [p[0] for p in parts for _ in p[1]] + ["onlyreal"] * 50
    return domains, labels, scores


def test_per_domain_scope_fits_one_temperature_per_validation_domain():
    domains, labels, scores = _three_domains()
    chosen = choose_thresholds(labels, domains, {"ema": scores}, "youden", "per_domain")
    own = chosen.calibration.per_domain["ema"]
    assert set(own) == {"sharp", "soft"}
    assert own["sharp"] == pytest.approx(8.0, rel=0.1) and own["soft"] == pytest.approx(2.0, rel=0.1)
    assert chosen.calibration.pooled["ema"] == fit_temperature(labels, scores)
    assert chosen.temperature("ema", "soft") == (own["soft"], "soft validation")
    assert chosen.temperature("ema", "onlyreal") == (chosen.calibration.pooled["ema"], "pooled validation")
    pooled = choose_thresholds(labels, domains, {"ema": scores}, "youden", "pooled")
    assert pooled.calibration.per_domain == {} and pooled.calibration.pooled == chosen.calibration.pooled


def test_rows_report_ece_and_brier_before_and_after_at_each_domains_temperature():
    domains, labels, scores = _three_domains()
    chosen = choose_thresholds(labels, domains, {"ema": scores}, "youden", "per_domain")
    tdomains, tlabels, tscores = _three_domains()  # same generator: test data like validation
    tdomains = [("held" if d == "onlyreal" else d) for d in tdomains]
    preds = Predictions([str(i) for i in range(len(tdomains))], tdomains, tlabels, tscores)
    roles = {"sharp": "trained", "soft": "trained", "held": "held out"}
    rows = {r["domain"]: r for r in evaluation_rows({"ema": preds}, chosen.pooled, "youden", roles,
                                                     per_domain=chosen.per_domain, calibration=chosen.temperatures)}
    for domain, t, source in (("sharp", chosen.calibration.per_domain["ema"]["sharp"], "sharp validation"),
                              ("held", chosen.calibration.pooled["ema"], FALLBACK_SOURCE)):
        part = preds.subset(domain)
        after = apply_temperature(part.scores, t)
        assert (rows[domain]["temperature"], rows[domain]["temperature_source"]) == (t, source)
        assert rows[domain]["ece_calibrated"] == expected_calibration_error(part.labels, after)
        assert rows[domain]["brier_calibrated"] == brier_score(part.labels, after)
        assert rows[domain]["brier"] == brier_score(part.labels, part.scores)
    for domain in ("sharp", "soft"):  # over-confident scores: calibration helps
        assert rows[domain]["ece_calibrated"] < rows[domain]["ece"] / 2
        assert rows[domain]["brier_calibrated"] < rows[domain]["brier"]
    combined = rows[COMBINED]
    assert math.isnan(combined["temperature"]) and combined["temperature_source"] == PER_IMAGE_TEMPERATURE
    everyone = chosen.temperatures.calibrate("ema", preds.scores, preds.domains)
    assert combined["ece_calibrated"] == expected_calibration_error(preds.labels, everyone)
    # the pooled scope uses the pooled temperature everywhere, even if per-domain ones are given
    pooled_rows = evaluation_rows({"ema": preds}, chosen.pooled, "youden", roles, calibration=chosen.temperatures)
    assert {r["temperature"] for r in pooled_rows} == {chosen.calibration.pooled["ema"]}


# --------------------------------------------------------------------------- a deliberately over-confident model


def _hide_stripes(root, domains):
    """Every other fake image loses its stripe: the model below calls it real, and is sure of it."""
    for domain in domains:
        fakes = [p for p in sorted(root.glob(f"{domain}/*/*/*.png")) if p.parent.name.lower() == "fake"]
        for path in fakes[::2]:
            rng = np.random.default_rng(zlib.crc32(str(path.relative_to(root)).encode()))
            Image.fromarray(rng.integers(60, 180, (32, 32, 3), dtype=np.uint8)).save(path)


@torch.no_grad()
def _overconfident_head(model, layout, sharpness: float) -> None:
    """Set the head to the difference of the class means of the training images' (random) features,
    scaled so a typical image's logit gap is ``sharpness``: the stripe decides, and decides hard."""
    head, model.fc = model.fc, torch.nn.Identity()
    samples = layout.gather(layout.domains_with("train"), "train")
    images = torch.stack([ImageDataset(samples, eval_transform(32))[i][0] for i in range(len(samples))])
    feats = model(images).double()
    fake = torch.tensor([s.label == 1 for s in samples])
    direction = feats[fake].mean(0) - feats[~fake].mean(0)
    middle = (feats[fake].mean(0) + feats[~fake].mean(0)) / 2
    direction *= sharpness / ((feats - middle) @ direction).abs().median()
    linear = head[1]
    linear.weight.zero_()
    linear.bias.zero_()
    linear.weight[1] = direction.float()
    linear.bias[1] = -(middle @ direction).float()
    model.fc = head


@pytest.fixture(scope="module")
def overconfident(module_tmp):
    """A Stage II best.pt (raw = EMA) that is sure of every answer and wrong about a quarter of the
    images, evaluated once on a tiny root (thresholds + temperatures saved beside it)."""
    tmp = module_tmp
    root = write_tiny_root(tmp / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    _hide_stripes(root, ["140k-real-vs-fake", "dalle"])
    # ResNet-50: the README's figures (ECE 0.234 -> 0.085) are this model's; a random ResNet-18's
    # features separate the stripes less cleanly, and its errors are less one-sided
    cfg, layout = resolve_run(load_config("demo", [*tiny_overrides(root, tmp), "runtime.precision=fp32",
                                                   "eval.hflip_tta=false", "model.arch=resnet50"]))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, weights="none")).eval()
    _overconfident_head(model, layout, sharpness=12.0)
    ckpt = tmp / "runs" / "t" / "stage2" / "best.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "ema": model.state_dict(), "stage": 2, "config": to_dict(cfg)})
    report = evaluate_checkpoint(ckpt, layout, tmp / "results", thresholds=ThresholdRequest("valid", save=True))
    return cfg, layout, ckpt, report, tmp


def _scores(cfg, layout, ckpt, split):
    model = load_models(load_checkpoint(ckpt), cfg)["ema"]
    samples = layout.gather(layout.domains_with(split), split)
    scores = predict_scores(model, samples, 32, Runtime.create("cpu", "fp32"), cfg)
    return np.array([s.label for s in samples]), scores


def test_temperature_scaling_lowers_ece_of_an_overconfident_model(overconfident):
    cfg, layout, ckpt, report, tmp = overconfident
    test = pq.read_table(tmp / "results" / "predictions.parquet").to_pylist()  # the evaluation's own scores
    labels = np.array([r["label"] for r in test if r["weights"] == "ema"])
    scores = np.array([r["score"] for r in test if r["weights"] == "ema"])
    wrong = ((scores >= 0.5) != labels).mean()
    confidence = np.maximum(scores, 1 - scores).mean()
    assert 0.15 < wrong < 0.4 and confidence > 0.95 > 1 - wrong + 0.1  # sure, and often wrong
    row = {(r["weights"], r["domain"]): r for r in report.rows}["ema", COMBINED]
    assert row["temperature"] > 1
    assert row["ece_calibrated"] < row["ece"] / 2 and row["brier_calibrated"] < row["brier"]
    after = apply_temperature(scores, row["temperature"])
    assert roc_auc(labels, after) == roc_auc(labels, scores) == row["auc"]  # the ranking is untouched
    assert row["ece_calibrated"] == expected_calibration_error(labels, after)
    # the temperature is the fit on the VALIDATION scores, saved beside the checkpoint with the thresholds
    val_labels, val_scores = _scores(cfg, layout, ckpt, "valid")
    saved = read_thresholds(ckpt)
    assert saved.calibration.pooled["ema"] == row["temperature"]
    # (scored again here, without channels_last: the same to ~1e-8)
    assert fit_temperature(val_labels, val_scores) == pytest.approx(row["temperature"], rel=1e-5)
    assert json.loads(thresholds_path(ckpt).read_text())["calibration"]["temperatures"]["ema"]["pooled"] == row["temperature"]
    summary = (tmp / "results" / "summary.md").read_text()
    assert "- **calibration**: temperature scaling fitted on the validation images above: raw T=" in summary
    assert "(reliability_ema.png)" in summary
    assert (tmp / "results" / "reliability_ema.png").read_bytes()[:8] == PNG_MAGIC
    on_disk = pq.read_table(tmp / "results" / "metrics.parquet").to_pylist()
    assert [r["ece_calibrated"] for r in on_disk] == [r["ece_calibrated"] for r in report.rows]


def test_predict_prints_the_calibrated_probability(overconfident, capsys):
    cfg, layout, ckpt, report, tmp = overconfident
    images = layout.root / "dalle" / "test" / "fake"
    t = read_thresholds(ckpt).calibration.pooled["ema"]
    predictor = Predictor.from_checkpoint(ckpt)
    expected = list(predictor.score(sorted(images.glob("*.png"))))
    assert predictor.temperature == t and all(r.calibrated == apply_temperature(r.probability, t) for r in expected)
    assert predict_job.main(["--checkpoint", str(ckpt), str(images)]) == 0
    out, err = capsys.readouterr()
    lines = [ln.split(",") for ln in out.splitlines()]
    assert lines[0] == ["path", "p_generated", "p_calibrated", "label", "threshold", "threshold_source", "temperature",
                        "temperature_source", "error"]
    assert [(c[1], c[2], c[6], c[7]) for c in lines[1:]] == [
        (f"{r.probability:.6f}", f"{r.calibrated:.6f}", f"{t:.6g}", "pooled validation") for r in expected]
    assert any(c[1] != c[2] for c in lines[1:])
    assert f"p_calibrated: temperature {t:.4g}, the ema weights' pooled validation temperature" in err


def test_old_thresholds_file_loads_as_uncalibrated(overconfident, tmp_path, capsys):
    """A thresholds.json written before calibration (no 'calibration' key) still works, at temperature 1."""
    cfg, layout, ckpt, report, tmp = overconfident
    old_ckpt = tmp_path / "stage2" / "best.pt"
    old_ckpt.parent.mkdir()
    old_ckpt.write_bytes(ckpt.read_bytes())
    chosen = stamp(report.chosen, old_ckpt, "an older TrueFace", str(layout.root))
    old = json.loads(chosen.to_json())
    del old["calibration"]
    thresholds_path(old_ckpt).write_text(json.dumps(old))
    saved = read_thresholds(old_ckpt)
    assert saved.calibration is None and saved.pooled == report.chosen.pooled
    assert saved.temperature("ema") == (1.0, UNCALIBRATED)
    assert "uncalibrated (temperature 1): these thresholds were chosen before temperatures" in saved.describe_calibration()

    rows = evaluate_checkpoint(old_ckpt, layout, tmp_path / "r", thresholds=ThresholdRequest("saved")).rows
    assert {(r["temperature"], r["temperature_source"]) for r in rows} == {(1.0, UNCALIBRATED)}
    assert all(r["ece_calibrated"] == r["ece"] and r["brier_calibrated"] == r["brier"] for r in rows)
    assert "- **calibration**: uncalibrated (temperature 1)" in (tmp_path / "r" / "summary.md").read_text()

    csv_path = tmp_path / "pred.csv"
    assert predict_job.main(["--checkpoint", str(old_ckpt), str(layout.root / "dalle" / "test"), "--out",
                             str(csv_path)]) == 0
    lines = [ln.split(",") for ln in csv_path.read_text().splitlines()]
    assert all(c[1] == c[2] and c[7] == UNCALIBRATED for c in lines[1:])  # p_calibrated == p_generated
    assert "p_calibrated: uncalibrated (temperature 1), equal to p_generated" in capsys.readouterr().err
    bad = dict(old, calibration={"temperatures": {"ema": {"pooled": -2.0}}})
    thresholds_path(old_ckpt).write_text(json.dumps(bad))
    with pytest.raises(ThresholdsError, match="not a TrueFace thresholds file.*temperatures must be finite and > 0"):
        read_thresholds(old_ckpt)


def test_predict_without_thresholds_file_is_uncalibrated(overconfident, tmp_path):
    cfg, layout, ckpt, report, tmp = overconfident
    bare = tmp_path / "best.pt"
    bare.write_bytes(ckpt.read_bytes())
    predictor = Predictor.from_checkpoint(bare)
    rows = list(predictor.score(sorted((layout.root / "dalle" / "test" / "fake").glob("*.png"))))
    assert predictor.temperature_source == UNCALIBRATED and "no thresholds file" in predictor.describe_calibration("ema")
    assert all(r.calibrated == r.probability for r in rows)


def test_temperatures_identity_is_uncalibrated():
    identity = Temperatures.identity(["raw", "ema"])
    assert identity.temperature("ema", "dalle") == (1.0, UNCALIBRATED) and identity.describe() == UNCALIBRATED
    assert identity.calibrate("ema", [0.3, 1.0], ["a", "b"]).tolist() == [0.3, 1.0]
    fitted = Temperatures({"ema": 2.0})
    with pytest.raises(ValueError, match="no temperature for weights 'raw'"):
        fitted.temperature("raw")

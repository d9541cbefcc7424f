"""jobs.export: ONNX (run in onnxruntime), torch.export (.pt2) and TorchScript files that score as
jobs.predict scores, at batch sizes 1 and 8, with the preprocessing, temperature and thresholds in
their metadata."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit
from torchvision.transforms.v2 import functional as F

from jobs import export as export_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.checkpoint import save_checkpoint
from trueface.config import load_config, to_dict
from trueface.data.decode import load_rgb
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint
from trueface.model import build_model
from trueface.predict import Predictor
from trueface.run import resolve_run
from trueface.export import ScoringModule
from trueface.thresholds import read_thresholds, thresholds_path

TOLERANCE = 1e-4  # issue 12: max |p_export - p_torch|


@pytest.fixture(scope="module")
def detector(module_tmp):
    """A Stage II best.pt (ResNet-18, 32 px, flip TTA on) evaluated once: thresholds and
    temperatures saved beside it; 8 test images to score."""
    tmp = module_tmp
    root = write_tiny_root(tmp / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    # fp32: the exported graphs run in fp32, and on a CPU with AVX512-BF16/AMX "auto" would score
    # the predictor in bf16 autocast, ~1e-3 away from them (measured), whatever the export does.
    cfg, layout = resolve_run(load_config("demo", [*tiny_overrides(root, tmp), "eval.threshold_scope=per_domain",
                                                   "eval.hflip_tta=true", "runtime.precision=fp32"]))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, weights="none"))
    ema = build_model(dataclasses.replace(cfg.model, weights="none"))
    ckpt = tmp / "runs" / "t" / "stage2" / "best.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "ema": ema.state_dict(), "stage": 2, "config": to_dict(cfg)})
    evaluate_checkpoint(ckpt, layout, tmp / "results", thresholds=ThresholdRequest("valid", save=True))
    images = sorted(root.glob("*/test/*/*.png"))[::4][:8]
    assert len(images) == 8
    return {"ckpt": ckpt, "images": images, "tmp": tmp}


def _torch_scores(detector) -> np.ndarray:
    predictor = Predictor.from_checkpoint(detector["ckpt"], device="cpu")
    return np.array([r.probability for r in predictor.score(detector["images"])])


def _inputs(detector) -> torch.Tensor:
    predictor = Predictor.from_checkpoint(detector["ckpt"], device="cpu")
    return torch.stack([predictor.load(p) for p in detector["images"]])


def _in_batches(score, x: torch.Tensor, size: int) -> np.ndarray:
    return np.concatenate([np.asarray(score(x[i:i + size]), dtype=np.float64).reshape(-1) for i in range(0, len(x), size)])


def _assert_scores_as_the_predictor(detector, score) -> None:
    """``score`` (prepared images -> (P(generated), its log-odds)) gives the predictor's scores at
    batch sizes 1 and 8, and log-odds whose sigmoid is that score."""
    want, x = _torch_scores(detector), _inputs(detector)
    with torch.no_grad():
        for batch in (1, 8):
            got = _in_batches(lambda b: score(b)[0], x, batch)
            assert np.abs(got - want).max() < TOLERANCE, batch
            log_odds = _in_batches(lambda b: score(b)[1], x, batch)
            assert np.abs(expit(log_odds) - want).max() < TOLERANCE, batch


def test_onnx_in_onnxruntime_scores_as_the_predictor_at_batch_1_and_8(detector, capsys):
    import onnxruntime as ort  # a test dependency (pyproject's export extra)

    out = detector["tmp"] / "detector.onnx"
    assert export_job.main(["--checkpoint", str(detector["ckpt"]), "--format", "onnx", "--out", str(out)]) == 0
    assert f"-> {out} (onnx" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["p_generated", "log_odds"]
    _assert_scores_as_the_predictor(detector, lambda b: session.run(None, {"images": b.numpy()}))
    # the metadata: inside the file and beside it, the same
    embedded = session.get_modelmeta().custom_metadata_map
    assert json.loads(embedded["trueface"]) == json.loads(Path(f"{out}.json").read_text())


@pytest.fixture(scope="module")
def pt2_file(detector) -> Path:
    out = detector["tmp"] / "detector.pt2"
    assert export_job.main(["--checkpoint", str(detector["ckpt"]), "--format", "pt2", "--out", str(out)]) == 0
    return out


def test_pt2_scores_as_the_predictor_at_batch_1_and_8(detector, pt2_file):
    out = pt2_file
    files = {"trueface.json": ""}
    _assert_scores_as_the_predictor(detector, torch.export.load(out, extra_files=files).module())
    assert json.loads(files["trueface.json"]) == json.loads(Path(f"{out}.json").read_text())


def test_a_pt2_file_scores_in_a_process_that_cannot_import_this_package(detector, pt2_file, tmp_path):
    out = pt2_file
    x = _inputs(detector)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; sys.modules['trueface'] = sys.modules['jobs'] = None  # import trueface fails\n"
              f"scorer = torch.export.load({str(out)!r}).module()\n"
              "with torch.inference_mode():\n"
              f"    torch.save(scorer(torch.load({str(tmp_path / 'x.pt')!r}))[0], {str(tmp_path / 'p.pt')!r})")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "p.pt").numpy()
    assert np.abs(got - _torch_scores(detector)).max() < TOLERANCE


def test_torchscript_scores_as_the_predictor_at_batch_1_and_8(detector):
    out = detector["tmp"] / "detector.pt"
    assert export_job.main(["--checkpoint", str(detector["ckpt"]), "--format", "torchscript", "--out", str(out)]) == 0
    files = {"trueface.json": ""}
    _assert_scores_as_the_predictor(detector, torch.jit.load(str(out), _extra_files=files))
    assert json.loads(files["trueface.json"]) == json.loads(Path(f"{out}.json").read_text())


def test_the_metadata_is_enough_to_prepare_the_input_and_label_it(detector, pt2_file):
    meta = json.loads(Path(f"{pt2_file}.json").read_text())
    saved = read_thresholds(detector["ckpt"])
    assert meta["threshold"]["value"] == saved.threshold("ema")[0] and meta["threshold"]["source"] == "pooled validation"
    assert meta["temperature"]["value"] == saved.temperature("ema")[0] != 1.0
    assert meta["threshold"]["per_domain"] == {d: saved.threshold("ema", d)[0] for d in ("140k-real-vs-fake", "dalle")}
    assert meta["hflip_tta"] is True and meta["input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(detector["ckpt"].read_bytes()).hexdigest()
    assert "label = fake where log_odds >= log(threshold / (1 - threshold))" in meta["calibrated"]
    # the preprocessing, done from the metadata's numbers alone, gives the predictor's input
    pre = meta["preprocess"]
    size = meta["input"]["shape"][-1]
    for path, want in zip(detector["images"], _inputs(detector)):
        img = F.pil_to_tensor(load_rgb(path))
        img = F.center_crop(F.resize(img, [size], antialias=True), [size, size]).float() / 255
        got = F.normalize(img, pre["mean"], pre["std"])
        assert torch.allclose(got, want, atol=1e-6)


def test_bad_input_is_named(detector, tmp_path):
    with pytest.raises(SystemExit, match="error: .*nowhere.pt"):
        export_job.main(["--checkpoint", str(tmp_path / "nowhere.pt"), "--format", "torchscript",
                         "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(SystemExit):
        export_job.main(["--checkpoint", str(detector["ckpt"]), "--format", "tflite", "--out", str(tmp_path / "x")])


def test_an_out_that_cannot_take_the_file_is_refused_before_the_export(detector, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    for out, why in ((tmp_path / "folder", "is a folder: give a file name inside it"),
                     (tmp_path / "a-file" / "x.onnx", "is a file, not a folder")):
        with pytest.raises(SystemExit) as stop:
            export_job.main(["--checkpoint", str(detector["ckpt"]), "--format", "onnx", "--out", str(out)])
        assert stop.value.code == 2 and why in capsys.readouterr().err


def test_a_checkpoint_in_a_bucket_exports_with_its_thresholds_and_temperature(detector, s3_server, tmp_path):
    ckpt = detector["ckpt"]
    for local in (ckpt, thresholds_path(ckpt)):
        s3_server["client"].put_object(Bucket=s3_server["bucket"], Key=f"exported/stage2/{local.name}",
                                       Body=local.read_bytes())
    out = tmp_path / "detector.pt"
    assert export_job.main(["--checkpoint", "s3://trueface-test/exported/stage2/best.pt", "--format", "torchscript",
                            "--out", str(out)]) == 0
    meta, saved = json.loads(Path(f"{out}.json").read_text()), read_thresholds(ckpt)
    assert meta["checkpoint"] == {"path": "s3://trueface-test/exported/stage2/best.pt",  # not the staged copy
                                  "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert meta["threshold"]["value"] == saved.threshold("ema")[0] and meta["threshold"]["source"] == "pooled validation"
    assert meta["temperature"]["value"] == saved.temperature("ema")[0] != 1.0


def test_the_scoring_module_and_its_model_are_in_inference_mode():
    # what is traced or exported: BatchNorm's running statistics and no dropout, wrapper included
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout(0.7))
    scorer = ScoringModule(model.train(), hflip=False)
    assert not scorer.training and not any(m.training for m in scorer.modules())
    x = torch.randn(3, 4)
    assert all(torch.equal(a, b) for a, b in zip(scorer(x), scorer(x)))  # dropout would differ between calls


@pytest.mark.parametrize("hflip", [False, True])
def test_the_log_odds_calibrate_as_the_predictor_where_float32_rounds_the_score_to_1(detector, hflip):
    # an over-confident head: logit gaps up to 30, where float32's P(generated) is exactly 1.0 (from
    # about 17) and float64's is not yet (37: the predictor's own calibration is exact to there)
    predictor = Predictor.from_checkpoint(detector["ckpt"], device="cpu")
    x = _inputs(detector)
    head = predictor.model.fc[1]
    with torch.no_grad():
        gaps = predictor.model(x) @ torch.tensor([-1.0, 1.0])  # z1 - z0
        head.bias[1] -= gaps.median()  # about half the images each side of 0.5
        scale = 30 / (gaps - gaps.median()).abs().max()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    predictor.hflip, predictor.temperature = hflip, 8.0
    want = np.array([p.calibrated for p in predictor.score_loaded([(str(i), image) for i, image in enumerate(x)])])
    with torch.no_grad():
        p, log_odds = ScoringModule(predictor.model, hflip)(x)
    assert (want[(p == 1.0).numpy()] < 0.99).any()  # the case: a saturated score, not a saturated calibration
    assert np.abs(expit(log_odds.numpy().astype(np.float64) / 8.0) - want).max() < TOLERANCE
    # the formula on p itself, as the metadata gave it before log_odds, is far off there
    p64 = p.numpy().astype(np.float64)
    with np.errstate(divide="ignore"):
        from_p = 1 / (1 + ((1 - p64) / p64) ** (1 / 8.0))
    assert np.abs(from_p - want).max() > 0.02
    # the metadata's labelling rule, on log_odds, labels as the predictor does at a threshold just
    # above the highest score, one that float32 rounds to 1.0: the rule on float32's p says fake
    predictor.threshold = float(expit(log_odds.numpy().astype(np.float64).max() + 0.5))
    labels = np.array([r.label for r in predictor.score_loaded([(str(i), image) for i, image in enumerate(x)])])
    by_rule = np.where(log_odds.numpy() >= np.log(predictor.threshold / (1 - predictor.threshold)), "fake", "real")
    assert (labels == by_rule).all() and (labels == "real").all()
    assert (p >= predictor.threshold).any()  # what the rule on p would have labelled fake

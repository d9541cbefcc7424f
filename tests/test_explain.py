"""Grad-CAM: the map peaks where the artefact is, jobs.predict --explain writes overlays and their
regions, and every stage logs a grid of overlays of the same validation images to TensorBoard."""

from __future__ import annotations

import csv
import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

import trueface.train as train
from jobs import predict as predict_job
from trueface.augment import normalize
from trueface.checkpoint import load_checkpoint, save_checkpoint
from trueface.config import to_dict
from trueface.evaluation import load_models
from trueface.explain import Explanation, grad_cam, top_region, validation_grid
from trueface.model import build_model, fake_probability
from trueface.predict import Prediction
from trueface.run import resolve_run
from trueface.tensorboard import NullLogger

SIZE = 128  # layer4 of a ResNet is SIZE / 32 = 4 cells across: 2 per quadrant
QUADRANTS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}


def _image(rng, quadrant: str | None) -> torch.Tensor:
    """Grey noise; with ``quadrant``, a high-contrast checkerboard patch inside that quadrant."""
    img = rng.uniform(0.35, 0.65, (3, SIZE, SIZE)).astype(np.float32)
    if quadrant:
        row, col = QUADRANTS[quadrant]
        half = SIZE // 2
        y, x = row * half + rng.integers(4, half - 36), col * half + rng.integers(4, half - 36)
        yy, xx = np.mgrid[0:32, 0:32]
        img[:, y:y + 32, x:x + 32] = ((yy // 4 + xx // 4) % 2).astype(np.float32)
    return normalize()(torch.from_numpy(img))


@torch.no_grad()
def _artefact_detector(cfg, through: str = "fake") -> torch.nn.Module:
    """A random ResNet-18 whose head is the mean layer4 feature of images with the patch minus that
    of images without: the patch, wherever it is, raises the fake logit (``through`` "fake"),
    lowers the real one ("real"; P(generated) rises as much), or raises the real one twice as much
    as the fake one ("both": P(generated) falls)."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, arch="resnet18", weights="none")).eval()
    head, model.fc = model.fc, torch.nn.Identity()
    fakes = torch.stack([_image(rng, q) for q in QUADRANTS for _ in range(4)])
    reals = torch.stack([_image(rng, None) for _ in range(16)])
    direction = model(fakes).mean(0) - model(reals).mean(0)
    linear = head[1]
    linear.weight.zero_()
    linear.bias.zero_()
    unit = direction / direction.norm()
    linear.weight[1], linear.weight[0] = {"fake": (unit, 0), "real": (0, -unit), "both": (unit, 2 * unit)}[through]
    model.fc = head
    return model


@pytest.mark.parametrize("through", ["fake", "real"])
def test_the_map_peaks_in_the_quadrant_that_holds_the_artefact(tiny_cfg, through):
    # the score follows the patch whichever logit carries it, and so does the map
    model = _artefact_detector(tiny_cfg, through)
    rng = np.random.default_rng(1)
    for quadrant in QUADRANTS:
        images = torch.stack([_image(rng, quadrant) for _ in range(3)])
        maps = grad_cam(model, images)
        assert maps.shape == (3, SIZE, SIZE) and float(maps.min()) >= 0 and float(maps.max()) == pytest.approx(1.0)
        for cam in maps:
            region, (x, y) = top_region(cam)
            assert region == quadrant and cam[y, x] == cam.max()
            half = SIZE // 2
            means = {q: float(cam[r * half:(r + 1) * half, c * half:(c + 1) * half].mean()) for q, (r, c) in QUADRANTS.items()}
            assert max(means, key=means.get) == quadrant, means  # the map's weight too, not just its peak
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_a_region_that_lowers_the_score_is_not_on_the_map(tiny_cfg):
    model = _artefact_detector(tiny_cfg, "both")  # the patch raises the fake logit, the real one more
    rng = np.random.default_rng(1)
    patched = torch.stack([_image(rng, quadrant) for quadrant in QUADRANTS])
    with torch.no_grad():
        lowered = fake_probability(model(patched)) < fake_probability(model(torch.stack([_image(rng, None)] * 4)))
    assert bool(lowered.all())
    maps = grad_cam(model, patched)
    half = SIZE // 2
    for cam, (r, c) in zip(maps, QUADRANTS.values()):  # the map's weight is not where the patch is
        inside = float(cam[r * half:(r + 1) * half, c * half:(c + 1) * half].mean())
        assert inside <= float(cam.mean()), (inside, float(cam.mean()))


def test_predict_explain_writes_an_overlay_and_the_region_per_readable_image(tiny_cfg, tmp_path):
    cfg, layout = resolve_run(tiny_cfg)
    model = _fake_raised_by_every_channel(build_model(dataclasses.replace(cfg.model, weights="none")))
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "ema": model.state_dict(), "stage": 2, "config": to_dict(cfg)})
    images = sorted(layout.root.glob("dalle/test/*/*.png"))[:4]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, p in enumerate(images):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    out_csv, explain_dir = tmp_path / "pred.csv", tmp_path / "explained"
    assert predict_job.main(["--checkpoint", str(ckpt), str(folder), "--out", str(out_csv),
                             "--explain", str(explain_dir)]) == 1  # the broken file
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and list(rows[0])[-4:] == ["explanation", "cam_region", "cam_peak_x", "cam_peak_y"]
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and broken[0]["explanation"] == broken[0]["cam_region"] == ""
    pngs = sorted(explain_dir.glob("*.gradcam.png"))
    assert len(pngs) == 4 == len({r["explanation"] for r in rows if not r["error"]})
    for r in (r for r in rows if not r["error"]):
        with Image.open(r["explanation"]) as im:
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
        x, y = int(r["cam_peak_x"]), int(r["cam_peak_y"])
        assert r["cam_region"] == f"{'top' if y < 16 else 'bottom'}-{'left' if x < 16 else 'right'}"


def _fake_raised_by_every_channel(model: torch.nn.Module, sign: float = 1.0) -> torch.nn.Module:
    """``model`` with a head whose fake-minus-real score every layer4 channel raises (``sign`` -1:
    lowers). Random weights alone leave it to chance whether an image's map is empty."""
    with torch.no_grad():
        head = model.fc[1]
        head.weight[1] = sign * (head.weight[1].abs() + 1)
        head.weight[0] = -sign * (head.weight[0].abs() + 1)
    return model


def test_an_empty_map_has_no_region_and_no_peak(tiny_cfg):
    # a head that lowers the fake score through every layer4 channel: nothing raises it, the map is 0
    model = _fake_raised_by_every_channel(build_model(dataclasses.replace(tiny_cfg.model, weights="none")), -1.0)
    images = torch.stack([_image(np.random.default_rng(0), None) for _ in range(2)])
    for cam in grad_cam(model, images):
        assert float(cam.max()) == 0.0 and top_region(cam) == ("none", None)  # not "top-left" at (0, 0)
    explained = {"a.png": Explanation("a.gradcam.png", "none", None)}
    row = predict_job._csv([Prediction("a.png", 0.2, "real", calibrated=0.2)], _Labels(), explained).splitlines()[1]
    assert row.endswith(",a.gradcam.png,none,,")


class _Labels:
    """What ``jobs.predict._csv`` reads of a Predictor."""
    threshold, threshold_source, temperature, temperature_source = 0.5, "none chosen (0.5)", 1.0, "uncalibrated"


def test_predict_refuses_outputs_it_could_not_write_before_scoring_anything(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    for flags, why in ((["--out", str(tmp_path / "folder")], "--out .*folder is a folder: give a file name"),
                       (["--explain", str(tmp_path / "a-file")], "--explain .*a-file is a file: give a folder"),
                       (["--out", str(tmp_path / "a-file" / "x.csv")], "a-file is a file, not a folder")):
        # the checkpoint does not exist: the refusal comes first, before anything is loaded or scored
        with pytest.raises(SystemExit) as stop:
            predict_job.main(["--checkpoint", str(tmp_path / "none.pt"), str(image), *flags])
        assert stop.value.code == 2
        assert re.search(why, capsys.readouterr().err), why


def test_each_stage_logs_overlays_of_the_same_validation_images(tiny_cfg, tmp_path, monkeypatch):
    logged = []

    class Recorder(NullLogger):
        def images(self, name, grid, step):
            logged.append((name, grid.detach().clone()))

    monkeypatch.setattr(train, "make_logger", lambda log_dir, rank: Recorder())
    cfg, layout = resolve_run(tiny_cfg)
    cfg = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, epochs=1))
    val = layout.gather(cfg.stage1.domains, "valid")
    train.run_stage(cfg, 1, layout.gather(cfg.stage1.domains, "train"), val, tmp_path / "s1")
    grids = [g for name, g in logged if name == "explain/gradcam_ema"]
    assert len(grids) == 1
    ema = load_models(load_checkpoint(tmp_path / "s1" / "last.pt"), cfg)["ema"]
    again = validation_grid(ema, list(reversed(val)), cfg.stage1.image_size, cfg)  # any order: the same images
    assert grids[0].shape == again.shape and torch.allclose(grids[0], again, atol=1e-6)
    assert grids[0].shape[0] == 3 and grids[0].shape[1] == 2 + 2 * (32 + 2)  # 8 overlays, 4 a row

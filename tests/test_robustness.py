"""Robustness sweeps: each perturbation is deterministic and does what it says, the cache is built once,
atomically, and rebuilt when a test file changes, and jobs.evaluate --robustness measures a real loss:
JPEG-30 erases a faint checkerboard that a detector relies on (the Ray path: tests/test_pipeline_ray.py)."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import evaluate as evaluate_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.augment import eval_transform
from trueface.checkpoint import save_checkpoint
from trueface.config import load_config, to_dict
from trueface.data.decode import load_rgb
from trueface.data.layout import discover_layout
from trueface.data.scan import estimate_jpeg_quality
from trueface.model import build_model
from trueface.robustness import (PERTURBATIONS, SPEC_FILE, Perturbation, SweepPlan, build_sweep, image_seed,
                                 output_relpath, perturb, perturbed_bytes, run_here)
from trueface.robustness_report import sweep_table


def _texture(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """Noise over a smooth ramp: plenty of high frequencies to lose."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, width)[None, :, None]
    img = ramp + rng.normal(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def _high_frequency_energy(pixels: np.ndarray) -> float:
    """Mean squared difference between neighbouring pixels, both directions."""
    return float((np.diff(pixels, axis=0) ** 2).mean() + (np.diff(pixels, axis=1) ** 2).mean())


def test_every_perturbation_is_deterministic_keeps_the_size_and_changes_the_pixels():
    img = _texture()
    for p in PERTURBATIONS:
        seed = image_seed(7, "dalle/test/fake/a.png", p.name)
        first, second = perturbed_bytes(img, p, seed), perturbed_bytes(img.copy(), p, seed)
        assert first == second, p.name
        out = _pixels(first)
        assert out.shape == np.asarray(img).shape, p.name
        assert np.abs(out - np.asarray(img, dtype=np.float64)).mean() > 0.5, f"{p.name} left the image as it was"
        assert np.array_equal(out, np.asarray(perturb(img, p, seed), dtype=np.float64)), p.name
        assert first[:4] == (b"\xff\xd8\xff\xe0" if p.kind == "jpeg" else b"\x89PNG"), p.name


def test_jpeg_is_written_at_its_quality():
    img = _texture()
    for p in (p for p in PERTURBATIONS if p.kind == "jpeg"):
        with Image.open(io.BytesIO(perturbed_bytes(img, p, 0))) as out:
            assert out.format == "JPEG" and estimate_jpeg_quality(out.quantization) == p.value


def test_blur_lowers_high_frequency_energy_more_with_each_sigma():
    img = _texture()
    blurs = sorted((p for p in PERTURBATIONS if p.kind == "blur"), key=lambda p: p.value)
    energy = [_high_frequency_energy(np.asarray(img, dtype=np.float64))]
    energy += [_high_frequency_energy(_pixels(perturbed_bytes(img, p, 0))) for p in blurs]
    assert [p.value for p in blurs] == [0.5, 1, 2]
    assert all(a > b * 1.2 for a, b in zip(energy, energy[1:])), energy


def test_downscale_and_back_keeps_the_size_and_loses_more_at_a_smaller_factor():
    img = _texture()
    error = {p.value: np.abs(_pixels(perturbed_bytes(img, p, 0)) - np.asarray(img, dtype=np.float64)).mean()
             for p in PERTURBATIONS if p.kind == "downscale"}
    assert sorted(error) == [0.25, 0.5] and error[0.25] > error[0.5] > 1


def test_crop_keeps_the_fraction_of_each_side_at_an_offset_seeded_per_image():
    # red = column, green = row: a crop's colours say which part of the image it kept
    w, h = 64, 48
    ramp = np.zeros((h, w, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 252, w).round()[None, :]
    ramp[..., 1] = np.linspace(0, 252, h).round()[:, None]
    img = Image.fromarray(ramp)
    for keep in (0.9, 0.75):
        p = Perturbation("crop", keep)
        lefts = set()
        for rel in ("a/test/real/1.png", "a/test/real/2.png", "a/test/fake/3.png", "b/test/fake/4.png"):
            out = _pixels(perturbed_bytes(img, p, image_seed(0, rel, p.name)))
            red, green = out[..., 0], out[..., 1]
            assert (red.max() - red.min()) / 252 == pytest.approx(keep, abs=0.04)
            assert (green.max() - green.min()) / 252 == pytest.approx(keep, abs=0.05)
            lefts.add(round(red.min()))
        assert len(lefts) > 1, "every image was cropped at the same offset"
    assert image_seed(0, "a.png", "crop-k0.9") == image_seed(0, "a.png", "crop-k0.9")
    assert len({image_seed(s, r, "crop-k0.9") for s in (0, 1) for r in ("a.png", "b.png")}) == 4


def test_perturbed_files_get_the_suffix_of_their_format():
    jpeg, blur = Perturbation("jpeg", 30), Perturbation("blur", 1)
    assert output_relpath("d/test/real/a.png", blur) == "d/test/real/a.png"
    assert output_relpath("d/test/real/a.jpg", blur) == "d/test/real/a.jpg.png"  # a.png may be another file
    assert output_relpath("d/test/real/a.JPEG", jpeg) == "d/test/real/a.JPEG"
    assert output_relpath("d/test/real/a.png", jpeg) == "d/test/real/a.png.jpg"
    with pytest.raises(ValueError, match="perturbation kind 'noise' must be one of jpeg, blur, downscale, crop"):
        Perturbation("noise", 1)


# --------------------------------------------------------------------------- the cache


class CountingRunner:
    """run_here that counts the chunks it ran."""

    def __init__(self) -> None:
        self.chunks = 0

    def __call__(self, fn, chunks):
        for count in run_here(fn, chunks):
            self.chunks += 1
            yield count


def _plan(root: Path, cache: Path, seed: int = 0) -> SweepPlan:
    layout = discover_layout(root)
    relpaths = [layout.relpath(s.path) for s in layout.gather(layout.domains_with("test"), "test")]
    return SweepPlan.of(root, relpaths, seed, cache)


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_the_cache_mirrors_the_test_split_is_reused_and_rebuilt_when_a_test_file_changes(tmp_path):
    root = write_tiny_root(tmp_path / "faces", {"": "upper"}, per_class=3, size=24)  # one domain: named "faces"
    runner = CountingRunner()
    plan = _plan(root, tmp_path / "cache")
    roots = build_sweep(plan, runner, progress=False)
    assert runner.chunks > 0 and plan.missing() == []
    assert set(roots) == {p.name for p in PERTURBATIONS}
    for p in PERTURBATIONS:
        mirror = discover_layout(roots[p.name])
        assert mirror.counts() == {"faces": {"test": {"real": 3, "fake": 3}}}, p.name
        for s in mirror.samples("faces", "test"):
            assert load_rgb(s.path).size == (24, 24) and s.path.endswith(p.suffix)
    before = _files(plan.folder)

    again = CountingRunner()
    assert build_sweep(_plan(root, tmp_path / "cache"), again, progress=False) == roots
    assert again.chunks == 0 and _files(plan.folder) == before

    changed = root / "test" / "FAKE" / "x_test_0.png"
    Image.fromarray(np.full((24, 24, 3), 90, dtype=np.uint8)).save(changed)
    new_plan = _plan(root, tmp_path / "cache")
    assert new_plan.folder != plan.folder
    rebuilt = CountingRunner()
    new_roots = build_sweep(new_plan, rebuilt, progress=False)
    assert rebuilt.chunks > 0
    rel = "test/FAKE/x_test_0.png"
    old_copy, new_copy = (Path(r["blur-s1"]) / rel for r in (roots, new_roots))
    assert old_copy.read_bytes() != new_copy.read_bytes()
    assert np.asarray(load_rgb(new_copy)).std() == 0  # the new file's blurred copy: flat grey


def test_another_cache_gets_the_same_bytes(tmp_path):
    root = write_tiny_root(tmp_path / "data", {"dalle": "lower", "tpdne": "lower"}, per_class=2, size=24)
    a, b = _plan(root, tmp_path / "a"), _plan(root, tmp_path / "b")
    build_sweep(a, progress=False), build_sweep(b, progress=False)
    files_a, files_b = ({k: v[1] for k, v in _files(p.folder).items() if not k.endswith(SPEC_FILE)} for p in (a, b))
    assert len(files_a) == len(PERTURBATIONS) * 8 and files_a == files_b
    other_seed = _plan(root, tmp_path / "a", seed=1)
    assert other_seed.folder != a.folder


def test_an_interrupted_build_leaves_no_half_cache(tmp_path):
    root = write_tiny_root(tmp_path / "data", {"dalle": "lower"}, per_class=20, size=24)

    def crash_after_one_chunk(fn, chunks):
        yield fn(chunks[0])
        raise KeyboardInterrupt

    plan = _plan(root, tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        build_sweep(plan, crash_after_one_chunk, progress=False)
    assert plan.missing() == list(PERTURBATIONS)
    assert sorted(os.listdir(plan.folder)) == [], "a temporary or partial folder was left"
    build_sweep(plan, progress=False)
    assert plan.missing() == []


def test_the_sweep_leaves_out_excluded_files_and_honours_data_normalize(tmp_path):
    root = write_tiny_root(tmp_path / "data", {"dalle": "lower"}, per_class=3, size=24)
    cfg = load_config("demo", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.normalize=jpeg:90@16"])
    excluded = ("dalle/test/real/dalle_test_0.png",)
    roots = evaluate_job.perturbed_test_roots(root, excluded, cfg, on_ray=False)
    assert [(k, v) for k, v, _ in roots] == [(p.kind, p.value) for p in PERTURBATIONS]
    for kind, value, mirror in roots:
        assert "/normalized/" in mirror, f"{kind} {value}: not normalised"
        layout = discover_layout(mirror)
        assert layout.counts() == {"dalle": {"test": {"real": 2, "fake": 3}}}
        with Image.open(layout.samples("dalle", "test")[0].path) as img:
            assert img.format == "JPEG" and min(img.size) == 16


# --------------------------------------------------------------------------- jobs.evaluate --robustness


def _write_checkerboard_root(root: Path, per_split: dict[str, int], size: int = 32) -> Path:
    """Smooth faces-like colour ramps; fakes carry a +-10 checkerboard, the finest pattern an 8x8 DCT has.
    JPEG at quality 30 quantises that coefficient (about 65) to zero (its step is 165); quality 95 keeps it."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    board = 10 * np.where(np.indices((size, size)).sum(0) % 2 == 0, 1, -1)[..., None]
    for domain in ("dalle", "tpdne"):
        for split, n in per_split.items():
            for label in ("real", "fake"):
                folder = root / domain / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    img = (rng.uniform(60, 190, 3) + rng.uniform(-40, 40, 3) * xx[..., None]
                           + rng.uniform(-40, 40, 3) * yy[..., None] + rng.normal(0, 2, (size, size, 3)))
                    img = img + board if label == "fake" else img
                    Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)).save(folder / f"{split}_{i}.png")
    return root


def _linear_probe_checkpoint(cfg, path: Path) -> Path:
    """A checkpoint that detects the checkerboard: random ResNet-50 features and a logistic-regression
    head fitted on the training split (seconds, where training the network would take minutes)."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, weights="none")).eval()
    layout = discover_layout(cfg.data.root)
    train = layout.gather(layout.domains_with("train"), "train")
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.no_grad():
        x = model(torch.stack([eval_transform(32)(load_rgb(s.path)) for s in train]))
    model.fc = head
    y = torch.tensor([s.label for s in train])
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(linear((x - mean) / std), y) + 1e-3 * linear.weight.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():  # the standardisation folded into the head
        model.fc[1].weight.copy_(linear.weight / std)
        model.fc[1].bias.copy_(linear.bias - (linear.weight * mean / std).sum(1))
    state = model.state_dict()
    save_checkpoint(path, {"model": state, "ema": state, "stage": 2, "config": to_dict(cfg)})
    return path


@pytest.mark.timeout(180)
def test_jobs_evaluate_robustness_jpeg30_erases_what_the_detector_sees(tmp_path, capsys):
    root = _write_checkerboard_root(tmp_path / "data", {"train": 64, "valid": 16, "test": 24})
    cfg = load_config("demo", [*tiny_overrides(root, tmp_path), f"data.cache_dir={tmp_path / 'cache'}",
                               "runtime.precision=fp32", "eval.hflip_tta=false", "eval.batch_size=64",
                               "stage1.domains=[dalle,tpdne]", "stage2.domains=[dalle,tpdne]"])
    ckpt = _linear_probe_checkpoint(cfg, tmp_path / "runs" / "t" / "stage2" / "best.pt")
    out = tmp_path / "eval"
    assert evaluate_job.main(["--checkpoint", str(ckpt), "--data-root", str(root), "--out", str(out), "--no-ray",
                              "--threshold-from", "valid", "--robustness"]) == 0
    printed = capsys.readouterr().out
    rows = pq.read_table(out / "robustness" / "robustness.parquet").to_pylist()
    clean = {(r["weights"], r["domain"]): r for r in pq.read_table(out / "metrics.parquet").to_pylist()}
    expected = {("clean", "clean")} | {(p.kind, p.label) for p in PERTURBATIONS}
    assert {(r["perturbation"], r["severity"], r["weights"], r["domain"]) for r in rows} == {
        (k, s, w, d) for k, s in expected for w in ("raw", "ema") for d in ("dalle", "tpdne", "combined")}
    assert len(rows) == len(expected) * 6
    for r in rows:  # labelled at the clean thresholds, drop measured from the clean AUC
        ref = clean[(r["weights"], r["domain"])]
        assert r["threshold"] == ref["threshold"] and r["n"] == ref["n"]
        assert r["auc_drop"] == pytest.approx(ref["auc"] - r["auc"])
        if r["perturbation"] == "clean":
            assert (r["auc"], r["accuracy"], r["severity_value"]) == (ref["auc"], ref["accuracy"], 0.0)
    auc = {(r["perturbation"], r["severity"]): r["auc"] for r in rows if (r["weights"], r["domain"]) == ("ema", "combined")}
    assert auc[("clean", "clean")] >= 0.85, "the probe does not detect the checkerboard: the test proves nothing"
    assert auc[("jpeg", "q95")] >= auc[("clean", "clean")] - 0.1  # quality 95 keeps the pattern
    assert auc[("jpeg", "q30")] <= min(0.65, auc[("clean", "clean")] - 0.25), auc  # quality 30 erases it
    table = sweep_table(rows, "ema")
    assert table in printed and "q30" in table and "keep 75%" in table
    markdown = (out / "robustness" / "robustness.md").read_text()
    assert all(p.label in markdown for p in PERTURBATIONS) and "(robustness.png)" in markdown
    assert (out / "robustness" / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "robustness" / "robustness.csv").read_text().count("\n") == len(rows) + 1

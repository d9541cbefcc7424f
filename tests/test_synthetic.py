"""Tests of the embedded synthetic data set (``trueface.data.synthetic``).

Run: ``.venv/bin/python -m pytest tests/test_synthetic.py -q`` (the detector AUCs, cross-domain
included, and the generation speed are printed even without ``-s``).

One small data set (40/10/20 images per class and split) is generated once for the module and
shared; the cache, determinism and failure tests use a tiny spec of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from trueface.data import synthetic
from trueface.data.synthetic import (
    GENERATOR_VERSION,
    SYNTHETIC_DOMAINS,
    SyntheticSpec,
    ensure_synthetic_dataset,
)

SMALL = SyntheticSpec(image_size=128, train_per_class=40, valid_per_class=10, test_per_class=20, seed=0)
TINY = SyntheticSpec(image_size=64, train_per_class=3, valid_per_class=1, test_per_class=2, seed=7)
_GENERATION_SECONDS: dict[SyntheticSpec, float] = {}  # filled by the small_root fixture
EXPECTED_LABEL_DIRS = {"140k-real-vs-fake": {"REAL", "FAKE"}, "tpdne": {"real", "fake"}, "dalle": {"real", "fake"}}


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def _files(root: Path, domain: str, split: str, label: int) -> list[Path]:
    """Sorted image paths of one (domain, split, label); label 0 = real, 1 = fake."""
    folder = synthetic.LABEL_DIRS[domain][label]
    return sorted((root / domain / split / folder).glob("*.png"))


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _report(capsys, text: str) -> None:
    """Print to the terminal even when pytest captures output (the numbers are the point)."""
    with capsys.disabled():
        print("\n" + text)


def welch_log_spectrum(path: Path, size: int, patch: int = 32) -> np.ndarray:
    """The simple detector's features: the log power spectrum of the grey image resized to
    ``size`` (PIL bilinear, antialiased), averaged over half-overlapping Hann-windowed patches.

    Averaging the LOG periodograms of patches (Welch-style) keeps the feature count small
    (32 x 17) and the estimate stable, so a linear model finds the artefacts' spectral peaks and
    slopes from a few dozen images; the patch size makes the features the same at any ``size``.
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        grey = np.asarray(im, dtype=np.float64).mean(axis=2)
    step = patch // 2
    windows = sliding_window_view(grey, (patch, patch))[::step, ::step].reshape(-1, patch, patch)
    windows = windows - windows.mean(axis=(1, 2), keepdims=True)
    windows = windows * np.outer(np.hanning(patch), np.hanning(patch))
    power = np.abs(np.fft.rfft2(windows)) ** 2
    return np.log(power + 1e-3).mean(axis=0).ravel()


def _xy(root: Path, domain: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Detector features and labels (1 = fake) of one domain and split."""
    x, y = [], []
    for label in (0, 1):
        for path in _files(root, domain, split, label):
            x.append(welch_log_spectrum(path, size))
            y.append(label)
    return np.array(x), np.array(y)


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """The SMALL data set, generated once for the module; its generation time is recorded."""
    cache = tmp_path_factory.mktemp("synthetic-cache")
    start = time.perf_counter()
    root = ensure_synthetic_dataset(cache, SMALL)
    _GENERATION_SECONDS[SMALL] = time.perf_counter() - start
    return root


# ------------------------------------------------------------------------------------------
# Layout, format, speed
# ------------------------------------------------------------------------------------------


def test_layout_marker_and_counts(small_root):
    assert small_root.name == f"synthetic-v{GENERATOR_VERSION}-{synthetic.spec_fingerprint(SMALL)}"
    assert sorted(os.listdir(small_root)) == sorted([*SYNTHETIC_DOMAINS, synthetic.MARKER_NAME])
    for domain in SYNTHETIC_DOMAINS:
        assert sorted(os.listdir(small_root / domain)) == ["test", "train", "valid"]
        for split in ("train", "valid", "test"):
            # os.listdir, not Path.exists: the label folders' CASE is part of the layout.
            assert set(os.listdir(small_root / domain / split)) == EXPECTED_LABEL_DIRS[domain]
            for label in (0, 1):
                files = _files(small_root, domain, split, label)
                assert len(files) == SMALL.per_class(split)
                assert len(os.listdir(files[0].parent)) == len(files)  # nothing but the PNGs
    marker = json.loads((small_root / synthetic.MARKER_NAME).read_text())
    assert marker["version"] == GENERATOR_VERSION
    assert marker["spec"] == {
        "image_size": 128, "train_per_class": 40, "valid_per_class": 10, "test_per_class": 20, "seed": 0,
        "artefact_strength": 1.0,
    }
    assert marker["file_count"] == 3 * 2 * 70 == len(list(small_root.rglob("*.png")))


def test_both_classes_share_one_file_format(small_root):
    """PNG, 8-bit RGB, image_size square, same header chunks: only content differs."""
    for domain in SYNTHETIC_DOMAINS:
        formats = {0: set(), 1: set()}
        for label in (0, 1):
            for path in _files(small_root, domain, "valid", label) + _files(small_root, domain, "test", label):
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                with Image.open(path) as im:
                    formats[label].add((im.format, im.mode, im.size, tuple(sorted(im.info))))
        assert formats[0] == formats[1] == {("PNG", "RGB", (128, 128), ())}, domain


def test_generation_is_fast(small_root, capsys):
    """Vectorised numpy: a few ms an image (a per-pixel Python loop would take seconds)."""
    seconds = _GENERATION_SECONDS[SMALL]
    per_image_ms = 1000 * seconds / SMALL.file_count()
    _report(capsys, f"synthetic: generated {SMALL.file_count()} images in {seconds:.2f} s "
                    f"({per_image_ms:.1f} ms/image; default spec ~{per_image_ms * 0.96:.1f} s)")
    assert per_image_ms < 60


# ------------------------------------------------------------------------------------------
# What separates the classes: not file size, yes the artefacts
# ------------------------------------------------------------------------------------------


def test_file_size_does_not_separate_the_classes(small_root, capsys):
    aucs = {}
    for domain in SYNTHETIC_DOMAINS:
        sizes, labels = [], []
        for split in ("train", "valid", "test"):
            for label in (0, 1):
                for path in _files(small_root, domain, split, label):
                    sizes.append(path.stat().st_size)
                    labels.append(label)
        aucs[domain] = roc_auc_score(labels, sizes)
    _report(capsys, "synthetic: file-size AUC (fake vs real) " + ", ".join(f"{d}: {a:.3f}" for d, a in aucs.items()))
    for domain, auc in aucs.items():
        assert 0.3 <= auc <= 0.7, f"{domain}: PNG size separates fake from real (AUC {auc:.3f})"


def test_brightness_does_not_separate_the_classes(small_root):
    """Same content generator for both classes: mean grey level carries no label."""
    for domain in SYNTHETIC_DOMAINS:
        means, labels = [], []
        for split in ("train", "test"):
            for label in (0, 1):
                for path in _files(small_root, domain, split, label):
                    with Image.open(path) as im:
                        means.append(np.asarray(im, dtype=np.float64).mean())
                    labels.append(label)
        auc = roc_auc_score(labels, means)
        assert 0.25 <= auc <= 0.75, f"{domain}: brightness AUC {auc:.3f}"


@pytest.mark.parametrize("size", [64, 128])
def test_artefacts_are_learnable_within_each_domain(small_root, size, capsys):
    """A sparse logistic regression on spectral features, trained on one domain's train split,
    detects that domain's fakes in its test split (AUC >= 0.85), also after downscaling to 64 px.
    Cross-domain AUCs are printed, not asserted: each domain's artefact is its own."""
    data = {d: (_xy(small_root, d, "train", size), _xy(small_root, d, "test", size)) for d in SYNTHETIC_DOMAINS}
    auc = {}
    for source in SYNTHETIC_DOMAINS:
        (x_train, y_train), _ = data[source]
        # L1: a sparse model keyed to the few spectral bins that carry the artefact, as a
        # detector of one generator's fingerprint should be.
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, l1_ratio=1.0, solver="liblinear"))
        model.fit(x_train, y_train)
        for target in SYNTHETIC_DOMAINS:
            _, (x_test, y_test) = data[target]
            auc[source, target] = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
    lines = [f"synthetic: detector AUC at {size} px (rows: trained on, columns: tested on)",
             " " * 20 + "".join(f"{d:>20}" for d in SYNTHETIC_DOMAINS)]
    lines += [f"{s:>20}" + "".join(f"{auc[s, t]:>20.3f}" for t in SYNTHETIC_DOMAINS) for s in SYNTHETIC_DOMAINS]
    _report(capsys, "\n".join(lines))
    for domain in SYNTHETIC_DOMAINS:
        assert auc[domain, domain] >= 0.85, f"{domain} at {size} px: within-domain AUC {auc[domain, domain]:.3f}"


# ------------------------------------------------------------------------------------------
# Determinism, caching, failure safety
# ------------------------------------------------------------------------------------------


def test_generation_is_deterministic(tmp_path):
    a = ensure_synthetic_dataset(tmp_path / "a", TINY)
    b = ensure_synthetic_dataset(tmp_path / "b", TINY)
    assert a.name == b.name
    hashes_a, hashes_b = _hashes(a), _hashes(b)
    assert len(hashes_a) == TINY.file_count() + 1  # + the marker
    assert hashes_a == hashes_b


def test_images_depend_on_seed_label_and_index(tmp_path):
    """Per-image seeding: no two images repeat, and another seed gives another data set."""
    root = ensure_synthetic_dataset(tmp_path, TINY)
    hashes = [h for name, h in _hashes(root).items() if name.endswith(".png")]
    assert len(set(hashes)) == len(hashes)
    other = SyntheticSpec(**{**TINY.__dict__, "seed": TINY.seed + 1})
    assert synthetic.dataset_root(tmp_path, other) != root
    assert not np.array_equal(synthetic.render_image(TINY, "tpdne", "train", 1, 0),
                              synthetic.render_image(other, "tpdne", "train", 1, 0))


def test_second_call_reuses_the_cache(tmp_path, monkeypatch):
    root = ensure_synthetic_dataset(tmp_path, TINY)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached data set was regenerated")

    monkeypatch.setattr(synthetic, "generate_into", must_not_run)
    monkeypatch.setattr(synthetic, "render_image", must_not_run)
    assert ensure_synthetic_dataset(tmp_path, TINY) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_write = synthetic.write_png
    written = []

    def flaky_write(path, image):
        if len(written) == TINY.file_count() // 2:
            raise RuntimeError("disk full (simulated)")
        real_write(path, image)
        written.append(path)

    monkeypatch.setattr(synthetic, "write_png", flaky_write)
    with pytest.raises(RuntimeError, match="simulated"):
        ensure_synthetic_dataset(tmp_path, TINY)
    assert written, "the failure should strike mid-way"
    assert not synthetic.dataset_root(tmp_path, TINY).exists()
    assert not list(tmp_path.rglob(synthetic.MARKER_NAME))
    assert os.listdir(tmp_path) == []  # the temporary folder is cleaned up too

    monkeypatch.setattr(synthetic, "write_png", real_write)
    root = ensure_synthetic_dataset(tmp_path, TINY)  # and the next call just works
    assert synthetic.is_complete(root, TINY)
    assert len(list(root.rglob("*.png"))) == TINY.file_count()


def test_incomplete_folder_at_the_final_path_is_replaced(tmp_path):
    root = synthetic.dataset_root(tmp_path, TINY)
    (root / "tpdne").mkdir(parents=True)
    (root / "tpdne" / "junk.png").write_bytes(b"not an image")
    assert ensure_synthetic_dataset(tmp_path, TINY) == root
    assert synthetic.is_complete(root, TINY)
    assert not (root / "tpdne" / "junk.png").exists()
    assert os.listdir(tmp_path) == [root.name]


def test_losing_the_publication_race_uses_the_winner(tmp_path, monkeypatch):
    """A concurrent caller publishes first: our rename fails, our copy is dropped, theirs used."""
    real_generate = synthetic.generate_into
    root = synthetic.dataset_root(tmp_path, TINY)

    def generate_while_another_process_wins(out_dir, spec):
        count = real_generate(out_dir, spec)
        winner = tmp_path / ".winner"
        real_generate(winner, spec)
        os.rename(winner, root)
        (root / "winner.txt").write_text("published by the other process")
        return count

    monkeypatch.setattr(synthetic, "generate_into", generate_while_another_process_wins)
    assert ensure_synthetic_dataset(tmp_path, TINY) == root
    assert (root / "winner.txt").exists()
    assert os.listdir(tmp_path) == [root.name]  # our temporary copy is gone


@pytest.mark.parametrize("size", [16, 33])
def test_small_and_odd_sizes_render(size):
    spec = SyntheticSpec(image_size=size)
    for domain in SYNTHETIC_DOMAINS:
        for label in (0, 1):
            image = synthetic.render_image(spec, domain, "train", label, 0)
            assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_spec_is_validated():
    with pytest.raises(ValueError):
        SyntheticSpec(image_size=15)
    with pytest.raises(ValueError):
        SyntheticSpec(train_per_class=-1)


def test_artefact_strength_scales_the_gan_artefacts_only():
    """Real images do not depend on the strength; a GAN fake's difference from its clean face grows."""
    weak, strong = SyntheticSpec(image_size=32, artefact_strength=1.0), SyntheticSpec(image_size=32, artefact_strength=4.0)
    real_w = synthetic.render_image(weak, "140k-real-vs-fake", "train", 0, 3)
    real_s = synthetic.render_image(strong, "140k-real-vs-fake", "train", 0, 3)
    assert np.array_equal(real_w, real_s)
    fake_w = synthetic.render_image(weak, "140k-real-vs-fake", "train", 1, 3).astype(float)
    fake_s = synthetic.render_image(strong, "140k-real-vs-fake", "train", 1, 3).astype(float)
    # the same face and noise underneath: the difference is 3x the weak artefact (up to rounding/clipping)
    assert np.abs(fake_s - fake_w).mean() > 1.0

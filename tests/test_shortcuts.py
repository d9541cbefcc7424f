"""The format-shortcut audit: metadata AUC per domain, the field that separates, the plots."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import MINI_140K
from trueface.data.check import shortcut_text
from trueface.data.shortcuts import METADATA_FIELDS, WARN_AUC, audit, audit_domain, plot_shortcuts


def make_rows(n: int, label: int, seed: int, domain: str = "d", fmt: str = "JPEG", size_kb: tuple[float, float] = (30, 60),
              side: int = 256, quality: int = 75) -> list[dict]:
    """Scan rows of ``n`` images of one class: file sizes uniform in ``size_kb``, the rest fixed."""
    rng = np.random.default_rng(seed)
    return [{"path": f"/x/{domain}/{label}/{k}", "relpath": f"{label}/{k}", "domain": domain, "split": "train", "label": label,
             "format": fmt, "width": side, "height": side, "jpeg_quality": quality if fmt == "JPEG" else -1, "exif": False,
             "file_size": int(rng.uniform(*size_kb) * 1000), "error": ""} for k in range(n)]


def test_reals_jpeg_fakes_png_is_a_format_shortcut():
    rows = make_rows(40, 0, seed=1, fmt="JPEG") + make_rows(40, 1, seed=2, fmt="PNG")
    result = audit_domain(rows)
    assert (result.n_real, result.n_fake, result.folds) == (40, 40, 5)
    assert result.auc > 0.9 and result.warning
    assert result.separating_field == "format" and result.field_auc["format"] > 0.9
    assert result.field_auc["jpeg_quality"] == 1.0  # PNG has no JPEG quality: -1 against 75
    assert result.describe().startswith("format separates real from fake: metadata AUC 1.00")
    assert "(real: JPEG 100%; fake: PNG 100%)" in result.describe()


def test_identical_distributions_give_auc_near_half_and_no_warning():
    rows = []
    for label, seed in ((0, 3), (1, 4)):
        rows += make_rows(100, label, seed, fmt="JPEG") + make_rows(100, label, seed + 10, fmt="PNG")
    result = audit_domain(rows)
    assert abs(result.auc - 0.5) < 0.08 and not result.warning
    assert result.field_auc["format"] == pytest.approx(0.5, abs=0.05)
    assert result.field_auc["width"] == 0.5 and result.field_auc["exif"] == 0.5  # constant fields
    assert result.describe().startswith("no metadata shortcut: metadata AUC 0.")


def test_a_separating_file_size_is_named_with_the_medians():
    rows = make_rows(50, 0, seed=5, size_kb=(30, 46)) + make_rows(50, 1, seed=6, size_kb=(54, 70))
    result = audit_domain(rows)
    assert result.warning and result.auc > 0.95
    assert result.separating_field == "file_size" and result.field_auc["file_size"] == 1.0
    assert {f: result.field_auc[f] for f in METADATA_FIELDS if f != "file_size"} == dict.fromkeys(
        ("format", "width", "height", "jpeg_quality", "exif"), 0.5)
    real = np.median([r["file_size"] for r in rows[:50]]) / 1000
    fake = np.median([r["file_size"] for r in rows[50:]]) / 1000
    assert f"(real median {real:.3g} KB, fake median {fake:.3g} KB)" in result.describe()
    assert result.describe().startswith("file_size separates real from fake")


def test_reals_smaller_than_fakes_or_larger_score_the_same():
    small_real = make_rows(30, 0, seed=7, size_kb=(30, 46)) + make_rows(30, 1, seed=8, size_kb=(40, 70))
    large_real = [{**r, "label": 1 - r["label"]} for r in small_real]
    assert audit_domain(small_real).field_auc["file_size"] == audit_domain(large_real).field_auc["file_size"] > 0.7


def test_too_few_of_a_class_gives_nan_with_a_reason_and_error_rows_are_ignored():
    rows = make_rows(10, 0, seed=9) + make_rows(1, 1, seed=10)
    rows += [{**r, "error": "cannot decode"} for r in make_rows(5, 1, seed=11)]
    result = audit_domain(rows)
    assert math.isnan(result.auc) and not result.warning and result.n_ignored == 5
    assert (result.n_real, result.n_fake) == (10, 1)
    assert result.describe() == "metadata AUC n/a: needs at least 2 images of each class (real 10, fake 1)"
    assert math.isnan(audit_domain([]).auc)


def test_smallest_class_sets_the_folds():
    rows = make_rows(30, 0, seed=12, fmt="JPEG") + make_rows(3, 1, seed=13, fmt="PNG")
    result = audit_domain(rows)
    assert result.folds == 3 and result.warning and result.separating_field == "format"


def test_audit_covers_every_domain_with_all_its_splits_and_refuses_mixed_domains():
    rows = make_rows(20, 0, seed=14, domain="tpdne") + make_rows(20, 1, seed=15, domain="tpdne", fmt="PNG")
    rows += make_rows(20, 0, seed=16, domain="dalle") + make_rows(20, 1, seed=17, domain="dalle")
    for k, r in enumerate(rows):
        r["split"] = ("train", "valid", "test")[k % 3]
    results = audit(rows)
    assert [(a.domain, a.n_real, a.n_fake, a.warning) for a in results] == [("dalle", 20, 20, False), ("tpdne", 20, 20, True)]
    with pytest.raises(ValueError, match="several domains"):
        audit_domain(rows)


def test_mpo_phone_jpegs_keep_their_quality_in_the_audit():
    """A phone's MPO (multi-picture JPEG) is a JPEG: a quality shortcut among MPOs is seen."""
    rows = make_rows(30, 0, seed=30, size_kb=(30, 60), quality=95) + make_rows(30, 1, seed=31, size_kb=(30, 60), quality=70)
    for r in rows:
        r["format"] = "MPO"
    result = audit_domain(rows)
    assert result.field_auc["jpeg_quality"] == 1.0 and result.separating_field == "jpeg_quality" and result.warning


def test_plot_shortcuts_writes_one_png_per_domain(tmp_path):
    rows = make_rows(20, 0, seed=18, domain="a/b") + make_rows(20, 1, seed=19, domain="a/b", fmt="PNG")
    rows += make_rows(20, 0, seed=20, domain="c") + make_rows(1, 1, seed=21, domain="c")  # too few fakes: still plotted
    results = audit(rows)
    paths = plot_shortcuts(rows, results, tmp_path / "plots")
    assert [p.name for p in paths] == ["shortcuts_a_b.png", "shortcuts_c.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 500
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["shortcuts_a_b.png", "shortcuts_c.png"]  # no temp files


@pytest.mark.skipif(not MINI_140K.is_dir(), reason=f"faces140k-mini not found at {MINI_140K}")
def test_mini_set_metadata_does_not_separate_real_from_fake():
    """Measured on faces140k-mini (FFHQ vs StyleGAN, both 256 px q75 JPEG, no EXIF): metadata AUC
    0.51, no warning, nor in any split alone. File size alone scores 0.520 (its raw value's AUC is
    0.553): the fakes compress a little smaller (median 10.9 KB vs 11.3 KB), a real but weak
    difference, and the model does not exploit it."""
    rows = []
    for path in sorted(MINI_140K.glob("*/*/*.jpg")):
        with Image.open(path) as img:
            rows.append({"path": str(path), "domain": "mini", "split": path.parts[-3], "label": int(path.parts[-2].lower() == "fake"),
                         "format": img.format, "width": img.width, "height": img.height, "jpeg_quality": -1,
                         "exif": "exif" in img.info, "file_size": os.stat(path).st_size, "error": ""})
    (result,) = audit(rows)
    assert (result.n_real, result.n_fake) == (1000, 1000)
    assert result.auc < WARN_AUC and not result.warning
    assert result.auc == pytest.approx(0.51, abs=0.03)
    assert {f: result.field_auc[f] for f in ("format", "width", "height", "jpeg_quality", "exif")} == dict.fromkeys(
        ("format", "width", "height", "jpeg_quality", "exif"), 0.5)
    assert result.separating_field == "file_size" and result.field_auc["file_size"] == pytest.approx(0.520, abs=0.002)
    assert result.auc_low < WARN_AUC and [c.split for c in result.cells] == ["train", "valid", "test"]
    assert not any(c.warning for c in result.cells)
    assert "real median 11.3 KB, fake median 10.9 KB" in result.describe()


def _in_split(rows: list[dict], split: str) -> list[dict]:
    return [{**r, "split": split, "relpath": f"{split}/{r['relpath']}"} for r in rows]


def test_a_shortcut_only_the_test_split_has_is_found_and_named():
    """Review finding 5a: train and valid all JPEG, only the test fakes PNG. Pooled, the format
    hardly separates; the test split alone does, and the warning line names domain and split."""
    rows = []
    for k, (split, n, fake_format) in enumerate((("train", 60, "JPEG"), ("valid", 20, "JPEG"), ("test", 20, "PNG"))):
        rows += _in_split(make_rows(n, 0, seed=50 + k) + make_rows(n, 1, seed=60 + k, fmt=fake_format), split)
    audits = audit(rows)
    warned = [a for a in audits if a.warning]
    assert [(a.domain, a.split, a.separating_field) for a in warned] == [("d", "test", "format")]
    pooled = audits[0]
    assert not pooled.warning and pooled.auc < 0.7 and [c.split for c in pooled.cells] == ["train", "valid", "test"]
    assert warned[0].auc == 1.0 and warned[0].describe().startswith(
        "format separates real from fake in the test split: metadata AUC 1.00, lower bound 0.")
    assert shortcut_text(warned[0]).startswith("metadata shortcut in 'd': format separates real from fake in the test split")


def test_error_rows_are_left_out_of_the_pooled_audit_and_of_every_split_alone():
    """Rows with an error are left out once (audit_domain) for the pooled audit and the splits alone:
    PNG fakes that do not decode would be a format shortcut in the test split if they were seen."""
    rows = []
    for k, split in enumerate(("train", "test")):
        rows += _in_split(make_rows(12, 0, seed=90 + k) + make_rows(12, 1, seed=95 + k), split)
    broken = _in_split(make_rows(7, 1, seed=99, fmt="PNG"), "test")
    result = audit_domain(rows + [{**r, "error": "cannot decode", "relpath": f"bad/{r['relpath']}"} for r in broken])
    assert (result.n_real, result.n_fake, result.n_ignored) == (24, 24, 7)
    assert [(c.split, c.n_real, c.n_fake, c.n_ignored) for c in result.cells] == [("train", 12, 12, 0),
                                                                                    ("test", 12, 12, 0)]
    assert not result.warning and not any(c.warning for c in result.cells)
    assert result.field_auc["format"] == 0.5 and all(c.field_auc["format"] == 0.5 for c in result.cells)


def test_a_shortcut_in_every_split_is_one_finding_and_small_splits_are_not_audited_alone():
    rows = []
    for k, (split, n) in enumerate((("train", 30), ("valid", 9), ("test", 12))):
        rows += _in_split(make_rows(n, 0, seed=70 + k) + make_rows(n, 1, seed=80 + k, fmt="PNG"), split)
    audits = audit(rows)
    assert [(a.split, a.warning) for a in audits] == [("", True)]  # the pooled line says it all
    assert [(c.split, c.warning) for c in audits[0].cells] == [("train", True), ("test", True)]  # valid: 9 < 10
    assert audits[0].describe().startswith("format separates real from fake: metadata AUC 1.00")


def test_a_non_monotone_size_shortcut_names_the_size():
    """Review finding 5b: reals at 128 or 512 px, fakes at 256 px. Each raw value's AUC is 0.5, so
    the old verdict named file_size; each field's own cross-validated model sees the width."""
    rows = make_rows(30, 0, seed=40, side=128) + make_rows(30, 0, seed=41, side=512) + make_rows(60, 1, seed=42, side=256)
    result = audit_domain(rows)
    assert result.warning and result.auc > 0.95
    assert result.separating_field == "width" and result.field_auc["width"] == result.field_auc["height"] == 1.0
    assert result.field_auc["file_size"] < 0.7
    assert "(real: 128 px 50%, 512 px 50%; fake: 256 px 100%)" in result.describe()
    assert "re-encodes every image alike" in shortcut_text(result)  # not the file-size advice


def _fair_rows(n: int, seed: int) -> list[dict]:
    """Both classes drawn from one mixture of formats, sizes, qualities and EXIF: nothing to find."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in (0, 1):
        for k in range(n):
            fmt, side = ("JPEG", "PNG")[rng.integers(2)], int(rng.choice([256, 512]))
            rows.append({"path": f"/x/{label}/{k}", "relpath": f"{label}/{k}", "domain": "d", "split": "train",
                         "label": label, "format": fmt, "width": side, "height": side,
                         "jpeg_quality": int(rng.choice([75, 90])) if fmt == "JPEG" else -1, "exif": bool(rng.random() < 0.3),
                         "file_size": int(rng.uniform(30, 60) * 1000), "error": ""})
    return rows


def test_fair_small_domains_do_not_warn():
    """Review finding 5c: a fair domain's cross-validated AUC passes 0.6 now and then at 10-40
    images a class (here 3 of 20 seeds at 30); the warning is on the lower end of its 95% interval.
    (Measured over 20 seeds each at 10/20/30/40 a class: point estimate over 0.6 in 6/2/3/5, the
    bound in 1/0/0/1: see trueface.data.shortcuts.)"""
    results = [audit_domain(_fair_rows(30, seed)) for seed in range(20)]
    assert sum(r.auc > WARN_AUC for r in results) == 3  # the point estimate would have warned
    assert sum(r.warning for r in results) == 0


def test_a_planted_shortcut_on_a_decent_sample_still_warns():
    """100 images a class, fakes' files larger by 1.5 standard deviations (AUC about 0.86)."""
    for seed in range(10):
        rows = make_rows(100, 0, seed=seed) + make_rows(100, 1, seed=seed + 100)
        rng = np.random.default_rng(seed)
        for r in rows:
            r["file_size"] = int(rng.normal(45 + 12 * r["label"], 8) * 1000)
        result = audit_domain(rows)
        assert result.warning and result.separating_field == "file_size", (seed, result.auc, result.auc_low)


def test_auc_lower_bound():
    from trueface.data.shortcuts import auc_lower_bound

    assert auc_lower_bound(1.0, 2, 2) < WARN_AUC < auc_lower_bound(1.0, 12, 12)  # 1.0 by chance: 1 in 6 at 2 a class
    assert auc_lower_bound(0.8, 10_000, 10_000) == pytest.approx(0.8, abs=0.01)
    bounds = [auc_lower_bound(a, 40, 40) for a in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert bounds == sorted(bounds) and all(b < a for b, a in zip(bounds, (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)))
    assert math.isnan(auc_lower_bound(math.nan, 5, 5))

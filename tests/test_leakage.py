"""Duplicate and near-duplicate leakage: the pHash, the pair search (banded vs brute force), the summary."""

from __future__ import annotations

import hashlib
import io
import itertools
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from tests.conftest import MINI_140K
from trueface.data.leakage import (
    NEAR_DUPLICATE_BITS,
    NEAR_DUPLICATE_MIN_CORRELATION,
    LeakPair,
    find_leakage,
    hamming,
    leak_summary,
    near_pairs_by_bands,
    perceptual_hash,
    thumbnail,
    thumbnail_correlation,
)


def picture(seed: int, size: int = 256) -> Image.Image:
    """A smooth random picture with a few shapes: low frequencies that differ from seed to seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(coarse)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 40, 2)
        x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=colour)
    return coarse


def reopen(img: Image.Image, **save) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, **save)
    buffer.seek(0)
    return Image.open(buffer)


def row(name: str, phash: str, sha1: str = "", domain: str = "d", split: str = "train", label: int = 0, error: str = "") -> dict:
    return {"path": f"/data/{name}", "relpath": name, "domain": domain, "split": split, "label": label,
            "sha1": sha1 or hashlib.sha1(name.encode()).hexdigest(), "phash": phash, "error": error}


def flip(phash: str, *bits: int) -> str:
    value = int(phash, 16)
    for bit in bits:
        value ^= 1 << bit
    return f"{value:016x}"


# ---- pHash ----

def test_phash_is_16_hex_digits_deterministic_and_equal_for_identical_images():
    a = perceptual_hash(picture(1))
    assert len(a) == 16 and int(a, 16) >= 0
    assert perceptual_hash(picture(1)) == a
    assert bin(int(a, 16)).count("1") == 32  # each bit is "above the median of 64"


def test_phash_within_threshold_for_reencoded_and_resized_copies():
    for seed in range(8):
        img = picture(seed)
        h = perceptual_hash(img)
        copies = {
            "jpeg q50": reopen(img, format="JPEG", quality=50),
            "resized x0.5": img.resize((128, 128), Image.Resampling.BICUBIC),
            "png": reopen(img, format="PNG"),
            "16-bit gray png": reopen(Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257), format="PNG"),
        }
        for what, copy in copies.items():
            assert hamming(h, perceptual_hash(copy)) <= NEAR_DUPLICATE_BITS, f"seed {seed}: {what}"
        assert hamming(h, perceptual_hash(copies["png"])) == 0
        assert hamming(h, perceptual_hash(copies["16-bit gray png"])) == 0  # scale-free: 16 bits hash like 8


def test_thumbnails_confirm_copies_and_refute_different_pictures():
    for seed in range(6):
        img = picture(seed)
        thumb = thumbnail(img)
        assert len(thumb) == 256
        for copy in (reopen(img, format="JPEG", quality=30), img.resize((100, 100), Image.Resampling.BILINEAR),
                     reopen(Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 200), format="PNG")):
            assert thumbnail_correlation(thumb, thumbnail(copy)) >= NEAR_DUPLICATE_MIN_CORRELATION
        assert thumbnail_correlation(thumb, thumbnail(picture(seed + 100))) < 0.9
    flat = thumbnail(Image.new("L", (64, 64), 120))
    assert thumbnail_correlation(flat, thumbnail(Image.new("L", (32, 32), 121))) == 1.0
    assert thumbnail_correlation(flat, thumbnail(Image.new("L", (64, 64), 0))) == 0.0
    assert thumbnail_correlation(flat, thumbnail(picture(1))) == 0.0


def test_a_candidate_near_pair_is_kept_only_when_the_thumbnails_confirm_it():
    img = picture(8)
    a = row("train/a.jpg", H) | {"thumb": thumbnail(img)}
    copy = row("test/b.jpg", flip(H, 3, 40), split="test") | {"thumb": thumbnail(reopen(img, format="JPEG", quality=40))}
    look_alike = row("test/c.jpg", flip(H, 5, 50), split="test") | {"thumb": thumbnail(picture(9))}
    assert [(p.a, p.b) for p in find_leakage([a, copy, look_alike])] == [("train/a.jpg", "test/b.jpg")]
    assert [p.b for p in find_leakage([a, copy, look_alike], min_correlation=-1)] == ["test/b.jpg", "test/c.jpg"]
    # a row scanned before thumbnails existed cannot refute its candidate
    del look_alike["thumb"]
    assert [p.b for p in find_leakage([a, copy, look_alike])] == ["test/b.jpg", "test/c.jpg"]


def test_phash_of_different_pictures_is_far_apart():
    hashes = [perceptual_hash(picture(seed)) for seed in range(100, 112)]
    distances = [hamming(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > 3 * NEAR_DUPLICATE_BITS
    assert 24 <= np.mean(distances) <= 40  # unrelated pictures: about half the bits


def test_phash_of_blank_and_transparent_images():
    assert perceptual_hash(Image.new("L", (64, 64), 0)) == "0" * 16
    assert perceptual_hash(Image.new("RGB", (64, 64), (200, 10, 10))) == "8" + "0" * 15  # only the DC term
    rgba = picture(3).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: what shows is the white background
    assert perceptual_hash(rgba) == perceptual_hash(Image.new("RGB", (64, 64), "white"))


def test_hamming_counts_bits_and_refuses_non_hex():
    assert hamming("0" * 16, "f" * 16) == 64
    assert hamming("00000000000000ff", "000000000000000f") == 4
    with pytest.raises(ValueError, match="not a hex hash"):
        hamming("zz", "00")


# ---- find_leakage ----

H = "a5a5a5a5a5a5a5a5"
FAR = "5a5a5a5a5a5a5a5a"  # 64 bits from H


def test_same_file_in_train_and_test_is_an_exact_cross_split_pair():
    rows = [row("train/real/x.jpg", H, sha1="s1"), row("test/real/x.jpg", H, sha1="s1", split="test"),
            row("train/real/y.jpg", FAR)]
    pairs = find_leakage(rows)
    assert pairs == [LeakPair("exact", "train/real/x.jpg", "test/real/x.jpg", 0, "d", "train", 0, "d", "test", 0)]
    assert pairs[0].cross_split and not pairs[0].cross_label and not pairs[0].cross_domain
    assert pairs.warnings == []


def test_same_image_as_real_and_fake_is_cross_label_and_a_resized_copy_across_domains_is_near():
    img = picture(7)
    h, h_small = perceptual_hash(img), perceptual_hash(img.resize((100, 100), Image.Resampling.BILINEAR))
    rows = [row("a/train/real/p.jpg", h, sha1="s1", domain="a"),
            row("a/train/fake/p.jpg", h, sha1="s1", domain="a", label=1),
            row("b/test/fake/small.jpg", h_small, sha1="s2", domain="b", split="test", label=1)]
    pairs = find_leakage(rows)
    exact = [p for p in pairs if p.kind == "exact"]
    near = {(p.a, p.b): p for p in pairs if p.kind == "near"}
    assert [(p.a, p.b, p.cross_label, p.cross_split) for p in exact] == [("a/train/real/p.jpg", "a/train/fake/p.jpg", True, False)]
    # the resized copy is near both of the same-bytes files (near pairs skip same-sha1 pairs only)
    assert set(near) == {("a/train/real/p.jpg", "b/test/fake/small.jpg"), ("a/train/fake/p.jpg", "b/test/fake/small.jpg")}
    assert all(p.cross_domain and p.cross_split for p in near.values())
    assert all(p.distance == hamming(h, h_small) for p in near.values())


def test_near_pair_inside_one_cell_is_not_leakage_but_an_exact_copy_there_is_reported():
    rows = [row("train/real/a.jpg", H), row("train/real/b.jpg", flip(H, 0, 9)),
            row("train/real/c.jpg", FAR, sha1="s3"), row("train/real/c_copy.jpg", FAR, sha1="s3")]
    pairs = find_leakage(rows)
    assert [(p.kind, p.a, p.b, p.same_cell) for p in pairs] == [("exact", "train/real/c.jpg", "train/real/c_copy.jpg", True)]
    # the same near pair across labels is reported, at its distance
    rows[1]["label"] = 1
    assert [(p.kind, p.distance, p.cross_label) for p in find_leakage(rows) if p.kind == "near"] == [("near", 2, True)]


def test_threshold_is_inclusive_and_rows_with_errors_or_no_hash_are_ignored():
    rows = [row("train/a.jpg", H), row("test/b.jpg", flip(H, 1, 2, 3, 4), split="test"),
            row("test/c.jpg", H, split="test", error="cannot decode"), row("test/d.jpg", "", split="test")]
    assert [(p.b, p.distance) for p in find_leakage(rows, near_bits=4)] == [("test/b.jpg", 4)]
    assert find_leakage(rows, near_bits=3) == []


def test_large_exact_group_gives_one_pair_per_copy_against_the_earliest_split():
    rows = [row(f"test/real/{k:02d}.jpg", H, sha1="same", split="test") for k in range(40)]
    rows.append(row("valid/real/first.jpg", H, sha1="same", split="valid"))
    pairs = find_leakage(rows)
    assert len(pairs) == 40 and {p.kind for p in pairs} == {"exact"}
    assert {p.a for p in pairs} == {"valid/real/first.jpg"}
    assert len({p.b for p in pairs}) == 40


def test_large_near_group_reports_every_cross_pair_once():
    # 30 distinct files, H and 29 copies with 2 bits of their own flipped, alternating train/test
    rows = [row(f"{('train', 'test')[k % 2]}/f{k}.jpg", flip(H, 2 * k, 2 * k + 1) if k else H, split=("train", "test")[k % 2])
            for k in range(30)]
    pairs = find_leakage(rows)
    hashes = [r["phash"] for r in rows]
    expected = {(rows[i]["relpath"], rows[j]["relpath"]) if i % 2 == 0 else (rows[j]["relpath"], rows[i]["relpath"])
                for i, j in itertools.combinations(range(30), 2)
                if hamming(hashes[i], hashes[j]) <= NEAR_DUPLICATE_BITS and i % 2 != j % 2}
    assert len(expected) == 15 * 15  # each file is 2 bits from H and 4 from the others: every train/test pair
    assert {(p.a, p.b) for p in pairs} == expected and len(pairs) == 225
    assert all(p.a.startswith("train/") for p in pairs)
    # at 3 bits only the pairs with H (train/f0) remain: one per test file
    assert {(p.a, p.b) for p in find_leakage(rows, near_bits=3)} == {("train/f0.jpg", f"test/f{k}.jpg") for k in range(1, 30, 2)}


def test_a_crowded_bucket_is_capped_with_a_warning_instead_of_compared():
    blank = perceptual_hash(Image.new("RGB", (64, 64), "white"))
    rows = [row(f"{('train', 'test')[k % 2]}/blank{k}.png", blank, split=("train", "test")[k % 2]) for k in range(60)]
    start = time.perf_counter()
    pairs = find_leakage(rows, max_bucket=50)
    assert time.perf_counter() - start < 2
    assert pairs == [] and len(pairs.warnings) == NEAR_DUPLICATE_BITS + 1  # the crowd fills one bucket in every band
    assert "shared by 60 images" in pairs.warnings[0] and "cap of 50" in pairs.warnings[0]
    assert leak_summary(pairs)["warnings"] == pairs.warnings
    assert len(find_leakage(rows, max_bucket=100)) == 30 * 30  # under the cap: every train/test pair


@pytest.mark.parametrize("near_bits", [0, 3, 4, 8])
def test_banding_finds_exactly_the_pairs_brute_force_finds(near_bits):
    rng = np.random.default_rng(near_bits)
    centres = rng.integers(0, 2**63, 20, dtype=np.int64).astype(np.uint64)
    hashes = []
    for _ in range(400):  # clustered, so that there are many pairs at every distance
        value = int(centres[rng.integers(20)])
        for bit in rng.choice(64, rng.integers(0, 10), replace=False):
            value ^= 1 << int(bit)
        hashes.append(value)
    array = np.array(hashes, dtype=np.uint64)
    (i, j, dist), warnings = near_pairs_by_bands(array, near_bits)
    brute = {(a, b) for a, b in itertools.combinations(range(len(hashes)), 2) if (hashes[a] ^ hashes[b]).bit_count() <= near_bits}
    assert warnings == [] and len(brute) > 20
    assert set(zip(i.tolist(), j.tolist())) == brute and len(i) == len(brute)  # each pair once
    assert dist.tolist() == [(hashes[a] ^ hashes[b]).bit_count() for a, b in zip(i.tolist(), j.tolist())]


def test_leak_summary_counts_by_kind_and_relation():
    pairs = [LeakPair("exact", "a", "b", 0, "d", "train", 0, "d", "test", 0),
             LeakPair("exact", "a", "c", 0, "d", "train", 0, "d", "train", 0),
             LeakPair("near", "e", "f", 2, "d", "train", 0, "e", "test", 1)]
    s = leak_summary(pairs)
    assert s["pairs"] == 3 and s["warnings"] == []
    assert s["exact"] == {"pairs": 2, "cross_split": 1, "cross_domain": 0, "cross_label": 0, "same_cell": 1,
                          "mirrored": 0, "by_splits": {"train/test": 1, "train/train": 1}}
    assert s["near"] == {"pairs": 1, "cross_split": 1, "cross_domain": 1, "cross_label": 1, "same_cell": 0,
                         "mirrored": 0, "by_splits": {"train/test": 1}}


def test_malformed_phash_names_the_file():
    with pytest.raises(ValueError, match="train/bad.jpg.*rescan"):
        find_leakage([row("train/bad.jpg", "abc"), row("test/x.jpg", H, split="test")])


@pytest.mark.skipif(not MINI_140K.is_dir(), reason=f"faces140k-mini not found at {MINI_140K}")
def test_mini_set_has_no_copies_and_its_one_chance_candidate_is_refuted_by_the_thumbnails():
    """Measured: of the 2,000 images' 2.0 M pairs, two are within 4 bits of the 64-bit hash (both
    at 2): one StyleGAN identity rendered twice inside train/FAKE (same cell, not reported) and a
    chance match of two different men across train/valid FAKE, whose thumbnails correlate 0.875:
    the confirmation stage drops it."""
    rows = []
    for path in sorted(MINI_140K.glob("*/*/*.jpg")):
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        rows.append({"path": str(path), "relpath": str(path.relative_to(MINI_140K)), "domain": "mini",
                     "split": path.parts[-3], "label": int(path.parts[-2].lower() == "fake"),
                     "sha1": hashlib.sha1(path.read_bytes()).hexdigest(), "phash": perceptual_hash(rgb),
                     "thumb": thumbnail(rgb), "error": ""})
    assert len(rows) == 2000
    assert find_leakage(rows) == []
    unconfirmed = find_leakage(rows, min_correlation=-1)
    assert [(p.kind, p.a, p.b, p.distance) for p in unconfirmed] == [("near", "train/FAKE/0VNPD85RZU.jpg", "valid/FAKE/0YX00K947S.jpg", 2)]
    thumbs = {r["relpath"]: r["thumb"] for r in rows}
    assert thumbnail_correlation(thumbs["train/FAKE/0VNPD85RZU.jpg"], thumbs["valid/FAKE/0YX00K947S.jpg"]) < 0.9


def test_rows_without_sha1_are_never_exact_but_can_be_near():
    rows = [row("train/a.jpg", H), row("test/b.jpg", H, split="test")]
    for r in rows:
        r["sha1"] = ""
    assert [(p.kind, p.distance) for p in find_leakage(rows)] == [("near", 0)]


# ---- test/train overlap (trueface.data.overlap, jobs.evaluate's gate) ----


def _resave(src, dst) -> None:
    """The same pixels in other bytes: another compression level and a text chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved")
    with Image.open(src) as img:
        img.save(dst, compress_level=1, pnginfo=info)


def _trained_run_and_test_root(tmp_path):
    """A run's files (config, manifest) written from a checked root, and a test root holding a
    re-saved copy of a train image, a byte copy of a valid image and an image of its own."""
    import argparse

    from tests.conftest import tiny_overrides, write_tiny_root
    from trueface.config import load_config
    from trueface.data.check import scan_and_check
    from trueface.data.layout import discover_layout
    from trueface.run import RunPaths, write_run_files

    root = write_tiny_root(tmp_path / "data", {"": "lower"}, per_class=2)
    cfg = load_config("demo", [*tiny_overrides(root, tmp_path), f"data.cache_dir={tmp_path / 'cache'}"])
    layout = discover_layout(root)
    paths = RunPaths.of(cfg)
    write_run_files(cfg, layout, paths, scan_and_check(layout, cfg, workers=1, progress=False))
    test = write_tiny_root(tmp_path / "test", {"faces": "lower"}, per_class=1, splits=("test",))
    _resave(root / "train" / "real" / "x_train_0.png", test / "faces" / "test" / "real" / "resaved.png")
    (test / "faces" / "test" / "fake" / "copied.png").write_bytes((root / "valid" / "fake" / "x_valid_0.png").read_bytes())
    assert (hashlib.sha1((test / "faces" / "test" / "real" / "resaved.png").read_bytes()).digest()
            != hashlib.sha1((root / "train" / "real" / "x_train_0.png").read_bytes()).digest())
    args = argparse.Namespace(checkpoint=str(paths.stage_dir(2) / "best.pt"), on_bad_image=None, allow_overlap=False)
    return cfg, paths, discover_layout(test / "faces"), args


def test_evaluate_refuses_a_test_root_of_resaved_copies_of_training_images(tmp_path):
    # A re-saved PNG (same pixels, other bytes) is as much a training image as a byte copy: the
    # run's manifest records each file's pixel_sha1 beside its sha1, and the gate matches either.
    from jobs.evaluate import checked_test_root

    cfg, paths, test_layout, args = _trained_run_and_test_root(tmp_path)
    manifest = pq.read_table(paths.run_dir / "manifest.parquet")
    assert "pixel_sha1" in manifest.column_names and all(manifest.column("pixel_sha1").to_pylist())
    with pytest.raises(SystemExit, match=r"error: 2 test images of .* are also in the checkpoint's training data"):
        checked_test_root(test_layout, cfg, args)
    args.allow_overlap = True
    assert checked_test_root(test_layout, cfg, args)[2] == {"faces": 2}


def test_an_older_manifest_without_pixel_sha1_compares_bytes_only_and_says_so(tmp_path):
    from trueface.data.check import cache_file
    from trueface.data.layout import discover_layout
    from trueface.data.overlap import overlap_counts, training_hashes
    from trueface.data.scan import scan_layout

    cfg, paths, test_layout, args = _trained_run_and_test_root(tmp_path)
    location = paths.run_dir / "manifest.parquet"
    pq.write_table(pq.read_table(location).drop(["pixel_sha1"]), location)
    rows = scan_layout(discover_layout(test_layout.root), None, workers=1, progress=False)
    # where the data check's cache of the root is, the re-saved copy is a near copy (distance 0)
    assert overlap_counts(rows, training_hashes(args.checkpoint, cfg)) == {"faces": 2}
    cache = cache_file(cfg, Path(cfg.data.root))
    cache.rename(cache.with_suffix(".away"))  # elsewhere: bytes alone
    trained = training_hashes(args.checkpoint, cfg)
    assert trained.pixel_sha1 == frozenset() and "by bytes only" in trained.source and not trained.hashed
    assert overlap_counts(rows, trained) == {"faces": 1}  # the byte copy; the re-saved one is not seen


def test_overlap_counts_a_test_image_by_its_pixels_or_its_bytes():
    from trueface.data.overlap import TrainingData, overlap_counts

    trained = TrainingData(frozenset({"bytes-a"}), "test", frozenset({"pixels-b"}))
    rows = [{"domain": "d", "split": "test", "sha1": "bytes-a", "pixel_sha1": "pixels-a"},   # byte copy
            {"domain": "d", "split": "test", "sha1": "bytes-x", "pixel_sha1": "pixels-b"},   # re-saved copy
            {"domain": "d", "split": "test", "sha1": "bytes-y", "pixel_sha1": ""},           # undecodable: bytes only
            {"domain": "e", "split": "test", "sha1": "", "pixel_sha1": ""},
            {"domain": "d", "split": "train", "sha1": "bytes-a", "pixel_sha1": "pixels-b"}]  # not a test image
    assert overlap_counts(rows, trained) == {"d": 2, "e": 0}


def _symmetric(seed: int) -> Image.Image:
    """A picture whose right half mirrors its left: its hash and its mirrored hash are one."""
    left = np.asarray(picture(seed))[:, :128]
    return Image.fromarray(np.concatenate([left, left[:, ::-1]], axis=1))


def test_overlap_counts_mirrored_and_reencoded_copies_of_training_images(tmp_path):
    """Review: the gate compared pixels and bytes only, so a left-right mirror image of a training
    image, or a JPEG re-encode of one, in a test root was not counted. Where the training rows have
    perceptual hashes, the leakage check's confirmed near pairs (mirrored ones too) count as well;
    a symmetric picture, which matches its own mirror, is no copy of anything by that alone."""
    from PIL import ImageOps

    from trueface.data.overlap import TrainingData, near_copies, overlap_counts

    picture(41).save(tmp_path / "trained.png")
    _symmetric(42).save(tmp_path / "trained_symmetric.png")
    with Image.open(tmp_path / "trained.png") as img:
        ImageOps.mirror(img).save(tmp_path / "mirror.png")
        ImageOps.mirror(img).save(tmp_path / "mirror.jpg", quality=75)
        img.save(tmp_path / "reencoded.jpg", quality=50)
    picture(43).save(tmp_path / "other.png")
    _symmetric(44).save(tmp_path / "other_symmetric.png")
    training = [_scanned(tmp_path / n, f"train/real/{n}", "train", 0) for n in ("trained.png", "trained_symmetric.png")]
    tests = [_scanned(tmp_path / n, f"test/real/{n}", "test", 0) | {"domain": domain}
             for n, domain in (("mirror.png", "mirror"), ("mirror.jpg", "mirror"), ("reencoded.jpg", "jpeg"),
                               ("other.png", "other"), ("other_symmetric.png", "other"))]
    assert training[1]["phash"] == training[1]["phash_flip"] and tests[4]["phash"] == tests[4]["phash_flip"]
    assert {r["pixel_sha1"] for r in tests}.isdisjoint(r["pixel_sha1"] for r in training)  # no exact copy
    exact = TrainingData(frozenset(r["sha1"] for r in training), "t", frozenset(r["pixel_sha1"] for r in training))
    assert overlap_counts(tests, exact) == {"mirror": 0, "jpeg": 0, "other": 0}  # pixels and bytes alone
    hashed = TrainingData(exact.sha1, "t", exact.pixel_sha1, tuple(training))
    assert overlap_counts(tests, hashed) == {"mirror": 2, "jpeg": 1, "other": 0}
    assert near_copies(tests, training) == {0, 1, 2}
    assert near_copies(tests, [{**training[0], "thumb": b""}]) == set()  # unconfirmable: exact matches only


def test_evaluate_counts_a_mirrored_copy_where_the_training_hashes_are_known(tmp_path):
    """The run's manifest records pixels and bytes only: the data check's cache of the data root
    (where training ran) gives its images' perceptual hashes, and without that cache the gate says
    it compares exactly only. The data root's scan, or a manifest with the scan's perceptual
    columns, also finds a mirrored copy of a train image."""
    from PIL import ImageOps

    from trueface.data.check import cache_file
    from trueface.data.layout import discover_layout
    from trueface.data.overlap import PERCEPTUAL_COLUMNS, overlap_counts, training_hashes
    from trueface.data.scan import scan_layout

    cfg, paths, test_layout, args = _trained_run_and_test_root(tmp_path)
    train_image = Path(cfg.data.root) / "train" / "real" / "x_train_1.png"
    with Image.open(train_image) as img:
        ImageOps.mirror(img).save(test_layout.root / "test" / "real" / "mirrored.png")
    rows = scan_layout(discover_layout(test_layout.root), None, workers=1, progress=False)
    location = paths.run_dir / "manifest.parquet"
    manifest = pq.read_table(location)
    trained = training_hashes(args.checkpoint, cfg)  # the run's check left its scan in the cache
    assert "only" not in trained.source and "near copies of the 8 of them in the data check's cache" in trained.source
    assert len(trained.hashed) == 8 and overlap_counts(rows, trained) == {"faces": 3}
    cache = cache_file(cfg, Path(cfg.data.root))
    cache.rename(cache.with_suffix(".away"))  # evaluated on another machine: no cache of the data root
    trained = training_hashes(args.checkpoint, cfg)
    assert "by pixels and bytes only" in trained.source and not trained.hashed
    assert overlap_counts(rows, trained) == {"faces": 2}  # the re-saved and the byte copy, not the mirror
    scanned = {r["path"]: r for r in scan_layout(discover_layout(cfg.data.root), None, workers=1, progress=False)}
    for column in PERCEPTUAL_COLUMNS:
        manifest = manifest.append_column(column, [[scanned[p][column] for p in manifest.column("path").to_pylist()]])
    pq.write_table(manifest, location)
    trained = training_hashes(args.checkpoint, cfg)
    assert "only" not in trained.source and len(trained.hashed) == 8
    assert overlap_counts(rows, trained) == {"faces": 3}
    location.unlink()  # no manifest: the data root's train and valid splits are scanned
    trained = training_hashes(args.checkpoint, cfg)
    assert "scanned" in trained.source and overlap_counts(rows, trained) == {"faces": 3}


# ---- mirrored copies ----

def _scanned(path, relpath: str, split: str, label: int) -> dict:
    from trueface.data.scan import inspect_image

    return inspect_image(str(path), relpath) | {"relpath": relpath, "domain": "d", "split": split, "label": label}


def test_a_mirrored_copy_in_another_split_and_label_is_found(tmp_path):
    """Review finding 6: a left-right mirrored copy is 24-38 bits from its original, so it was never
    a candidate. The scan keeps the mirror's hash too, and the pair is found like any near copy."""
    from PIL import ImageOps

    img = picture(21)
    img.save(tmp_path / "a.png")
    ImageOps.mirror(img).save(tmp_path / "b.jpg", quality=75)
    picture(22).save(tmp_path / "c.png")
    rows = [_scanned(tmp_path / "a.png", "train/real/a.png", "train", 0),
            _scanned(tmp_path / "b.jpg", "test/fake/b.jpg", "test", 1),
            _scanned(tmp_path / "c.png", "test/fake/c.png", "test", 1)]
    assert hamming(rows[0]["phash"], rows[1]["phash"]) > 3 * NEAR_DUPLICATE_BITS  # not a plain candidate
    pairs = find_leakage(rows)
    assert [(p.kind, p.a, p.b) for p in pairs] == [("near", "train/real/a.png", "test/fake/b.jpg")]
    assert pairs[0].mirrored and pairs[0].cross_split and pairs[0].cross_label and pairs[0].distance <= NEAR_DUPLICATE_BITS
    assert leak_summary(pairs)["near"]["mirrored"] == 1


def test_the_mirrored_hash_is_the_hash_of_the_mirror_image():
    from PIL import ImageOps

    from trueface.data.leakage import mirror_thumbnail, perceptual_hashes

    for seed in range(6):
        img = picture(seed)
        plain, mirrored = perceptual_hashes(img)
        assert plain == perceptual_hash(img) and mirrored == perceptual_hash(ImageOps.mirror(img))
        assert mirror_thumbnail(thumbnail(img)) == thumbnail(ImageOps.mirror(img))


def test_mirrored_matches_obey_the_same_rules_as_plain_ones():
    """Inside one cell a mirror image is not leakage; a row is not its own mirror's pair; a pair
    matched both ways is one pair, and a plain match wins over a mirrored one; rows without a
    mirrored hash (older scans) are still matched against the others' mirrors."""
    a = row("train/a.jpg", H) | {"phash_flip": FAR}
    assert find_leakage([a, row("train/b.jpg", FAR) | {"phash_flip": H}]) == []  # same cell
    symmetric = row("train/s.jpg", H) | {"phash_flip": H}
    assert find_leakage([symmetric, row("test/far.jpg", FAR, split="test")]) == []
    both_ways = row("test/c.jpg", flip(FAR, 1), split="test") | {"phash_flip": flip(H, 2)}
    assert [(p.b, p.mirrored, p.distance) for p in find_leakage([a, both_ways])] == [("test/c.jpg", True, 1)]
    plain_too = row("test/e.jpg", flip(H, 1, 2), split="test") | {"phash_flip": H}
    assert [(p.b, p.mirrored, p.distance) for p in find_leakage([a, plain_too])] == [("test/e.jpg", False, 2)]
    old = row("test/d.jpg", flip(FAR, 3), split="test")  # scanned before phash_flip
    assert [(p.b, p.mirrored, p.distance) for p in find_leakage([a, old])] == [("test/d.jpg", True, 1)]


@pytest.mark.skipif(not MINI_140K.is_dir(), reason=f"faces140k-mini not found at {MINI_140K}")
def test_mirrored_mini_faces_are_all_found(tmp_path):
    """20 mini faces, each mirrored and re-saved as JPEG q75 under test/: 20 cross-split pairs
    (before the mirrored hash: 0 of 20), and no other pair among the 40 images."""
    from PIL import ImageOps

    from trueface.data.decode import load_rgb

    rows = []
    for k, path in enumerate(sorted(MINI_140K.glob("train/*/*.jpg"))[::50][:20]):
        ImageOps.mirror(load_rgb(str(path))).save(tmp_path / f"{k}.jpg", quality=75)
        rows += [_scanned(path, f"train/{path.name}", "train", 0), _scanned(tmp_path / f"{k}.jpg", f"test/{k}.jpg", "test", 0)]
    pairs = find_leakage(rows)
    assert len(pairs) == 20 and all(p.mirrored and p.cross_split for p in pairs)

"""trueface.data.normalize: the jpeg:<q>@<size> re-encoding, its on-disk cache, and the Predictor's
in-memory copy of it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import trueface.atomic
import trueface.data.normalize as normalize
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.augment import eval_transform
from trueface.config import load_config, to_dict
from trueface.data.dataset import ImageDataset
from trueface.data.decode import ImageReadError, load_rgb
from trueface.data.layout import Sample, discover_layout
from trueface.data.normalize import (
    encode_normalized,
    load_normalized,
    normalize_image,
    normalized_folder,
    normalized_root,
)
from trueface.data.overlap import training_hashes
from trueface.predict import Predictor

SPEC = "jpeg:90@64"


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "train" / "real").mkdir(parents=True)
    (root / "train" / "fake").mkdir(parents=True)
    noise(300, 200, 1).save(root / "train" / "real" / "a.jpg", quality=95)
    noise(120, 150, 2).save(root / "train" / "fake" / "b.png")
    noise(40, 50, 3).save(root / "train" / "fake" / "c.png")
    return root


RELPATHS = ["train/real/a.jpg", "train/fake/b.png", "train/fake/c.png"]


def build(root: Path, tmp_path: Path, **kw) -> Path:
    return normalized_root(root, RELPATHS, SPEC, tmp_path / "cache", workers=kw.pop("workers", 1), progress=False, **kw)


def stamps(folder: Path) -> dict[str, int]:
    return {rel: (folder / rel).stat().st_mtime_ns for rel in RELPATHS}


def test_normalize_image_sizes_settings_and_determinism():
    # the shorter side becomes exactly 64, down or up; the aspect ratio is kept
    assert normalize_image(noise(300, 200), 90, 64).size == (96, 64)
    assert normalize_image(noise(120, 150), 90, 64).size == (64, 80)
    assert normalize_image(noise(40, 50), 90, 64).size == (64, 80)  # upscaled: every image, one size class
    data = encode_normalized(noise(300, 200), 90, 64)
    assert data == encode_normalized(noise(300, 200), 90, 64)  # byte for byte
    out = normalize_image(noise(300, 200), 90, 64)
    assert out.mode == "RGB" and out.format == "JPEG"
    assert JpegImagePlugin.get_sampling(out) == 2  # 4:2:0 whatever the quality
    assert not out.getexif() and "icc_profile" not in out.info
    assert np.array_equal(np.asarray(out), np.asarray(normalize_image(noise(300, 200), 90, 64)))
    assert not np.array_equal(np.asarray(out), np.asarray(normalize_image(noise(300, 200), 50, 64)))


def test_the_mirror_has_the_same_relative_paths_and_jpeg_content(root, tmp_path):
    mirror = build(root, tmp_path)
    assert mirror == normalized_folder(root, SPEC, tmp_path / "cache")
    # ends in the root's own name: a single-domain root keeps its domain name
    assert mirror.parent.parent == tmp_path / "cache" / "normalized" and mirror.parent.name.startswith("data-jpeg-90-64-")
    assert mirror.name == "data"
    sizes = {}
    for rel in RELPATHS:
        with Image.open(mirror / rel) as img:
            assert img.format == "JPEG"  # b.png keeps its name; PIL goes by the content
            sizes[rel] = img.size
        assert (mirror / rel).read_bytes() == encode_normalized(load_rgb(root / rel), 90, 64)
    assert sizes == {"train/real/a.jpg": (96, 64), "train/fake/b.png": (64, 80), "train/fake/c.png": (64, 80)}
    manifest = json.loads((mirror / "manifest.json").read_text())
    assert manifest["spec"] == SPEC and sorted(manifest["files"]) == sorted(RELPATHS)
    # another spec or another root: another folder
    assert normalized_folder(root, "jpeg:90@128", tmp_path / "cache") != mirror
    assert normalized_folder(tmp_path / "other" / "data", SPEC, tmp_path / "cache") != mirror


def test_the_cache_is_reused_and_a_changed_or_missing_file_rebuilt(root, tmp_path, monkeypatch):
    mirror = build(root, tmp_path)
    before = stamps(mirror)
    calls = []
    real_write = normalize._write_one
    monkeypatch.setattr(normalize, "_write_one", lambda job: (calls.append(job[0]), real_write(job)))
    assert build(root, tmp_path) == mirror
    assert calls == [] and stamps(mirror) == before  # nothing rebuilt

    changed = root / "train" / "fake" / "b.png"
    noise(120, 150, seed=9).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (mirror / "train/fake/c.png").unlink()
    build(root, tmp_path)
    assert sorted(calls) == sorted([str(changed), str(root / "train/fake/c.png")])
    after = stamps(mirror)
    assert after["train/real/a.jpg"] == before["train/real/a.jpg"]
    assert (mirror / "train/fake/b.png").read_bytes() == encode_normalized(load_rgb(changed), 90, 64)


def test_copies_of_files_no_longer_wanted_leave_the_mirror(root, tmp_path, monkeypatch):
    # The run's layout is read from the mirror: a copy whose source was deleted, moved (here from
    # train to test) or excluded would be trained on, or sit in two splits.
    mirror = build(root, tmp_path)
    (mirror / "valid" / "real").mkdir(parents=True)
    noise(8, 8).save(mirror / "valid" / "real" / "orphan.png")  # a killed build's copy, never recorded
    (root / "test" / "fake").mkdir(parents=True)
    (root / "train" / "fake" / "c.png").rename(root / "test" / "fake" / "c.png")
    calls = []
    real_write = normalize._write_one
    monkeypatch.setattr(normalize, "_write_one", lambda job: (calls.append(job[0]), real_write(job)))
    wanted = ["train/real/a.jpg", "test/fake/c.png"]  # b.png deleted at the source (or excluded)
    assert normalized_root(root, wanted, SPEC, tmp_path / "cache", workers=1, progress=False) == mirror
    images = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*.*") if p.name != normalize.MANIFEST)
    assert images == sorted(wanted)
    assert sorted(json.loads((mirror / normalize.MANIFEST).read_text())["files"]) == sorted(wanted)
    assert calls == [str(root / "test/fake/c.png")]  # a.jpg's copy kept as it was


def test_an_interrupted_build_leaves_no_partial_file(root, tmp_path, monkeypatch):
    real_fsync, count = os.fsync, []

    def fsync_then_die(fd):  # the second image dies after its bytes are written, before the rename
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # a folder's sync after a rename
            return real_fsync(fd)
        count.append(fd)
        if len(count) == 2:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(trueface.atomic.os, "fsync", fsync_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(root, tmp_path)
    monkeypatch.setattr(trueface.atomic.os, "fsync", real_fsync)
    mirror = normalized_folder(root, SPEC, tmp_path / "cache")
    files = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file())
    assert files == ["manifest.json", "train/real/a.jpg"]  # no b.png, no temporary file left
    assert list(json.loads((mirror / "manifest.json").read_text())["files"]) == ["train/real/a.jpg"]
    first = (mirror / "train/real/a.jpg").stat().st_mtime_ns
    build(root, tmp_path)  # finishes the rest, keeps what was done
    assert (mirror / "train/real/a.jpg").stat().st_mtime_ns == first
    assert all((mirror / rel).is_file() for rel in RELPATHS)


def test_a_process_pool_builds_the_same_bytes(root, tmp_path):
    one = build(root, tmp_path)
    pooled = normalized_root(root, RELPATHS, SPEC, tmp_path / "pool_cache", workers=2, progress=False)
    assert all((one / rel).read_bytes() == (pooled / rel).read_bytes() for rel in RELPATHS)


def test_an_undecodable_source_is_named(root, tmp_path):
    (root / "train" / "fake" / "bad.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"bad\.png: not an image .*data check should have excluded it"):
        normalized_root(root, RELPATHS + ["train/fake/bad.png"], SPEC, tmp_path / "cache", workers=1, progress=False)
    with pytest.raises(ValueError, match="not a path inside the data root"):
        normalized_root(root, ["../x.png"], SPEC, tmp_path / "cache", workers=1, progress=False)


@pytest.mark.parametrize("decode_size", [32, None])  # 32: the 64+ px copies are reduced by 2 first
def test_predictor_in_memory_equals_the_cached_copy(root, tmp_path, decode_size):
    mirror = build(root, tmp_path)
    predictor = Predictor(torch.nn.Identity(), 32, 0.5, runtime=None, hflip=False,
                          decode_size=decode_size, normalize=(90, 64))
    for i, rel in enumerate(RELPATHS):
        cached = ImageDataset([Sample(str(mirror / rel), 0, "d", "train")], eval_transform(32), decode_size)[0][0]
        assert torch.equal(predictor.load(root / rel), cached)
        expected = load_rgb(mirror / rel, decode_size)
        assert np.array_equal(np.asarray(load_normalized(root / rel, 90, 64, decode_size)), np.asarray(expected))


def test_predictor_from_checkpoint_honours_the_data_config(tmp_path, monkeypatch):
    import trueface.predict as predict

    cfg = load_config("demo", ["data.normalize=jpeg:80@96", "data.decode_draft=false"])
    monkeypatch.setattr(predict, "load_checkpoint", lambda path: {"config": to_dict(cfg), "stage": 2})
    monkeypatch.setattr(predict, "load_models", lambda state, cfg: {"ema": torch.nn.Identity()})
    p = Predictor.from_checkpoint(tmp_path / "best.pt", device="cpu")
    assert (p.decode_size, p.normalize) == (None, (80, 96))
    cfg = load_config("demo")
    p = Predictor.from_checkpoint(tmp_path / "best.pt", device="cpu")
    assert (p.decode_size, p.normalize) == (cfg.stage2.image_size, None)


def test_overlap_with_a_mirror_trained_checkpoint_compares_the_source_bytes(tmp_path):
    # A checkpoint trained with data.normalize names the mirror as its data root. Without the run's
    # manifest beside it, the overlap check scans a data root: the source's, whose bytes a copied
    # test file shares (the mirror's are re-encoded and share nobody's).
    root = write_tiny_root(tmp_path / "data", {"": "lower"}, per_class=2)
    layout = discover_layout(root)
    mirror = normalized_root(root, [layout.relpath(s.path) for s in layout.all_samples()], SPEC,
                             tmp_path / "cache", workers=1, progress=False)
    cfg = load_config("demo", [*tiny_overrides(mirror, tmp_path), f"data.normalize={SPEC}",
                               f"data.cache_dir={tmp_path / 'cache'}"])
    alone = tmp_path / "copied" / "best.pt"  # copied out of its run: no manifest.parquet beside it
    trained = training_hashes(str(alone), cfg)
    train_file = layout.samples("data", "train")[0].path
    assert hashlib.sha1(Path(train_file).read_bytes()).hexdigest() in trained.sha1
    assert len(trained.sha1) == 8 and str(root) in trained.source  # train + valid of the source
    # a mirror whose manifest is gone names no source: nothing to compare with, not the mirror's bytes
    (mirror / normalize.MANIFEST).unlink()
    assert training_hashes(str(alone), cfg) is None

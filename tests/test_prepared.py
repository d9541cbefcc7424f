"""The prepared cache (data.prepared: uint8): the decode path's pixels bit for bit, keyed by each
file's size, mtime and ctime, whole shards only, built in parallel on Ray by jobs.prepare and used by the
engine for training and validation."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trueface.data.prepared as prepared
import trueface.train as train
from jobs import prepare as prepare_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.config import ConfigError, load_config
from trueface.data.decode import load_rgb
from trueface.data.layout import Sample
from trueface.data.prepared import PreparedImages, build_prepared, plan_shards, prepared_folder
from trueface.run import resolve_run


def _odd_images(folder: Path) -> list[Sample]:
    """The decode path's cases: a JPEG reduced by 2 (512 -> 256 at decode size 224), a PNG with
    alpha, an EXIF-rotated JPEG, a grey one, an odd non-square size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    big = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    big.save(folder / "big.jpg", quality=80)
    Image.fromarray(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (33, 47), dtype=np.uint8), "L").save(folder / "grey.png")
    for name in ("big.jpg", "alpha.png", "rotated.jpg", "grey.png"):
        paths.append(Sample(str(folder / name), len(paths) % 2, "d", "train"))
    return paths


def test_the_cache_gives_the_decode_paths_pixels_exactly(tmp_path):
    samples = _odd_images(tmp_path / "img")
    assert build_prepared(samples, 224, tmp_path / "cache", progress=False) == (0, 4)
    images = PreparedImages.open(tmp_path / "cache", 224)
    assert images.coverage(samples) == 4
    for s in samples:
        want = load_rgb(s.path, 224)
        got = images.load(s.path, 224)
        assert got.mode == "RGB" and got.size == want.size and got.tobytes() == want.tobytes(), s.path
    assert images.load(samples[0].path, 224).size == (256, 256)  # reduced as the decode path reduces
    # served from the shard, not decoded again
    shard = next(prepared_folder(tmp_path / "cache", 224).glob("*.u8"))
    assert shard.stat().st_size == sum(np.asarray(load_rgb(s.path, 224)).size for s in samples)


def test_a_replacement_of_the_same_size_with_its_mtime_kept_is_never_served_stale(tmp_path):
    # cp -p or rsync -a of a corrected image: an uncompressed format keeps the byte size exactly
    path = tmp_path / "img" / "face.bmp"
    path.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    samples = [Sample(str(path), 0, "d", "train")]
    build_prepared(samples, None, tmp_path / "cache", progress=False)
    before = path.stat()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    images = PreparedImages.open(tmp_path / "cache", None)
    assert images.coverage(samples) == 0
    assert images.load(str(path), None).getpixel((0, 0)) == (200, 200, 200)


def test_a_changed_file_is_prepared_again_and_never_served_stale(tmp_path):
    samples = _odd_images(tmp_path / "img")
    build_prepared(samples, 224, tmp_path / "cache", progress=False)
    images = PreparedImages.open(tmp_path / "cache", 224)
    changed = samples[3].path
    Image.fromarray(np.full((33, 47), 7, dtype=np.uint8), "L").save(changed)
    os.utime(changed, ns=(1, 1))  # another mtime, whatever the clock's resolution
    assert images.load(changed, 224).tobytes() == load_rgb(changed, 224).tobytes()  # decoded: the copy is stale
    assert images.coverage(samples) == 3
    jobs = plan_shards(samples, 224, tmp_path / "cache")
    assert [j.paths for j in jobs] == [(str(Path(changed).absolute()),)]
    assert build_prepared(samples, 224, tmp_path / "cache", progress=False) == (3, 1)
    # the stale version stays in its shard: whichever order the shards are read in, it is never served
    folder = prepared_folder(tmp_path / "cache", 224)
    first = min(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for suffix in (".json", ".u8"):
        (folder / f"zzzz{suffix}").write_bytes(first.with_suffix(suffix).read_bytes())
    again = PreparedImages.open(tmp_path / "cache", 224)
    assert again.coverage(samples) == 4 and again.load(changed, 224).getpixel((0, 0)) == (7, 7, 7)
    # another decode size is another cache: nothing of it is there yet
    assert PreparedImages.open(tmp_path / "cache", 64).coverage(samples) == 0
    # an image outside the cache (a test split) is decoded
    other = tmp_path / "img" / "other.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(other)
    assert again.load(other, 224).tobytes() == load_rgb(other, 224).tobytes()


def test_an_interrupted_build_keeps_whole_shards_and_a_rerun_does_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "SHARD_IMAGES", 2)
    samples = _odd_images(tmp_path / "img")
    written = []

    def stops_after_one(fn, jobs):
        for job in jobs:
            if written:
                raise KeyboardInterrupt
            written.append(fn(job))
            yield written[-1]

    with pytest.raises(KeyboardInterrupt):
        build_prepared(samples, 224, tmp_path / "cache", shard_map=stops_after_one, progress=False)
    folder = prepared_folder(tmp_path / "cache", 224)
    assert len(list(folder.glob("*.u8"))) == len(list(folder.glob("*.json"))) == 1
    assert not list(folder.glob(".*.tmp"))
    assert build_prepared(samples, 224, tmp_path / "cache", progress=False) == (2, 2)
    assert PreparedImages.open(tmp_path / "cache", 224).coverage(samples) == 4


def test_a_picklable_reader_for_loader_processes(tmp_path):
    samples = _odd_images(tmp_path / "img")
    build_prepared(samples, 224, tmp_path / "cache", progress=False)
    images = PreparedImages.open(tmp_path / "cache", 224)
    images.load(samples[0].path, 224)  # opens a memory map: not sent to another process
    copy = pickle.loads(pickle.dumps(images))
    assert copy._maps == {} and copy.load(samples[1].path, 224).tobytes() == images.load(samples[1].path, 224).tobytes()


def test_a_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.prepared: 'float' must be none .* or uint8"):
        load_config("demo", ["data.prepared=float"])


def test_a_stage_trained_from_the_cache_trains_exactly_as_from_the_files(tiny_cfg, tmp_path, monkeypatch, capsys):
    cfg, layout = resolve_run(tiny_cfg)
    cfg = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, epochs=1))
    train_s, val_s = layout.gather(cfg.stage1.domains, "train"), layout.gather(cfg.stage1.domains, "valid")
    from_files = train.run_stage(cfg, 1, train_s, val_s, tmp_path / "files")

    cached = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared="uint8",
                                                               cache_dir=str(tmp_path / "prepared")))
    size = train.decode_size(cached, cached.stage1.image_size)
    build_prepared(train_s + val_s, size, cached.data.cache_dir, progress=False)
    decoded, served, real_load = [], set(), PreparedImages.load
    monkeypatch.setattr(prepared, "load_rgb", lambda *a: decoded.append(a[0]) or load_rgb(*a))
    monkeypatch.setattr(PreparedImages, "load", lambda self, path, size: served.add(path) or real_load(self, path, size))
    from_cache = train.run_stage(cached, 1, train_s, val_s, tmp_path / "cache")
    # every training and validation image came through the cache, none decoded from its file
    assert served == {s.path for s in train_s + val_s} and decoded == []
    assert f"prepared cache: {len(train_s)} of {len(train_s)} train images" in capsys.readouterr().out
    assert from_cache.history[0]["train/loss"] == from_files.history[0]["train/loss"]
    assert from_cache.history[0]["val/auc_ema"] == from_files.history[0]["val/auc_ema"]
    a = torch.load(tmp_path / "files" / "best.pt", weights_only=False)["ema"]
    b = torch.load(tmp_path / "cache" / "best.pt", weights_only=False)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_jobs_prepare_builds_on_ray_tasks_what_the_engine_reads(ray_session, tmp_path, monkeypatch, capsys):
    root = write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    monkeypatch.setattr(prepared, "SHARD_IMAGES", 10)  # several tasks
    args = [*tiny_overrides(root, tmp_path), "data.prepared=uint8", f"data.cache_dir={tmp_path / 'cache'}",
            "stage2.image_size=64"]
    maps, real_map = [], prepare_job.ray_shard_map
    monkeypatch.setattr(prepare_job, "ray_shard_map", lambda fn, jobs: maps.append(len(jobs)) or real_map(fn, jobs))
    assert prepare_job.main(args) == 0
    out = capsys.readouterr().out
    # Stage I (32 px: 16 train + 16 valid of 140k) and Stage II (64 px: both domains, 64 images)
    assert "(decode size 32): 32 images prepared" in out and "(decode size 64): 64 images prepared" in out
    cfg = load_config("demo", args)
    layout_samples = sorted(p for p in root.rglob("*.png") if "/test/" not in p.as_posix())
    images = PreparedImages.open(cfg.data.cache_dir, 64)
    assert images.coverage([Sample(str(p), 0, "", "") for p in layout_samples]) == 64
    assert len(list(prepared_folder(cfg.data.cache_dir, 64).glob("*.u8"))) == 7  # 64 images in shards of 10
    for p in layout_samples[:5]:
        assert images.load(p, 64).tobytes() == load_rgb(p, 64).tobytes()
    assert prepare_job.main(args) == 0  # up to date: nothing again
    assert "(decode size 64): 0 images prepared" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="data.prepared is none here, so a run with these arguments"):
        prepare_job.main([a for a in args if a != "data.prepared=uint8"])  # a cache no run would read
    assert maps == [4, 7]  # shards of 10 images, as Ray tasks; none the second time

"""``python -m jobs.benchmark input``: the naive reference really is naive, each side runs the
path it names, and the table carries the issue's targets. No speed is asserted (the machine is
shared): the figures' ratios are what the benchmark prints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import benchmark
from trueface.bench import input as bench_input
from trueface.bench.naive import STRONG_OPS, NaivePipeline, naive_decode
from trueface.config import load_config
from trueface.data import decode


@pytest.fixture(scope="module")
def paper():
    return load_config("paper")


@pytest.fixture(scope="module")
def jpeg_512(tmp_path_factory):
    return bench_input.generated_jpegs(tmp_path_factory.mktemp("jpeg512"), 512, 3)


def test_naive_strong_applies_every_op_to_every_sample(paper, jpeg_512, monkeypatch):
    naive = NaivePipeline(224, paper.stage1.augment, strong=True)
    assert [name for name, _ in naive.ops] == list(STRONG_OPS)
    calls = {name: 0 for name in STRONG_OPS}
    for i, (name, op) in enumerate(naive.ops):
        naive.ops[i] = (name, lambda x, op=op, name=name: calls.__setitem__(name, calls[name] + 1) or op(x))
    outs = [naive(p) for p in jpeg_512]
    assert calls == {name: len(jpeg_512) for name in STRONG_OPS}
    assert all(o.shape == (3, 224, 224) and o.dtype == torch.float32 for o in outs)
    # RandomErasing at p=1 leaves a rectangle at exactly 0 in every channel (after normalisation)
    assert all(bool((o == 0).all(dim=0).any()) for o in outs)


def test_naive_decodes_at_full_size_where_the_project_reduces(jpeg_512):
    assert naive_decode(jpeg_512[0]).size == (512, 512)
    assert decode.load_rgb(jpeg_512[0], 224).size == (256, 256)


def test_project_pipelines_return_what_each_path_hands_the_batch(paper, jpeg_512):
    cpu = bench_input.project_pipeline(paper, paper.stage1, strong=True)(jpeg_512[0])
    gpu_side = bench_input.project_pipeline(paper, paper.stage1, strong=True, gpu_side=True)(jpeg_512[0])
    assert cpu.dtype == torch.float32 and cpu.shape == (3, 224, 224)
    assert gpu_side.dtype == torch.uint8 and gpu_side.shape == (3, 224, 224)  # floats are left to the GPU


def test_the_prepared_rows_read_the_cache_and_hand_the_batch_the_same(paper, jpeg_512, tmp_path, monkeypatch):
    cache = bench_input.prepared_cache(paper, paper.stage1, jpeg_512, tmp_path)
    decoded = []
    monkeypatch.setattr("trueface.data.prepared.load_rgb", lambda *a: decoded.append(a) or bench_input.load_rgb(*a))
    for gpu_side in (False, True):
        torch.manual_seed(5)
        want = bench_input.project_pipeline(paper, paper.stage1, strong=False, gpu_side=gpu_side)(jpeg_512[0])
        torch.manual_seed(5)
        got = bench_input.project_pipeline(paper, paper.stage1, strong=False, gpu_side=gpu_side, load=cache)(jpeg_512[0])
        assert torch.equal(want, got)
    assert decoded == []  # the cache's pixels, not a decode


def test_real_images_are_used_as_they_are_where_their_side_fits(tmp_path):
    train = tmp_path / "mini" / "train" / "REAL"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(train / f"{i}.jpg", quality=75)
    images, source = bench_input.bench_images(tmp_path / "mini", {256: 3, 1024: 2}, tmp_path / "work")
    assert all(p.parent == train for p in images[256]) and len(images[256]) == 3
    assert [Image.open(p).size for p in images[1024]] == [(1024, 1024)] * 2
    assert set(source["resized"]) == {1024} and "resized once to 1024 px" in source["resized"][1024]
    test = tmp_path / "mini" / "test" / "FAKE"
    test.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(test / f"{i}.jpg", quality=75)
    # more than the train split holds: the whole root (7 files), not an error
    wider, _ = bench_input.bench_images(tmp_path / "mini", {256: 6}, tmp_path / "work1")
    assert len(wider[256]) == 6 and {p.parent for p in wider[256]} == {train, test}
    with pytest.raises(SystemExit, match="holds 7 JPEG files, the benchmark needs 9"):
        bench_input.bench_images(tmp_path / "mini", {256: 9}, tmp_path / "work2")
    with pytest.raises(SystemExit, match="is not a folder"):
        bench_input.bench_images(tmp_path / "absent", {256: 1}, tmp_path / "work3")


def test_per_image_ms_times_every_pipeline_over_every_image(jpeg_512):
    seen = {"a": 0, "b": 0}
    ms = bench_input.per_image_ms({k: (lambda p, k=k: seen.__setitem__(k, seen[k] + 1)) for k in seen},
                                  jpeg_512, repeats=2)
    warm = min(bench_input.WARMUP_IMAGES, len(jpeg_512))
    assert seen == {"a": warm + 2 * len(jpeg_512), "b": warm + 2 * len(jpeg_512)}
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


def test_quick_input_benchmark_writes_every_row_with_the_issues_targets(tmp_path, capsys):
    assert benchmark.main(["input", "--quick", "--images", "3", "--results-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench-input" / "bench.json").read_text())
    rows = {r["what"]: r for r in payload["rows"]}
    strong = [w for w in rows if w.endswith("strong")]
    assert strong == ["Stage I JPEG 256 -> 224 strong", "Stage I JPEG 512 -> 224 strong",
                      "Stage II JPEG 1024 -> 1024 strong"]
    gpu_side = rows["Stage II JPEG 1024 -> 1024 strong, CPU side with augment.device gpu"]
    assert gpu_side["target"] == 4.0 and gpu_side["reference"] == rows["Stage II JPEG 1024 -> 1024 strong"]["reference"]
    assert rows["Stage I JPEG 256 -> 224 strong"]["target"] == 3.0
    for stage_row in strong:
        for path in ("augment.device cpu", "CPU side with augment.device gpu"):
            assert rows[f"{stage_row}, {path}, data.prepared uint8"]["reference"] == rows[stage_row]["reference"]
    for r in payload["rows"]:
        assert r["project"] > 0 and r["reference"] > 0
        assert r["ratio"] == pytest.approx(r["reference"] / r["project"])  # ms: lower is better
    assert any(w.startswith("decode JPEG 256 full") for w in rows)
    assert "| Stage I JPEG 256 -> 224 strong |" in capsys.readouterr().out
    assert (tmp_path / "bench-input" / "bench.md").read_text().startswith("## Benchmark `input`")


def test_parts_default_dedupe_and_an_unknown_one_is_named(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["inputs"])
    assert "unknown part 'inputs': choose from input, train, infer, gpu" in capsys.readouterr().err
    assert benchmark.parse_args([]).parts == ["input", "train"]
    assert benchmark.parse_args(["input", "train", "input"]).parts == ["input", "train"]


@pytest.mark.parametrize("bad", ["empty", "truncated", "not an image"])
def test_an_unreadable_jpeg_under_data_root_is_named_in_one_line(tmp_path, bad):
    # a zero-byte or cut-off download, or another file under a .jpg name: an exit that names the
    # file and what to do, before anything is timed; not PIL's traceback from inside a measurement
    train = tmp_path / "mini" / "train" / "REAL"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(train / f"{i}.jpg", quality=75)
    whole = (train / "0.jpg").read_bytes()
    (train / "1.jpg").write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2],
                                   "not an image": b"<html>404</html>"}[bad])
    bad_file = str(train / "1.jpg")
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["input", "--quick", "--images", "3", "--data-root", str(tmp_path / "mini"),
                        "--results-dir", str(tmp_path / "results")])
    message = str(exc.value)
    assert message.startswith(f"--data-root: {bad_file} cannot be read as an image (") and "\n" not in message
    assert message.endswith("remove or replace it, or point --data-root at another set")
    with pytest.raises(SystemExit, match="cannot be read as an image"):  # the gpu part picks its files the same way
        bench_input.bench_images(tmp_path / "mini", {256: 3}, tmp_path / "work")

"""``python -m jobs.benchmark infer``: both sides score the same files with the same model, the
project's side is the predictor ``jobs.predict`` runs, and the row carries both rates."""

from __future__ import annotations

import json

import pytest

from jobs import benchmark
from trueface.bench import infer as bench_infer
from trueface.config import load_config
from trueface.predict import Predictor


def test_infer_benchmark_times_the_predictor_beside_the_naive_loop(tmp_path, monkeypatch, capsys):
    scored, naive_calls = [], []
    real_score, real_naive = Predictor.score, bench_infer.NaivePredictor.__call__
    monkeypatch.setattr(Predictor, "score", lambda self, paths: scored.append(len(paths)) or real_score(self, paths))
    monkeypatch.setattr(bench_infer.NaivePredictor, "__call__",
                        lambda self, path: naive_calls.append(path) or real_naive(self, path))
    assert benchmark.main(["infer", "--quick", "--images", "3", "--results-dir", str(tmp_path)]) == 0
    assert scored == [3, 3]  # warm-up + one timed pass, over every file
    assert len(naive_calls) == 6 and len(set(naive_calls)) == 3
    payload = json.loads((tmp_path / "bench-infer" / "bench.json").read_text())
    (row,) = payload["rows"]
    assert row["what"] == "jobs.predict vs naive per-image predictor" and row["unit"] == "img/s"
    assert row["project"] > 0 and row["reference"] > 0 and row["ratio"] == pytest.approx(row["project"] / row["reference"])
    assert payload["context"]["images"] == 3 and payload["context"]["flip_tta"] is load_config("demo").eval.hflip_tta
    assert "probabilities differ by at most" in row["note"]
    assert "jobs.predict vs naive" in capsys.readouterr().out


def test_both_sides_give_nearly_the_same_probability(tmp_path):
    paths = bench_infer.generated_jpegs(tmp_path, 256, 2)
    predictor, text = bench_infer.load_predictor(None, dict(bench_infer.QUICK))
    assert "fresh ResNet-50" in text and predictor.image_size == 64
    naive = bench_infer.NaivePredictor(predictor)
    for path, row in zip(paths, predictor.score(paths)):
        assert row.probability == pytest.approx(naive(path), abs=1e-3)


def test_bad_sizes_are_named():
    with pytest.raises(SystemExit, match="--image-size >= 32"):
        bench_infer.bench_size(benchmark.parse_args(["infer", "--image-size", "16"]))

"""``python -m jobs.benchmark infer``: both sides score the same files with the same model, the
project's side is the predictor ``jobs.predict`` runs, and the row carries both rates."""

from __future__ import annotations

import json

import pytest
import torch

from jobs import benchmark
from trueface.bench import infer as bench_infer
from trueface.bench import report as bench_report
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


def test_a_checkpoint_that_cannot_be_had_is_a_one_line_error(tmp_path, monkeypatch):
    missing = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["infer", "--quick", "--images", "2", "--checkpoint", str(missing),
                        "--results-dir", str(tmp_path / "results")])
    assert str(exc.value) == (f"infer: --checkpoint {missing}: checkpoint {missing} does not exist; give a checkpoint "
                              "file a training run wrote (or its s3:// / gs:// URI), or leave --checkpoint out to time "
                              "a fresh model")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"^infer: --checkpoint {junk}: .*leave --checkpoint out"):
        bench_infer.run(benchmark.parse_args(["infer", "--quick", "--images", "2", "--checkpoint", str(junk)]))
    # a URI reaches the stager whole (argparse's Path would make s3://b/x.pt s3:/b/x.pt), as in jobs.predict
    from trueface.storage import StorageError
    asked = []

    def fetch(location, cache_dir):
        asked.append(location)
        raise StorageError(f"{location} does not exist")

    monkeypatch.setattr(bench_infer, "fetch_checkpoint", fetch)
    args = benchmark.parse_args(["infer", "--quick", "--images", "2", "--checkpoint", "s3://bucket/run/best.pt"])
    assert args.checkpoint == "s3://bucket/run/best.pt"
    with pytest.raises(SystemExit, match="^infer: --checkpoint s3://bucket/run/best.pt: s3://bucket/run/best.pt does "
                                         "not exist; give a checkpoint"):
        bench_infer.run(args)
    assert asked == ["s3://bucket/run/best.pt"]


def test_an_unreadable_image_under_data_root_is_named_before_either_side_runs(tmp_path):
    from PIL import Image
    train = tmp_path / "mini" / "train" / "REAL"
    train.mkdir(parents=True)
    Image.new("RGB", (256, 256), (120, 90, 60)).save(train / "a.jpg", quality=75)
    (train / "b.jpg").write_bytes(b"\xff\xd8\xff")  # a cut-off JPEG
    args = benchmark.parse_args(["infer", "--quick", "--images", "2", "--data-root", str(tmp_path / "mini")])
    with pytest.raises(SystemExit, match=f"^--data-root: {train / 'b.jpg'} cannot be read as an image"):
        bench_infer.run(args)


def test_the_ray_rows_are_warm_actors_at_the_references_batch_and_their_start_up_apart(tmp_path):
    asked, references = [], []

    def ray_rate(checkpoint, paths, size, *reference):
        asked.append((checkpoint.name, len(paths), size["batch_size"], size["repeats"]))
        references.extend(pass_() for pass_ in reference)  # a pass of the reference: here, while its files exist
        return bench_infer.RayFigures(rate=50.0, reference=40.0, startup_s=7.5, note="made up")

    bench = bench_infer.run(benchmark.parse_args(["infer", "--quick", "--images", "3"]), ray_rate=ray_rate)
    plain, warm, startup = bench.rows
    assert asked == [("fresh.pt", 3, bench.context["batch"], bench.context["repeats"])]
    # handed a pass of the plain predictor that scores every file, to alternate with the actors' passes;
    # the row's reference is the one measured in those rounds, not the first row's
    (probabilities,) = references
    assert len(probabilities) == 3 and all(0 <= p <= 1 for p in probabilities)
    assert (warm.what, warm.project, warm.reference) == (bench_infer.RAY_ROW, 50.0, 40.0)
    assert warm.ratio == pytest.approx(50.0 / 40.0)
    assert (startup.what, startup.project, startup.reference, startup.unit) == (bench_infer.STARTUP_ROW, 7.5, None, "s")
    assert startup.lower_is_better and startup.target is None and startup.met is None and startup.no_target
    assert "| 7.5 | — | s | — | none: once per job |" in bench.markdown()


def test_the_ray_rate_times_warm_actors_in_rounds_alternating_with_the_reference(monkeypatch):
    # no Ray here: the actors' start-up (made slow), their scoring and the reference's (made fast)
    # are stand-ins; the passes must alternate A B, B A, ..., the rates hold the timed passes only,
    # and the start-up figure the start-up
    import contextlib
    import time

    from jobs import bench_infer_ray

    passes, started = [], []

    @contextlib.contextmanager
    def slow_start(checkpoint, count, gpus, threads):
        started.append(threads)
        time.sleep(0.6)  # model loads
        yield [f"actor{i}" for i in range(count)], [threads] * count

    def score_pass(actors, batches):
        passes.append([len(b) for b in batches])
        time.sleep(0.01)
        return 0

    def reference():
        passes.append("reference")
        time.sleep(0.04)  # slower than the actors: its own figure, not theirs

    monkeypatch.setattr(bench_infer_ray.ray, "is_initialized", lambda: True)  # a running Ray: none started
    monkeypatch.setattr(bench_infer_ray, "actor_pool", lambda: (2, 0))
    monkeypatch.setattr(bench_infer_ray, "scorers", slow_start)
    monkeypatch.setattr(bench_infer_ray, "score_pass", score_pass)
    paths = [f"{i}.jpg" for i in range(10)]
    with bench_report.torch_threads(4):
        figures = bench_infer_ray.ray_predict_rate("fresh.pt", paths, {"batch_size": 4, "repeats": 3}, reference)
    assert figures.startup_s >= 0.6
    assert len(paths) / figures.rate < 0.3  # a pass's seconds: the start-up is not in them
    assert figures.rate > figures.reference > 0 and len(paths) / figures.reference >= 0.04
    # one warm-up batch per actor, then 3 rounds in the reference's batches of 4, alternating
    ray_pass = [4, 4, 2]
    assert passes == [[4, 4], "reference", ray_pass, ray_pass, "reference", "reference", ray_pass]
    assert started == [2]  # the reference's 4 threads shared by the 2 actors
    assert "median of 3 passes each" in figures.note and "batches of 4" in figures.note
    assert "torch threads: jobs.predict 4, 2 actor(s) x 2" in figures.note


@pytest.mark.parametrize("reference_threads", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("actors", [1, 2, 3, 16])
def test_the_actors_share_the_references_threads_at_least_one_each(reference_threads, actors):
    from jobs.bench_infer_ray import actor_threads

    share = actor_threads(reference_threads, actors)
    assert share >= 1
    if actors <= reference_threads:  # all of the reference's threads that divide evenly, never more
        assert reference_threads - actors < share * actors <= reference_threads
    else:  # more actors than threads: one each, as jobs.predict --ray gives them
        assert share == 1


def test_an_actor_scores_with_the_threads_it_is_given(monkeypatch):
    # the actor's class in this process (a Ray actor runs the same __init__): the model load is a stand-in
    import jobs.predict_ray
    from jobs import bench_infer_ray
    from trueface.predict import Predictor

    monkeypatch.setattr(jobs.predict_ray, "fetch_checkpoint", lambda location, cache_dir: location)
    monkeypatch.setattr(Predictor, "from_checkpoint", lambda *a, **k: "a predictor")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU the Scorer leaves threads alone
    with bench_report.torch_threads(1):
        for threads in (2, 1):
            actor = bench_infer_ray.WarmScorer("fresh.pt", threads)
            assert actor.ready() == threads and torch.get_num_threads() == threads


def test_the_threads_text_says_each_actors_threads():
    from jobs.bench_infer_ray import threads_text

    assert threads_text([2, 2, 2]) == "3 actor(s) x 2"
    assert threads_text([1, 2]) == "actors 1, 2"

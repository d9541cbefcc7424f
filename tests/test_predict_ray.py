"""jobs.predict --ray: Ray Data actors give the plain predictor's probabilities, a broken file is a
row with its error (never a failed job), and a bucket is read through pyarrow (moto's S3)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from jobs import predict as predict_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.checkpoint import save_checkpoint
from trueface.config import load_config, to_dict
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint
from trueface.model import build_model
from trueface.predict import Predictor, expand_inputs
from trueface.run import resolve_run
from trueface.thresholds import thresholds_path

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def scored(module_tmp):
    """A checkpoint with thresholds and temperatures beside it, a folder of 32 test images plus one
    broken file, and the plain predictor's scores of them."""
    tmp = module_tmp
    root = write_tiny_root(tmp / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)
    cfg, layout = resolve_run(load_config("demo", [*tiny_overrides(root, tmp), "eval.hflip_tta=true"]))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, weights="none"))
    ckpt = tmp / "runs" / "t" / "stage2" / "best.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "ema": model.state_dict(), "stage": 2, "config": to_dict(cfg)})
    evaluate_checkpoint(ckpt, layout, tmp / "results", thresholds=ThresholdRequest("valid", save=True))
    folder = tmp / "to-score"
    for p in sorted(root.glob("*/test/*/*.png")):
        target = folder / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    plain = {r.path: r for r in predictor.score(expand_inputs([folder]))}
    return {"ckpt": ckpt, "folder": folder, "plain": plain, "tmp": tmp, "threshold": predictor.threshold,
            "temperature": predictor.temperature}


def _check_rows(rows, scored, prefix: str = "") -> None:
    plain = scored["plain"]
    assert len(rows) == len(plain) == 33
    by_path = {r["path"]: r for r in rows}
    for path, want in plain.items():
        got = by_path[prefix + Path(path).relative_to(scored["folder"]).as_posix() if prefix else path]
        assert got["label"] == want.label and got["threshold"] == scored["threshold"]
        if want.error:
            assert got["p_generated"] is None and "broken.png" in got["error"] and "not an image" in got["error"]
            assert got["error"].split(": ", 1)[1] == want.error.split(": ", 1)[1]  # the predictor's reason
            continue
        assert got["error"] == "" and abs(got["p_generated"] - want.probability) < 1e-6
        assert abs(got["p_calibrated"] - want.calibrated) < 1e-6


@pytest.mark.timeout(300)
def test_ray_data_scores_a_folder_as_the_plain_predictor_does(ray_session, scored, capsys):
    out = scored["tmp"] / "preds.parquet"
    assert predict_job.main(["--ray", "--checkpoint", str(scored["ckpt"]), "--input", str(scored["folder"]),
                             "--out", str(out)]) == 1  # one unreadable file: reported, not a failed job
    rows = pq.read_table(out).to_pylist()
    _check_rows(rows, scored)
    err = capsys.readouterr().err
    assert "32 scored, 1 unreadable" in err and "img/s" in err


@pytest.mark.timeout(300)
def test_ray_data_reads_a_bucket_with_the_checkpoint_and_its_thresholds_in_it(s3_server, ray_session, scored,
                                                                             capsys):
    client = s3_server["client"]
    for path in expand_inputs([scored["folder"]]):
        key = f"faces/{path.relative_to(scored['folder']).as_posix()}"
        client.put_object(Bucket=s3_server["bucket"], Key=key, Body=path.read_bytes())
    ckpt, thresholds = scored["ckpt"], thresholds_path(scored["ckpt"])
    for local in (ckpt, thresholds):  # the run as the pipeline leaves it in a bucket
        client.put_object(Bucket=s3_server["bucket"], Key=f"runs/t/stage2/{local.name}", Body=local.read_bytes())
    out = scored["tmp"] / "bucket.parquet"
    # The suite's Ray started after the local S3 put its credentials in the environment: its workers
    # have them from the environment alone, as a cluster's workers do (nothing passes them along).
    assert predict_job.main(["--ray", "--checkpoint", "s3://trueface-test/runs/t/stage2/best.pt", "--input",
                             "s3://trueface-test/faces/", "--out", str(out)]) == 1
    # the bucket's thresholds file labels and calibrates the rows, as the local one does the plain
    # predictor's: read alone, the checkpoint gave a temperature of 1 (p_calibrated = p_generated)
    assert scored["temperature"] != pytest.approx(1.0)
    _check_rows(pq.read_table(out).to_pylist(), scored, prefix="s3://trueface-test/faces/")
    err = capsys.readouterr().err
    assert f"labelling at {scored['threshold']:.4f}: the ema weights' " in err and "p_calibrated: temperature " in err
    # the plain predictor takes the bucket's checkpoint the same way
    table = scored["tmp"] / "bucket.csv"
    assert predict_job.main(["--checkpoint", "s3://trueface-test/runs/t/stage2/best.pt", str(scored["folder"]),
                             "--out", str(table)]) == 1
    plain = {r["path"]: r for r in csv.DictReader(table.open())}
    assert all(float(r["temperature"]) == pytest.approx(scored["temperature"]) for r in plain.values())
    for path, want in scored["plain"].items():
        if not want.error:
            assert abs(float(plain[str(path)]["p_calibrated"]) - want.calibrated) < 1e-6


def test_ray_arguments_are_checked(scored):
    with pytest.raises(SystemExit):
        predict_job.main(["--ray", "--checkpoint", str(scored["ckpt"]), str(scored["folder"])])
    with pytest.raises(SystemExit, match="not a folder"):
        predict_job.main(["--ray", "--checkpoint", str(scored["ckpt"]), "--input", str(scored["tmp"] / "nowhere"),
                          "--out", str(scored["tmp"] / "x.parquet")])
    assert not (scored["tmp"] / "x.parquet").exists()


def test_a_device_torch_cannot_use_is_named_before_anything_loads(tmp_path, capsys):
    import torch

    cases = [("gpu", "'gpu' is not auto, cpu, cuda or cuda:N"), ("cuda:x", "is not auto, cpu, cuda")]
    if not torch.cuda.is_available():  # make test hides a GPU
        cases.append(("cuda", "--device cuda: torch sees no CUDA device here; use auto or cpu"))
    for device, why in cases:
        with pytest.raises(SystemExit):
            predict_job.main(["--checkpoint", str(tmp_path / "none.pt"), "--device", device, str(tmp_path)])
        assert why in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_infer_benchmark_ray_row_times_warm_actors_beside_the_predictor(ray_session, tmp_path, monkeypatch):
    import json
    import time

    from jobs import bench_infer_ray, benchmark

    passes, real = [], bench_infer_ray.score_pass
    monkeypatch.setattr(bench_infer_ray, "score_pass", lambda actors, batches: passes.append(
        (len(actors), [[Path(p) for p in b] for b in batches])) or real(actors, batches))
    assert benchmark.main(["infer", "--quick", "--images", "3", "--ray", "--results-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench-infer" / "bench.json").read_text())
    rows = payload["rows"]
    assert [r["what"] for r in rows] == ["jobs.predict vs naive per-image predictor",
                                         "jobs.predict --ray actors (warm) vs jobs.predict",
                                         "jobs.predict --ray actors start-up"]
    # the reference beside the actors is timed in their rounds (alternating), not taken from the first row
    assert rows[1]["reference"] > 0 and rows[1]["project"] > 0 and "alternating with jobs.predict's" in rows[1]["note"]
    assert "torch threads: jobs.predict" in rows[1]["note"]
    assert "(0 unreadable)" in rows[1]["note"] and "Ray was running already" in rows[1]["note"]
    startup = rows[2]
    assert startup["unit"] == "s" and startup["lower_is_better"] and startup["project"] > 0 and startup["target"] is None
    # one warm-up batch per actor, then the reference's passes over the same files at its batch size
    (actors, warm), *timed = passes
    assert actors >= 1 and len(warm) == actors and len(timed) == payload["context"]["repeats"]
    batch = payload["context"]["batch"]
    for _, batches in timed:
        assert [p for b in batches for p in b] == [p for b in timed[0][1] for p in b] and len(batches[0]) == min(batch, 3)
    assert len({p for b in timed[0][1] for p in b}) == 3
    # the actors were killed, so the session's Ray has their CPUs back (their exit takes a moment)
    from ray.util.state import list_actors

    deadline = time.monotonic() + 20
    while list_actors(filters=[("class_name", "=", "WarmScorer"), ("state", "=", "ALIVE")]):
        assert time.monotonic() < deadline, "the benchmark's actors are still alive"
        time.sleep(0.5)

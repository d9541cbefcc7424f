"""A run's record (runs/<name>/config.yaml, manifest.parquet) and the checks before a job writes
anything: a rerun with other training settings is refused, empty flags and folders under a file
are named. No Ray: the pipeline is stopped where it would start Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides, write_tiny_root
from trueface.config import load_config

DOMAINS = {"140k-real-vs-fake": "upper", "dalle": "lower"}


class RayReached(Exception):
    """The pipeline got past every check and would start Ray now."""


@pytest.fixture
def pipeline(monkeypatch):
    from jobs import pipeline

    def stop(*args, **kwargs):
        raise RayReached

    monkeypatch.setattr(pipeline, "init_ray", stop)
    return pipeline


@pytest.fixture
def run_args(tmp_path: Path) -> list[str]:
    root = write_tiny_root(tmp_path / "data", DOMAINS)
    return [*tiny_overrides(root, tmp_path, "rec"), f"data.cache_dir={tmp_path / 'cache'}"]


def _record(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "manifest.parquet")}


def _finish(stage_dir: Path) -> None:
    """What a finished stage leaves for the pipeline to skip it (trueface.checkpoint.finished_stage)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "last.pt").write_bytes(b"")
    (stage_dir / "stage.json").write_text(json.dumps({
        "stage": int(stage_dir.name[-1]), "best_select_auc_ema": 0.9, "best_epoch": 1, "epochs_run": 2,
        "stopped_early": False, "best_checkpoint": str(stage_dir / "best.pt"),
        "last_checkpoint": str(stage_dir / "last.pt"), "select_on": "mean_domain"}))


# --- which changes a started run refuses ------------------------------------------------------

def test_training_changes_refuse_data_model_and_started_stages_only():
    from trueface.run import config_changes, training_changes

    def refused(old, new, started):  # as the pipeline asks: every difference once, then the refused ones
        return training_changes(config_changes(old, new), started)

    old = load_config("demo")
    new = load_config("demo", ["data.root=/elsewhere", "model.dropout=0.5", "stage1.lr=0.01", "stage2.lr=0.01",
                               "scaling.num_workers=2", "runtime.log_every=1", "eval.threshold_policy=max_f1",
                               "output.results_dir=/r", "data.loader_workers=0"])
    assert refused(old, new, {}) == []  # nothing trained yet: the record may describe the new settings
    assert refused(old, new, {1: True}) == [
        "data.root: '' -> '/elsewhere'", "model.dropout: 0.7 -> 0.5", "stage1.lr: 0.001 -> 0.01"]
    # an interrupted stage may go on longer (the documented resume), not with another recipe
    longer = load_config("demo", ["stage1.epochs=6", "stage1.patience=3"])
    assert refused(old, longer, {1: False}) == []
    assert refused(old, longer, {1: True}) == ["stage1.epochs: 4 -> 6", "stage1.patience: 2 -> 3"]
    # what picks best.pt and stops early is part of the recipe
    assert refused(old, load_config("demo", ["eval.select_on=pooled"]), {1: False}) == [
        "eval.select_on: 'mean_domain' -> 'pooled'"]


# --- the pipeline ---------------------------------------------------------------------------

def test_a_rerun_with_other_data_is_refused_before_the_record_is_rewritten(pipeline, run_args, tmp_path, capsys):
    with pytest.raises(RayReached):
        pipeline.main(run_args)
    run = tmp_path / "runs" / "rec"
    _finish(run / "stage1")
    before = _record(run)
    other = write_tiny_root(tmp_path / "other", {**DOMAINS, "tpdne": "lower"})
    with pytest.raises(SystemExit) as exc:
        pipeline.main([*run_args, f"data.root={other}", "stage2.lr=0.01"])
    message = str(exc.value)
    assert f"run rec in {run} already has stage 1 (finished)" in message
    assert f"data.root: '{tmp_path / 'data'}' -> '{other}'" in message
    assert "stage2" not in message  # Stage II never started: its settings may change
    assert "--run-name NAME" in message and f"remove {run}" in message
    assert _record(run) == before
    assert not (tmp_path / "results" / "rec" / "data-check" / "report.md").read_text().count(str(other))
    # the same settings resume, and so do changes that decide nothing the checkpoints learnt
    with pytest.raises(RayReached):
        pipeline.main([*run_args, "runtime.log_every=3", "stage2.lr=0.01"])
    assert "resuming with:\n  stage2.lr: 0.001 -> 0.01\n  runtime.log_every: 1 -> 3" in capsys.readouterr().err


def test_the_same_images_at_another_root_resume_and_changed_ones_are_named(pipeline, run_args, tmp_path, capsys):
    """The data mounted elsewhere (a new cluster, a restored bucket) is the same data: the run resumes
    and its record follows the new root. Changed bytes, or an image under the other label, are not."""
    import shutil

    import pyarrow.parquet as pq

    with pytest.raises(RayReached):
        pipeline.main(run_args)
    run = tmp_path / "runs" / "rec"
    _finish(run / "stage1")
    moved = tmp_path / "mounted" / "elsewhere"
    shutil.copytree(tmp_path / "data", moved)
    with pytest.raises(RayReached):
        pipeline.main([*run_args, f"data.root={moved}"])
    assert (f"resuming with:\n  data.root: '{tmp_path / 'data'}' -> '{moved}' (the same 48 images, by sha1)"
            in capsys.readouterr().err)
    paths = pq.read_table(run / "manifest.parquet").column("path").to_pylist()
    assert len(paths) == 48 and all(p.startswith(str(moved)) for p in paths)

    # back at the first root (the record now says `moved`), one image's bytes changed and one moved
    # to the other label: refused, each named with an example path
    data = tmp_path / "data"
    changed = sorted((data / "dalle" / "train" / "fake").glob("*.png"))[0]
    changed.write_bytes(changed.read_bytes() + b"\0")
    relabelled = sorted((data / "dalle" / "valid" / "real").glob("*.png"))[0]
    relabelled.rename(data / "dalle" / "valid" / "fake" / "relabelled.png")
    before = _record(run)
    with pytest.raises(SystemExit) as exc:
        pipeline.main(run_args)
    message = str(exc.value)
    assert f"data.root: '{moved}' -> '{data}'" in message
    assert "2 images the run trained on are not in the new root (e.g. " in message
    assert "2 images in the new root are not in the run's manifest (e.g. " in message
    gone = message.split("not in the new root (e.g. ", 1)[1].split(")", 1)[0]
    assert gone in {str(moved / changed.relative_to(data)), str(moved / relabelled.relative_to(data))}
    assert "dalle/valid/fake/relabelled.png)" in message or "dalle/train/fake/dalle_train_0.png)" in message
    assert _record(run) == before


def test_image_differences_name_images_that_changed_role_or_bytes():
    import pyarrow as pa

    from trueface.run import image_differences

    def table(*rows):
        return pa.table({k: [r[i] for r in rows] for i, k in enumerate(("path", "domain", "split", "label", "sha1"))})

    saved = table(("/old/a/train/real/1.png", "a", "train", 0, "s1"), ("/old/a/train/fake/2.png", "a", "train", 1, "s2"))
    assert image_differences(saved, table(("/new/a/train/fake/2.png", "a", "train", 1, "s2"),
                                          ("/new/a/train/real/1.png", "a", "train", 0, "s1"))) == ""
    swapped = table(("/new/a/train/fake/1.png", "a", "train", 1, "s1"), ("/new/a/train/real/2.png", "a", "train", 0, "s2"))
    assert image_differences(saved, swapped) == (
        "the same images, but 2 of them under another domain, split or label (e.g. /new/a/train/fake/1.png: "
        "a/train/real in the run, a/train/fake now; a root without domain folders is one domain named after its folder)")
    renamed = table(("/new/b/train/real/1.png", "b", "train", 0, "s1"), ("/new/b/train/fake/2.png", "b", "train", 1, "s2"))
    assert "2 of them under another domain, split or label (e.g. /new/b/train/real/1.png: a/train/real in the run, " \
           "b/train/real now" in image_differences(saved, renamed)
    # a file the run held in two domains (allowed, with a warning) that kept both is not named; the
    # one that moved is, with the role it had
    twice = table(("/old/a/train/real/1.png", "a", "train", 0, "s1"), ("/old/b/train/real/1.png", "b", "train", 0, "s1"),
                  ("/old/a/train/fake/2.png", "a", "train", 1, "s2"))
    one_moved = table(("/new/a/train/real/1.png", "a", "train", 0, "s1"), ("/new/b/train/real/1.png", "b", "train", 0, "s1"),
                      ("/new/a/valid/fake/2.png", "a", "valid", 1, "s2"))
    assert image_differences(twice, one_moved).startswith(
        "the same images, but 1 of them under another domain, split or label (e.g. /new/a/valid/fake/2.png: "
        "a/train/fake in the run, a/valid/fake now;")
    both_moved = table(("/new/c/train/real/1.png", "c", "train", 0, "s1"), ("/new/b/train/real/1.png", "b", "train", 0, "s1"),
                       ("/new/a/train/fake/2.png", "a", "train", 1, "s2"))
    assert "but 1 of them under another domain, split or label (e.g. /new/c/train/real/1.png: a/train/real in the run, " \
           "c/train/real now;" in image_differences(twice, both_moved)
    changed = table(("/new/a/train/real/1.png", "a", "train", 0, "s1"), ("/new/a/train/fake/2.png", "a", "train", 1, "s3"))
    assert image_differences(saved, changed) == (
        "1 images the run trained on are not in the new root (e.g. /old/a/train/fake/2.png); "
        "1 images in the new root are not in the run's manifest (e.g. /new/a/train/fake/2.png)")


def test_a_run_recorded_without_sha1_is_not_resumed_from_another_root(pipeline, run_args, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    with pytest.raises(RayReached):
        pipeline.main(run_args)
    run = tmp_path / "runs" / "rec"
    _finish(run / "stage1")
    manifest = pq.read_table(run / "manifest.parquet")
    pq.write_table(manifest.drop(["sha1"]), run / "manifest.parquet")  # an older record
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    with pytest.raises(SystemExit, match=r"\(data.root: the run's manifest.parquet does not record every image's sha1"):
        pipeline.main([*run_args, f"data.root={tmp_path / 'moved'}"])


def test_the_synthetic_set_rebuilt_in_another_cache_resumes(pipeline, tmp_path, capsys):
    """The synthetic set's root lies in data.cache_dir: another cache folder rebuilds the same images."""
    synthetic = ["--config", "demo", "data.synthetic.train_per_class=4", "data.synthetic.valid_per_class=1",
                 "data.synthetic.test_per_class=1", "data.synthetic.image_size=16",
                 *[o for o in tiny_overrides(tmp_path / "unused", tmp_path, "syn") if not o.startswith("data.root")]]
    with pytest.raises(RayReached):
        pipeline.main([*synthetic, f"data.cache_dir={tmp_path / 'cache-a'}"])
    _finish(tmp_path / "runs" / "syn" / "stage1")
    with pytest.raises(RayReached):
        pipeline.main([*synthetic, f"data.cache_dir={tmp_path / 'cache-b'}"])
    import re

    assert re.search(r"resuming with:\n  data.root: '\S+/cache-a/\S+' -> '\S+/cache-b/\S+' \(the same 36 images, by sha1\)",
                     capsys.readouterr().err)


def test_an_interrupted_stage_may_run_longer_but_not_with_another_recipe(pipeline, run_args, tmp_path):
    with pytest.raises(RayReached):
        pipeline.main(run_args)
    (tmp_path / "runs" / "rec" / "stage1").mkdir()
    (tmp_path / "runs" / "rec" / "stage1" / "last.pt").write_bytes(b"")
    with pytest.raises(RayReached):
        pipeline.main([*run_args, "stage1.epochs=3"])
    with pytest.raises(SystemExit, match=r"stage 1 \(interrupted: last.pt\).*\n  stage1.lr: 0.001 -> 0.002"):
        pipeline.main([*run_args, "stage1.epochs=3", "stage1.lr=0.002"])
    with pytest.raises(SystemExit, match=r"\n  model.arch: 'resnet18' -> 'resnet50'"):
        pipeline.main([*run_args, "--dry-run", "stage1.epochs=3", "model.arch=resnet50"])  # a dry run says so too


def test_empty_flags_are_refused_not_read_as_their_default(pipeline, capsys):
    with pytest.raises(SystemExit, match=r"--run-name is empty \(an unset variable\?\)"):
        pipeline.main(["--dry-run", "--run-name", ""])
    with pytest.raises(SystemExit):
        pipeline.main(["--dry-run", "--storage", " "])
    assert "argument --storage: is empty (an unset variable?)" in capsys.readouterr().err


def test_folders_under_a_file_are_named_before_any_work(pipeline, run_args, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit, match=rf"config error:\n  data.cache_dir {afile}/cache: {afile} is a file"):
        pipeline.main([*run_args, "--dry-run", f"data.cache_dir={afile}/cache"])
    with pytest.raises(SystemExit, match=rf"config error:\n  output.runs_dir {afile}/runs: {afile} is a file"):
        pipeline.main([*run_args, f"output.runs_dir={afile}/runs"])
    assert not (tmp_path / "cache").exists()  # refused before the data check


# --- jobs.evaluate --------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path: Path, run_args) -> Path:
    from trueface.checkpoint import save_checkpoint
    from trueface.config import to_dict

    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": {}, "ema": {}, "stage": 1, "config": to_dict(load_config("demo", run_args))})
    return path


def test_evaluate_refuses_an_out_that_is_a_file_before_scoring(checkpoint, tmp_path, monkeypatch):
    from jobs import evaluate

    monkeypatch.setattr(evaluate, "checked_test_root", lambda *a: pytest.fail("scored before --out was checked"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=rf"error: --out {tmp_path / 'afile'} is a file: give a folder"):
        evaluate.main(["--no-ray", "--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "data"),
                       "--out", str(tmp_path / "afile"), "--threshold-from", "valid", "--save-thresholds"])


@pytest.mark.parametrize("flag", ["--out", "--checkpoint", "--data-root", "--test-domains"])
def test_evaluate_refuses_empty_flags(flag, checkpoint, tmp_path, capsys, monkeypatch):
    from jobs import evaluate

    # --test-domains "" once meant every domain: the run would go on, scoring them all
    monkeypatch.setattr(evaluate, "checked_test_root", lambda *a: pytest.fail(f"{flag} '' was taken for a default"))
    args = {"--checkpoint": str(checkpoint), "--data-root": str(tmp_path / "data"), "--out": str(tmp_path / "out"),
            "--test-domains": "dalle"}
    args[flag] = ""
    with pytest.raises(SystemExit):
        evaluate.main(["--no-ray", *[x for pair in args.items() for x in pair]])
    assert f"argument {flag}: is empty (an unset variable?)" in capsys.readouterr().err


def test_evaluate_refuses_test_domains_that_name_no_domain(checkpoint, tmp_path, capsys, monkeypatch):
    from jobs import evaluate

    monkeypatch.setattr(evaluate, "checked_test_root", lambda *a: pytest.fail("' , ' was taken for every domain"))
    with pytest.raises(SystemExit):
        evaluate.main(["--no-ray", "--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "data"),
                       "--test-domains", " , "])
    assert "--test-domains ' , ' names no domain" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--components", "--name", "--spec", "--init", "--storage", "--resume"])
def test_ablate_refuses_empty_flags(flag, capsys, monkeypatch):
    from jobs import ablate

    # --components "" once ablated every component, --name "" took abl-<date>, --spec "" the shipped spec
    monkeypatch.setattr(ablate, "_new_job", lambda *a, **k: pytest.fail(f"{flag} '' was taken for a default"))
    with pytest.raises(SystemExit):
        ablate.main(["--dry-run", flag, ""])
    assert f"argument {flag}: is empty (an unset variable?)" in capsys.readouterr().err


def test_evaluate_refuses_a_domain_listed_twice(checkpoint, tmp_path, capsys):
    from jobs import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--no-ray", "--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "data"),
                       "--test-domains", "dalle,140k-real-vs-fake,dalle"])
    assert "--test-domains lists dalle more than once" in capsys.readouterr().err

"""The data check on a corpus of every bad and odd input: each named, the policy obeyed, nothing lost.

One corpus (tests/data_corpus.py) and one scan are shared by the module's tests; training under
``data.on_bad_image=skip`` runs one short Stage I on it, to show a bad file never reaches an epoch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import trueface.data.scan as scan_module
from tests.conftest import MINI_140K, REPO, tiny_overrides
from tests.data_corpus import write_corpus
from trueface.config import load_config
from trueface.data.check import DataCheckError, _duplicate_findings, scan_and_check
from trueface.data.report import write_report
from trueface.run import RunPaths, describe_plan, prepare_run, resolve_layout

CROP = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    built = write_corpus(tmp / "root")
    yield built
    os.chmod(built.root / "faces/train/real/noperm.jpg", 0o644)  # let pytest clean up


def _cfg(corpus, tmp: Path, *extra: str):
    return load_config("demo", tiny_overrides(corpus.root, tmp, "corpus") + [
        f"data.cache_dir={tmp / 'cache'}", f"stage1.image_size={CROP}", f"stage2.image_size={CROP}",
        "stage1.domains=[faces]", "stage2.domains=[faces]", "data.test_domains=[faces]", *extra])


@pytest.fixture(scope="module")
def unreadable(corpus):
    """As root (CI containers), chmod 000 does not stop reading: make the scan's open refuse instead."""
    target = str(corpus.root / "faces/train/real/noperm.jpg")
    if os.geteuid() != 0:
        yield
        return
    real_open = open

    def guarded(path, *args, **kw):
        if str(path) == target:
            raise PermissionError(13, "Permission denied", target)
        return real_open(path, *args, **kw)

    scan_module.open = guarded
    yield
    del scan_module.open


@pytest.fixture(scope="module")
def checked(corpus, unreadable, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    cfg, layout = resolve_layout(_cfg(corpus, tmp))
    return cfg, layout, scan_and_check(layout, cfg, progress=False), tmp


def test_every_bad_file_is_named_with_its_problem(corpus, checked):
    _, _, check, _ = checked
    errors = {f.path: f.problem for f in check.errors}
    for rel, words in corpus.errors.items():
        assert rel in errors, f"{rel} ({words}) not reported; errors: {sorted(errors)}"
        assert words.lower() in errors[rel].lower(), f"{rel}: {errors[rel]!r} does not say {words!r}"
    # Nothing healthy is called bad: every error is a planted one.
    assert set(errors) == set(corpus.errors), sorted(set(errors) - set(corpus.errors))


def test_layout_problems_and_warnings_are_reported(corpus, checked):
    _, _, check, _ = checked
    found = {f.path: f.problem for f in check.findings}
    for rel, words in {**corpus.layout_problems, **corpus.warnings}.items():
        assert rel in found and words in found[rel], f"{rel}: expected {words!r}, got {found.get(rel)!r}"


def test_valid_oddities_are_converted_not_errors(corpus, checked):
    _, _, check, _ = checked
    rows = {r["relpath"]: r for r in check.rows}
    for rel, words in corpus.oddities.items():
        assert rows[rel]["error"] == "", f"{rel}: {rows[rel]['error']}"
        assert words in rows[rel]["warning"], f"{rel}: {rows[rel]['warning']!r}"
    assert rows["faces/train/fake/cmyk.jpg"]["format"] == "JPEG" and rows["faces/train/fake/cmyk.jpg"]["jpeg_quality"] == 90
    assert sum(check.oddities.values()) == len(corpus.oddities)


def test_error_policy_stops_before_training_with_the_summary(corpus, checked, tmp_path):
    with pytest.raises(DataCheckError) as err:
        prepare_run(_cfg(corpus, checked[3]), progress=False)
    text = str(err.value)
    assert "stopping (data.on_bad_image=error)" in text and "faces/train/real/truncated.jpg" in text
    assert f"{len(corpus.errors)} errors" in text


def test_skip_policy_leaves_bad_files_out_and_shows_counts_after(corpus, checked):
    cfg_asked = _cfg(corpus, checked[3], "data.on_bad_image=skip")
    prepared = prepare_run(cfg_asked, progress=False)
    assert set(prepared.cfg.data.exclude) == corpus.excluded
    used = {prepared.layout.relpath(s.path) for s in prepared.layout.all_samples()}
    assert not used & set(corpus.errors)
    assert "faces/test/real/leak.jpg" in used  # the test copy of a train/test duplicate stays
    # The plan's counts are those after skipping, and say so.
    plan = describe_plan(prepared.cfg, prepared.layout, RunPaths.of(prepared.cfg), prepared.check)
    counts = prepared.layout.counts()["faces"]["train"]
    assert "after the data check" in plan and f"train {counts['real']}/{counts['fake']}" in plan
    assert f"left out {len(corpus.excluded)} files" in plan
    before = prepared.check.counts_before["faces"]["train"]
    assert before["real"] - counts["real"] == sum(1 for p in corpus.excluded if p.startswith("faces/train/real/"))


def test_report_names_every_file(corpus, checked, tmp_path):
    _, _, check, _ = checked
    files = write_report(check, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    for rel in corpus.errors:
        assert rel in text, rel
    table = pq.read_table(tmp_path / "report" / "images.parquet")
    assert table.num_rows == len(check.rows) and "sha1" in table.column_names
    assert all(p.is_file() for p in files)


def test_report_docs_match_what_is_written(checked, tmp_path):
    """The plot names the module promises are those written; exact copies inside one cell are
    listed (the corpus has none, so one is added) and the report says so."""
    import trueface.data.report as report_module
    from trueface.data.leakage import LeakPair

    _, _, check, _ = checked
    files = write_report(check, tmp_path / "report")
    plots = [p.name for p in files if p.suffix == ".png"]
    assert plots and all(n.startswith("shortcuts_") for n in plots) and "shortcuts_<domain>.png" in report_module.__doc__
    twin = LeakPair("exact", "faces/train/real/a.png", "faces/train/real/b.png", 0, "faces", "train", 0, "faces", "train", 0)
    text = "\n".join(report_module._leak_section([twin]))
    assert "faces/train/real/b.png" in text and "exact copies" in text and "listed even there" in text


def test_rescan_reads_the_cache_and_notices_a_changed_file(corpus, checked, monkeypatch):
    cfg, layout, check, _ = checked
    calls = []
    monkeypatch.setattr(scan_module, "inspect_image", lambda *a: calls.append(a) or {})
    again = scan_and_check(layout, cfg, progress=False)
    assert calls == [] and [r["sha1"] for r in again.rows] == [r["sha1"] for r in check.rows]
    monkeypatch.undo()
    victim = corpus.root / "faces/valid/real/valid_real_0.jpg"
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rescanned = []
    real = scan_module.inspect_image
    monkeypatch.setattr(scan_module, "inspect_image", lambda *a: rescanned.append(a[0]) or real(*a))
    scan_and_check(layout, cfg, progress=False)
    assert rescanned == [str(victim)]
    # a chmod changes neither size nor mtime: a file made unreadable, or readable again, is read again
    other = corpus.root / "faces/valid/real/valid_real_1.jpg"
    other.chmod(other.stat().st_mode)
    rescanned.clear()
    scan_and_check(layout, cfg, progress=False)
    assert rescanned == [str(other)]


def _copy(domain: str, split: str) -> dict:
    return {"relpath": f"{domain}/{split}/real/x.png", "domain": domain, "split": split, "label": 0, "sha1": "abc",
            "error": ""}


@pytest.mark.parametrize("copies,warned", [
    ([("A", "test"), ("B", "test")], "A/test/real/x.png"),
    ([("A", "train"), ("A", "test"), ("B", "test")], "A/test/real/x.png"),  # the train copy is left out
    ([("A", "train"), ("B", "train"), ("C", "test")], None),  # left: the test copy alone
    ([("A", "train"), ("B", "test"), ("A", "test")], "B/test/real/x.png"),
])
def test_copies_kept_in_several_domains_are_warned_of_once(copies, warned):
    findings = _duplicate_findings([_copy(d, s) for d, s in copies])
    errors = [f.path for f in findings if f.severity == "error"]
    assert errors == [f"{d}/{s}/real/x.png" for d, s in copies if s == "train"]  # the leaked copies
    warnings = [(f.path, f.problem) for f in findings if f.severity == "warning"]
    others = [f"{d}/{s}/real/x.png" for d, s in copies if s == "test" and f"{d}/{s}/real/x.png" != warned]
    assert warnings == ([(warned, "the same file is in several domains: " + ", ".join(others))] if warned else [])


@pytest.mark.parametrize("names,split,warned", [
    (["x.png", "y.png"], "test", "the same file is also in this folder: A/test/real/y.png "
                                 "(the image counts 2 times in the test metrics)"),
    (["x.png", "y.png", "z.png"], "train", "the same file is also in this folder: A/train/real/y.png, "
                                           "A/train/real/z.png (the image counts 3 times in train/)"),
])
def test_copies_inside_one_folder_are_a_warning_naming_every_copy(names, split, warned):
    rows = [_copy("A", split) | {"relpath": f"A/{split}/real/{n}"} for n in names]
    findings = _duplicate_findings(rows)
    assert [(f.path, f.severity, f.problem) for f in findings] == [(f"A/{split}/real/x.png", "warning", warned)]


def test_copies_inside_one_folder_of_a_split_left_out_are_not_warned_of():
    # the two train copies leak test/ into train/: both are errors (left out), so no folder warning
    rows = [_copy("A", "train"), _copy("A", "train") | {"relpath": "A/train/real/y.png"}, _copy("A", "test")]
    assert [(f.path, f.severity) for f in _duplicate_findings(rows)] == [("A/train/real/x.png", "error"),
                                                                         ("A/train/real/y.png", "error")]


def test_a_resaved_copy_in_the_same_test_folder_is_warned_of_and_kept(tmp_path):
    from PIL import Image, PngImagePlugin

    from tests.conftest import write_tiny_root
    from trueface.data.check import check_data
    from trueface.data.layout import discover_layout
    from trueface.data.scan import scan_layout

    root = write_tiny_root(tmp_path / "cell", {"": "lower"}, per_class=3, size=48)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "re-saved")
    with Image.open(root / "test/real/x_test_0.png") as img:
        img.save(root / "test/real/x_test_0_resaved.png", pnginfo=info, compress_level=9)
    layout = discover_layout(root)
    cfg = load_config("demo", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    check = check_data(layout, scan_layout(layout, None, workers=1, progress=False), cfg)
    copies = [(f.path, f.severity, f.problem) for f in check.findings if "this folder" in f.problem]
    assert copies == [("test/real/x_test_0.png", "warning", "the same image (identical pixels) is also in this "
                       "folder: test/real/x_test_0_resaved.png (the image counts 2 times in the test metrics)")]
    assert check.excluded == () and not check.blocking


def test_a_mirrored_near_duplicate_is_called_a_mirror_image_in_its_warning_and_the_summary(tmp_path):
    """The report and leakage.csv said a near pair was mirrored; the warning and the printed summary
    did not, so a flipped copy read like any chance look-alike. A plain re-encode is not called one."""
    from PIL import Image, ImageOps

    from tests.conftest import write_tiny_root
    from trueface.data.check import check_data
    from trueface.data.layout import discover_layout
    from trueface.data.scan import scan_layout

    root = write_tiny_root(tmp_path / "flip", {"": "lower"}, per_class=2, size=48)
    rng = np.random.default_rng(11)
    for k, name in enumerate(("face", "other")):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        picture = coarse.resize((64, 64), Image.Resampling.BICUBIC)
        picture.save(root / f"train/real/{name}.png")
        (ImageOps.mirror(picture) if k == 0 else picture).save(root / f"test/fake/{name}_copy.jpg", quality=75)
    layout = discover_layout(root)
    cfg = load_config("demo", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                               "stage1.image_size=32", "stage2.image_size=32"])
    check = check_data(layout, scan_layout(layout, None, workers=1, progress=False), cfg)
    assert sorted((p.b, p.mirrored) for p in check.leaks) == [("test/fake/face_copy.jpg", True),
                                                              ("test/fake/other_copy.jpg", False)]
    near = {f.path: f.problem for f in check.warnings if f.problem.startswith("near duplicate")}
    assert near["train/real/face.png"].startswith("near duplicate, mirrored left to right (perceptual hash distance ")
    assert near["train/real/face.png"].endswith(
        "to its mirror image), of test/fake/face_copy.jpg, across split and label")
    assert "mirror" not in near["train/real/other.png"]
    first = check.summary().splitlines()[0]
    assert first.endswith("2 cross-split and 2 cross-label duplicate pairs; mirror images (flipped left to right): "
                          "1 near-duplicate pair")


def _pixel_copy_root(tmp_path: Path, other_label: bool) -> tuple[Path, dict]:
    """A tiny root plus one picture saved three ways: same pixels, different bytes each time."""
    from PIL import Image, PngImagePlugin

    from tests.conftest import write_tiny_root

    root = write_tiny_root(tmp_path / "pix", {"": "lower"}, per_class=3, size=48)
    rng = np.random.default_rng(7)
    picture = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((48, 48), Image.Resampling.BICUBIC)
    picture.save(root / "test/real/face.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "re-saved")
    picture.save(root / "train/real/face_resaved.png", pnginfo=info, compress_level=9)  # metadata added
    paths = {"test": "test/real/face.png", "train": "train/real/face_resaved.png"}
    if other_label:
        picture.save(root / "valid/fake/face_relabelled.png", compress_level=1)
        paths["other"] = "valid/fake/face_relabelled.png"
    return root, paths


@pytest.mark.parametrize("other_label", [False, True])
def test_pixel_identical_copies_with_other_bytes_count_as_copies(tmp_path, other_label):
    """A re-saved PNG (other bytes, same pixels) leaks exactly as a byte copy does: an error, left
    out under skip; under the other label every copy is an error."""
    from trueface.data.check import check_data
    from trueface.data.layout import discover_layout
    from trueface.data.scan import scan_layout

    root, paths = _pixel_copy_root(tmp_path, other_label)
    assert len({hashlib.sha1((root / p).read_bytes()).hexdigest() for p in paths.values()}) == len(paths)
    cfg = load_config("demo", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.on_bad_image=skip",
                               "stage1.image_size=32", "stage2.image_size=32"])
    layout = discover_layout(root)
    rows = scan_layout(layout, tmp_path / "scan.parquet", workers=1, progress=False)
    by_path = {r["relpath"]: r for r in rows}
    assert len({by_path[p]["pixel_sha1"] for p in paths.values()}) == 1 and by_path[paths["test"]]["pixel_sha1"]
    check = check_data(layout, rows, cfg)
    errors = {f.path: f.problem for f in check.errors}
    if other_label:
        assert set(errors) == set(paths.values()) == set(check.excluded)
        assert all("identical pixels" in e and "also labelled" in e for e in errors.values())
    else:
        assert set(errors) == {paths["train"]} and check.excluded == (paths["train"],)
        assert "also in test/" in errors[paths["train"]] and "identical pixels" in errors[paths["train"]]
    # judged once, as a copy, not also warned of as a near duplicate
    assert not [f for f in check.warnings if f.path in paths.values()]
    # the digest survives the scan's cache
    cached = scan_layout(layout, tmp_path / "scan.parquet", workers=1, progress=False)
    assert [r["pixel_sha1"] for r in cached] == [r["pixel_sha1"] for r in rows]


def test_pixel_digest_is_the_decoded_picture_not_the_file(tmp_path):
    from PIL import Image

    from trueface.data.scan import inspect_image

    img = Image.new("RGB", (40, 30), (10, 200, 30))
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png", compress_level=0)
    Image.new("RGB", (30, 40), (10, 200, 30)).save(tmp_path / "c.png")  # same bytes of pixels, other shape
    a, b, c = (inspect_image(str(tmp_path / n)) for n in ("a.png", "b.png", "c.png"))
    assert a["sha1"] != b["sha1"] and a["pixel_sha1"] == b["pixel_sha1"] != c["pixel_sha1"]


def test_mpo_phone_jpeg_gets_its_quality(tmp_path):
    """PIL opens a phone's multi-picture JPEG as MPO: its quantisation tables still give the quality."""
    from PIL import Image

    from trueface.data.scan import inspect_image

    a, b = Image.new("RGB", (64, 64), (200, 120, 90)), Image.new("RGB", (64, 64), (20, 60, 90))
    a.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[b], quality=85)
    row = inspect_image(str(tmp_path / "phone.jpg"))
    assert row["format"] == "MPO" and row["jpeg_quality"] == 85 and row["error"] == ""


def test_training_under_skip_never_meets_a_bad_file(corpus, checked):
    from trueface.train import run_stage

    prepared = prepare_run(_cfg(corpus, checked[3], "data.on_bad_image=skip", "stage1.epochs=1"), progress=False)
    cfg, layout = prepared.cfg, prepared.layout
    result = run_stage(cfg, 1, layout.gather(["faces"], "train"), layout.gather(["faces"], "valid"),
                       checked[3] / "stage1")
    assert result.epochs_run == 1


def test_check_data_cli_exit_status_and_report(corpus, checked, tmp_path):
    cmd = [sys.executable, "-m", "jobs.check_data", "--data-root", str(corpus.root), "--out", str(tmp_path / "r"),
           f"data.cache_dir={checked[3] / 'cache'}"]
    stopped = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 1, stopped.stderr
    assert "faces/train/fake/zero.jpg" in stopped.stdout and (tmp_path / "r" / "report.md").is_file()
    skipped = subprocess.run(cmd[:3] + ["--dry-run"] + cmd[3:] + ["data.on_bad_image=skip"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    assert f"leaving out {len(corpus.excluded)} files" in skipped.stdout


@pytest.mark.parametrize("splits", [("test",), ("train", "valid")])
def test_check_data_cli_checks_roots_of_any_splits(tmp_path, capsys, splits):
    """A test-only root (jobs.evaluate asks for it to be checked) and one without test/ are checked,
    not refused for lacking a train/ split."""
    from jobs.check_data import main
    from tests.conftest import write_tiny_root

    root = write_tiny_root(tmp_path / "root", {"faces": "lower"}, per_class=3, size=32, splits=splits)
    status = main(["--data-root", str(root), "--out", str(tmp_path / "r"), f"data.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"data check of {root}: {len(splits) * 6} images, 0 errors" in out
    assert (tmp_path / "r" / "report.md").is_file()


def test_check_data_cli_writes_its_report_to_a_uri_results_dir(tmp_path, capsys, s3_server):
    """output.results_dir in a bucket: the report goes there (it went to a local folder named
    's3:/...'), and a scheme no filesystem opens is an error naming the key, before the scan."""
    from jobs.check_data import main
    from tests.conftest import s3_keys, write_tiny_root

    root = write_tiny_root(tmp_path / "root", {"faces": "lower"}, per_class=2, size=32)
    status = main(["--data-root", str(root), "output.results_dir=s3://trueface-test/checks",
                   f"data.cache_dir={tmp_path / 'cache'}"])
    assert status == 0
    keys = s3_keys(s3_server, "checks/root-data/")
    assert {"checks/root-data/report.md", "checks/root-data/images.parquet"} <= set(keys)
    assert "report: s3://trueface-test/checks/root-data/report.md" in capsys.readouterr().out
    assert not (Path.cwd() / "s3:").exists()
    with pytest.raises(SystemExit, match=r"error: output.results_dir: cannot open ftp://host/r"):
        main(["--data-root", str(root), "output.results_dir=ftp://host/r", f"data.cache_dir={tmp_path / 'cache'}"])


def test_check_data_cli_refuses_an_out_that_is_a_file_before_scanning(tmp_path, monkeypatch):
    """An --out naming an existing file: a one-line error before the scan, not a traceback after it."""
    import jobs.check_data
    from tests.conftest import write_tiny_root

    root = write_tiny_root(tmp_path / "root", {"faces": "lower"}, per_class=1, size=32)
    (tmp_path / "report.md").write_text("not a folder")
    scanned = []
    monkeypatch.setattr(jobs.check_data, "scan_and_check", lambda *a, **k: scanned.append(a) or pytest.fail("scanned"))
    with pytest.raises(SystemExit) as stopped:
        jobs.check_data.main(["--data-root", str(root), "--out", str(tmp_path / "report.md"),
                              f"data.cache_dir={tmp_path / 'cache'}"])
    assert str(stopped.value) == f"error: --out {tmp_path / 'report.md'} is a file: give a folder"
    assert not scanned


def _format_root(tmp_path: Path) -> Path:
    """Reals JPEG, fakes PNG, the same kind of pixels otherwise."""
    from PIL import Image

    from tests.conftest import write_tiny_root

    root = write_tiny_root(tmp_path / "fmt", {"": "lower"}, per_class=12, size=48)
    for path in root.rglob("real/*.png"):
        Image.open(path).convert("RGB").save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    return root


def test_a_format_shortcut_is_flagged_and_normalize_removes_it(tmp_path):
    root = _format_root(tmp_path)
    cfg = load_config("demo", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    cfg, layout = resolve_layout(cfg)
    check = scan_and_check(layout, cfg, progress=False)
    (audit,) = check.audits
    assert audit.warning and audit.separating_field == "format" and audit.auc > 0.9
    assert "format separates real from fake" in check.summary()
    # Trained on the normalised copy: same domain name and images, one format and quality.
    prepared = prepare_run(replace(cfg, data=replace(cfg.data, normalize="jpeg:90@48")), progress=False)
    assert Path(prepared.cfg.data.root).is_relative_to(tmp_path / "cache" / "normalized")
    assert prepared.layout.counts() == layout.counts()
    after = scan_and_check(prepared.layout, prepared.cfg, progress=False)
    assert {r["format"] for r in after.rows} == {"JPEG"} and {r["jpeg_quality"] for r in after.rows} == {90}
    # (the fakes' stripe still makes their JPEGs larger: file size follows content, and the audit says so)
    assert after.audits[0].field_auc["format"] == 0.5 and after.audits[0].separating_field != "format"


@pytest.mark.skipif(not MINI_140K.is_dir(), reason=f"real sample {MINI_140K} is absent on this machine")
def test_real_sample_is_clean(tmp_path):
    cfg = load_config("demo", [f"data.root={MINI_140K}", f"data.cache_dir={tmp_path / 'cache'}"])
    cfg, layout = resolve_layout(cfg)
    check = scan_and_check(layout, cfg, progress=False)
    assert check.errors == [] and check.leaks == []  # one chance pHash match, refuted by the fine hash
    assert {r["format"] for r in check.rows} == {"JPEG"} and {r["jpeg_quality"] for r in check.rows} == {75}


def test_report_lists_the_shortcut_audit_per_split_with_its_bound():
    """Review finding 5: the report's audit table has a row per domain and per split audited
    alone, with the lower bound the warning is on and how it is computed."""
    from types import SimpleNamespace

    import trueface.data.report as report_module
    from tests.test_shortcuts import make_rows
    from trueface.data.shortcuts import audit

    rows = []
    for k, (split, fake_format) in enumerate((("train", "JPEG"), ("test", "PNG"))):
        rows += [{**r, "split": split} for r in make_rows(20, 0, seed=90 + k) + make_rows(20, 1, seed=95 + k, fmt=fake_format)]
    text = "\n".join(report_module._audit_section(SimpleNamespace(audits=audit(rows)), []))
    assert "| domain | split | real | fake | metadata AUC | lower bound |" in text and "Hanley-McNeil" in text
    assert "| d | all | 40 | 40 |" in text and "| d | train | 20 | 20 |" in text
    assert "| d | test | 20 | 20 | 1.000 |" in text and "format separates real from fake in the test split" in text

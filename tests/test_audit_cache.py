"""The shortcut audit remembered (trueface.data.audit_cache): read back only where what it reads
is unchanged, audited again otherwise, the same verdicts either way."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import write_tiny_root
from tests.test_shortcuts import make_rows
from trueface.config import load_config
from trueface.data import audit_cache
from trueface.data.check import cache_file, scan_and_check
from trueface.data.layout import discover_layout
from trueface.data.shortcuts import audit


@pytest.fixture
def audits_run(monkeypatch) -> list[int]:
    """An empty memory, and the number of rows of each audit actually run."""
    runs: list[int] = []
    monkeypatch.setattr(audit_cache, "_MEMORY", {})
    monkeypatch.setattr(audit_cache, "audit", lambda rows: runs.append(len(rows)) or audit(rows))
    return runs


def _rows() -> list[dict]:
    """A format shortcut in the test split only: the pooled audit and its cells, NaN-free."""
    rows = []
    for k, (split, fake_format) in enumerate((("train", "JPEG"), ("test", "PNG"))):
        rows += [{**r, "split": split} for r in make_rows(20, 0, seed=40 + k) + make_rows(20, 1, seed=45 + k, fmt=fake_format)]
    return rows


def test_the_same_rows_are_read_back_with_the_same_verdicts(tmp_path, audits_run, monkeypatch):
    cache = tmp_path / "root.audit.json"
    first = audit_cache.cached_audit(_rows(), cache)
    assert audits_run == [80] and cache.is_file()
    assert [asdict(a) for a in first] == [asdict(a) for a in audit(_rows())]
    assert first[0].warning and [c.split for c in first[0].cells if c.warning] == ["test"]

    monkeypatch.setattr(audit_cache, "_MEMORY", {})  # another process: from the file
    again = audit_cache.cached_audit(_rows(), cache)
    assert audits_run == [80]
    assert [asdict(a) for a in again] == [asdict(a) for a in first]
    again[0].cells.clear()  # a caller's copy: the remembered audit keeps its cells
    assert audit_cache.cached_audit(_rows(), cache)[0].cells and audits_run == [80]


@pytest.mark.parametrize("field, value", [("file_size", 1), ("format", "PNG"), ("label", 1), ("split", "valid"),
                                          ("error", "truncated"), ("domain", "e")])
def test_any_input_the_audit_reads_audits_again(field, value, tmp_path, audits_run):
    cache = tmp_path / "root.audit.json"
    audit_cache.cached_audit(_rows(), cache)
    changed = _rows()
    changed[3] = {**changed[3], field: value}
    assert audit_cache.cached_audit(changed, cache) is not None
    assert audits_run == [80, 80]
    # a field it does not read (the path) changes nothing
    moved = [{**r, "path": "/elsewhere" + r["path"]} for r in changed]
    audit_cache.cached_audit(moved, cache)
    assert audits_run == [80, 80]


def test_a_change_to_the_audit_s_code_or_library_audits_again(tmp_path, audits_run, monkeypatch):
    from importlib import metadata

    from trueface.data import shortcuts

    key = audit_cache.audit_key(_rows())
    source = tmp_path / "shortcuts.py"
    source.write_bytes(Path(shortcuts.__file__).read_bytes() + b"\n# WARN_AUC changed\n")
    with monkeypatch.context() as m:
        m.setattr(shortcuts, "__file__", str(source))
        assert audit_cache.audit_key(_rows()) != key
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0" if name == "scikit-learn" else real(name))
    assert audit_cache.audit_key(_rows()) != key


def test_an_unreadable_or_foreign_cache_file_is_audited_again_and_replaced(tmp_path, audits_run):
    cache = tmp_path / "root.audit.json"
    cache.write_text("{not json")
    audit_cache.cached_audit(_rows(), cache)
    assert audits_run == [80] and json.loads(cache.read_text())["key"] == audit_cache.audit_key(_rows())
    saved = json.loads(cache.read_text())
    saved["audits"][0]["renamed_field"] = saved["audits"][0].pop("auc")  # written by another version
    cache.write_text(json.dumps(saved))
    audit_cache._MEMORY.clear()
    audit_cache.cached_audit(_rows(), cache)
    assert audits_run == [80, 80]


def test_the_data_check_audits_an_unchanged_root_once(tmp_path, audits_run):
    root = write_tiny_root(tmp_path / "root", {"faces": "lower"}, per_class=12, size=32)
    cfg = load_config("demo", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    first = scan_and_check(discover_layout(root), cfg, progress=False)
    assert audits_run == [72] and cache_file(cfg, root).with_suffix(".audit.json").is_file()
    audit_cache._MEMORY.clear()
    again = scan_and_check(discover_layout(root), cfg, progress=False)
    assert audits_run == [72] and again.summary() == first.summary()
    # the fakes of the test split re-saved as JPEG: their metadata changed, the audit runs again
    for path in (root / "faces" / "test" / "fake").glob("*.png"):
        Image.open(path).convert("RGB").save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    after = scan_and_check(discover_layout(root), cfg, progress=False)
    assert audits_run == [72, 72] and after.audits != first.audits

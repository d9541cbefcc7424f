"""Does a test root hold images a checkpoint was trained on? Compared by content (sha1), not name.

Usage::

    trained = training_hashes("runs/demo/stage2/best.pt", cfg)     # None: nothing to compare with
    counts = overlap_counts(test_rows, trained.sha1)                # test domain -> images also trained on

The training data of a checkpoint is its run's ``manifest.parquet`` (the pipeline writes it beside
the stage folders, with each file's sha1), or else the train and valid splits of the data root its
config names, scanned through the data check's cache (under ``data.normalize`` the config names the
normalised mirror: the source root its manifest records is scanned, as test files share the
source's bytes, never the re-encoded copies'). Validation images count as training data:
they chose the best epoch and the thresholds.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from trueface.config import Config
from trueface.config.choices import parse_normalize
from trueface.data.layout import DataLayoutError, discover_layout
from trueface.data.normalize import mirror_source
from trueface.storage import StorageError, fetch, is_uri

TRAINING_SPLITS = ("train", "valid")


@dataclass(frozen=True)
class TrainingData:
    sha1: frozenset[str]
    source: str  # where the hashes came from, for the table's header


def _manifest_location(checkpoint: str) -> str:
    """``<run>/manifest.parquet`` for ``<run>/stageN/<file>.pt``."""
    if is_uri(checkpoint):
        return posixpath.join(posixpath.dirname(posixpath.dirname(checkpoint)), "manifest.parquet")
    return str(Path(checkpoint).absolute().parent.parent / "manifest.parquet")


def training_hashes(checkpoint: str, cfg: Config) -> TrainingData | None:
    """The sha1 of every image ``checkpoint`` saw in training or validation, or None when neither its
    run's manifest (with sha1) nor its data root is reachable from here."""
    location = _manifest_location(str(checkpoint))
    try:
        local = fetch(location, cfg.data.cache_dir) if is_uri(location) else Path(location)
        if Path(local).is_file():
            table = pq.read_table(local)
            if "sha1" in table.column_names:
                rows = [r for r in table.select(["split", "sha1"]).to_pylist() if r["split"] in TRAINING_SPLITS]
                if all(r["sha1"] for r in rows):
                    return TrainingData(frozenset(r["sha1"] for r in rows), f"{location} ({len(rows)} images)")
    except (StorageError, OSError):
        pass
    return _scanned_root(cfg)


def _scanned_root(cfg: Config) -> TrainingData | None:
    from trueface.data.check import cache_file
    from trueface.data.scan import scan_layout

    root = cfg.data.root
    if parse_normalize(cfg.data.normalize) is not None:
        # trained from a normalised mirror (its config names the mirror): the source's bytes are
        # what test files are compared with; a mirror whose source is gone compares with nothing
        root = mirror_source(root, cfg.data.normalize)
        if root is None:
            return None
    try:
        layout = discover_layout(root, cfg.data.exclude)
    except DataLayoutError:
        return None
    layout.domains = {d: {s: xs for s, xs in splits.items() if s in TRAINING_SPLITS}
                      for d, splits in layout.domains.items()}
    rows = scan_layout(layout, cache_file(cfg, layout.root), progress=False)
    return TrainingData(frozenset(r["sha1"] for r in rows if r["sha1"]),
                        f"train and valid splits of {root} ({len(rows)} images, scanned)")


def overlap_counts(test_rows: list[dict], trained: frozenset[str]) -> dict[str, int]:
    """Test-split images per domain whose bytes are in ``trained`` (every test domain listed, 0 too)."""
    counts: dict[str, int] = {}
    for r in test_rows:
        if r["split"] == "test":
            counts[r["domain"]] = counts.get(r["domain"], 0) + int(bool(r["sha1"]) and r["sha1"] in trained)
    return counts

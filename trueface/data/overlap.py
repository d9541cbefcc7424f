"""Does a test root hold images a checkpoint was trained on? Compared by content, not name: a test
image counts as trained on when its decoded pixels (the scan's ``pixel_sha1``) or its bytes (sha1)
are those of a training image, so a re-saved PNG or a copy with its metadata stripped counts as much
as a byte-identical copy. (A lossy re-encode changes the pixels: it is not counted.)

Usage::

    trained = training_hashes("runs/demo/stage2/best.pt", cfg)     # None: nothing to compare with
    counts = overlap_counts(test_rows, trained)                     # test domain -> images also trained on

The training data of a checkpoint is its run's ``manifest.parquet`` (the pipeline writes it beside
the stage folders, with each file's sha1 and pixel_sha1; a manifest written before pixel_sha1 was
recorded is compared by bytes alone), or else the train and valid splits of the data root its
config names, scanned through the data check's cache (under ``data.normalize`` the config names the
normalised mirror: the source root its manifest records is scanned, as test files share the
source's content, never the re-encoded copies'). Validation images count as training data:
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
    sha1: frozenset[str]  # of the files' bytes
    source: str  # where the hashes came from, for the table's header
    pixel_sha1: frozenset[str] = frozenset()  # of the decoded pixels (trueface.data.scan.pixel_digest)


def _manifest_location(checkpoint: str) -> str:
    """``<run>/manifest.parquet`` for ``<run>/stageN/<file>.pt``."""
    if is_uri(checkpoint):
        return posixpath.join(posixpath.dirname(posixpath.dirname(checkpoint)), "manifest.parquet")
    return str(Path(checkpoint).absolute().parent.parent / "manifest.parquet")


def training_hashes(checkpoint: str, cfg: Config) -> TrainingData | None:
    """The sha1 (and pixel_sha1, where recorded) of every image ``checkpoint`` saw in training or
    validation, or None when neither its run's manifest (with sha1) nor its data root is reachable
    from here."""
    location = _manifest_location(str(checkpoint))
    try:
        local = fetch(location, cfg.data.cache_dir) if is_uri(location) else Path(location)
        if Path(local).is_file():
            table = pq.read_table(local)
            if "sha1" in table.column_names:
                columns = ["split", "sha1"] + (["pixel_sha1"] if "pixel_sha1" in table.column_names else [])
                rows = [r for r in table.select(columns).to_pylist() if r["split"] in TRAINING_SPLITS]
                if all(r["sha1"] for r in rows):
                    pixels = frozenset(r["pixel_sha1"] for r in rows if r.get("pixel_sha1"))
                    how = "" if "pixel_sha1" in columns else ", by bytes only: an older manifest without pixel_sha1"
                    return TrainingData(frozenset(r["sha1"] for r in rows), f"{location} ({len(rows)} images{how})",
                                        pixels)
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
                        f"train and valid splits of {root} ({len(rows)} images, scanned)",
                        frozenset(r["pixel_sha1"] for r in rows if r.get("pixel_sha1")))


def trained_on(row: dict, trained: TrainingData) -> bool:
    """Whether the scanned image ``row`` is one of ``trained``: the same decoded pixels, or the same bytes."""
    return bool((row.get("pixel_sha1") and row["pixel_sha1"] in trained.pixel_sha1)
                or (row.get("sha1") and row["sha1"] in trained.sha1))


def overlap_counts(test_rows: list[dict], trained: TrainingData) -> dict[str, int]:
    """Test-split images per domain that are in ``trained``, by pixels or by bytes (every test domain
    listed, 0 too)."""
    counts: dict[str, int] = {}
    for r in test_rows:
        if r["split"] == "test":
            counts[r["domain"]] = counts.get(r["domain"], 0) + int(trained_on(r, trained))
    return counts

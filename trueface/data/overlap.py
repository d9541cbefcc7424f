"""Does a test root hold images a checkpoint was trained on? Compared by content, not name: a test
image counts as trained on when its decoded pixels (the scan's ``pixel_sha1``) or its bytes (sha1)
are those of a training image, so a re-saved PNG or a copy with its metadata stripped counts as much
as a byte-identical copy; and, where the training images' perceptual hashes and thumbnails are
known, when it is a near or mirrored copy of one (a lossy re-encode, a resize, a left-right mirror
image: the pairs trueface.data.leakage finds and confirms, by the same hashes and thresholds).

Usage::

    trained = training_hashes("runs/demo/stage2/best.pt", cfg)     # None: nothing to compare with
    counts = overlap_counts(test_rows, trained)                     # test domain -> images also trained on

The training data of a checkpoint is its run's ``manifest.parquet`` (the pipeline writes it beside
the stage folders, with each file's sha1 and pixel_sha1; a manifest written before pixel_sha1 was
recorded is compared by bytes alone; one without the scan's ``phash``, ``phash_flip`` and
``thumb`` columns, as the pipeline writes them, takes those of its images from the data check's
cache of the data root, by sha1, where the cache is here, else compares pixels and bytes alone),
or else the train and valid splits of the data root
its config names, scanned through the data check's cache (under ``data.normalize`` the config names
the normalised mirror: the source root its manifest records is scanned, as test files share the
source's content, never the re-encoded copies'). Validation images count as training data: they
chose the best epoch and the thresholds.

Near copies cost one banded pHash search over the training and test hashes together (about 8 s for
140,000 images with their mirrors, trueface.data.leakage), beside a scan of the test root that
decodes every image. A pair counts only when its 16x16 thumbnails confirm it (correlation 0.995 or
more): a row without a thumbnail cannot confirm, so such rows are matched exactly only, lest chance
pHash matches between look-alike faces (about 1 per 2 million pairs) refuse an evaluation.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trueface.config import Config
from trueface.config.choices import parse_normalize
from trueface.data.layout import DataLayoutError, discover_layout
from trueface.data.leakage import find_leakage
from trueface.data.normalize import mirror_source
from trueface.storage import StorageError, fetch, is_uri

TRAINING_SPLITS = ("train", "valid")
#: The scan's columns that match near and mirrored copies (trueface.data.leakage.find_leakage).
PERCEPTUAL_COLUMNS = ("phash", "phash_flip", "thumb")


@dataclass(frozen=True)
class TrainingData:
    sha1: frozenset[str]  # of the files' bytes
    source: str  # where the hashes came from, for the table's header
    pixel_sha1: frozenset[str] = frozenset()  # of the decoded pixels (trueface.data.scan.pixel_digest)
    hashed: tuple[dict, ...] = ()  # sha1 and PERCEPTUAL_COLUMNS of each image that has them: near copies


def _manifest_location(checkpoint: str) -> str:
    """``<run>/manifest.parquet`` for ``<run>/stageN/<file>.pt``."""
    if is_uri(checkpoint):
        return posixpath.join(posixpath.dirname(posixpath.dirname(checkpoint)), "manifest.parquet")
    return str(Path(checkpoint).absolute().parent.parent / "manifest.parquet")


def training_hashes(checkpoint: str, cfg: Config) -> TrainingData | None:
    """The sha1 (and pixel_sha1 and perceptual hashes, where recorded) of every image ``checkpoint``
    saw in training or validation, or None when neither its run's manifest (with sha1) nor its data
    root is reachable from here."""
    location = _manifest_location(str(checkpoint))
    try:
        local = fetch(location, cfg.data.cache_dir) if is_uri(location) else Path(location)
        if Path(local).is_file():
            table = pq.read_table(local)
            trained = _from_manifest(table, location) if "sha1" in table.column_names else None
            if trained is not None:
                return trained if trained.hashed else _with_cached_hashes(trained, cfg)
    except (StorageError, OSError):
        pass
    return _scanned_root(cfg)


def _from_manifest(table: pa.Table, location: str) -> TrainingData | None:
    """The training data a manifest with sha1 records (None when a training row has none)."""
    perceptual = all(c in table.column_names for c in PERCEPTUAL_COLUMNS)
    columns = ["split", "sha1"] + [c for c in ("pixel_sha1", *PERCEPTUAL_COLUMNS) if c in table.column_names]
    rows = [r for r in table.select(columns).to_pylist() if r["split"] in TRAINING_SPLITS]
    if not all(r["sha1"] for r in rows):
        return None
    if "pixel_sha1" not in columns:
        how = ", by bytes only: an older manifest without pixel_sha1"
    else:
        how = "" if perceptual else ", by pixels and bytes only: a manifest without perceptual hashes"
    return _training_data(rows, f"{location} ({len(rows)} images{how})", perceptual)


def _training_data(rows: list[dict], source: str, perceptual: bool = True) -> TrainingData:
    hashed = tuple(_hash_fields(r) for r in rows if perceptual and _matchable(r))
    return TrainingData(frozenset(r["sha1"] for r in rows if r["sha1"]), source,
                        frozenset(r["pixel_sha1"] for r in rows if r.get("pixel_sha1")), hashed)


def _with_cached_hashes(trained: TrainingData, cfg: Config) -> TrainingData:
    """``trained`` (a manifest's digests) with the perceptual hashes of its images that the data
    check's cache of the config's data root holds, matched by sha1: where training ran, or the
    check did, near and mirrored copies count too, at no scan. Elsewhere exact copies only."""
    from trueface.data.check import cache_file
    from trueface.data.scan import read_cache

    root = _compared_root(cfg)
    cached = read_cache(cache_file(cfg, Path(root).expanduser())) if root is not None else {}
    hashed = tuple(_hash_fields(r) for r in cached.values() if r.get("sha1") in trained.sha1 and _matchable(r))
    if not hashed:
        return trained
    source = trained.source.replace(", by pixels and bytes only: a manifest without perceptual hashes", "")
    return replace(trained, hashed=hashed, source=f"{source}; near copies of the {len(hashed)} of them in the data "
                                                  f"check's cache of {root}")


def _compared_root(cfg: Config) -> str | None:
    """The data root whose files the test root is compared with: the config's, or where it trained
    from a normalised mirror (its config names the mirror), the mirror's source, as test files
    share the source's content; None for a mirror whose source is gone."""
    if parse_normalize(cfg.data.normalize) is None:
        return cfg.data.root
    return mirror_source(cfg.data.root, cfg.data.normalize)


def _scanned_root(cfg: Config) -> TrainingData | None:
    from trueface.data.check import cache_file
    from trueface.data.scan import scan_layout

    root = _compared_root(cfg)
    if root is None:
        return None
    try:
        layout = discover_layout(root, cfg.data.exclude)
    except DataLayoutError:
        return None
    layout.domains = {d: {s: xs for s, xs in splits.items() if s in TRAINING_SPLITS}
                      for d, splits in layout.domains.items()}
    rows = scan_layout(layout, cache_file(cfg, layout.root), progress=False)
    return _training_data(rows, f"train and valid splits of {root} ({len(rows)} images, scanned)")


def trained_on(row: dict, trained: TrainingData) -> bool:
    """Whether the scanned image ``row`` is one of ``trained``: the same decoded pixels, or the same bytes."""
    return bool((row.get("pixel_sha1") and row["pixel_sha1"] in trained.pixel_sha1)
                or (row.get("sha1") and row["sha1"] in trained.sha1))


def near_copies(test_rows: Sequence[dict], hashed: Sequence[dict]) -> set[int]:
    """Indices of ``test_rows`` that are near or mirrored copies of a ``hashed`` training row: the
    leakage check's near pairs (find_leakage) between the two, never those inside either."""
    tests = [k for k, r in enumerate(test_rows) if _matchable(r)]
    # One cell per side (the split; domain and label alike): find_leakage pairs only what crosses a
    # cell, so only a training row with a test row; a test row's name is its index.
    rows = [_one_cell(r, f"trained {k}", "train") for k, r in enumerate(hashed) if _matchable(r)]
    if not rows or not tests:
        return set()
    rows += [_one_cell(test_rows[k], f"test {k}", "test") for k in tests]
    return {int(p.b.split()[1]) for p in find_leakage(rows) if p.kind == "near" and p.cross_split}


def _matchable(row: dict) -> bool:
    """A hash to match and a thumbnail to confirm with: find_leakage keeps a pair it cannot confirm,
    which at the gate would let a chance pHash match refuse an evaluation."""
    return bool(row.get("phash") and row.get("thumb"))


def _hash_fields(row: dict) -> dict:
    """What near matching reads of a row: its sha1 and PERCEPTUAL_COLUMNS."""
    return {k: row.get(k) for k in ("sha1", *PERCEPTUAL_COLUMNS)}


def _one_cell(row: dict, name: str, split: str) -> dict:
    return _hash_fields(row) | {"relpath": name, "split": split, "domain": "", "label": 0}


def overlap_counts(test_rows: list[dict], trained: TrainingData) -> dict[str, int]:
    """Test-split images per domain that are in ``trained``, by pixels or by bytes, or as near or
    mirrored copies where ``trained`` has perceptual hashes (every test domain listed, 0 too)."""
    tests = [r for r in test_rows if r["split"] == "test"]
    near = near_copies(tests, trained.hashed)
    counts: dict[str, int] = {}
    for k, r in enumerate(tests):
        counts[r["domain"]] = counts.get(r["domain"], 0) + int(k in near or trained_on(r, trained))
    return counts

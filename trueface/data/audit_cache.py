"""The format-shortcut audit (trueface.data.shortcuts), remembered: it is a pure function of the
scanned metadata, and its cross-validated models are most of a data check's cost once the scan is
cached (10 s of a 14 s ``jobs.tune --dry-run`` on the embedded set here; about 30 s at 140K images).
Every rerun, resume and dry run on unchanged data read the verdicts back instead.

Usage::

    audits = cached_audit(rows, Path(".cache/trueface/data-check/faces-1a2b3c.audit.json"))

The key is a digest of what the audit reads (each row's domain, split, label, error and metadata
fields, in order), of the audit's own source and of the library versions its models come from: a
change to any of them audits again. One file per data root, holding its latest audit (written
atomically); in a process, the last few audits are kept in memory as well.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path

from trueface.atomic import atomic_write_text
from trueface.data import shortcuts
from trueface.data.shortcuts import METADATA_FIELDS, DomainAudit, audit

_INPUTS = ("domain", "split", "label", "error", *METADATA_FIELDS)
_MEMORY: dict[str, list[DomainAudit]] = {}
_MEMORY_SIZE = 4


def cached_audit(rows: list[dict], cache: Path | None = None) -> list[DomainAudit]:
    """``shortcuts.audit(rows)``, from memory or ``cache`` where the same inputs were audited; else
    audited now and kept in both (``cache`` None: in memory only)."""
    key = audit_key(rows)
    if key not in _MEMORY:
        audits = _read(cache, key) if cache is not None else None
        if audits is None:
            audits = audit(rows)
            if cache is not None:
                _write(cache, key, audits)
        while len(_MEMORY) >= _MEMORY_SIZE:
            _MEMORY.pop(next(iter(_MEMORY)))
        _MEMORY[key] = audits
    return copy.deepcopy(_MEMORY[key])  # callers may annotate theirs


def audit_key(rows: list[dict]) -> str:
    digest = hashlib.sha256(Path(shortcuts.__file__).read_bytes())
    for package in ("scikit-learn", "numpy"):
        digest.update(f"{package} {metadata.version(package)}".encode())
    for row in rows:
        digest.update(json.dumps([_plain(row.get(name)) for name in _INPUTS]).encode())
    return digest.hexdigest()


def _plain(value):
    """A JSON-able stand-in for a scanned value (numpy scalars from a parquet cache, NaN, None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _read(cache: Path, key: str) -> list[DomainAudit] | None:
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") != key:
            return None
        return [_audit_from(d) for d in saved["audits"]]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: audit again
        return None


def _write(cache: Path, key: str, audits: list[DomainAudit]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"key": key, "audits": [asdict(a) for a in audits]}))
    except OSError:  # a read-only cache folder: the audit stands, it is only not remembered
        pass


def _audit_from(saved: dict) -> DomainAudit:
    known = {f.name for f in fields(DomainAudit)}
    if set(saved) != known:
        raise KeyError(f"fields {sorted(set(saved) ^ known)}")
    return DomainAudit(**{**saved, "cells": [_audit_from(c) for c in saved["cells"]]})

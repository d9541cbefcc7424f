"""The data check: what in a data root is bad, leaks or gives the label away, and what to leave out.

Usage::

    check = check_data(layout, rows, cfg)            # rows from trueface.data.scan.scan_layout
    print(check.summary()); check.blocking           # True: stop before training (data.on_bad_image=error)
    check.excluded                                   # relpaths a run leaves out under on_bad_image=skip

The rules, each finding naming the file and the problem:

- **error** (a file that cannot be used): it does not decode (truncated, zero bytes, not an image,
  a decompression bomb over PIL's limit, unreadable, a broken link), its shorter side is below
  ``data.min_image_side``, its link leaves the data root, its name is not UTF-8, a split has one
  class only; the same image under real/ and fake/ (every copy: which label is right is unknown);
  the same image in two splits (the copy in the earlier split, train < valid < test, so the test
  split stays whole). "The same image" is the same decoded pixels (the scan's ``pixel_sha1``), so a
  re-saved PNG or a copy with its metadata stripped counts as much as a byte-identical file.
- **warning** (usable, worth knowing): near duplicates (perceptual hash; mirror images too, said
  so) across splits, domains or labels; exact duplicates across domains within one split, or twice
  in one domain/split/label folder (the image counts once per copy: nothing is left out); images
  smaller than every crop they are trained at (upscaled); a domain whose file metadata alone
  separates real from fake (the format shortcut audit, trueface.data.shortcuts); missing splits and
  ignored folders.

``data.on_bad_image``: ``error`` stops a run before training when any error is found; ``skip``
leaves the files out (``excluded``) and the plan shows the counts after leaving them out, so a
change of class balance is never silent. Converted oddities (alpha, palette, 16-bit, CMYK, EXIF
rotation) are counted per domain and class: converted alike for both classes, but a kind that only
one class has is itself a shortcut.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trueface.config import Config
from trueface.data.layout import LABEL_NAMES, DataLayout, discover_layout
from trueface.data.leakage import LeakPair, find_leakage
from trueface.data.scan import scan_layout
from trueface.data.audit_cache import cached_audit
from trueface.data.shortcuts import DomainAudit

SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}


class DataCheckError(RuntimeError):
    """The data check found errors under ``data.on_bad_image=error``; the message is its summary."""


@dataclass(frozen=True)
class Finding:
    path: str  # relative to the data root (a folder for layout problems)
    problem: str
    severity: str  # error | warning
    domain: str = ""
    split: str = ""
    label: str = ""


@dataclass
class DataCheck:
    root: str
    policy: str
    rows: list[dict]
    findings: list[Finding]
    leaks: list[LeakPair]
    audits: list[DomainAudit]
    counts_before: dict[str, dict[str, dict[str, int]]]
    counts_after: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    oddities: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (domain, label, kind) -> files

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def excluded(self) -> tuple[str, ...]:
        """Files an ``on_bad_image=skip`` run leaves out (relative paths; layout problems are not
        samples, so only scanned files appear here)."""
        scanned = {r["relpath"] for r in self.rows}
        return tuple(sorted({f.path for f in self.errors if f.path in scanned}))

    @property
    def blocking(self) -> bool:
        return self.policy == "error" and bool(self.errors)

    @property
    def shortcut_warnings(self) -> list[DomainAudit]:
        return [a for a in self.audits if a.warning]

    def summary(self, limit: int = 10) -> str:
        """A few lines for the console and the plan: counts, the first problems, what happens."""
        n = len(self.rows)
        lines = [f"data check of {self.root}: {n} images, {len(self.errors)} errors, {len(self.warnings)} warnings, "
                 f"{len(self.shortcut_warnings)} metadata shortcuts, "
                 f"{sum(p.cross_split for p in self.leaks)} cross-split and {sum(p.cross_label for p in self.leaks)} "
                 f"cross-label duplicate pairs" + _mirrored_text(self.leaks)]
        for f in self.errors[:limit]:
            lines.append(f"  error: {f.path}: {f.problem}")
        if len(self.errors) > limit:
            lines.append(f"  ... and {len(self.errors) - limit} more errors (see the report)")
        for a in self.shortcut_warnings:
            lines.append(f"  warning: {shortcut_text(a)}")
        if self.errors:
            if self.policy == "error":
                lines.append("  stopping (data.on_bad_image=error): fix or remove these files, or run with "
                             "data.on_bad_image=skip to leave them out")
            else:
                lines.append(f"  leaving out {len(self.excluded)} files (data.on_bad_image=skip); images after that:")
                lines += ["    " + line for line in describe_counts(self.counts_after).splitlines()]
        return "\n".join(lines)


def _mirrored_text(leaks: list[LeakPair]) -> str:
    """The mirror images among the duplicate pairs, said apart: a flipped copy is easily taken for
    a chance match by whoever reads only the count."""
    mirrored = sum(p.mirrored for p in leaks)
    return f"; mirror images (flipped left to right): {mirrored} near-duplicate pair{'s' * (mirrored != 1)}" \
        if mirrored else ""


def shortcut_text(audit: DomainAudit) -> str:
    """One line on a domain whose metadata separates the classes, with what to do about it."""
    if audit.separating_field == "file_size":
        advice = ("file size follows image content and the encoder: check both classes were saved the same "
                  "way; data.normalize=jpeg:<q>@<size> re-encodes them alike")
    else:
        advice = "data.normalize=jpeg:<q>@<size> re-encodes every image alike and removes it"
    return f"metadata shortcut in {audit.domain!r}: {audit.describe()} ({advice})"


def describe_counts(counts: dict[str, dict[str, dict[str, int]]]) -> str:
    return "\n".join(f"{domain:<28} " + "  ".join(f"{s} {c['real']}/{c['fake']}" for s, c in splits.items())
                     for domain, splits in counts.items())


def scan_and_check(layout: DataLayout, cfg: Config, workers: int | None = None, progress: bool = True) -> DataCheck:
    """Scan ``layout`` (from the cache where files are unchanged) and judge it (the shortcut audit
    read back from beside the scan's cache where the metadata is unchanged)."""
    cache = cache_file(cfg, layout.root)
    return check_data(layout, scan_layout(layout, cache, workers, progress), cfg, cache.with_suffix(".audit.json"))


def check_data(layout: DataLayout, rows: list[dict], cfg: Config, audit_cache: Path | None = None) -> DataCheck:
    """Judge the scanned ``rows`` of ``layout`` by the rules above (``cfg.data`` gives the policy
    and the minimum side; the stages' sizes and domains say which images are upscaled).
    ``audit_cache``: where the shortcut audit is remembered (trueface.data.audit_cache)."""
    findings = [Finding(p.path, p.problem, p.severity) for p in layout.problems]
    findings += _file_findings(rows, cfg)
    findings += _duplicate_findings(rows)
    leaks = find_leakage([r for r in rows if not r["error"]])
    findings += _leak_warnings(leaks, rows)
    audits = cached_audit(rows, audit_cache)
    check = DataCheck(str(layout.root), cfg.data.on_bad_image, rows, _dedupe(findings), leaks, audits,
                      layout.counts(), oddities=_oddities(rows))
    check.counts_after = discover_layout(layout.root, check.excluded).counts() if check.excluded else layout.counts()
    return check


def _label(row: dict) -> str:
    return LABEL_NAMES[int(row["label"])]


def _finding(row: dict, problem: str, severity: str = "error") -> Finding:
    return Finding(row["relpath"], problem, severity, row["domain"], row["split"], _label(row))


def _crop_sizes(cfg: Config) -> dict[str, int]:
    """The smallest crop each domain is trained at (only domains a stage names explicitly or by the
    resolved config; others fall back to Stage I's size)."""
    sizes: dict[str, int] = {}
    for number in (1, 2):
        st = cfg.stage(number)
        for d in st.domains:
            sizes[d] = min(sizes.get(d, st.image_size), st.image_size)
    return sizes


def _file_findings(rows: list[dict], cfg: Config) -> list[Finding]:
    out = []
    crops = _crop_sizes(cfg)
    for r in rows:
        if r["error"]:
            out.append(_finding(r, r["error"]))
            continue
        side = min(r["width"], r["height"])
        if side < cfg.data.min_image_side:
            out.append(_finding(r, f"image is {r['width']}x{r['height']}: its shorter side is below "
                                   f"data.min_image_side={cfg.data.min_image_side}"))
        elif side < crops.get(r["domain"], cfg.stage1.image_size):
            crop = crops.get(r["domain"], cfg.stage1.image_size)
            out.append(_finding(r, f"image is {r['width']}x{r['height']}, smaller than the {crop} px crop: "
                                   f"upscaled x{crop / side:.1f}", "warning"))
    return out


def _copy_key(row: dict) -> str:
    """What makes two files copies of one image: the decoded pixels (``pixel_sha1``) where the
    scan recorded them, so a re-saved or metadata-stripped copy counts as a copy; else the bytes."""
    return f"pixels {row['pixel_sha1']}" if row.get("pixel_sha1") else f"bytes {row.get('sha1') or ''}"


def _same(a: dict, b: dict) -> str:
    """How two copies are the same, in words."""
    if a.get("sha1") and a.get("sha1") == b.get("sha1"):
        return "the same file"
    return "the same image (identical pixels, other bytes)"


def _same_as_all(a: dict, others: list[dict]) -> str:
    """How ``a`` and every one of ``others`` are the same, in words."""
    if all(_same(a, o) == "the same file" for o in others):
        return "the same file"
    return "the same image (identical pixels)"


def _duplicate_findings(rows: list[dict]) -> list[Finding]:
    """Exact copies (same decoded pixels, or same sha1 where the pixels were not digested) under two
    labels, in two splits, in two domains, or twice in one domain/split/label folder (a warning:
    nothing is left out, but the image counts once per copy in training or in the metrics)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if (r.get("pixel_sha1") or r["sha1"]) and not r["error"]:
            groups[_copy_key(r)].append(r)
    out = []
    for group in (g for g in groups.values() if len(g) > 1):
        if len({r["label"] for r in group}) > 1:
            for r in group:
                others = [o for o in group if o is not r and o["label"] != r["label"]]
                out.append(_finding(r, f"{_same(r, others[0])} is also labelled {LABEL_NAMES[1 - int(r['label'])]}: "
                                       f"{', '.join(o['relpath'] for o in others)} (which label is right is unknown)"))
            continue
        last = max(SPLIT_ORDER[r["split"]] for r in group)
        kept = [r for r in group if SPLIT_ORDER[r["split"]] == last]  # the copies not left out
        for r in group:
            later = [o for o in group if SPLIT_ORDER[o["split"]] > SPLIT_ORDER[r["split"]]]
            if later:
                out.append(_finding(r, f"{_same(r, later[0])} is also in {later[0]['split']}/: {later[0]['relpath']} "
                                       f"(leaks {later[0]['split']} into {r['split']}; this copy is the one left out)"))
            elif r is kept[0] and len({o["domain"] for o in kept}) > 1:
                others = kept[1:]
                out.append(_finding(r, f"{_same_as_all(r, others)} is in several domains: "
                                       + ", ".join(o["relpath"] for o in others), "warning"))
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for r in kept:  # copies left out as leaks are judged above; those kept may share a folder
            cells[(r["domain"], r["split"], r["label"])].append(r)
        for cell in (c for c in cells.values() if len(c) > 1):
            first, others = cell[0], cell[1:]
            where = "the test metrics" if first["split"] == "test" else f"{first['split']}/"
            out.append(_finding(first, f"{_same_as_all(first, others)} is also in this folder: "
                                       f"{', '.join(o['relpath'] for o in others)} "
                                       f"(the image counts {len(cell)} times in {where})", "warning"))
    return out


def _leak_warnings(leaks: list[LeakPair], rows: list[dict] = ()) -> list[Finding]:
    """Near duplicates (the exact ones, and those with identical pixels, are judged above):
    warnings, since a perceptual hash can match two different images; the pairs are listed in the
    report's leakage.csv."""
    pixels = {r["relpath"]: r["pixel_sha1"] for r in rows if r.get("pixel_sha1")}
    out = []
    for p in leaks:
        if p.kind != "near" or (p.a in pixels and pixels.get(p.a) == pixels.get(p.b)):
            continue
        relation = " and ".join(name for name, on in (("split", p.cross_split), ("domain", p.cross_domain),
                                                      ("label", p.cross_label)) if on)
        how = (f", mirrored left to right (perceptual hash distance {p.distance} to its mirror image)," if p.mirrored
               else f" (perceptual hash distance {p.distance})")
        out.append(Finding(p.a, f"near duplicate{how} of {p.b}, across {relation}",
                           "warning", p.a_domain, p.a_split, LABEL_NAMES[int(p.a_label)]))
    return out


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        if (f.path, f.problem) not in seen:
            seen.add((f.path, f.problem))
            out.append(f)
    return out


def _oddities(rows: list[dict]) -> dict[tuple[str, str, str], int]:
    counts: Counter = Counter()
    for r in rows:
        for kind in filter(None, (r["warning"] or "").split("; ")):
            counts[(r["domain"], _label(r), kind)] += 1
    return dict(counts)


def cache_file(cfg: Config, root: Path) -> Path:
    """Where the scan of ``root`` is cached: one file per root, keyed by its absolute path."""
    key = hashlib.sha1(str(Path(root).absolute()).encode()).hexdigest()[:10]
    return Path(cfg.data.cache_dir).expanduser() / "data-check" / f"{Path(root).absolute().name}-{key}.parquet"


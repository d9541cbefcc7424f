"""Write a data check's report: what a user reads, and the tables behind it.

Usage: ``paths = write_report(check, Path("results/faces-data"))``

Files: ``report.md`` (the summary, per-split counts before and after leaving files out, every
error, the leakage pairs, the format-shortcut audit with its plots, converted oddities),
``images.parquet`` (one row per scanned file: trueface.data.scan's columns), ``problems.csv``
(every finding), ``leakage.csv`` (every duplicate pair) and ``shortcuts_<domain>.png`` (the domain's
name made safe for a file name). Each file is
written atomically: a rerun never leaves half a report.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

from trueface.atomic import atomic_write_text
from trueface.data.check import DataCheck, describe_counts
from trueface.data.leakage import NEAR_DUPLICATE_BITS, NEAR_DUPLICATE_MIN_CORRELATION, LeakPair, leak_summary
from trueface.data.scan import write_table
from trueface.data.shortcuts import BOUND_METHOD, METADATA_FIELDS, MIN_CELL_CLASS, WARN_AUC, DomainAudit, plot_shortcuts

MD_ROWS = 200  # rows of a long list shown in report.md; the CSVs hold all


def write_report(check: DataCheck, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(check.rows, out_dir / "images.parquet")
    atomic_write_text(out_dir / "problems.csv", _csv(["path", "severity", "problem", "domain", "split", "label"],
                                                      [asdict(f) for f in check.findings]))
    atomic_write_text(out_dir / "leakage.csv", _csv([f.name for f in fields(LeakPair)] + ["cross_split", "cross_domain",
                                                                                        "cross_label"],
                                                    [_leak_row(p) for p in check.leaks]))
    plots = plot_shortcuts(check.rows, check.audits, out_dir)
    atomic_write_text(out_dir / "report.md", _markdown(check, plots))
    return [out_dir / n for n in ("report.md", "images.parquet", "problems.csv", "leakage.csv")] + list(plots)


def _leak_row(p: LeakPair) -> dict:
    return asdict(p) | {"cross_split": p.cross_split, "cross_domain": p.cross_domain, "cross_label": p.cross_label}


def _csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(check: DataCheck, plots: list[Path]) -> str:
    md = [f"# Data check: {check.root}", "",
          f"Checked {time.strftime('%Y-%m-%d %H:%M')}: {len(check.rows)} images; policy data.on_bad_image="
          f"{check.policy}.", "", "```", check.summary(limit=20), "```", "",
          "## Images per split (real/fake)", "", "Found:", "```", describe_counts(check.counts_before), "```"]
    if check.excluded:
        md += ["", f"After leaving out {len(check.excluded)} files:", "```", describe_counts(check.counts_after), "```"]
    md += ["", f"## Errors ({len(check.errors)})", ""]
    md += _table(["file", "domain/split/label", "problem"],
                 [[f.path, "/".join(filter(None, (f.domain, f.split, f.label))), f.problem] for f in check.errors],
                 "problems.csv") if check.errors else ["None."]
    md += _leak_section(check.leaks)
    md += _audit_section(check, plots)
    md += ["", "## Converted oddities", "",
           "Decoded alike for both classes (trueface.data.decode); a kind only one class has is itself a shortcut.", ""]
    md += _table(["domain", "class", "conversion", "files"],
                 [[d, label, kind, n] for (d, label, kind), n in sorted(check.oddities.items())], "images.parquet") \
        if check.oddities else ["None: every image is plain 8-bit RGB without rotation."]
    md += ["", f"## Warnings ({len(check.warnings)})", ""]
    md += _table(["file", "problem"], [[f.path, f.problem] for f in check.warnings], "problems.csv") \
        if check.warnings else ["None."]
    md += ["", "Files: images.parquet (every image's metadata and hashes), problems.csv, leakage.csv"
           + "".join(f", {p.name}" for p in plots) + "."]
    return "\n".join(md) + "\n"


def _table(header: list[str], rows: list[list], full_file: str) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows[:MD_ROWS]]
    if len(rows) > MD_ROWS:
        out.append(f"\n{len(rows) - MD_ROWS} more in {full_file}.")
    return out


def _leak_section(leaks: list[LeakPair]) -> list[str]:
    md = ["", "## Leakage", "",
          f"Exact duplicates share a sha1; near duplicates have perceptual hashes (64-bit DCT pHash) at most "
          f"{NEAR_DUPLICATE_BITS} bits apart, or one's within that of the other's mirror image (kind 'near, "
          f"mirrored'), confirmed by a 16x16 thumbnail correlation of at least {NEAR_DUPLICATE_MIN_CORRELATION} "
          "(trueface.data.leakage states how both thresholds were measured, and what they miss). "
          "Near pairs inside one domain, split and label are not leakage and are not listed; exact copies "
          "(same sha1) are listed even there, since such a file counts twice."]
    counts = leak_summary(leaks)
    md += ["", "```", "\n".join(f"{k}: {v}" for k, v in counts.items()), "```", ""]
    if not leaks:
        return md + ["No pairs."]
    return md + _table(["kind", "a", "b", "distance", "across"],
                       [[p.kind + (", mirrored" if p.mirrored else ""), f"{p.a} ({p.a_domain}/{p.a_split})",
                         f"{p.b} ({p.b_domain}/{p.b_split})", p.distance,
                         ", ".join(n for n, on in (("split", p.cross_split), ("domain", p.cross_domain),
                                                   ("label", p.cross_label)) if on)] for p in leaks], "leakage.csv")


def _audit_section(check: DataCheck, plots: list[Path]) -> list[str]:
    md = ["", "## Format-shortcut audit", "",
          f"A small classifier sees only each file's metadata ({', '.join(METADATA_FIELDS)}) and predicts real or "
          f"fake, cross-validated per domain (all splits together), and per split where a split has at least "
          f"{MIN_CELL_CLASS} images of each class. A warning means the lower bound of its AUC is above {WARN_AUC} "
          f"({BOUND_METHOD}): the file format gives the label away, and a detector can learn it instead of the "
          "face. The top field is the one whose own cross-validated model separates best. Remove a shortcut with "
          "data.normalize=jpeg:<quality>@<size>, which re-encodes every image alike.", ""]
    rows = []
    for a in (a for a in check.audits if not a.split):  # a domain, then its splits
        rows += [_audit_row(x) for x in [a, *a.cells]]
    md += _table(["domain", "split", "real", "fake", "metadata AUC", "lower bound", "top field", "verdict", "how"],
                 rows, "report")
    md += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return md


def _audit_row(a: DomainAudit) -> list:
    def number(x) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    return [a.domain, a.split or "all", a.n_real, a.n_fake, number(a.auc),
            number(a.auc_low), a.separating_field or "", "**warning**" if a.warning else "ok",
            a.describe()]

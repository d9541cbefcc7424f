"""The cross-domain comparison table: runs, searches and ablation rows side by side, per test
domain and combined, each AUC with its 95% interval and, against a reference, the difference with
its interval.

Usage::

    from trueface.compare import compare, units_from_paths
    loaded = units_from_paths(["runs/a", "runs/b", "results/abl-x"])      # paths or URIs
    result = compare(loaded.units, Path("results/compare-x"), reference=loaded.reference)
    print(result.markdown)

    python -m jobs.aggregate runs/a runs/b results/abl-x --reference full   # the same, from the shell

A **unit** is a row of the table: a label and one evaluation report per seed (a folder written by
trueface.results.write_report: ``metrics.parquet``, ``predictions.parquet``, ``config.yaml``) with
the weights to read from it (``ema`` or ``raw``).

**Intervals** (trueface.stats), per unit and domain: with 2 or more seeds, the mean of the seeds'
AUCs with a Student-t interval over the seeds (its bounds clipped to [0, 1]); with one seed, that
seed's AUC with a percentile bootstrap over the test images (stratified by label, and in the
combined column by domain too; it measures only which test images were drawn, not training noise).
The **difference** to the reference: over the seeds both units have (paired t) when they share 2 or
more; when each has 2 or more seeds but they share fewer, the difference of their mean AUCs over
all their seeds (Welch t, unpaired); when either has one seed, over the test images both scored,
matched by path, with one seed each (the first seed they share, else each one's first; a paired
bootstrap, blind to training noise). The t methods compare AUCs, so they need every seed involved
to have scored the same images. An interval that includes 0 is reported as "no evidence of a
difference".

**Paths** ``units_from_paths`` understands (a URI's files are pulled to ``<cache>/staging``):

- an evaluation report (holds ``metrics.parquet``): one unit, labelled with the run name of its
  ``config.yaml`` (else the folder's name);
- a run folder (``config.yaml`` and ``stage1/`` or ``stage2/``): its evaluation, which the pipeline
  writes to ``<output.results_dir>/<run_name>`` of the saved config;
- a search (``trueface-tune.json``) or its report (``trials.parquet`` and ``test/``): the best
  trial's test report, ``test/`` of what jobs.aggregate wrote;
- an ablation's results folder (``ablation.json``, written by jobs.ablate) or its storage folder
  (``trueface-ablate.json``, naming the results folder): one unit per variant.

``ablation.json``::

    {"name": "abl-x", "reference": "full",
     "variants": [{"name": "full", "description": "the full recipe",
                   "evaluations": [{"seed": 0, "dir": "evals/full/seed0", "weights": "ema"}, ...]},
                  ...]}

``dir`` is relative to the folder of ``ablation.json``; ``weights`` defaults to ``ema``; other keys
(``kind``, ``dropped``, ``command``) are ignored. The reference is the file's unless the caller
names one. Labels are unique: a repeated one gets its source's name in front (``abl-y/full``).

Files ``compare`` writes: ``comparison.md`` (the table, the differences in plain words, the method
of every interval), ``comparison.csv`` and ``comparison.parquet`` (one row per unit and domain,
with each seed's AUC in ``auc_seed<k>``), ``heatmap.png`` (units x domains, mean AUC) and, with a
reference, ``forest.png`` (each difference with its interval, a line at 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from trueface.atomic import atomic_write_bytes, atomic_write_text
from trueface.results import COMBINED, csv_text, figure_png, markdown_table, parquet_bytes
from trueface.stats import (BOOTSTRAP_IMAGES, PAIRED_BOOTSTRAP_IMAGES, PAIRED_T_SEEDS, T_SEEDS, WELCH_T_SEEDS,
                            Interval, bootstrap_auc, paired_bootstrap_auc_diff, paired_t_diff, t_interval,
                            welch_t_diff)
from trueface.search_report import TEST_DIR, TESTED_FILE, stale_test_report
from trueface.storage import Mirror, absolute, join

__all__ = ["ABLATION_FILE", "Comparison", "CompareError", "SeedReport", "Unit", "Units", "cell_text", "compare",
           "comparison_markdown", "comparison_rows", "plain_words", "units_from_ablation", "units_from_paths",
           "write_comparison"]

ABLATION_FILE = "ablation.json"
ABLATION_JOB_FILE = "trueface-ablate.json"  # jobs.ablate's job file, in the ablation's storage folder
SEARCH_FILE = "trueface-tune.json"  # jobs.tune's spec file (jobs.ray_tune.SPEC_FILE; trueface/ never imports jobs/)
REPORT_FILES = ("metrics.parquet", "predictions.parquet", "config.yaml")
WEIGHTS = ("ema", "raw")

_METHOD_TEXT = {
    T_SEEDS: "t over seeds: the mean of the seeds' AUCs +- t(n-1) x sd / sqrt(n), sd over the seeds "
             "(their AUCs: columns auc_seed<k> of comparison.csv), its bounds clipped to [0, 1] (an AUC cannot "
             "leave it; near 1 the interval is then shorter above the mean than below)",
    BOOTSTRAP_IMAGES: "bootstrap over images (one seed): {n_boot} resamples of the test images within each class "
                      "(and, in the combined column, within each domain), "
                      "the percentiles around the middle {pct}; it measures how much the AUC owes to which test "
                      "images were drawn, not training noise: another seed may land outside it",
    PAIRED_T_SEEDS: "paired t over seeds: the mean of the per-seed differences (seeds both units have) with its "
                    "t interval",
    WELCH_T_SEEDS: "Welch t over seeds (unpaired: both units have 2 or more seeds but fewer than 2 in common): the "
                   "difference of the two units' mean AUCs over all their seeds +- t(df) x sqrt(sd_a^2/n_a + "
                   "sd_b^2/n_b), df by Welch-Satterthwaite; valid only where every seed of both scored the same "
                   "images",
    PAIRED_BOOTSTRAP_IMAGES: "paired bootstrap over images (one seed each): the AUC difference on the same "
                             "{n_boot} resamples of the images both units scored (matched by path); like the "
                             "bootstrap above, it says nothing of whether the difference holds over seeds",
}


class CompareError(ValueError):
    """A path or unit cannot be compared; the message names the file or key and what was expected."""


@dataclass(frozen=True)
class SeedReport:
    """One evaluation of a unit: a local report folder, its seed (None: the ``seed`` of its
    config.yaml) and the weights read from it. ``source``: where it came from, as users name it."""

    dir: Path
    seed: int | None = None
    weights: str = "ema"
    source: str = ""


@dataclass(frozen=True)
class Unit:
    """A row of the table: one evaluation per seed."""

    label: str
    evaluations: tuple[SeedReport, ...]
    description: str = ""


class Units(NamedTuple):
    """What ``units_from_paths`` found, and the reference an ablation named (None: none)."""

    units: list[Unit]
    reference: str | None


@dataclass
class Comparison:
    """What ``compare`` wrote: the folder, its long-form rows, the markdown text and the files."""

    out_dir: Path
    rows: list[dict]
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading evaluations


@dataclass
class _Seed:
    """An evaluation read back: per domain, its metrics row for the weights; predictions on demand."""

    seed: int
    report: SeedReport
    metrics: dict[str, dict]
    _predictions: pa.Table | None = None

    def auc(self, domain: str) -> float:
        value = self.metrics[domain].get("auc")
        return math.nan if value is None else float(value)

    def predictions(self, domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(paths, labels, scores) of ``domain`` (all of the weights' images for ``combined``)."""
        if self._predictions is None:
            self._predictions = _read_predictions(self.report)
        table = self._predictions
        if domain != COMBINED:
            mask = np.asarray(table.column("domain").to_pylist()) == domain
            table = table.filter(pa.array(mask))
        return (np.asarray(table.column("path").to_pylist(), dtype=object),
                np.asarray(table.column("label").to_numpy(), dtype=np.int64),
                np.asarray(table.column("score").to_numpy(), dtype=np.float64))

    def strata(self, domain: str) -> np.ndarray | None:
        """Each image's domain for ``combined`` (in predictions' order), so its bootstrap keeps every
        domain's image counts as the test set fixes them; None for one domain."""
        if domain != COMBINED:
            return None
        self.predictions(domain)  # reads the table once
        return np.asarray(self._predictions.column("domain").to_pylist(), dtype=object)


def _read_parquet(path: Path, what: str) -> pa.Table:
    if not path.is_file():
        raise CompareError(f"{path.parent}: no {path.name}, so it is not a complete evaluation report ({what}; "
                           f"trueface.results.write_report writes it)")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:  # cut short, or not Parquet at all
        raise CompareError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}); the evaluation "
                           f"report is damaged (an interrupted copy or write?): copy it again, or score the "
                           f"checkpoint again (python -m jobs.evaluate)") from exc


def _read_metrics(report: SeedReport) -> dict[str, dict]:
    rows = _read_parquet(report.dir / "metrics.parquet", "the per-domain metrics").to_pylist()
    mine = [r for r in rows if r.get("weights") == report.weights]
    if not mine:
        present = sorted({str(r.get("weights")) for r in rows})
        raise CompareError(f"{report.dir / 'metrics.parquet'} has no rows for weights {report.weights!r} "
                           f"(it has {', '.join(present) or 'none'}); choose one of those (--weights)")
    return {str(r["domain"]): r for r in mine}


def _read_predictions(report: SeedReport) -> pa.Table:
    table = _read_parquet(report.dir / "predictions.parquet", "the per-image scores the bootstrap resamples")
    mask = np.asarray(table.column("weights").to_pylist()) == report.weights
    return table.filter(pa.array(mask))


def _config_values(folder: Path) -> dict:
    """The saved config.yaml as a plain dict ({} when there is none)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CompareError(f"{path}: not readable YAML ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _resolved_seed(report: SeedReport, position: int) -> int:
    """The report's seed as given, else its config.yaml's, else its position in the unit."""
    return int(report.seed if report.seed is not None else _config_values(report.dir).get("seed", position))


def _load_unit(unit: Unit) -> list[_Seed]:
    """The unit's evaluations read back, each with its seed (given, else its config's, else its
    position); two evaluations of one seed are refused, since pairing by seed would be ambiguous."""
    if not unit.evaluations:
        raise CompareError(f"unit {unit.label!r} has no evaluations")
    seeds = []
    for i, report in enumerate(unit.evaluations):
        if report.weights not in WEIGHTS:
            raise CompareError(f"unit {unit.label!r}: weights {report.weights!r} must be one of {', '.join(WEIGHTS)}")
        seeds.append(_Seed(_resolved_seed(report, i), report, _read_metrics(report)))
    numbers = [s.seed for s in seeds]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        dirs = [str(s.report.dir) for s in seeds if s.seed in repeated]
        raise CompareError(f"unit {unit.label!r} has seed(s) {repeated} more than once ({', '.join(dirs)}); "
                           f"each evaluation of a unit must come from another seed")
    return seeds


# --------------------------------------------------------------------------- the rows


def plain_words(diff: Interval, reference: str) -> str:
    """The difference in words: whether its interval shows one, and which way."""
    if math.isnan(diff.mean):
        if diff.n == 0 and diff.method in (PAIRED_T_SEEDS, WELCH_T_SEEDS):  # a seed scored other images
            return "not comparable (scored on different test images)"
        if diff.n == 0:  # a pairing over images found none: the two were scored on different test data
            return "not comparable (no test images in common: scored on different data)"
        return "not comparable (AUC undefined: one class only)"
    if not diff.has_bounds:
        return "one value only: no interval"
    if diff.includes_zero:
        return "interval includes 0: no evidence of a difference"
    return f"lower than {reference}" if diff.high < 0 else f"higher than {reference}"


def _nan_interval(n: int, method: str, confidence: float) -> Interval:
    return Interval(math.nan, math.nan, math.nan, n, method, confidence)


def _auc_interval(seeds: list[_Seed], domain: str, confidence: float, n_boot: int) -> Interval:
    if len(seeds) >= 2:
        aucs = [s.auc(domain) for s in seeds]
        if any(math.isnan(a) for a in aucs):
            return _nan_interval(len(aucs), T_SEEDS, confidence)
        return _within_unit(t_interval(aucs, confidence))
    _, labels, scores = seeds[0].predictions(domain)
    if len(set(labels.tolist())) < 2:
        return _nan_interval(len(labels), BOOTSTRAP_IMAGES, confidence)
    return bootstrap_auc(labels, scores, n_boot, confidence=confidence, strata=seeds[0].strata(domain))


def _within_unit(interval: Interval) -> Interval:
    """An AUC interval with its bounds clipped to [0, 1]: a t interval over seeds near the ceiling
    (0.995, 0.999, 0.990) would otherwise end above 1. Differences are never clipped."""
    if not interval.has_bounds:
        return interval
    return replace(interval, low=min(max(interval.low, 0.0), 1.0), high=min(max(interval.high, 0.0), 1.0))


def _difference(mine: list[_Seed], ref: list[_Seed], domain: str, confidence: float,
                n_boot: int) -> tuple[Interval, str]:
    """(interval of AUC(unit) - AUC(reference), how it was paired)."""
    a, b = {s.seed: s for s in mine}, {s.seed: s for s in ref}
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        pairing = f"seeds {_seed_list(common)}"
        # a t over seeds pairs AUCs, not images: it means something only where each seed of the
        # two scored the same images (not another data root, nor another set of domains for combined)
        differing = [k for k in common if not _same_images(a[k], b[k], domain)]
        if differing:
            return _nan_interval(0, PAIRED_T_SEEDS, confidence), f"{pairing}; seed {differing[0]} scored other images"
        x, y = [a[k].auc(domain) for k in common], [b[k].auc(domain) for k in common]
        if any(math.isnan(v) for v in x + y):
            return _nan_interval(len(common), PAIRED_T_SEEDS, confidence), pairing
        return paired_t_diff(x, y, confidence), pairing
    if len(mine) >= 2 and len(ref) >= 2:
        # fewer than 2 seeds in common (e.g. 0,1,2 against 10,11,12): an unpaired t over every seed
        # of both, so training noise is in the interval; like the paired t it compares AUCs, so
        # every seed of both must have scored the same images
        pairing = f"seeds {_seed_list([s.seed for s in mine])} vs seeds {_seed_list([s.seed for s in ref])} (unpaired)"
        first = mine[0]
        differing = [f"{who} seed {s.seed}" for who, seeds in (("its", mine[1:]), ("the reference's", ref))
                     for s in seeds if not _same_images(first, s, domain)]
        if differing:
            return (_nan_interval(0, WELCH_T_SEEDS, confidence),
                    f"{pairing}; {differing[0]} scored other images than its seed {first.seed}")
        x, y = [s.auc(domain) for s in mine], [s.auc(domain) for s in ref]
        if any(math.isnan(v) for v in x + y):
            return _nan_interval(len(x) + len(y), WELCH_T_SEEDS, confidence), pairing
        return welch_t_diff(x, y, confidence), pairing
    # a unit with one seed: no spread over seeds to measure, so the images of one seed each
    sa, sb = (a[common[0]], b[common[0]]) if common else (mine[0], ref[0])
    paths_a, labels_a, scores_a = sa.predictions(domain)
    paths_b, labels_b, scores_b = sb.predictions(domain)
    _, ia, ib = np.intersect1d(paths_a, paths_b, return_indices=True)
    pairing = f"seed {sa.seed} vs seed {sb.seed}, {len(ia)} images in common"
    if (labels_a[ia] != labels_b[ib]).any():
        raise CompareError(f"{sa.report.dir} and {sb.report.dir} label {int((labels_a[ia] != labels_b[ib]).sum())} "
                           f"of the same images differently: they were not scored on the same test data")
    if len(set(labels_a[ia].tolist())) < 2:
        return _nan_interval(len(ia), PAIRED_BOOTSTRAP_IMAGES, confidence), pairing
    strata = sa.strata(domain)
    return paired_bootstrap_auc_diff(labels_a[ia], scores_a[ia], scores_b[ib], n_boot, confidence=confidence,
                                     strata=None if strata is None else strata[ia]), pairing


def _same_images(x: _Seed, y: _Seed, domain: str) -> bool:
    """Whether two evaluations scored the same (image, label) pairs in ``domain``."""
    paths_x, labels_x, _ = x.predictions(domain)
    paths_y, labels_y, _ = y.predictions(domain)
    return len(paths_x) == len(paths_y) and (
        sorted(zip(paths_x.tolist(), labels_x.tolist())) == sorted(zip(paths_y.tolist(), labels_y.tolist())))


def _seed_list(seeds: list[int]) -> str:
    return ",".join(str(s) for s in seeds)


def _domains(loaded: dict[str, list[_Seed]]) -> list[str]:
    """Every test domain in order of first appearance, then ``combined``."""
    names = [d for seeds in loaded.values() for s in seeds for d in s.metrics if d != COMBINED]
    return list(dict.fromkeys(names)) + [COMBINED]


def _interval_columns(prefix: str, interval: Interval | None) -> dict:
    if interval is None:
        return {f"{prefix}_mean": math.nan, f"{prefix}_low": math.nan, f"{prefix}_high": math.nan,
                f"{prefix}_method": "", f"{prefix}_n": 0}
    return {f"{prefix}_mean": interval.mean, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high,
            f"{prefix}_method": interval.method, f"{prefix}_n": interval.n}


def _check_labels(units: list[Unit], reference: str | None) -> None:
    if not units:
        raise CompareError("no units to compare")
    labels = [u.label for u in units]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise CompareError(f"unit label(s) {repeated} appear more than once; each row needs its own label")
    if reference is not None and reference not in labels:
        raise CompareError(f"reference {reference!r} is not one of the units: {', '.join(labels)}")


def comparison_rows(units: list[Unit], reference: str | None = None, *, confidence: float = 0.95,
                    n_boot: int = 2000) -> list[dict]:
    """One row per unit and domain (each test domain, then ``combined``): the mean AUC with its
    interval (``auc_*``), each seed's AUC (``auc_seed<k>``) and, with ``reference`` (a unit's label),
    the difference to it (``diff_*``), how it was paired and in plain words (``diff_words``).
    A domain a unit was not tested on has NaN numbers and ``n_seeds`` 0."""
    _check_labels(units, reference)
    loaded = {u.label: _load_unit(u) for u in units}
    all_seeds = sorted({s.seed for seeds in loaded.values() for s in seeds})
    rows = []
    for unit in units:
        for domain in _domains(loaded):
            seeds = [s for s in loaded[unit.label] if domain in s.metrics]
            interval = _auc_interval(seeds, domain, confidence, n_boot) if seeds else None
            row = {"unit": unit.label, "description": unit.description, "domain": domain,
                   "role": str(seeds[0].metrics[domain].get("role", "")) if seeds else "",
                   "weights": ",".join(dict.fromkeys(s.report.weights for s in loaded[unit.label])),
                   "n_seeds": len(seeds), "seeds": _seed_list([s.seed for s in seeds]),
                   "n_images": int(seeds[0].metrics[domain].get("n", 0)) if seeds else 0,
                   **_interval_columns("auc", interval)}
            by_seed = {s.seed: s.auc(domain) for s in seeds}
            row.update({f"auc_seed{k}": by_seed.get(k, math.nan) for k in all_seeds})
            if reference is not None:
                row.update(_difference_columns(seeds, loaded[reference], unit.label, reference, domain,
                                               confidence, n_boot))
            rows.append(row)
    return rows


def _difference_columns(seeds: list[_Seed], ref_all: list[_Seed], label: str, reference: str, domain: str,
                        confidence: float, n_boot: int) -> dict:
    ref = [s for s in ref_all if domain in s.metrics]
    head = {"reference": reference}
    if label == reference:
        return {**head, **_interval_columns("diff", None), "diff_pairing": "", "diff_words": "the reference"}
    if not seeds or not ref:
        return {**head, **_interval_columns("diff", None), "diff_pairing": "",
                "diff_words": f"not comparable: {domain} is not in {'this unit' if not seeds else reference}'s tests"}
    diff, pairing = _difference(seeds, ref, domain, confidence, n_boot)
    return {**head, **_interval_columns("diff", diff), "diff_pairing": pairing, "diff_words": plain_words(diff, reference)}


# --------------------------------------------------------------------------- markdown


def _interval_of(row: dict, prefix: str, confidence: float) -> Interval:
    return Interval(row[f"{prefix}_mean"], row[f"{prefix}_low"], row[f"{prefix}_high"], row[f"{prefix}_n"],
                    row[f"{prefix}_method"], confidence)


def cell_text(row: dict, prefix: str, confidence: float = 0.95, signed: bool = False) -> str:
    """A row's ``auc`` or ``diff`` interval as the tables print it (``-`` where there is none)."""
    if not row.get(f"{prefix}_method"):
        return "-"
    text = _interval_of(row, prefix, confidence).text()
    return text if not signed or text.startswith(("-", "n/a")) else "+" + text


def _unit_method(rows: list[dict]) -> str:
    """The interval column of a unit: its method and seed count, or each domain's where they
    differ (a domain that fewer seeds were tested on)."""
    def method(n: int) -> str:
        return f"t over {n} seeds" if n >= 2 else "bootstrap over images (1 seed)" if n == 1 else "not tested"

    counts = [r["n_seeds"] for r in rows]
    if len(set(counts)) == 1:
        return method(counts[0])
    return "; ".join(f"{r['domain']}: {method(r['n_seeds'])}" for r in rows)


def comparison_markdown(rows: list[dict], reference: str | None = None, *, confidence: float = 0.95,
                        n_boot: int = 2000, header: dict[str, str] | None = None) -> str:
    """``comparison.md``: the AUC table (rows units, columns domains), the roles, the differences to
    ``reference`` in plain words, and what each interval method means."""
    units = list(dict.fromkeys(r["unit"] for r in rows))
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    cell = {(r["unit"], r["domain"]): r for r in rows}
    pct = f"{confidence:.0%}"
    out = ["# Cross-domain comparison", ""]
    out += [f"- **{k}**: {v}" for k, v in (header or {}).items()]
    out += [f"- **confidence**: {pct} intervals", ""]
    out += [f"## Test AUC [{pct} interval]", ""]
    body = [[u, _unit_method([cell[(u, d)] for d in domains]), *(cell_text(cell[(u, d)], "auc", confidence) for d in domains)]
            for u in units]
    out += [markdown_table(["unit", "interval", *domains], body), ""]
    described = {r["unit"]: r["description"] for r in rows if r.get("description")}
    if described:
        out += ["Rows:", "", *(f"- {u}: {text}" for u, text in described.items()), ""]
    out += _roles_markdown(units, domains, cell)
    if reference is not None:
        out += [f"## Difference to {reference}: AUC(unit) - AUC({reference})", ""]
        diff_body = [[r["unit"], r["domain"], cell_text(r, "diff", confidence, signed=True), r["diff_method"] or "-",
                      r["diff_pairing"] or "-", r["diff_words"]] for r in rows if r["unit"] != reference]
        out += [markdown_table(["unit", "domain", f"difference [{pct} interval]", "method", "paired on",
                                "in plain words"], diff_body), ""]
    methods = [m for m in _METHOD_TEXT if any(m in (r["auc_method"], r.get("diff_method")) for r in rows)]
    out += ["## How the intervals were computed", ""]
    out += [f"- {_METHOD_TEXT[m].format(n_boot=n_boot, pct=pct)}" for m in methods]
    return "\n".join(out) + "\n"


def _roles_markdown(units: list[str], domains: list[str], cell: dict) -> list[str]:
    """Each domain's role (trained on, held out): one line per domain, or a table when units differ
    (leave-one-domain-out rows hold out another domain each)."""
    roles = {d: {u: cell[(u, d)]["role"] for u in units if cell[(u, d)]["role"]} for d in domains if d != COMBINED}
    if all(len(set(r.values())) <= 1 for r in roles.values()):
        lines = [f"- {d}: {next(iter(r.values()), 'not tested')}" for d, r in roles.items()]
        return ["Test domains:", "", *lines, ""]
    body = [[u, *(cell[(u, d)]["role"] or "-" for d in roles)] for u in units]
    return ["Roles of the test domains:", "", markdown_table(["unit", *roles], body), ""]


# --------------------------------------------------------------------------- plots


def heatmap_png(rows: list[dict]) -> bytes:
    """Units x domains, coloured by mean AUC and annotated with it (grey: not tested)."""
    import matplotlib.pyplot as plt

    units = list(dict.fromkeys(r["unit"] for r in rows))
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    values = np.array([[next(r["auc_mean"] for r in rows if r["unit"] == u and r["domain"] == d) for d in domains]
                       for u in units], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(domains), 1.0 + 0.55 * len(units)), layout="constrained")
    low = min(0.5, float(np.nanmin(values))) if np.isfinite(values).any() else 0.5
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        dark = not math.isnan(value) and value < low + (1.0 - low) * 0.6  # white on viridis' dark end
        ax.text(j, i, "n/a" if math.isnan(value) else f"{value:.3f}", ha="center", va="center",
                color="white" if dark else "black", fontsize="small")
    ax.set_xticks(range(len(domains)), labels=domains, rotation=30, ha="right")
    ax.set_yticks(range(len(units)), labels=units)
    ax.set_title("Test AUC (mean over each row's seeds)")
    fig.colorbar(image, ax=ax, label="AUC")
    return figure_png(fig)


def forest_png(rows: list[dict], reference: str) -> bytes:
    """One panel per domain: each unit's difference to ``reference`` with its interval, a line at 0;
    red where the interval excludes 0."""
    import matplotlib.pyplot as plt

    units = [u for u in dict.fromkeys(r["unit"] for r in rows) if u != reference]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    fig, axes = plt.subplots(1, len(domains), figsize=(2.0 + 2.6 * len(domains), 1.2 + 0.45 * max(1, len(units))),
                             sharey=True, squeeze=False, layout="constrained")
    for ax, domain in zip(axes[0], domains):
        for y, unit in enumerate(units):
            row = next(r for r in rows if r["unit"] == unit and r["domain"] == domain)
            mean, low, high = row["diff_mean"], row["diff_low"], row["diff_high"]
            if math.isnan(mean):
                continue
            bounded = not (math.isnan(low) or math.isnan(high))
            colour = "tab:red" if bounded and (high < 0 or low > 0) else "tab:blue"
            if bounded:
                ax.plot([low, high], [y, y], color=colour, linewidth=2)
            ax.plot([mean], [y], "o", color=colour)
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set(title=domain, xlabel=f"AUC - AUC({reference})")
    axes[0][0].set_yticks(range(len(units)), labels=units)
    axes[0][0].set_ylim(len(units) - 0.5, -0.5)  # first unit on top, as in the table
    fig.suptitle(f"Difference to {reference} (red: interval excludes 0)")
    return figure_png(fig)


# --------------------------------------------------------------------------- writing


def write_comparison(out_dir: Path, rows: list[dict], markdown: str, reference: str | None = None) -> dict[str, Path]:
    """Write comparison.csv/.parquet, heatmap.png, forest.png (with a reference and another unit)
    and, last, comparison.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "comparison.csv": atomic_write_text(out_dir / "comparison.csv", csv_text(rows)),
        "comparison.parquet": atomic_write_bytes(out_dir / "comparison.parquet", parquet_bytes(pa.Table.from_pylist(rows))),
        "heatmap.png": atomic_write_bytes(out_dir / "heatmap.png", heatmap_png(rows)),
    }
    if reference is not None and any(r["unit"] != reference for r in rows):
        files["forest.png"] = atomic_write_bytes(out_dir / "forest.png", forest_png(rows, reference))
    files["comparison.md"] = atomic_write_text(out_dir / "comparison.md", markdown)
    return files


def compare(units: list[Unit], out_dir: Path, reference: str | None = None, *, confidence: float = 0.95,
            n_boot: int = 2000, header: dict[str, str] | None = None) -> Comparison:
    """Build the comparison of ``units`` and write it into ``out_dir`` (a local folder; push it
    yourself for a URI). ``header``: extra ``- **key**: value`` lines for comparison.md."""
    rows = comparison_rows(units, reference, confidence=confidence, n_boot=n_boot)
    sources = {u.label: "; ".join(f"seed {_resolved_seed(e, i)}: {e.source or e.dir} ({e.weights})"
                                  for i, e in enumerate(u.evaluations)) for u in units}
    text = comparison_markdown(rows, reference, confidence=confidence, n_boot=n_boot, header=header)
    text += "\n## Sources\n\n" + "\n".join(f"- {label}: {src}" for label, src in sources.items()) + "\n"
    return Comparison(Path(out_dir), rows, text, write_comparison(Path(out_dir), rows, text, reference))


# --------------------------------------------------------------------------- loading from paths


def _default_cache() -> str:
    from trueface.config import Config

    return Config().data.cache_dir


def _evaluation(location: str, cache_dir: str, seed: int | None = None, weights: str = "ema") -> SeedReport:
    """An evaluation report folder (pulled when it is a URI), checked to hold metrics.parquet."""
    folder = Mirror.of(location, cache_dir)
    folder.pull(*REPORT_FILES)
    if not (folder.local / "metrics.parquet").is_file():
        raise CompareError(f"{location}: no metrics.parquet, so no evaluation report is there")
    return SeedReport(folder.local, seed, weights, location)


def units_from_ablation(location: str, cache_dir: str | None = None) -> Units:
    """One unit per variant of the ablation whose ``ablation.json`` is in ``location``."""
    cache = cache_dir or _default_cache()
    folder = Mirror.of(location, cache)
    folder.pull(ABLATION_FILE)
    path = folder.local / ABLATION_FILE
    try:
        data = json.loads(path.read_text())
        variants = data["variants"]
        units = [Unit(str(v["name"]), tuple(
            _evaluation(join(location, e["dir"]), cache, int(e["seed"]) if e.get("seed") is not None else None,
                        str(e.get("weights", "ema")))
            for e in v["evaluations"]), str(v.get("description", ""))) for v in variants]
    except CompareError:
        raise
    except FileNotFoundError as exc:
        raise CompareError(f"{location}: no {ABLATION_FILE}") from exc
    except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CompareError(f"{location}/{ABLATION_FILE}: not a valid ablation file ({type(exc).__name__}: {exc}); "
                           f"expected {{\"name\", \"reference\", \"variants\": [{{\"name\", \"evaluations\": "
                           f"[{{\"seed\", \"dir\", \"weights\"}}]}}]}} (see trueface/compare.py)") from exc
    return Units(units, data.get("reference"))


def _from_run(location: str, cache: str, weights: str) -> Unit:
    """A run folder: its evaluation is at <output.results_dir>/<run_name> of its saved config."""
    folder = Mirror.of(location, cache)
    folder.pull("config.yaml")
    values = _config_values(folder.local)
    results_dir = (values.get("output") or {}).get("results_dir")
    run_name = values.get("run_name")
    if not results_dir or not run_name:
        raise CompareError(f"{location}/config.yaml names no run_name and output.results_dir; "
                           f"is it a TrueFace run's saved config?")
    results = join(absolute(results_dir), run_name)
    try:
        report = _evaluation(results, cache, values.get("seed"), weights)
    except CompareError as exc:
        raise CompareError(f"run {run_name} ({location}) has no evaluation at {results} yet: the pipeline writes "
                           f"it once training ends (python -m jobs.evaluate scores a checkpoint)") from exc
    return Unit(str(run_name), (report,))


def _from_search(location: str, cache: str, weights: str, spec_file: bool) -> Unit:
    """A search's best trial's test report: ``test/`` of the report folder (from the spec file)."""
    folder = Mirror.of(location, cache)
    name = folder.local.name
    report_location = location
    if spec_file:
        folder.pull(SEARCH_FILE)
        spec = read_job_file(location, folder.local / SEARCH_FILE, "search", "python -m jobs.tune")
        if not spec.get("results_dir"):
            raise CompareError(f"{location}/{SEARCH_FILE} names no results_dir, so the search's report cannot be "
                               f"found; give its report folder (results/<name>, with trials.parquet and test/) "
                               f"instead, or restore the spec file python -m jobs.tune wrote")
        name, report_location = str(spec.get("name", name)), str(spec["results_dir"])
    test = join(report_location, TEST_DIR)
    report_folder = Mirror.of(report_location, cache)
    report_folder.pull("trials.parquet", f"{TEST_DIR}/{TESTED_FILE}")
    stale = stale_test_report(report_folder.local)
    if stale:
        raise CompareError(f"search {name} ({report_location}): {stale}. Run python -m jobs.aggregate {location} "
                           "(without --no-test) to score it first")
    try:
        report = _evaluation(test, cache, None, weights)
    except CompareError as exc:
        raise CompareError(f"search {name}: no test report at {test}; run python -m jobs.aggregate {location} "
                           f"(without --no-test) to score its best trial first") from exc
    return Unit(name, (report,))


def read_job_file(location: str, path: Path, what: str, writer: str) -> dict:
    """A job's JSON file (a search's spec, an ablation's job file) as a dict, or a CompareError
    naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CompareError(f"{location}/{path.name}: not readable JSON ({exc}); {writer} writes it when the {what} "
                           f"starts: was it cut short (an interrupted copy, a full disk)? Restore it from the "
                           f"{what}'s storage") from exc
    if not isinstance(data, dict):
        raise CompareError(f"{location}/{path.name}: expected a JSON object (as {writer} writes), "
                           f"got {type(data).__name__}")
    return data


def _kind(folder: Mirror) -> str:
    """What a folder holds, from the files that mark each kind."""
    if folder.exists(ABLATION_FILE):
        return "ablation"
    if folder.exists(ABLATION_JOB_FILE):
        return "ablation storage"
    if folder.exists(SEARCH_FILE):
        return "search"
    if folder.exists("trials.parquet") and folder.exists(TEST_DIR):
        return "search report"
    if folder.exists("metrics.parquet"):
        return "evaluation"
    if folder.exists("config.yaml") and (folder.exists("stage1") or folder.exists("stage2")):
        return "run"
    return "unknown"


_EXPECTED = ("an evaluation report (metrics.parquet), a run folder (config.yaml with stage1/ or stage2/), a search "
             f"({SEARCH_FILE}) or its report (trials.parquet and test/), or an ablation ({ABLATION_FILE}, or "
             f"{ABLATION_JOB_FILE} in its storage folder)")


def _units_of(location: str, cache: str, weights: str) -> Units:
    folder = Mirror.of(location, cache)
    kind = _kind(folder)
    if kind == "ablation":
        return units_from_ablation(location, cache)
    if kind == "ablation storage":
        folder.pull(ABLATION_JOB_FILE)
        job = read_job_file(location, folder.local / ABLATION_JOB_FILE, "ablation", "python -m jobs.ablate")
        results = job.get("results_dir")
        if not results or not Mirror.of(results, cache).exists(ABLATION_FILE):
            raise CompareError(f"ablation {location}: no {ABLATION_FILE} in its results folder {results} yet; "
                               f"it is written when the ablation finishes (python -m jobs.ablate --resume)")
        return units_from_ablation(results, cache)
    if kind in ("search", "search report"):
        return Units([_from_search(location, cache, weights, kind == "search")], None)
    if kind == "run":
        return Units([_from_run(location, cache, weights)], None)
    if kind == "evaluation":
        report = _evaluation(location, cache, None, weights)
        label = str(_config_values(report.dir).get("run_name") or folder.local.name)
        return Units([Unit(label, (report,))], None)
    if not folder.remote and not folder.local.exists():
        raise CompareError(f"{location} does not exist")
    raise CompareError(f"{location}: nothing to compare there; expected {_EXPECTED}")


def units_from_paths(paths: list[str | Path], weights: str = "ema", cache_dir: str | None = None) -> Units:
    """The units of each path or URI (see the module docstring for what each may be) and the
    reference the first ablation among them names. ``weights`` applies where the path does not say
    (an ablation's rows say which weights each reads). Repeated labels get their source's name in
    front (``abl-y/full``), or a number."""
    if weights not in WEIGHTS:
        raise CompareError(f"weights {weights!r} must be one of {', '.join(WEIGHTS)}")
    cache = cache_dir or _default_cache()
    units: list[Unit] = []
    reference = None
    ablations = 0  # paths whose rows say their own weights (only an ablation names a reference)
    for path in paths:
        location = absolute(path)
        found = _units_of(location, cache, weights)
        ablations += found.reference is not None
        source = Path(location.partition("?")[0].rstrip("/")).name
        for unit in found.units:
            label = _unique_label(unit.label, source, {u.label for u in units})
            if reference is None and unit.label == found.reference:
                reference = label  # the ablation's own reference row, renamed where its name was taken
            units.append(Unit(label, unit.evaluations, unit.description))
    if not units:
        raise CompareError("no units to compare: give at least one path")
    if weights != "ema" and ablations == len(paths):
        raise CompareError(f"weights {weights}: every path given is an ablation, whose rows say which weights each "
                           "reads (its no-ema row reads the raw ones), so it would change nothing; give it with a "
                           "run, search or evaluation path")
    return Units(units, reference)


def _unique_label(label: str, source: str, taken: set[str]) -> str:
    if label not in taken:
        return label
    candidate = f"{source}/{label}"
    k = 2
    while candidate in taken:
        candidate = f"{source}/{label}-{k}"
        k += 1
    return candidate

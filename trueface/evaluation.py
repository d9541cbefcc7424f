"""Evaluate a checkpoint per test domain and combined, for its raw and EMA weights.

Usage::

    report = evaluate_checkpoint(Path("runs/demo/stage2/best.pt"), layout, out_dir=Path("results/demo"))
    print(format_table(report.rows))

Thresholds are chosen on VALIDATION data (``eval.threshold_policy``, default Youden's J on the
combined validation splits of the domains the model was fine-tuned on), never on test data.
``eval.threshold_scope: per_domain`` also chooses one per validation domain on its own images;
a test domain without one (held out) is labelled at the pooled threshold, and every row says
which it used. The thresholds go to ``thresholds.json`` in the results folder and, for the
pipeline, beside the checkpoint (see trueface.thresholds): the checkpoint itself is never
rewritten. Each test domain is labelled with its honest role: trained on in Stage I and/or II,
or held out (flaw 4: the original called held-out splits of its training domains "unseen domains").

Calibration: with the thresholds comes a temperature per weights (and per validation domain under
``per_domain``), fitted on the same validation images (trueface.calibration); every row reports
ECE and Brier before (``ece``, ``brier``) and after (``ece_calibrated``, ``brier_calibrated``)
temperature scaling and the ``temperature`` used, and ``reliability_<weights>.png`` shows both.
AUC and thresholds come from the raw scores, as before: dividing logits by T > 0 keeps every
image's rank (AUC) and maps the threshold t to sigmoid(logit(t) / T), labelling every image the
same, so choosing thresholds on calibrated scores would change nothing but their printed value.
Saved thresholds without temperatures (files written before calibration) evaluate as
uncalibrated (temperature 1), and the header says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trueface.atomic import atomic_write_text
from trueface.checkpoint import load_checkpoint
from trueface.config import Config, apply_values, from_dict, to_yaml
from trueface.data.layout import DataLayout, Sample, pick_domains
from trueface.distributed import DistInfo
from trueface.inference import predict_scores
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.results import Predictions, evaluation_rows, write_report
from trueface.thresholds import (FILE_NAME, Thresholds, ThresholdsError, choose_thresholds, read_thresholds, stamp,
                                 thresholds_path, write_thresholds)

WEIGHTS = ("raw", "ema")
#: Values of ``ThresholdRequest.source``; "checkpoint" is the old name of "saved" (thresholds used to live in it).
THRESHOLD_FROM = ("auto", "valid", "saved", "checkpoint")

SCOPE_TEXT = {
    "pooled": "pooled: one threshold per weights, chosen on all validation domains together",
    "per_domain": "per_domain: each test domain at the threshold chosen on its own validation split, a domain "
                  "without one at the pooled threshold; the combined row labels each image at its domain's",
}


@dataclass
class EvaluationReport:
    rows: list[dict]
    thresholds: dict[str, float]  # weights -> pooled threshold
    threshold_source: str
    files: dict[str, Path]
    chosen: Thresholds
    threshold_file: Path  # where the thresholds used are kept: beside the checkpoint, or in the results


def load_models(state: dict, cfg: Config) -> dict[str, torch.nn.Module]:
    models = {}
    for name, key in (("raw", "model"), ("ema", "ema")):
        model = build_model(replace(cfg.model, weights="none"))
        model.load_state_dict(state[key])
        models[name] = model.eval()
    return models


def domain_roles(cfg: Config, test_domains: list[str], trained_stage: int) -> dict[str, str]:
    stage1 = set(cfg.stage1.domains)
    stage2 = set(cfg.stage2.domains) if trained_stage == 2 else set()
    roles = {}
    for d in test_domains:
        used = [name for name, doms in (("Stage I", stage1), ("Stage II", stage2)) if d in doms]
        roles[d] = f"trained ({' + '.join(used)}), held-out test split" if used else "held out (never trained on)"
    return roles


@dataclass(frozen=True)
class ThresholdRequest:
    """Where ``evaluate_checkpoint`` gets its decision thresholds, and whether it keeps them.

    ``source``: ``valid`` (choose on the layout's validation splits of the checkpoint's training
    domains), ``saved`` (alias ``checkpoint``: the checkpoint's thresholds file), or ``auto`` (the
    saved ones if the file exists with this policy and scope, else valid). A saved file chosen for
    other checkpoint bytes is refused (ThresholdsError). ``policy``/``scope`` default to the
    checkpoint's ``eval`` settings. ``save`` writes the chosen ones beside the checkpoint, where
    ``jobs.predict`` reads them, recording ``chosen_by`` as the program that chose them."""

    source: str = "auto"
    policy: str | None = None
    scope: str | None = None
    save: bool = False
    chosen_by: str = "trueface.evaluation"

    def __post_init__(self) -> None:
        if self.source not in THRESHOLD_FROM:
            raise ValueError(f"threshold source {self.source!r} must be one of {', '.join(THRESHOLD_FROM)}")


def evaluate_checkpoint(
    checkpoint: Path,
    layout: DataLayout,
    out_dir: Path,
    *,
    test_domains: tuple[str, ...] = (),
    thresholds: ThresholdRequest = ThresholdRequest(),
    dist_info: DistInfo | None = None,
    train_overlap: dict[str, int] | None = None,
    config_values: dict | None = None,
) -> EvaluationReport:
    """Score the test splits of ``layout`` and write the tables into ``out_dir`` (rank 0), at the
    thresholds ``thresholds`` asks for (see ThresholdRequest). ``train_overlap`` (test domain ->
    images also in the checkpoint's training data, see trueface.data.overlap) adds that count to
    every row, so a table computed on overlapping data says so."""
    di = dist_info or DistInfo.current()
    state = load_checkpoint(checkpoint)
    cfg = apply_values(from_dict(state["config"]), config_values or {})
    request = thresholds
    policy, scope = request.policy or cfg.eval.threshold_policy, request.scope or cfg.eval.threshold_scope
    stage = int(state["stage"])
    image_size = cfg.stage(stage).image_size
    runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
    models = {k: m.to(runtime.device, memory_format=torch.channels_last) for k, m in load_models(state, cfg).items()}

    def score(samples: list[Sample]) -> dict[str, np.ndarray]:
        return {name: predict_scores(m, samples, image_size, runtime, cfg, di) for name, m in models.items()}

    saved = None if request.source == "valid" else saved_thresholds(checkpoint, request.source, policy, scope)
    if saved is not None:
        chosen, source = saved, f"{saved.describe()}; read from {thresholds_path(checkpoint)} ({saved.chosen_by}, {saved.chosen_at})"
    else:
        chosen, source = _choose(layout, _validation_domains(cfg, layout, stage), policy, scope, score)
    keep_beside = saved is not None or request.save
    threshold_file = thresholds_path(checkpoint) if keep_beside else Path(out_dir) / FILE_NAME

    domains = pick_domains(layout, test_domains, "test")
    test_samples = layout.gather(domains, "test")
    test = {name: _predictions(test_samples, s) for name, s in score(test_samples).items()}
    rows = evaluation_rows(test, chosen.pooled, source, domain_roles(cfg, domains, stage),
                           per_domain=chosen.per_domain if chosen.scope == "per_domain" else None,
                           threshold_file=str(threshold_file), calibration=chosen.temperatures)
    if train_overlap is not None:
        for row in rows:
            row["train_overlap"] = train_overlap.get(row["domain"], sum(train_overlap.get(d, 0) for d in domains))
    files: dict[str, Path] = {}
    if di.rank == 0:
        if saved is None:  # stamped here: hashing the checkpoint is rank 0's job alone
            chosen = stamp(chosen, Path(checkpoint), request.chosen_by, str(layout.root))
        if request.save:
            write_thresholds(Path(checkpoint), chosen)
        # The results keep a copy: a report names the thresholds it used even when none are saved.
        atomic_write_text(Path(out_dir) / FILE_NAME, chosen.to_json())
        header = {
            "checkpoint": str(checkpoint), "stage": str(stage), "data root": str(layout.root),
            "test domains": ", ".join(domains), "image size": str(image_size),
            "threshold": source, "threshold scope": SCOPE_TEXT[chosen.scope], "threshold file": str(threshold_file),
            "calibration": chosen.describe_calibration(),
            "flip test-time augmentation": str(cfg.eval.hflip_tta),
        }
        if train_overlap is not None:
            header["test images also in the training data"] = (
                f"{sum(train_overlap.get(d, 0) for d in domains)} (per domain: column train_overlap)")
        files = write_report(out_dir, rows, test, to_yaml(cfg), header, calibration=chosen.temperatures)
        files[FILE_NAME] = Path(out_dir) / FILE_NAME
    return EvaluationReport(rows, chosen.pooled, source, files, chosen, threshold_file)


def saved_thresholds(checkpoint: Path, threshold_from: str, policy: str, scope: str) -> Thresholds | None:
    """The checkpoint's saved thresholds when they are to be used, else None (choose on valid).
    A stale file is an error even under ``auto``: it means the checkpoint changed after its evaluation."""
    saved = read_thresholds(Path(checkpoint))
    if threshold_from == "auto":
        return saved if saved is not None and (saved.policy, saved.scope) == (policy, scope) else None
    if saved is None:
        raise ThresholdsError(f"{checkpoint} has no thresholds file ({thresholds_path(checkpoint)}; the pipeline "
                              "writes it when it evaluates): use --threshold-from valid to choose them on this data root")
    return saved


def _validation_domains(cfg: Config, layout: DataLayout, stage: int) -> list[str]:
    """The checkpoint's training domains that have a validation split here, else every domain that has one."""
    trained = cfg.stage2.domains if stage == 2 else cfg.stage1.domains
    return [d for d in trained if d in layout.domains_with("valid")] or layout.domains_with("valid")


def _choose(layout: DataLayout, val_domains: list[str], policy: str, scope: str, score) -> tuple[Thresholds, str]:
    if not val_domains:
        none = Thresholds(policy, scope, {w: 0.5 for w in WEIGHTS}, {}, {})
        return none, "0.5 (no validation split found to choose one)"
    val_samples = layout.gather(val_domains, "valid")
    labels = np.array([s.label for s in val_samples])
    chosen = choose_thresholds(labels, [s.domain for s in val_samples], score(val_samples), policy, scope)
    own = "; per domain on its own validation split" if scope == "per_domain" else ""
    return chosen, f"{policy} on validation ({', '.join(val_domains)}){own}"


def _predictions(samples: list[Sample], scores: np.ndarray) -> Predictions:
    return Predictions(
        paths=[s.path for s in samples], domains=[s.domain for s in samples],
        labels=np.array([s.label for s in samples], dtype=np.int64), scores=np.asarray(scores, dtype=np.float64),
    )

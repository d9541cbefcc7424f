"""Evaluate a checkpoint per test domain and combined, for its raw and EMA weights.

Usage::

    report = evaluate_checkpoint(Path("runs/demo/stage2/best.pt"), layout, out_dir=Path("results/demo"))
    print(format_table(report.rows))

Thresholds are chosen on VALIDATION data (``eval.threshold_policy``, default Youden's J on the
combined validation splits of the domains the model was fine-tuned on), never on test data, and
the policy is written into every table. Each test domain is labelled with its honest role:
trained on in Stage I and/or II, or held out (flaw 4: the original called held-out splits of its
training domains "unseen domains").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trueface.checkpoint import load_checkpoint, update_checkpoint
from trueface.config import Config, from_dict, to_yaml
from trueface.data.layout import DataLayout, Sample, pick_domains
from trueface.engine import DistInfo, predict_scores
from trueface.metrics import choose_threshold
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.results import Predictions, evaluation_rows, write_report

WEIGHTS = ("raw", "ema")


@dataclass
class EvaluationReport:
    rows: list[dict]
    thresholds: dict[str, float]
    threshold_source: str
    files: dict[str, Path]


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


def evaluate_checkpoint(
    checkpoint: Path,
    layout: DataLayout,
    out_dir: Path,
    *,
    test_domains: tuple[str, ...] = (),
    threshold_from: str = "auto",
    save_thresholds: bool = False,
    dist_info: DistInfo | None = None,
) -> EvaluationReport:
    """Score the test splits of ``layout`` and write the tables into ``out_dir`` (rank 0).

    ``threshold_from``: ``valid`` (choose on this layout's validation splits of the checkpoint's
    training domains), ``checkpoint`` (the thresholds saved in it), or ``auto`` (the saved ones if
    any, else valid). ``save_thresholds`` stores the chosen thresholds in the checkpoint so
    ``jobs.predict`` labels images with them.
    """
    di = dist_info or DistInfo.current()
    state = load_checkpoint(checkpoint)
    cfg = from_dict(state["config"])
    stage = int(state["stage"])
    image_size = cfg.stage(stage).image_size
    runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
    models = {k: m.to(runtime.device, memory_format=torch.channels_last) for k, m in load_models(state, cfg).items()}

    domains = pick_domains(layout, test_domains, "test")
    test_samples = layout.gather(domains, "test")
    thresholds, source = _thresholds(state, cfg, layout, models, image_size, runtime, di, threshold_from)
    test = {name: _predictions(test_samples, predict_scores(m, test_samples, image_size, runtime, cfg, di))
            for name, m in models.items()}
    rows = evaluation_rows(test, thresholds, f"{source}", domain_roles(cfg, domains, stage))
    files: dict[str, Path] = {}
    if di.rank == 0:
        header = {
            "checkpoint": str(checkpoint), "stage": str(stage), "data root": str(layout.root),
            "test domains": ", ".join(domains), "image size": str(image_size),
            "threshold": source, "flip test-time augmentation": str(cfg.eval.hflip_tta),
        }
        files = write_report(out_dir, rows, test, to_yaml(cfg), header)
        if save_thresholds:
            update_checkpoint(checkpoint, thresholds=thresholds, threshold_source=source)
    return EvaluationReport(rows, thresholds, source, files)


def _thresholds(state, cfg, layout, models, image_size, runtime, di, threshold_from) -> tuple[dict[str, float], str]:
    saved = state.get("thresholds")
    if threshold_from == "checkpoint" or (threshold_from == "auto" and saved):
        if not saved:
            raise ValueError("the checkpoint holds no thresholds; use --threshold-from valid")
        return {k: float(v) for k, v in saved.items()}, f"saved in checkpoint ({state.get('threshold_source', '?')})"
    policy = cfg.eval.threshold_policy
    val_domains = [d for d in (cfg.stage2.domains if state["stage"] == 2 else cfg.stage1.domains) if d in layout.domains_with("valid")]
    val_domains = val_domains or layout.domains_with("valid")
    if not val_domains:
        return {k: 0.5 for k in models}, "0.5 (no validation split found to choose one)"
    val_samples = layout.gather(val_domains, "valid")
    labels = np.array([s.label for s in val_samples])
    thresholds = {
        name: float(choose_threshold(labels, predict_scores(m, val_samples, image_size, runtime, cfg, di), policy))
        for name, m in models.items()
    }
    return thresholds, f"{policy} on validation ({', '.join(val_domains)})"


def _predictions(samples: list[Sample], scores: np.ndarray) -> Predictions:
    return Predictions(
        paths=[s.path for s in samples], domains=[s.domain for s in samples],
        labels=np.array([s.label for s in samples], dtype=np.int64), scores=np.asarray(scores, dtype=np.float64),
    )

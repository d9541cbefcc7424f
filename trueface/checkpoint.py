"""Single-file checkpoints that resume everything, written atomically, loaded with weights_only.

Usage::

    save_checkpoint(path, {"model": ..., "ema": ..., "optimizer": ..., "stage": 1, "config": ...})
    state = load_checkpoint(path)            # plain dict of tensors and Python values
    done = finished_stage(Path("runs/demo/stage1"))   # the stage's summary, or None while it runs

A stage's ``last.pt`` holds the unwrapped model (no DDP/compile prefixes), the EMA, the
optimizer, the grad scaler, step, epoch (the next one to run), stage, the resolved config and the
early-stopping state: all it takes to resume. ``best.pt`` is the same without optimizer and
scaler (half the size): it only starts Stage II, is evaluated and predicts. It is written to a temporary name in the same folder, fsynced and renamed, so a crash
while writing never replaces a good file with a partial one.
Once its stage has finished, a checkpoint is never rewritten: what is chosen later (the decision
thresholds) goes to a file beside it (trueface.thresholds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trueface.atomic import atomic_open

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unusable; the message names the file."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise CheckpointError(f"{path} is not a readable TrueFace checkpoint: {exc}") from exc
    missing = {"model", "ema", "stage", "config"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"{path} is not a TrueFace checkpoint (missing {', '.join(sorted(missing))})")
    return state


@dataclass
class StageResult:
    """A finished stage, as ``stage.json`` records it. ``best_select_auc_ema`` is the validation AUC
    of the EMA weights by ``select_on`` (``eval.select_on``) at ``best_epoch``: best.pt's score."""

    stage: int
    best_select_auc_ema: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    best_checkpoint: str
    last_checkpoint: str
    select_on: str = "pooled"
    history: list[dict] = field(default_factory=list)


def stage_files(stage_dir: Path) -> dict[str, Path]:
    return {"last": stage_dir / "last.pt", "best": stage_dir / "best.pt", "summary": stage_dir / "stage.json"}


def finished_stage(stage_dir: Path) -> StageResult | None:
    """The result of a stage that already ran to its end in ``stage_dir``, else None."""
    path = stage_files(Path(stage_dir))["summary"]
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    if "best_auc_ema" in fields:  # written before selection was domain-aware: it selected on the pooled AUC
        fields["best_select_auc_ema"] = fields.pop("best_auc_ema")
    return StageResult(**fields)


def save_stage_checkpoints(files: dict[str, Path], state: dict[str, Any], improved: bool) -> Path:
    """Write ``last.pt`` (everything to resume) and, when the epoch improved, ``best.pt`` (the same
    without optimizer and scaler: it starts Stage II, is evaluated and predicts).

    best.pt first: a resume from last.pt never comes back to this epoch, so a process killed
    between the two writes would otherwise leave a run whose best epoch has no best.pt."""
    if improved:
        save_checkpoint(files["best"], {k: v for k, v in state.items() if k not in ("optimizer", "scaler")})
    save_checkpoint(files["last"], state)
    return files["last"]

"""Single-file checkpoints that resume everything, written atomically, loaded with weights_only.

Usage::

    save_checkpoint(path, {"model": ..., "ema": ..., "optimizer": ..., "stage": 1, "config": ...})
    state = load_checkpoint(path)            # plain dict of tensors and Python values
    weights = safe_torch_load(path, "weights file")   # any torch file: tensors and plain values only
    done = finished_stage(Path("runs/demo/stage1"))   # the stage's summary, or None while it runs

A stage's ``last.pt`` holds the unwrapped model (no DDP/compile prefixes), the EMA, the
optimizer, the grad scaler, step, epoch (the next one to run), stage, the resolved config and the
early-stopping state: all it takes to resume. ``best.pt`` is the same without optimizer and
scaler (half the size): it only starts Stage II, is evaluated and predicts. It is written to a temporary name in the same folder, fsynced and renamed, so a crash
while writing never replaces a good file with a partial one.
Once its stage has finished, a checkpoint is never rewritten: what is chosen later (the decision
thresholds) goes to a file beside it (trueface.thresholds).

Every torch file TrueFace reads goes through ``safe_torch_load``: ``weights_only=True``, and a
refusal in TrueFace's words. A pickle that would build other Python objects (code could run) is
"refused"; a truncated or foreign file is "not readable"; the torch error stays chained, not printed.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trueface.atomic import atomic_open

FORMAT_VERSION = 1
_LEGACY_HEADER_PICKLES = 4  # torch's pre-zip format: magic number, protocol, sys info, the object


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


def safe_torch_load(path: Path, what: str, error: type[Exception] = CheckpointError) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file it refuses raises ``error`` with a
    message naming ``path``, saying what the file is (``what``: "TrueFace checkpoint", "weights
    file") and what to do. Torch's own text stays out of the message (it is the chained cause)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    except pickle.UnpicklingError as exc:  # the weights-only unpickler's refusal, or bytes it cannot parse
        refused = _complete_pickle_globals(path)
        if refused is None:
            raise error(_unreadable(path, what)) from exc
        named = f" ({', '.join(refused[:3])})" if refused else ""
        raise error(
            f"refused {path}: it holds Python objects other than tensors and plain values{named}, and code "
            f"could run when it loads, so it is not a {what}. TrueFace loads checkpoints and weights with "
            f"weights_only=True; re-save the weights as a plain state dict "
            f"(torch.save(model.state_dict(), path)) from a source you trust."
        ) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError... for a cut or foreign file
        raise error(_unreadable(path, what)) from exc


def _unreadable(path: Path, what: str) -> str:
    return (f"{path} is not a readable {what}: the file is truncated or not a torch file "
            f"(copy it again, or point to the file torch.save wrote)")


def _complete_pickle_globals(path: Path) -> list[str] | None:
    """When ``path`` holds complete pickle programs (the ``data.pkl`` of torch's zip format, a bare
    pickle, or the leading pickles of torch's legacy format), the globals it names that weights_only does not allow (maybe none: it may refuse an
    opcode instead); None when no complete pickle is there (cut, corrupt or not a pickle at all).

    Read statically with pickletools: nothing in the file is executed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                program = archive.read(name)
            for _ in pickletools.genops(program):  # raises on a cut or corrupt program
                pass
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with open(path, "rb") as f:  # a bare pickle, or torch's legacy format: four pickles, then storages
            for _ in range(_LEGACY_HEADER_PICKLES):
                if not f.peek(1):
                    break
                for _ in pickletools.genops(f):  # reads one pickle, up to its STOP; raises when cut
                    pass
        return []
    except Exception:  # zip, pickle and torch each raise their own types for bytes they cannot parse
        return None


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(_folder_message(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = safe_torch_load(path, "TrueFace checkpoint")
    missing = {"model", "ema", "stage", "config"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"{path} is not a TrueFace checkpoint (missing {', '.join(sorted(missing))})")
    from trueface.config import ConfigError, from_dict

    try:  # every reader builds the saved config: say here, once, why one cannot be
        from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its saved config does not load in this version of TrueFace (written by "
                              f"another version?): {exc}") from None
    return state


def _folder_message(path: Path) -> str:
    """A folder given for a checkpoint file: the checkpoints it holds (a stage's, or a run's stages')."""
    found = [f for name in ("best.pt", "last.pt", "stage2/best.pt", "stage1/best.pt") if (f := path / name).is_file()]
    hint = f" it holds {', '.join(str(f) for f in found)}" if found else (
        " a run's stage1/ and stage2/ folders hold best.pt and last.pt")
    return f"checkpoint {path} is a folder, not a checkpoint file: give the .pt file itself (best.pt or last.pt);{hint}"


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

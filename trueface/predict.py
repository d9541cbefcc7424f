"""Score individual image files with a trained checkpoint, tolerating unreadable ones.

Usage::

    predictor = Predictor.from_checkpoint(Path("runs/demo/stage2/best.pt"), weights="ema")
    for row in predictor.score(paths): print(row.path, row.probability, row.label, row.error)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trueface.augment import eval_transform
from trueface.checkpoint import load_checkpoint
from trueface.config import from_dict
from trueface.data.dataset import ImageReadError, load_rgb
from trueface.data.layout import IMAGE_SUFFIXES, LABEL_NAMES
from trueface.evaluation import load_models
from trueface.engine import score_batch
from trueface.precision import Runtime


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float | None  # P(generated); None when the image could not be read
    label: str  # real | fake | error
    error: str = ""


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted)."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            out.append(item)  # a missing file is reported as an error row, not skipped
    return out


class Predictor:
    def __init__(self, model: torch.nn.Module, image_size: int, threshold: float, runtime: Runtime,
                 hflip: bool, batch_size: int = 32, threshold_saved: bool = False) -> None:
        self.model, self.image_size, self.threshold = model, image_size, threshold
        self.threshold_saved = threshold_saved  # False: 0.5 stands in for a threshold never chosen
        self.runtime, self.hflip, self.batch_size = runtime, hflip, batch_size
        self.transform = eval_transform(image_size)

    @classmethod
    def from_checkpoint(cls, path: Path, weights: str = "ema", device: str = "auto") -> "Predictor":
        state = load_checkpoint(path)
        cfg = from_dict(state["config"])
        runtime = Runtime.create(device, cfg.runtime.precision)
        model = load_models(state, cfg)[weights].to(runtime.device, memory_format=torch.channels_last)
        threshold = float(state.get("thresholds", {}).get(weights, 0.5))
        return cls(model, cfg.stage(int(state["stage"])).image_size, threshold, runtime, cfg.eval.hflip_tta,
                   threshold_saved="thresholds" in state)

    def score(self, paths: Iterable[Path]) -> Iterator[Prediction]:
        """Predictions in input order; an unreadable file yields an error row and the rest go on."""
        batch: list[tuple[Path, torch.Tensor]] = []
        for path in paths:
            try:
                batch.append((path, self.transform(load_rgb(str(path), self.image_size))))
            except ImageReadError as exc:
                yield from self._flush(batch)
                batch = []
                yield Prediction(str(path), None, "error", str(exc))
                continue
            if len(batch) == self.batch_size:
                yield from self._flush(batch)
                batch = []
        yield from self._flush(batch)

    def _flush(self, batch: list[tuple[Path, torch.Tensor]]) -> Iterator[Prediction]:
        if not batch:
            return
        probs = score_batch(self.model, torch.stack([x for _, x in batch]), self.runtime, self.hflip)
        for (path, _), p in zip(batch, probs.tolist()):
            yield Prediction(str(path), p, LABEL_NAMES[int(p >= self.threshold)])

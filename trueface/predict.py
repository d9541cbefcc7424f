"""Score individual image files with a trained checkpoint, tolerating unreadable ones.

Usage::

    predictor = Predictor.from_checkpoint(Path("runs/demo/stage2/best.pt"), weights="ema")
    for row in predictor.score(paths): print(row.path, row.probability, row.calibrated, row.label, row.error)

Labels use the threshold kept beside the checkpoint (``thresholds.json``, see trueface.thresholds):
the pooled one, or with ``domain=`` that domain's own (per_domain scope); 0.5 when there is no file.
``calibrated`` is the probability after temperature scaling with the temperature kept in the same
file (the domain's own with ``domain=``, as for the threshold). Without one (no file, or a file
written before calibration) it equals ``probability`` and ``temperature_source`` says "uncalibrated".
The label comes from the raw probability and the raw threshold: calibration is monotone and would
give the same label at the calibrated threshold (see trueface.calibration).

Images are prepared as the checkpoint was trained: decoded by ``load_rgb`` with the config's
``data.decode_draft`` reduce, and under ``data.normalize: jpeg:<q>@<size>`` re-encoded in memory by
the function that built the training cache (``load_normalized``: the same pixels as the cached copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trueface.augment import eval_transform
from trueface.calibration import UNCALIBRATED, apply_temperature
from trueface.checkpoint import load_checkpoint
from trueface.config import from_dict
from trueface.config.choices import parse_normalize
from trueface.data.decode import ImageReadError, decode_bytes, load_rgb, prepare_rgb
from trueface.data.layout import IMAGE_SUFFIXES, LABEL_NAMES
from trueface.data.normalize import load_normalized, normalize_image
from trueface.evaluation import load_models
from trueface.inference import decode_size, score_batch
from trueface.precision import Runtime
from trueface.thresholds import Thresholds, ThresholdsError, read_thresholds, thresholds_path


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float | None  # P(generated); None when the image could not be read
    label: str  # real | fake | error
    error: str = ""
    calibrated: float | None = None  # P(generated) after temperature scaling; None when unreadable


#: ``threshold_source`` when the checkpoint has no thresholds file.
UNCHOSEN = "none chosen (0.5)"


def pick_temperature(saved: Thresholds | None, weights: str, domain: str | None) -> tuple[float, str]:
    """(temperature, where it came from), as ``pick_threshold`` picks the threshold; (1.0,
    UNCALIBRATED) without a thresholds file or with one written before calibration."""
    return (1.0, UNCALIBRATED) if saved is None else saved.temperature(weights, domain)


def pick_threshold(saved: Thresholds | None, checkpoint: Path, weights: str, domain: str | None) -> tuple[float, str]:
    """(threshold, where it came from) for ``weights``: ``domain``'s own if asked, else the pooled one."""
    if saved is None:
        if domain:
            raise ThresholdsError(f"--domain {domain}: {checkpoint} has no thresholds file "
                                  f"({thresholds_path(checkpoint)}); evaluate it first")
        return 0.5, UNCHOSEN
    if domain and domain not in saved.domains():
        have = f"domains with their own: {', '.join(saved.domains())}" if saved.domains() else "none has a domain's own"
        raise ThresholdsError(f"--domain {domain}: {thresholds_path(checkpoint)} has no threshold for {domain!r} "
                              f"(scope {saved.scope}; {have}); leave --domain out to use the pooled one")
    return saved.threshold(weights, domain)


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
                 hflip: bool, batch_size: int = 32, saved: Thresholds | None = None,
                 threshold_source: str = UNCHOSEN, threshold_file: Path | None = None,
                 decode_size: int | None = None, normalize: tuple[int, int] | None = None,
                 temperature: tuple[float, str] = (1.0, UNCALIBRATED)) -> None:
        """``decode_size``: ``load_rgb``'s reduce target (None: full decode); ``normalize``: (JPEG
        quality, short side) of ``data.normalize``, None for none; ``temperature``: (T, its source)
        for ``calibrated``. ``from_checkpoint`` sets them from the checkpoint and its thresholds file."""
        self.model, self.image_size, self.threshold = model, image_size, threshold
        self.saved = saved  # None: 0.5 stands in for a threshold never chosen
        self.threshold_source = threshold_source  # e.g. "pooled validation", "dalle validation"
        self.threshold_file = threshold_file
        self.runtime, self.hflip, self.batch_size = runtime, hflip, batch_size
        self.transform = eval_transform(image_size)
        self.decode_size, self.normalize = decode_size, normalize
        self.temperature, self.temperature_source = temperature

    @property
    def threshold_saved(self) -> bool:
        return self.saved is not None

    @classmethod
    def from_checkpoint(cls, path: Path, weights: str = "ema", device: str = "auto",
                        domain: str | None = None) -> "Predictor":
        """``domain``: label at that domain's own threshold (per_domain scope) instead of the pooled one.
        A thresholds file left from an earlier training of this checkpoint raises ThresholdsError."""
        return cls.from_state(load_checkpoint(path), path, weights, device, domain)

    @classmethod
    def from_state(cls, state: dict, path: Path, weights: str = "ema", device: str = "auto",
                   domain: str | None = None) -> "Predictor":
        """from_checkpoint on a checkpoint already read from ``path`` (for a caller that reads its
        config too, so the file is read once)."""
        saved = read_thresholds(Path(path))
        threshold, source = pick_threshold(saved, Path(path), weights, domain)
        cfg = from_dict(state["config"])
        runtime = Runtime.create(device, cfg.runtime.precision)
        model = load_models(state, cfg)[weights].to(runtime.device, memory_format=torch.channels_last)
        image_size = cfg.stage(int(state["stage"])).image_size
        return cls(model, image_size, threshold, runtime, cfg.eval.hflip_tta,
                   saved=saved, threshold_source=source, threshold_file=thresholds_path(Path(path)),
                   decode_size=decode_size(cfg, image_size), normalize=parse_normalize(cfg.data.normalize),
                   temperature=pick_temperature(saved, weights, domain))

    def describe_labelling(self, weights: str) -> str:
        """The console's two lines before scoring: the threshold (a warning where none was saved) and
        the temperature."""
        warning = "" if self.threshold_saved else "warning: "
        return f"{warning}{self.describe_threshold(weights)}\n{self.describe_calibration(weights)}"

    def describe_threshold(self, weights: str) -> str:
        """One line for the console: the threshold, where it came from, and what else there is."""
        if self.saved is None:
            return (f"labelling at 0.5: no thresholds file {self.threshold_file} (the pipeline's evaluation or "
                    "jobs.evaluate --save-thresholds writes one)")
        s = self.saved
        text = (f"labelling at {self.threshold:.4f}: the {weights} weights' {self.threshold_source} threshold from "
                f"{self.threshold_file} ({s.policy}, scope {s.scope}, chosen {s.chosen_at} by {s.chosen_by})")
        if s.domains() and self.threshold_source == "pooled validation":
            text += f"; domains with their own: {', '.join(s.domains())} (pick one with --domain)"
        return text

    def describe_calibration(self, weights: str) -> str:
        """One line for the console: the temperature behind ``calibrated``, or why there is none."""
        if self.temperature_source == UNCALIBRATED:
            why = ("no thresholds file" if self.saved is None else
                   f"{self.threshold_file} was written before calibration; choose its thresholds again to fit one")
            return f"p_calibrated: {UNCALIBRATED}, equal to p_generated ({why})"
        return (f"p_calibrated: temperature {self.temperature:.4g}, the {weights} weights' {self.temperature_source} "
                f"temperature from {self.threshold_file}")

    def score(self, paths: Iterable[Path]) -> Iterator[Prediction]:
        """Predictions in input order; an unreadable file yields an error row and the rest go on."""
        batch: list[tuple[Path, torch.Tensor]] = []
        for path in paths:
            try:
                batch.append((path, self.load(path)))
            except ImageReadError as exc:
                yield from self._flush(batch)
                batch = []
                yield Prediction(str(path), None, "error", str(exc))
                continue
            if len(batch) == self.batch_size:
                yield from self._flush(batch)
                batch = []
        yield from self._flush(batch)

    def load(self, path: Path) -> torch.Tensor:
        """The model's input for one file, prepared as training prepared its data."""
        if self.normalize is None:
            return self.transform(load_rgb(path, self.decode_size))
        return self.transform(load_normalized(path, *self.normalize, self.decode_size))

    def load_bytes(self, data: bytes, name: str) -> torch.Tensor:
        """``load`` for a file's bytes already in memory (Ray Data reads them); ``name`` in errors."""
        if self.normalize is None:
            return self.transform(decode_bytes(data, name, self.decode_size))
        return self.transform(prepare_rgb(normalize_image(decode_bytes(data, name), *self.normalize), self.decode_size))

    def score_loaded(self, batch: list[tuple[str, torch.Tensor]]) -> list[Prediction]:
        """Predictions of files already loaded, one forward for the whole batch."""
        return list(self._flush(batch))

    def _flush(self, batch: list[tuple[Path, torch.Tensor]]) -> Iterator[Prediction]:
        if not batch:
            return
        probs = score_batch(self.model, torch.stack([x for _, x in batch]), self.runtime, self.hflip)
        calibrated = apply_temperature(probs.double().numpy(), self.temperature).tolist()
        for (path, _), p, c in zip(batch, probs.tolist(), calibrated):
            yield Prediction(str(path), p, LABEL_NAMES[int(p >= self.threshold)], calibrated=c)

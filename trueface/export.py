"""Export a checkpoint's scorer to ONNX, torch.export's ``.pt2`` or TorchScript, with its
preprocessing written beside it.

Usage::

    meta = export_checkpoint(Path("runs/demo/stage2/best.pt"), "onnx", Path("detector.onnx"))
    # detector.onnx + detector.onnx.json (the same metadata is inside the ONNX file's metadata_props
    # under "trueface", and inside a .pt2 or TorchScript file as its extra file "trueface.json")
    scorer = torch.export.load("detector.pt2").module()     # a pt2 file, back in PyTorch

Formats: ``onnx`` for onnxruntime, TensorRT and other runtimes; ``pt2`` (``torch.export``'s
ExportedProgram) for PyTorch without this package, the format torch now points to;
``torchscript`` for LibTorch and older PyTorch (torch 2.14 marks ``torch.jit`` deprecated, with
a FutureWarning on every trace, save and load).

What is exported is what ``jobs.predict`` computes from a prepared batch: ``images`` (N, 3, S, S),
float32, RGB, the eval preprocessing already applied (decode to RGB, resize the shorter side to S
with antialiasing, centre crop S x S, scale to [0, 1], normalise with the ImageNet mean and std)
-> ``p_generated`` (N,), float32: the softmax's fake class, averaged with the horizontally
flipped image's where the checkpoint's ``eval.hflip_tta`` is on, exactly as the predictor
averages; and ``log_odds`` (N,), float32: log(p / (1 - p)) of that score, computed from the
logits (log-sigmoids), not from p. The batch axis is dynamic. The metadata says all that in
numbers, plus the calibrated temperature and the thresholds chosen on validation (pooled, and per
domain where chosen), so a deployment outside Python can compute ``p_calibrated = 1 / (1 +
exp(-log_odds / T))`` and the label ``p_generated >= threshold`` without this package. Why the
second output: float32 rounds P(generated) to exactly 1.0 once the logit gap passes about 17,
and the calibration formula on such a p gives 1.0 where the predictor (float64) gives, at T = 8
and a gap of 25, 0.958. Only the preprocessing before the
tensor stays outside the file, as its steps are named in the metadata.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trueface.atomic import atomic_open, atomic_write_text
from trueface.augment import IMAGENET_MEAN, IMAGENET_STD
from trueface.predict import Predictor
from trueface.thresholds import file_sha256

FORMATS = ("onnx", "pt2", "torchscript")
INPUT, OUTPUT, LOG_ODDS = "images", "p_generated", "log_odds"
OPSET = 18


class ScoringModule(nn.Module):
    """Normalised images -> (P(generated), its log-odds), with the predictor's flip averaging."""

    def __init__(self, model: nn.Module, hflip: bool) -> None:
        super().__init__()
        self.model, self.hflip = model, hflip
        self.eval()  # the wrapper too: the exporter warns about (and traces) a module in training mode

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        p, gap = torch.softmax(logits, dim=1)[:, 1], logits[:, 1] - logits[:, 0]
        if not self.hflip:
            return p, gap  # P(fake) = sigmoid(gap): the gap is the log-odds
        flipped = self.model(torch.flip(images, dims=[3]))
        p = (p + torch.softmax(flipped, dim=1)[:, 1]) / 2
        other = flipped[:, 1] - flipped[:, 0]
        # log of the mean of two sigmoids, and of their complements, each a logaddexp of log-sigmoids
        log_odds = (torch.logaddexp(F.logsigmoid(gap), F.logsigmoid(other))
                    - torch.logaddexp(F.logsigmoid(-gap), F.logsigmoid(-other)))
        return p, log_odds


class ExportError(RuntimeError):
    """The export could not be made; the message says why and what to do."""


def export_checkpoint(checkpoint: Path, fmt: str, out: Path, weights: str = "ema", source: str | None = None) -> dict:
    """Write the scorer of ``checkpoint``'s ``weights`` to ``out`` (and ``out``.json); returns the
    metadata. The file appears complete or not at all (written to a temporary name first).
    ``source``: where the checkpoint was given from (a URI staged locally), as the metadata names it."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    predictor = Predictor.from_checkpoint(Path(checkpoint), weights, device="cpu")
    module = ScoringModule(predictor.model.float().to(memory_format=torch.contiguous_format), predictor.hflip)
    example = torch.zeros(2, 3, predictor.image_size, predictor.image_size)
    meta = export_metadata(predictor, Path(checkpoint), weights, fmt, source)
    text = json.dumps(meta, indent=1, sort_keys=True)
    data = {"onnx": _onnx_bytes, "pt2": _pt2_bytes, "torchscript": _torchscript_bytes}[fmt](module, example, text)
    with atomic_open(out) as f:
        f.write(data)
    atomic_write_text(Path(f"{out}.json"), text + "\n")
    return meta


def export_metadata(predictor: Predictor, checkpoint: Path, weights: str, fmt: str, source: str | None = None) -> dict:
    saved = predictor.saved
    size = predictor.image_size
    return {
        "format": fmt,
        "input": {"name": INPUT, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW, RGB"},
        "outputs": [
            {"name": OUTPUT, "shape": ["batch"], "dtype": "float32",
             "meaning": "P(generated), flip-averaged" if predictor.hflip else "P(generated)"},
            {"name": LOG_ODDS, "shape": ["batch"], "dtype": "float32",
             "meaning": f"log({OUTPUT} / (1 - {OUTPUT})), from the logits: exact where {OUTPUT} rounds to 1"},
        ],
        "preprocess": {
            "decode": "RGB (alpha over black, EXIF orientation applied)",
            "reduce_before_resize": (f"shrink by the largest power of two keeping the shorter side >= "
                                     f"{predictor.decode_size} (PIL Image.reduce)") if predictor.decode_size else "none",
            "normalize_format": (f"re-encode as JPEG quality {predictor.normalize[0]}, shorter side "
                                 f"{predictor.normalize[1]} px, before everything else") if predictor.normalize else "none",
            "resize": f"shorter side to {size} px, bilinear with antialiasing",
            "crop": f"centre {size} x {size}",
            "scale": "divide by 255",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        },
        "hflip_tta": predictor.hflip,
        "weights": weights,
        "temperature": {"value": predictor.temperature, "source": predictor.temperature_source,
                        "per_domain": _per_domain(saved, weights, "temperature")},
        "threshold": {"value": predictor.threshold, "source": predictor.threshold_source,
                      "per_domain": _per_domain(saved, weights, "threshold")},
        # the rule on the log-odds: float32's P(generated) rounds to 1 from a log-odds of about 17,
        # so a threshold that close to 1 would label otherwise than jobs.predict's float64
        "calibrated": (f"p_calibrated = 1 / (1 + exp(-{LOG_ODDS} / T)); label = fake where {LOG_ODDS} >= "
                       f"log(threshold / (1 - threshold)), the same as {OUTPUT} >= threshold without float32's "
                       "rounding near 1"),
        "checkpoint": {"path": source or str(checkpoint), "sha256": file_sha256(checkpoint)},
    }


def _per_domain(saved, weights: str, what: str) -> dict[str, float]:
    if saved is None:
        return {}
    return {d: getattr(saved, what)(weights, d)[0] for d in saved.domains()}


def _onnx_bytes(module: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:  # torch's exporter needs both, and would say so from deep inside
        raise ExportError(f"ONNX export needs the {' and '.join(missing)} package(s): pip install -e '.[export]'")
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT, LOG_ODDS],
                                dynamic_shapes=_dynamic_batch(), opset_version=OPSET, verbose=False)
    model = program.model_proto
    model.metadata_props.add(key="trueface", value=meta)
    return model.SerializeToString()


def _pt2_bytes(module: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    """torch.export's ExportedProgram (the graph the ONNX exporter starts from), saved with the
    metadata as its extra file; ``torch.export.load(path).module()`` runs it."""
    program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_batch())
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"trueface.json": meta})
    return buf.getvalue()


def _dynamic_batch() -> tuple[dict[int, torch.export.Dim]]:
    """The images' batch axis, dynamic (any size from 1; traced at 2)."""
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def _torchscript_bytes(module: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"trueface.json": meta})
    return buf.getvalue()

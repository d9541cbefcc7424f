"""ResNet-50 with a Dropout + Linear head, from ImageNet weights, a file, or random init.

Usage: ``model = build_model(cfg.model)``; ``probs = fake_probability(model(x))``

``model.arch`` is resnet50 (the method) or resnet18: the same network family at a fifth of the
compute and under half the checkpoint size, for the test suite's many tiny runs and quick
experiments on a laptop. Every part of the platform works with either.

No download ever happens at run time: ``imagenet`` reads torchvision's weight file from the
local torch hub cache and says how to put it there when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18, resnet50

from trueface.checkpoint import safe_torch_load
from trueface.config.schema import ModelConfig


#: model.arch -> (constructor, its ImageNet weights)
ARCHS = {"resnet50": (resnet50, ResNet50_Weights.IMAGENET1K_V2), "resnet18": (resnet18, ResNet18_Weights.IMAGENET1K_V1)}


class WeightsError(RuntimeError):
    """Weights that were asked for cannot be loaded; the message says how to provide them."""


class Fp32Head(nn.Sequential):
    """Dropout + Linear that always runs in float32, outside any autocast.

    Under bf16 autocast a Linear head returns bf16 logits (8 bits of mantissa): 10,000 confident
    scores collapsed to 858 distinct values, and AUC counts each tie as one half. Features come in
    whatever dtype the backbone produced; they are cast up and the head's matmul runs in fp32.
    A Sequential subclass keeps the state-dict keys ``fc.0`` (no parameters) and ``fc.1.weight``/
    ``fc.1.bias`` of existing checkpoints.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(in_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def build_model(cfg: ModelConfig) -> nn.Module:
    model = ARCHS[cfg.arch][0](weights=None)
    if cfg.weights == "imagenet":
        model.load_state_dict(load_imagenet_state_dict(cfg.arch))
    model.fc = Fp32Head(model.fc.in_features, cfg.num_classes, cfg.dropout)
    if cfg.weights not in ("imagenet", "none"):
        load_weights_file(model, Path(cfg.weights))
    return model


def imagenet_weights_path(arch: str = "resnet50") -> Path:
    weights = ARCHS[arch][1]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_imagenet_state_dict(arch: str = "resnet50") -> dict[str, torch.Tensor]:
    path = imagenet_weights_path(arch)
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights not found at {path} and nothing is downloaded at run time.\n"
            f"On a machine with internet: python -c \"import torchvision; "
            f"torchvision.models.{arch}(weights='{ARCHS[arch][1].name}')\", then copy "
            f"{path.name} to {path.parent}/ here (or set TORCH_HOME), "
            f"or run with model.weights=none or model.weights=/path/to/weights.pt"
        )
    return safe_torch_load(path, "ImageNet weights file", WeightsError)


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a plain state dict or a TrueFace checkpoint (its EMA weights) into ``model``."""
    if not path.is_file():
        raise WeightsError(f"file {path} does not exist (model.weights takes imagenet, none or a file)")
    state = safe_torch_load(path, "weights file (a state dict or a TrueFace checkpoint)", WeightsError)
    if isinstance(state, dict) and "ema" in state:
        state = state["ema"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict: save it with "
                           f"torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit this model.arch's network with a 2-class head "
                           f"(a checkpoint of another arch?): {exc}") from exc


def fake_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(generated) from the two-class logits (class 1 = fake), in float64: float32 rounds every
    logit gap above ~17 to exactly 1.0, and such ties would hide the ranking AUC measures. float64
    does the same above ~36.7 (README, Calibration: the limit that remains)."""
    return logits.double().softmax(dim=1)[:, 1]

"""Grad-CAM: where in the image the detector's "generated" score comes from.

Usage::

    maps = grad_cam(model, images)                 # (N, H, W) in [0, 1], the input's size
    region = top_region(maps[0])                   # e.g. "top-left", and the peak's (x, y)
    png = overlay(images[0], maps[0])              # RGB uint8 array: the heat map over the image
    grid = validation_grid(model, samples, image_size, cfg)   # TensorBoard's grid after a stage

A short hook-based implementation rather than the ``grad-cam`` package: the method is a dozen
lines (Selvaraju et al. 2017: the last residual stage's activations, weighted by the spatial
mean of the gradient of the class score, summed over channels, ReLU), the package would pin
another dependency for that, and this one runs on the model exactly as scoring runs it (eval
mode, the checkpoint's head). The map is for the fake class: what made the score go up. The
class score differentiated is the fake logit minus the real one, the log-odds that P(generated)
= softmax(z)[1] is a function of: the fake logit alone would also credit a region that raises
both logits, or the real one more, and so lowers the score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid

from trueface.augment import denormalize, eval_transform
from trueface.config import Config
from trueface.data.dataset import ImageDataset
from trueface.data.layout import Sample
from trueface.inference import decode_size, image_loader

REGIONS = (("top", "bottom"), ("left", "right"))


def target_layer(model: nn.Module) -> nn.Module:
    """The last residual stage of a torchvision ResNet (``layer4``)."""
    layer = getattr(model, "layer4", None)
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no layer4: Grad-CAM here explains TrueFace's ResNets")
    return layer


def grad_cam(model: nn.Module, images: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM maps of the fake class for a batch of normalised images, upsampled to their
    size and scaled to [0, 1] per image (all zeros where nothing raised the score)."""
    layer = layer or target_layer(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(images.detach().requires_grad_(True))  # EMA weights need no grad: the input does
            acts = captured[-1]
            grads, = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), acts)  # the score's log-odds
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return (cam / peak[:, None, None]).clamp(0, 1).cpu()


def top_region(cam: torch.Tensor) -> tuple[str, tuple[int, int] | None]:
    """The quadrant holding the map's peak ("top-left", ...) and the peak's (x, y) in pixels;
    ("none", None) for an empty map (nothing in the image raised the fake score), which has no peak."""
    if not bool(cam.max() > 0):
        return "none", None
    h, w = cam.shape
    idx = int(torch.argmax(cam))
    y, x = divmod(idx, w)
    return f"{REGIONS[0][int(y >= h / 2)]}-{REGIONS[1][int(x >= w / 2)]}", (x, y)


def overlay(image: torch.Tensor, cam: torch.Tensor, alpha: float = 0.45) -> np.ndarray:
    """The normalised ``image`` (3, H, W) as the model saw it, with ``cam`` in the jet colour map
    blended over it: an (H, W, 3) uint8 RGB array."""
    from matplotlib import colormaps

    rgb = denormalize(image[None].float())[0].clamp(0, 1).permute(1, 2, 0).numpy()
    heat = colormaps["jet"](cam.numpy())[..., :3]
    return (255 * ((1 - alpha) * rgb + alpha * heat)).round().astype(np.uint8)


#: Validation images in the TensorBoard grid: the first ones by path, the same after every stage.
GRID_IMAGES = 8


def validation_grid(model: nn.Module, samples: Sequence[Sample], image_size: int, cfg: Config) -> torch.Tensor:
    """Overlays of a fixed set of validation images (the first ``GRID_IMAGES`` by path), real
    ones first, as one (3, H, W) float grid for TensorBoard."""
    chosen = sorted(sorted(samples, key=lambda s: s.path)[:GRID_IMAGES], key=lambda s: s.label)
    ds = ImageDataset(chosen, eval_transform(image_size), decode_size(cfg, image_size), image_loader(cfg, image_size))
    device = next(model.parameters()).device
    images = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
    maps = grad_cam(model, images)
    tiles = [torch.from_numpy(overlay(x.cpu(), m)).permute(2, 0, 1).float() / 255 for x, m in zip(images, maps)]
    return make_grid(tiles, nrow=4, padding=2)


@dataclass(frozen=True)
class Explanation:
    overlay: str  # the PNG written
    region: str  # the quadrant of the map's peak, in the prepared (centre-cropped) image; "none": empty map
    peak: tuple[int, int] | None  # (x, y) of the peak in that image, pixels; None for an empty map


def explain_files(model: nn.Module, load: Callable[[Path], torch.Tensor], paths: Sequence[str | Path],
                  out_dir: Path, batch_size: int = 16) -> dict[str, Explanation]:
    """Write a Grad-CAM overlay PNG per file (``<n>-<name>.gradcam.png``: numbered, so two files of
    one name in different folders never overwrite each other); ``load`` prepares a file as
    scoring does (``Predictor.load``). Returns each path's Explanation."""
    from PIL import Image

    from trueface.atomic import atomic_open

    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    done: dict[str, Explanation] = {}
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        images = torch.stack([load(Path(p)) for p in chunk]).to(device)
        for offset, (path, image, cam) in enumerate(zip(chunk, images.cpu(), grad_cam(model, images))):
            target = out_dir / f"{start + offset:05d}-{Path(path).stem}.gradcam.png"
            with atomic_open(target) as f:
                Image.fromarray(overlay(image, cam)).save(f, format="PNG")
            region, peak = top_region(cam)
            done[str(path)] = Explanation(str(target), region, peak)
    return done

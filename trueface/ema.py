"""Exponential moving average of a model's parameters AND buffers, with a decay warm-up.

Usage::

    ema = ModelEma(model, decay=0.9999, warmup=True)
    ...optimizer.step(); ema.update(model, step)     # step = optimizer steps done so far
    evaluate(ema.module)

The original used decay 0.9999 from step 0 without warm-up, so after 36 epochs 17% of its EMA
was still the initial weights and early stopping judged that lagging model (flaw 1). With
warm-up the decay is ``min(decay, (1 + step) / (10 + step))``. BatchNorm statistics are buffers:
averaging them too keeps them consistent with the averaged weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class ModelEma:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self._pairs: tuple[int, list, list, list] | None = None  # (id of the model, floats, model's floats, ints)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Blend ``model`` into the average; returns the decay used."""
        d = ema_decay_at(step, self.decay, self.warmup)
        _, ema_float, model_float, ints = self._tensor_pairs(model)
        for ema_t, t in ints:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
            ema_t.copy_(t)
        torch._foreach_lerp_(ema_float, model_float, 1.0 - d)
        return d

    def _tensor_pairs(self, model: nn.Module) -> tuple[int, list, list, list]:
        """The (EMA, model) tensor pairs, listed once per model: walking a ResNet-50's 320
        parameters and buffers every step cost a third of the update on a CPU. load_state_dict
        copies into the same tensors, so the lists stay valid for the model's life."""
        if self._pairs is None or self._pairs[0] != id(model):
            ema_float, model_float, ints = [], [], []
            for ema_t, t in zip(self._tensors(self.module), self._tensors(model)):
                if ema_t.dtype.is_floating_point:
                    ema_float.append(ema_t)
                    model_float.append(t.detach())
                else:
                    ints.append((ema_t, t))
            self._pairs = (id(model), ema_float, model_float, ints)
        return self._pairs

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return list(model.parameters()) + list(model.buffers())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

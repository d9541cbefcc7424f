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
        self._pairs: tuple[int, list, list, list, list] | None = None  # _tensor_pairs

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Blend ``model`` into the average; returns the decay used."""
        d = ema_decay_at(step, self.decay, self.warmup)
        _, ema_float, model_float, ema_ints, model_ints = self._tensor_pairs(model)
        if ema_ints:  # integer buffers (BatchNorm's num_batches_tracked) follow the model, in one op:
            torch._foreach_copy_(ema_ints, model_ints)  # a ResNet-50's 53 copies were 53 kernel launches
        torch._foreach_lerp_(ema_float, model_float, 1.0 - d)
        return d

    def _tensor_pairs(self, model: nn.Module) -> tuple[int, list, list, list, list]:
        """(id of the model, EMA floats, model floats, EMA ints, model ints), listed once per model:
        walking a ResNet-50's 320 parameters and buffers every step cost a third of the update on a
        CPU. load_state_dict copies into the same tensors, so the lists stay valid for the model's life."""
        if self._pairs is None or self._pairs[0] != id(model):
            lists = ([], [], [], [])  # EMA floats, model floats, EMA ints, model ints
            for ema_t, t in zip(self._tensors(self.module), self._tensors(model)):
                kind = 0 if ema_t.dtype.is_floating_point else 2
                lists[kind].append(ema_t)
                lists[kind + 1].append(t.detach())
            self._pairs = (id(model), *lists)
        return self._pairs

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return list(model.parameters()) + list(model.buffers())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

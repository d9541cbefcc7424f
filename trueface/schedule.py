"""Learning-rate schedule as a pure function of the optimizer step: resuming needs only the step.

Usage: ``lr = lr_at(step, total_steps, warmup_steps, base_lr, final_lr)``

Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps``, then cosine
from ``base_lr`` down to ``final_lr`` at ``total_steps``.
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

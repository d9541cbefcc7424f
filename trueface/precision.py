"""The one place that decides device and numeric precision.

Usage::

    runtime = Runtime.create(device="auto", precision="auto")
    with runtime.autocast():
        loss = ...
    runtime.backward_and_step(loss, optimizer, step_now=True)

``auto`` precision is bf16 autocast wherever the hardware runs it natively: CUDA with bf16, and
CPUs with AVX512-BF16/AMX (~1.5x faster there). On other CPUs (AVX2 only) bf16 is emulated and
measured 10x SLOWER than fp32, so auto picks fp32. fp16 gets a GradScaler, the others need none.
``augment_dtype``: the batched augmentation's float type, float16 on CUDA under autocast.
On CUDA, cuDNN picks its convolution algorithms by timing them (``cudnn.benchmark``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Runtime:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32, resolved
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("runtime.device=cuda but no CUDA device is visible; use runtime.device=auto or cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type == "cuda":
            # Training batches keep one shape, so cuDNN's timed choice of convolution algorithm
            # (once per shape) pays for itself after a few steps.
            torch.backends.cudnn.benchmark = True
        if precision == "auto":
            precision = _auto_precision(dev)
        scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
        return cls(dev, precision, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def augment_dtype(self) -> torch.dtype:
        """The float type the batched augmentation (``DeviceAugment``) works in: float16 on CUDA
        under bf16 or fp16 autocast, float32 otherwise. Under autocast the model's first layer
        takes its input in 16 bits anyway, and float16's 11 significant bits keep a pixel within
        0.1 grey level through the ops (the per-sample path rounds to 8-bit pixels after each);
        on a GPU, where those ops run on memory bandwidth, half the bytes are about half the time.
        float32 on a CPU (its float16 arithmetic is slow) and for fp32 training."""
        return torch.float16 if self.device.type == "cuda" and self.precision != "fp32" else torch.float32

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _auto_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"

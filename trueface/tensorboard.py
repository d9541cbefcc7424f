"""Where metrics go: TensorBoard on rank 0, nothing elsewhere.

Usage: ``logger = make_logger(log_dir, rank)``; ``logger.scalar("train/loss", 0.4, step)``

Metric names are stable and namespaced: ``train/loss``, ``val/auc``, ``val/auc_ema``.
"""

from __future__ import annotations

from pathlib import Path

import torch


class NullLogger:
    def scalar(self, name: str, value: float, step: int) -> None:
        pass

    def images(self, name: str, grid: torch.Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 pays for it

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def images(self, name: str, grid: torch.Tensor, step: int) -> None:
        self.writer.add_image(name, grid, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_logger(log_dir: Path | None, rank: int) -> NullLogger:
    return TensorBoardLogger(log_dir) if log_dir is not None and rank == 0 else NullLogger()

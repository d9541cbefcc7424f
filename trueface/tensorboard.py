"""Where metrics go: TensorBoard on rank 0, nothing elsewhere.

Usage: ``logger = make_logger(log_dir, rank)``; ``logger.scalar("train/loss", 0.4, step)``

Metric names are stable and namespaced: ``train/loss``, ``val/auc``, ``val/auc_ema``.
"""

from __future__ import annotations

from pathlib import Path

import torch


class NullLogger:
    @property
    def keeps_images(self) -> bool:
        """False where ``images`` drops them, so callers skip building a grid nobody keeps (every
        rank but 0 would otherwise build one each epoch, as would a benchmark's every step)."""
        return type(self).images is not NullLogger.images

    def scalar(self, name: str, value: float, step: int) -> None:
        pass

    def images(self, name: str, grid: torch.Tensor, step: int) -> None:
        pass

    def flush(self) -> None:
        """Write what is queued to the event file (before the file is uploaded)."""

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

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_logger(log_dir: Path | None, rank: int) -> NullLogger:
    return TensorBoardLogger(log_dir) if log_dir is not None and rank == 0 else NullLogger()


def write_hparams(log_dir: Path, hparams: dict[str, float | int | str | bool], metrics: list[tuple[str, str]],
                  trial_id: str, domains: dict[str, tuple[float, float] | list] | None = None) -> None:
    """Make ``log_dir`` one session of TensorBoard's HParams dashboard.

    ``metrics`` are ``(group, tag)`` pairs: the dashboard reads each metric's latest value from
    the run ``log_dir/group``, where the engine logs it every epoch, so a trial stopped halfway
    still shows its best validation AUC so far. ``domains`` (a ``(low, high)`` range or a list of
    values per name) give the dashboard its filters. Every session writes the same experiment
    config; TensorBoard uses the first it finds.
    """
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard import SummaryWriter

    def hparam(name: str) -> "hp.HParam":
        domain = (domains or {}).get(name)
        if isinstance(domain, tuple):
            return hp.HParam(name, hp.RealInterval(float(domain[0]), float(domain[1])))
        if isinstance(domain, list) and len({type(v) for v in domain}) == 1:
            return hp.HParam(name, hp.Discrete(domain))
        return hp.HParam(name)

    columns = [hp.Metric(tag, group=group, display_name=f"{group} {tag}".strip()) for group, tag in metrics]
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        file_writer = writer._get_file_writer()  # the only way to add a raw Summary proto
        file_writer.add_summary(hp.hparams_config_pb([hparam(name) for name in hparams], columns))
        file_writer.add_summary(hp.hparams_pb(hparams, trial_id=trial_id))
    finally:
        writer.close()

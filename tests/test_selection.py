"""Model selection: which validation number picks best.pt and stops early, and when it may."""

import dataclasses
import math

import numpy as np
import pytest

from trueface.config import ConfigError, load_config
from trueface.distributed import DistInfo
from trueface.train import Progress, StageError, _build_state, validation_metrics


def _two_domains():
    """A big domain the model ranks perfectly and a small one it ranks badly."""
    labels = np.array([0] * 40 + [1] * 40 + [0, 0, 1, 1])
    domains = ["big"] * 80 + ["small"] * 4
    good = np.r_[np.linspace(0.0, 0.4, 40), np.linspace(0.6, 1.0, 40)]
    scores = np.r_[good, [0.9, 0.8, 0.1, 0.85]]  # small: AUC 1/4 (one of four pairs ranked right)
    return labels, domains, scores


@pytest.mark.parametrize("select_on, expected", [("mean_domain", (1.0 + 0.25) / 2), ("worst_domain", 0.25), ("pooled", None)])
def test_selection_auc_by_mode(select_on, expected):
    labels, domains, scores = _two_domains()
    m = validation_metrics(labels, domains, {"raw": scores, "ema": scores}, select_on)
    assert m["val/big/auc_ema"] == 1.0 and m["val/small/auc_ema"] == 0.25
    pooled = m["val/auc_ema"]
    assert pooled > 0.9  # the big domain dominates the pooled AUC: why it is not the default
    assert m["val/select_auc_ema"] == pytest.approx(pooled if expected is None else expected)
    assert m["val/select_auc"] == m["val/select_auc_ema"]  # same scores for both weights here


def test_a_domain_with_one_class_is_left_out_of_the_mean():
    labels, domains, scores = _two_domains()
    labels, domains = np.r_[labels, [1, 1]], domains + ["onlyfake"] * 2
    m = validation_metrics(labels, domains, {"ema": np.r_[scores, [0.5, 0.6]]}, "mean_domain")
    assert math.isnan(m["val/onlyfake/auc_ema"])
    assert m["val/select_auc_ema"] == pytest.approx(0.625)
    only = validation_metrics(np.array([1, 1]), ["x", "x"], {"ema": np.array([0.2, 0.3])}, "worst_domain")
    assert math.isnan(only["val/select_auc_ema"])


def test_unknown_select_mode_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="eval.select_on: must be one of mean_domain, worst_domain, pooled"):
        load_config("demo", ["eval.select_on=best"])


def _epoch(progress: Progress, auc: float, in_warmup: bool) -> bool:
    progress.epoch += 1
    return progress.record({"val/select_auc_ema": auc}, in_warmup)


def test_warmup_epochs_may_be_best_but_never_count_towards_early_stopping():
    p = Progress()
    assert _epoch(p, 0.6, in_warmup=True)  # the first epoch is always the best so far
    assert not _epoch(p, 0.5, in_warmup=True) and p.bad_epochs == 0 and not p.should_stop(1)
    assert _epoch(p, 0.7, in_warmup=True) and p.best_epoch == 3
    assert not _epoch(p, 0.6, in_warmup=False) and p.bad_epochs == 1 and p.should_stop(1)
    assert not _epoch(p, math.nan, in_warmup=False) and p.bad_epochs == 2  # NaN never improves
    assert p.best_auc == 0.7 and len(p.history) == 5


def test_stage2_warmup_defaults_to_one_epoch():
    cfg = load_config("paper")
    assert cfg.stage2.warmup_epochs == 1 and cfg.stage2.patience == 2


def test_sync_batchnorm_on_cpu_workers_is_a_clear_error(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, scaling=dataclasses.replace(tiny_cfg.scaling, sync_batchnorm=True),
                              model=dataclasses.replace(tiny_cfg.model, weights="none"),
                              runtime=dataclasses.replace(tiny_cfg.runtime, device="cpu"))
    with pytest.raises(StageError, match="scaling.sync_batchnorm needs GPUs"):
        _build_state(cfg, 1, None, DistInfo(0, 2))
    assert _build_state(cfg, 1, None, DistInfo(0, 1)).train_model is not None  # one worker: nothing to sync

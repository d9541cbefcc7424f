"""A checkpoint of another architecture (model.arch) than the run's: a one-line StageError naming
the file and both architectures, wherever training takes weights on (Stage II's start, a resume)."""

from __future__ import annotations

import pytest

from trueface.checkpoint import save_checkpoint
from trueface.config import load_config, to_dict
from trueface.distributed import DistInfo
from trueface.model import build_model
from trueface.train import StageError, _build_state, _initial_model


@pytest.fixture(scope="module")
def resnet18_stage1(tmp_path_factory):
    cfg = load_config("demo", ["model.arch=resnet18"])
    weights = build_model(cfg.model).state_dict()
    path = tmp_path_factory.mktemp("arch") / "stage1-r18.pt"
    save_checkpoint(path, {"format_version": 1, "stage": 1, "config": to_dict(cfg), "model": weights, "ema": weights,
                           "optimizer": {}, "step": 0, "epoch": 1, "best_select_auc_ema": 0.5, "best_epoch": 1,
                           "bad_epochs": 0, "history": []})
    return path


def assert_names_both(message: str, path) -> None:
    assert "\n" not in message and "Error(s) in loading state_dict" not in message
    assert f"{path} holds a resnet18 (its saved config's model.arch), but this run's model.arch is resnet50" in message
    assert "Set model.arch=resnet18, or start from a checkpoint of a resnet50" in message


def test_stage_two_from_a_stage_one_of_another_architecture(resnet18_stage1):
    with pytest.raises(StageError) as exc:
        _initial_model(load_config("demo"), 2, resnet18_stage1)
    assert_names_both(str(exc.value), resnet18_stage1)
    assert _initial_model(load_config("demo", ["model.arch=resnet18"]), 2, resnet18_stage1) is not None


def test_resuming_after_model_arch_changed(resnet18_stage1):
    cfg = load_config("demo", ["runtime.device=cpu"])  # resnet50
    state = _build_state(cfg, 1, None, DistInfo())
    with pytest.raises(StageError) as exc:
        state.restore(resnet18_stage1, 1)  # arch: the default's, resnet50, as run_stage passes cfg.model.arch
    assert_names_both(str(exc.value), resnet18_stage1)

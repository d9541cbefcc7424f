from pathlib import Path

import pytest
import torch

from trueface import checkpoint as ck
from trueface.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((2,), value)}, "ema": {}, "stage": 1, "config": {"run_name": "x"}, "step": 3}


def test_round_trip_weights_only(tmp_path: Path):
    save_checkpoint(tmp_path / "last.pt", _state(1.0))
    state = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["step"] == 3


def test_crash_while_writing_keeps_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2.0))
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bad_files_are_named(tmp_path: Path):
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt is not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt is not a TrueFace checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_a_folder_is_named_as_one_with_the_checkpoints_it_holds(tmp_path: Path):
    (tmp_path / "run" / "stage2").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"run is a folder, not a checkpoint file: give the \.pt file itself "
                                              r"\(best\.pt or last\.pt\); a run's stage1/ and stage2/ folders hold"):
        load_checkpoint(tmp_path / "run")
    save_checkpoint(tmp_path / "run" / "stage2" / "best.pt", _state(1.0))
    with pytest.raises(CheckpointError, match=rf"; it holds {tmp_path}/run/stage2/best\.pt$"):
        load_checkpoint(tmp_path / "run")


def test_a_saved_config_this_version_cannot_load_is_named_as_the_checkpoints(tmp_path: Path, capsys):
    """A checkpoint from another version of TrueFace (a key this one lacks) is refused by every
    reader with its file named, not a config error that suggests a key to the user."""
    from jobs import predict as predict_job

    state = _state(1.0)
    state["config"] = {"stage1": {"grad_clip": 1.0}}
    save_checkpoint(tmp_path / "best.pt", state)
    with pytest.raises(CheckpointError, match=r"best.pt: its saved config does not load in this version of "
                                              r"TrueFace \(written by another version\?\): .*stage1.grad_clip"):
        load_checkpoint(tmp_path / "best.pt")
    with pytest.raises(SystemExit, match="error: .*best.pt: its saved config does not load"):
        predict_job.main(["--checkpoint", str(tmp_path / "best.pt"), str(tmp_path)])


def test_unwrap_strips_wrappers():
    inner = torch.nn.Linear(1, 1)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = inner

    assert unwrap(Wrapper()) is inner

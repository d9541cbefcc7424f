"""Training, evaluation and prediction without Ray: stage runs, resume, Stage II's guard, evaluation and prediction."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from trueface.checkpoint import finished_stage, load_checkpoint
import trueface.train as train
from trueface.train import StageError, make_optimizer, micro_batch_size, run_stage
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint
from trueface.predict import Predictor
from trueface.run import resolve_run
from trueface.thresholds import read_thresholds


def _stage1(cfg, tmp_path: Path, **kw):
    cfg, layout = resolve_run(cfg)
    st = cfg.stage1
    return cfg, layout, run_stage(cfg, 1, layout.gather(st.domains, "train"), layout.gather(st.domains, "valid"),
                                  tmp_path / "stage1", **kw)


def test_stage1_writes_checkpoints_summary_and_tensorboard(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reports, on_disk = [], []

    def report(metrics, path):
        # What a report's upload would find: a scheduler may end the trial right after the report
        # that says the stage is done, so the stage's summary and TensorBoard must be complete then.
        events = EventAccumulator(str(tmp_path / "tb"))
        events.Reload()
        summary = finished_stage(tmp_path / "stage1")
        on_disk.append((summary and summary.epochs_run, len(events.Scalars("val/auc_ema")), events.Tags()["images"]))
        reports.append((metrics, path))

    cfg, _, result = _stage1(tiny_cfg, tmp_path, log_dir=tmp_path / "tb", report=report)
    assert result.epochs_run == 2 and len(reports) == 2
    assert [m["stage_done"] for m, _ in reports] == [0.0, 1.0]
    assert on_disk[0][:2] == (None, 1) and "explain/gradcam_ema" not in on_disk[0][2]
    assert on_disk[1][:2] == (2, 2) and "explain/gradcam_ema" in on_disk[1][2]
    metrics, path = reports[-1]
    assert {"train/loss", "val/auc", "val/auc_ema", "train/lr", "train/ema_decay"} <= set(metrics)
    assert path == tmp_path / "stage1" / "last.pt"
    state = load_checkpoint(path)
    assert state["stage"] == 1 and state["epoch"] == 2 and state["step"] == 4  # 8 images / batch 4, 2 epochs
    assert state["config"]["stage1"]["domains"] == ["140k-real-vs-fake"]
    assert finished_stage(tmp_path / "stage1").epochs_run == 2
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/ema_decay", "val/auc", "val/auc_ema"} <= set(events.Tags()["scalars"])
    assert sorted(events.Tags()["images"]) == ["explain/gradcam_ema", "train/augmented_samples"]
    assert len(events.Images("explain/gradcam_ema")) == 1  # once, after the stage
    assert len(events.Scalars("val/auc_ema")) == 2  # one point per epoch


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_resume_gives_the_identical_next_epoch(tiny_cfg, tmp_path, loader_workers):
    # with loader workers, the DataLoader's first iterator once drew its seed from the global
    # generator (the resumed run's first epoch is the straight run's second)
    cfg = dataclasses.replace(tiny_cfg, stage1=dataclasses.replace(tiny_cfg.stage1, epochs=2, patience=0),
                              data=dataclasses.replace(tiny_cfg.data, loader_workers=loader_workers))
    _stage1(cfg, tmp_path / "straight")
    one = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, epochs=1))
    _stage1(one, tmp_path / "resumed")
    (tmp_path / "resumed" / "stage1" / "stage.json").unlink()  # as if it had been interrupted
    _stage1(cfg, tmp_path / "resumed")  # picks up last.pt at epoch 1
    a = load_checkpoint(tmp_path / "straight" / "stage1" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "stage1" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


def test_a_retry_from_an_older_ray_checkpoint_goes_on_from_the_newer_last_pt(tiny_cfg, tmp_path, capsys):
    """Ray hands a retried worker the checkpoint of the last epoch it was told of; a worker killed
    after saving the next epoch but before its report left last.pt an epoch ahead. The retry must
    go on from last.pt: training the epoch again rewrote its (here the finished stage's) checkpoints."""
    one = dataclasses.replace(tiny_cfg, stage1=dataclasses.replace(tiny_cfg.stage1, epochs=1, patience=0))
    two = dataclasses.replace(one, stage1=dataclasses.replace(one.stage1, epochs=2))
    _stage1(one, tmp_path)
    ray_copy = tmp_path / "ray-checkpoint.pt"
    shutil.copy(tmp_path / "stage1" / "last.pt", ray_copy)  # what Ray was given with epoch 1's report
    (tmp_path / "stage1" / "stage.json").unlink()
    _stage1(two, tmp_path)  # epoch 2 saved, then the worker is "killed" before Ray hears of it
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stage1").glob("*.pt")}
    capsys.readouterr()
    _stage1(two, tmp_path, resume_from=ray_copy)
    assert f"resumed from {tmp_path / 'stage1' / 'last.pt'} at epoch 2" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stage1").glob("*.pt")} == before  # not rewritten


@pytest.mark.parametrize("epochs", [2, 3])
def test_a_report_lost_to_a_kill_after_its_epoch_was_saved_is_sent_on_resume(tiny_cfg, tmp_path, epochs):
    """A worker killed between saving epoch 2 and reporting it resumes after epoch 2: the search
    must still get epoch 2's report (ASHA's rung; where it was the last epoch, Optuna's value and
    the trial's outcome), before any later epoch's and, for a finished stage, after its stage.json."""
    cfg = dataclasses.replace(tiny_cfg, stage1=dataclasses.replace(tiny_cfg.stage1, epochs=epochs, patience=0))
    sent, lost = [], []

    def killed_at_epoch_2(metrics, checkpoint):
        if metrics["epoch"] == 2:
            lost.append(metrics)
            raise KeyboardInterrupt  # the worker dies after the save, before Ray hears of the epoch
        sent.append(metrics)

    with pytest.raises(KeyboardInterrupt):
        _stage1(cfg, tmp_path, report=killed_at_epoch_2)
    assert [m["epoch"] for m in sent] == [1] and load_checkpoint(tmp_path / "stage1" / "last.pt")["epoch"] == 2
    (tmp_path / "stage1" / "stage.json").unlink(missing_ok=True)  # a kill before the summary's write
    resumed = []
    _stage1(cfg, tmp_path, report=lambda m, c: resumed.append((m, (tmp_path / "stage1" / "stage.json").is_file())))
    assert [m["epoch"] for m, _ in resumed] == list(range(2, epochs + 1))
    again, summary_written = resumed[0]
    assert again == lost[0] and all(type(again[k]) is type(lost[0][k]) for k in ("stage", "epoch", "step"))
    assert again["stage_done"] == float(epochs == 2) and summary_written == (epochs == 2)
    assert finished_stage(tmp_path / "stage1").epochs_run == epochs


def test_a_writer_killed_between_the_two_checkpoints_leaves_best_pt_for_its_resume(tiny_cfg, tmp_path, monkeypatch):
    """last.pt is what a resume starts from, so it is written last: once it exists, so does the
    best.pt of every epoch before it (a kill between the writes used to lose epoch 1's best.pt)."""
    from trueface import checkpoint

    real_save, written = checkpoint.save_checkpoint, []

    def save_then_die_on_last(path, state):
        if path.name == "last.pt":
            raise KeyboardInterrupt  # the process is killed at this write
        real_save(path, state)
        written.append(path.name)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die_on_last)
    with pytest.raises(KeyboardInterrupt):
        _stage1(tiny_cfg, tmp_path)
    assert written == ["best.pt"]  # epoch 1 improved: its best.pt was written before last.pt
    (tmp_path / "stage1" / ".last.pt.x.tmp").write_bytes(b"half")  # what a real SIGKILL leaves
    monkeypatch.undo()
    _stage1(tiny_cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "stage1").iterdir()) == ["best.pt", "last.pt", "stage.json"]


def test_a_diverged_epoch_stops_with_an_error_decided_on_the_loss_over_all_ranks(tiny_cfg, tmp_path, monkeypatch):
    # every rank must raise together (tests/test_ddp.py checks the mean itself with two processes):
    # here this rank's own losses are finite, and the mean over the ranks is not
    reduced = []

    def other_rank_diverged(value, di):
        reduced.append(value.item())
        return torch.full_like(value, float("nan"))

    monkeypatch.setattr(train, "mean_over_ranks", other_rank_diverged)
    with pytest.raises(StageError) as failed:
        _stage1(tiny_cfg, tmp_path)
    # each progress line's loss (log_every 1: one per step), then the epoch's loss sum, finite here
    *steps, epoch = reduced
    assert steps and all(v > 0 for v in steps) and epoch == pytest.approx(sum(steps))
    assert str(failed.value).startswith("stage1: training diverged (mean loss nan) in epoch 1; lower stage1.lr (now 0.001)")


def test_stage2_refuses_to_start_without_stage1(tiny_cfg, tmp_path):
    cfg, layout = resolve_run(tiny_cfg)
    train, val = layout.gather(cfg.stage2.domains, "train"), layout.gather(cfg.stage2.domains, "valid")
    with pytest.raises(StageError, match="Stage II needs Stage I's checkpoint"):
        run_stage(cfg, 2, train, val, tmp_path / "stage2", init_from=None)
    with pytest.raises(Exception, match="does not exist"):
        run_stage(cfg, 2, train, val, tmp_path / "stage2", init_from=tmp_path / "nope.pt")
    assert not (tmp_path / "stage2" / "last.pt").exists()


def test_stage2_starts_from_stage1_ema_and_balances_domains(tiny_cfg, tmp_path, capsys):
    cfg, layout, s1 = _stage1(tiny_cfg, tmp_path)
    with pytest.raises(StageError, match="Stage 2 checkpoint"):
        fake = load_checkpoint(s1.best_checkpoint)
        fake["stage"] = 2
        torch.save(fake, tmp_path / "s2.pt")
        run_stage(cfg, 2, layout.gather(cfg.stage2.domains, "train"), [], tmp_path / "x", init_from=tmp_path / "s2.pt")
    seen = {}
    import trueface.train as train

    original = train.ModelEma

    class Spy(original):
        def __init__(self, model, *a, **k):
            seen["init"] = {k2: v.clone() for k2, v in model.state_dict().items()}
            super().__init__(model, *a, **k)

    train.ModelEma = Spy
    try:
        run_stage(cfg, 2, layout.gather(cfg.stage2.domains, "train"), layout.gather(cfg.stage2.domains, "valid"),
                  tmp_path / "stage2", init_from=Path(s1.best_checkpoint))
    finally:
        train.ModelEma = original
    ema1 = load_checkpoint(s1.best_checkpoint)["ema"]
    assert all(torch.equal(seen["init"][k], v) for k, v in ema1.items())
    out = capsys.readouterr().out
    assert "140k-real-vs-fake/real" in out and "dalle/fake" in out  # the per-cell sampling plan


def test_global_batch_must_divide(tiny_cfg):
    st = dataclasses.replace(tiny_cfg.stage2, batch_size=12, accum_steps=2)
    assert micro_batch_size(st, 3, "stage2") == 2
    with pytest.raises(StageError, match=r"stage2.batch_size=12 .* 5 x 2"):
        micro_batch_size(st, 5, "stage2")


def test_evaluation_tables_thresholds_and_predict(tiny_cfg, tmp_path):
    cfg, layout, s1 = _stage1(tiny_cfg, tmp_path)
    report = evaluate_checkpoint(Path(s1.best_checkpoint), layout, tmp_path / "results",
                                 thresholds=ThresholdRequest(save=True))
    domains = {(r["weights"], r["domain"]) for r in report.rows}
    assert domains == {(w, d) for w in ("raw", "ema") for d in ("140k-real-vs-fake", "dalle", "combined")}
    roles = {r["domain"]: r["role"] for r in report.rows}
    assert roles["140k-real-vs-fake"].startswith("trained (Stage I)") and roles["dalle"].startswith("held out")
    assert "youden on validation (140k-real-vs-fake)" in report.threshold_source
    for name in ("summary.md", "metrics.csv", "metrics.parquet", "roc_ema.png", "confusion_ema.png", "config.yaml"):
        assert (tmp_path / "results" / name).is_file(), name
    assert "youden" in (tmp_path / "results" / "summary.md").read_text()
    saved = read_thresholds(Path(s1.best_checkpoint))  # beside best.pt, never inside it
    assert saved.pooled == report.thresholds and "thresholds" not in load_checkpoint(s1.best_checkpoint)

    predictor = Predictor.from_checkpoint(Path(s1.best_checkpoint))
    assert predictor.threshold == report.thresholds["ema"] and predictor.threshold_saved
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    good = [Path(s.path) for s in layout.samples("dalle", "test")[:3]]
    rows = list(predictor.score([good[0], broken, *good[1:]]))
    assert [r.label == "error" for r in rows] == [False, True, False, False]
    assert "broken.jpg" in rows[1].error
    assert all(0 <= r.probability <= 1 for r in rows if r.probability is not None)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_is_fused_on_the_cpu_and_steps_like_torchs_default(tiny_cfg, name):
    """Fused on the CPU (a third of the default's step time for ResNet-50's AdamW); same update
    as torch's default implementation to float rounding."""
    st = dataclasses.replace(tiny_cfg.stage1, optimizer=name, lr=0.01, weight_decay=0.05, momentum=0.9)
    torch.manual_seed(0)
    models = [torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], st)
    default = (torch.optim.AdamW(models[1].parameters(), lr=st.lr, weight_decay=st.weight_decay) if name == "adamw"
               else torch.optim.SGD(models[1].parameters(), lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay))
    assert fused.defaults["fused"] is True and not default.defaults["fused"]
    x, start = torch.randn(16, 64), [p.detach().clone() for p in models[0].parameters()]
    for _ in range(5):
        for model, opt in zip(models, (fused, default)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b, a0 in zip(models[0].parameters(), models[1].parameters(), start):
        assert (a - a0).abs().max() > 1e-3  # the steps moved the weights
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_training_step_copies_to_the_device_without_waiting(tiny_cfg, monkeypatch):
    """Every copy a step makes to the training device is non-blocking (MixUp's permutation
    included): on CUDA a blocking copy waits for the previous step's kernels before the host can
    queue this step's. Checked on the CPU by recording each Tensor.to that names a device."""
    import numpy as np

    from trueface.distributed import DistInfo
    from trueface.train import _build_state, train_step

    st = dataclasses.replace(tiny_cfg.stage1, mixup_alpha=0.4)
    cfg = dataclasses.replace(tiny_cfg, stage1=st)
    state = _build_state(cfg, 1, None, DistInfo(0, 1))
    copies, real_to = [], torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        if any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs:
            copies.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    loss = train_step(state, images, labels, st, np.random.default_rng(0), sync_grads=True)
    assert torch.isfinite(loss)
    assert len(copies) >= 3 and all(copies), copies  # images, labels, MixUp's permutation

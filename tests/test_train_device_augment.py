"""The engine's batched augmentation path (``trueface.augment_device`` wired into ``trueface.train``).

``run_stage(..., augment_on_device=True)`` runs on this CPU what ``stageN.augment.device=gpu``
runs on CUDA: uint8 batches out of the loader, ``DeviceAugment`` on the training device with a
generator seeded from (seed, rank, epoch), then MixUp. Spies record what reaches MixUp (the
model's input), what ``DeviceAugment`` is called with and returns, and the TensorBoard grid.
"""

import contextlib
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.utils import make_grid

import trueface.train as train
from trueface.augment import denormalize
from trueface.augment_device import DeviceAugment
from trueface.checkpoint import load_checkpoint
from trueface.distributed import DistInfo
from trueface.run import resolve_run
from trueface.tensorboard import NullLogger


def _stage1(cfg, out: Path, **kw):
    cfg, layout = resolve_run(cfg)
    st = cfg.stage1
    return train.run_stage(cfg, 1, layout.gather(st.domains, "train"), layout.gather(st.domains, "valid"),
                           out / "stage1", **kw)


def _with(cfg, **stage1):
    return dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, **stage1))


@pytest.fixture
def model_inputs(monkeypatch):
    """Every batch handed to MixUp (the model's input before mixing), in order."""
    seen, real = [], train.mixup

    def spy(images, targets, alpha, rng):
        seen.append(images.detach().clone())
        return real(images, targets, alpha, rng)

    monkeypatch.setattr(train, "mixup", spy)
    return seen


@pytest.fixture
def grids(monkeypatch):
    """The grids of the model's input the engine logs to TensorBoard (train/*), by name."""
    logged = []

    class Recorder(NullLogger):
        def images(self, name, grid, step):
            if name.startswith("train/"):  # not the Grad-CAM grid after the stage (tests/test_explain.py)
                logged.append((name, grid.detach().clone()))

    monkeypatch.setattr(train, "make_logger", lambda log_dir, rank: Recorder())
    return logged


def test_a_light_epoch_gives_the_per_sample_light_paths_batches_exactly(tiny_cfg, tmp_path, model_inputs):
    cfg = _with(tiny_cfg, epochs=1, light_epochs=1, mixup_alpha=0.0)
    per_sample = _stage1(cfg, tmp_path / "cpu", augment_on_device=False)
    reference = list(model_inputs)
    model_inputs.clear()
    batched = _stage1(cfg, tmp_path / "batched", augment_on_device=True)
    assert len(reference) == len(model_inputs) >= 2
    for a, b in zip(reference, model_inputs):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert per_sample.history[0]["train/loss"] == batched.history[0]["train/loss"]


def test_batched_stage_switches_to_strong_logs_what_the_model_sees_and_resumes_identically(
        tiny_cfg, tmp_path, device_calls, grids):
    """One straight two-epoch run (light, then strong) read three ways, then a resumed one."""
    cfg = _with(tiny_cfg, epochs=2, light_epochs=1, patience=0)
    result = _stage1(cfg, tmp_path / "straight", augment_on_device=True)
    assert result.epochs_run == 2
    state = load_checkpoint(tmp_path / "straight" / "stage1" / "last.pt")
    assert state["epoch"] == 2 and (tmp_path / "straight" / "stage1" / "best.pt").is_file()
    steps_per_epoch = state["step"] // 2
    assert steps_per_epoch >= 1
    assert [c["strong"] for c in device_calls] == [False] * steps_per_epoch + [True] * steps_per_epoch
    assert all(c["in"].dtype == torch.uint8 for c in device_calls)  # the loader's workers left the floats to it
    assert result.history[1]["train/strong_augment"] == 1.0 and all(
        torch.isfinite(torch.tensor(h["train/loss"])) for h in result.history)

    # TensorBoard's grid is each epoch's first batch as DeviceAugment returned it ...
    firsts = [device_calls[0]["out"], device_calls[steps_per_epoch]["out"]]
    assert [name for name, _ in grids] == ["train/augmented_samples"] * 2
    for (_, grid), out in zip(grids, firsts):
        assert torch.equal(grid, make_grid(denormalize(out[:16]), nrow=8))
    # ... which in the strong epoch is not the loader's batch merely normalised (what a grid taken
    # before DeviceAugment would show)
    first_strong = device_calls[steps_per_epoch]
    plain = DeviceAugment(cfg.stage1.augment)(first_strong["in"], torch.Generator(), strong=False)
    assert not torch.equal(grids[1][1], make_grid(denormalize(plain[:16]), nrow=8))

    # the device generator is seeded from (seed, rank, epoch): a resumed epoch draws the same
    straight = [c["out"] for c in device_calls if c["strong"]]
    _stage1(_with(cfg, epochs=1), tmp_path / "resumed", augment_on_device=True)
    (tmp_path / "resumed" / "stage1" / "stage.json").unlink()  # as if it had been interrupted
    device_calls.clear()
    _stage1(cfg, tmp_path / "resumed", augment_on_device=True)
    resumed = [c["out"] for c in device_calls]
    assert len(resumed) == len(straight) >= 1 and all(torch.equal(a, b) for a, b in zip(straight, resumed))
    a = load_checkpoint(tmp_path / "straight" / "stage1" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "stage1" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_per_sample_path_grid_is_the_model_input(tiny_cfg, tmp_path, model_inputs, grids):
    cfg = _with(tiny_cfg, epochs=1, mixup_alpha=0.0)
    _stage1(cfg, tmp_path, augment_on_device=False)
    assert len(grids) == 1
    assert torch.equal(grids[0][1], make_grid(denormalize(model_inputs[0][:16]), nrow=8))


def test_augment_device_gpu_on_a_cpu_run_names_the_key(tiny_cfg, tmp_path):
    cfg = _with(tiny_cfg, augment=dataclasses.replace(tiny_cfg.stage1.augment, device="gpu"))
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device="cpu"))
    with pytest.raises(ValueError, match=r"stage1\.augment\.device: gpu needs training on CUDA"):
        _stage1(cfg, tmp_path)


class _Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule (same ``_orig_mod`` attribute)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module

    def forward(self, x):
        return self._orig_mod(x)


def test_a_stage_augmenting_in_float16_feeds_the_model_float16_under_autocast(tiny_cfg, tmp_path, device_calls,
                                                                            model_inputs, monkeypatch):
    # as a CUDA run under bf16 autocast does (Runtime.augment_dtype), here on the CPU's batched path
    monkeypatch.setattr(train.Runtime, "augment_dtype", property(lambda self: torch.float16))
    cfg = _with(tiny_cfg, epochs=1, light_epochs=0)
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision="bf16"))
    result = _stage1(cfg, tmp_path, augment_on_device=True)
    assert device_calls and all(c["strong"] and c["out"].dtype == torch.float16 for c in device_calls)
    assert model_inputs and all(x.dtype == torch.float16 for x in model_inputs)
    assert math.isfinite(result.history[0]["train/loss"])


def _compiling(cfg):
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, compile=True))


@contextlib.contextmanager
def _real_compile_with(backend, monkeypatch):
    """The real torch.compile (dynamo) with ``backend`` in place of inductor, dynamo's caches
    cleared before and after (they outlive a test)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=backend, **kw))
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


def test_runtime_compile_wraps_only_the_training_model(tiny_cfg, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or _Compiled(m))
    off = train._build_state(tiny_cfg, 1, None, DistInfo())
    assert not compiled and off.train_model is off.model
    cfg = _compiling(tiny_cfg)
    on = train._build_state(cfg, 1, None, DistInfo())
    assert compiled == [on.model] and isinstance(on.train_model, _Compiled)
    assert on.optimizer.defaults["fused"] is True  # fused on the CPU too (make_optimizer)
    _stage1(_with(cfg, epochs=1), tmp_path)
    saved = load_checkpoint(tmp_path / "stage1" / "last.pt")["model"]
    assert saved.keys() == on.model.state_dict().keys()  # no _orig_mod. prefixes


def test_a_second_image_size_in_the_process_gets_a_graph_of_its_own_size(tiny_cfg, monkeypatch):
    # Stage II after Stage I in one process, as jobs.benchmark gpu runs them: torch.compile's default
    # would compile the second size with the image's sides symbolic, unlike a run's fresh process.
    # A backend that only records each graph's non-tensor inputs.
    symbolic = []

    def recording(gm, inputs):
        symbolic.append([n.name for n in gm.graph.nodes
                         if n.op == "placeholder" and not isinstance(n.meta.get("example_value"), torch.Tensor)])
        return gm.forward

    with _real_compile_with(recording, monkeypatch):
        for size in (32, 48):  # one state per stage; the same forward code both times
            train._build_state(_compiling(tiny_cfg), 1, None, DistInfo()).train_model(torch.randn(2, 3, size, size))
    assert symbolic == [[], []]  # two graphs, each for its own size


def test_a_model_torch_compile_cannot_compile_stops_with_an_error_naming_the_key(tiny_cfg, tmp_path, monkeypatch):
    # as where a CPU has no C++ compiler or a GPU no Triton: a backend that fails
    def no_compiler(gm, inputs):
        raise RuntimeError("no working C++ compiler found\nmore lines of the compiler's own")

    with _real_compile_with(no_compiler, monkeypatch), pytest.raises(train.StageError) as failed:
        _stage1(_with(_compiling(tiny_cfg), epochs=1), tmp_path)
    assert str(failed.value) == ("runtime.compile=true: torch.compile could not compile the model (RuntimeError: no "
                                 "working C++ compiler found); set runtime.compile=false to train without compiling")

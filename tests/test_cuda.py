"""The CUDA paths, checked on CUDA: what the rest of the suite runs on the CPU device only.

On a GPU machine, with no Ray and nothing downloaded::

    make test-gpu                              # or, where torch is installed:
    TRUEFACE_REQUIRE_CUDA=1 python -m pytest tests/test_cuda.py -v

Where torch sees no CUDA device (every CI run, and ``make test``, which hides the GPU from the CPU
suite) the same tests run on a CPU stand-in: the CPU device, with the CUDA run's float16
augmentation and its thread that augments ahead forced on, and no synchronisation to count. That
holds nothing the rest of the suite does not (its pixels are the CPU's on both sides); it runs
every line of these tests, so a renamed argument or a changed signature fails in CI, not in a GPU
session's few minutes. ``TRUEFACE_REQUIRE_CUDA=1`` (``make test-gpu`` sets it) makes a missing
CUDA device an error instead: a GPU machine whose driver torch cannot reach must not pass.

Each check holds the GPU to the CPU on the same input or the same draws:

- ``trueface.jpeg_tensor`` gives the CPU's pixels (its products are float64: TF32 cannot touch them).
- ``DeviceAugment`` in float16 (``Runtime.augment_dtype`` on CUDA) gives the CPU's float32 pixels
  for the same draws, op by op and all together, within what float16 alone moves on the CPU
  (tests/test_augment_device.py); the noise, drawn on the device, at its configured strength.
- A batch's augmentation reads the device back once, and a training step (bf16 autocast, a float16
  batch) never: torch's sync debug mode counts. ``jobs.benchmark gpu`` prints both counts; this
  holds them.
- Augmenting a batch ahead on the side stream gives the inline batches: the step's stream waits
  for the augmentation, or the step would read a half-made batch.
- A stage trains end to end: DataLoader workers with pinned memory, the batched augmentation a
  batch ahead in float16, bf16 autocast, EMA, and checkpoints a CPU machine loads.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

import trueface.augment_ahead as ahead_mod
from tests.conftest import tiny_overrides
from tests.test_augment_device import RATE_CASES, _images, _only
from trueface.augment import denormalize
from trueface.augment_ahead import training_batches
from trueface.augment_device import DeviceAugment, Draws
from trueface.bench.gpu import device_batches, host_syncs, one_step
from trueface.checkpoint import load_checkpoint
from trueface.config import load_config
from trueface.config.schema import AugmentConfig
from trueface.distributed import DistInfo
from trueface.jpeg_tensor import jpeg_tensor
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.run import resolve_run
from trueface.train import EpochAugment, _build_state, run_stage

ON_CUDA = torch.cuda.is_available()
# the device the checks run on: CUDA, or the CPU standing in for it
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# what runtime.precision auto picks on a GPU; the stand-in asks for it (a CPU with AVX2 only would
# pick fp32, and emulates bf16 where asked)
PRECISION = "auto" if ON_CUDA else "bf16"


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
    """On the CPU stand-in, what a CUDA run does that the CPU device would not: augment in float16
    under 16-bit autocast, and a batch ahead in a thread. With ``TRUEFACE_REQUIRE_CUDA=1``, no CUDA
    device fails."""
    if ON_CUDA:
        return
    if os.environ.get("TRUEFACE_REQUIRE_CUDA") == "1":
        pytest.fail("TRUEFACE_REQUIRE_CUDA=1 (make test-gpu) but torch sees no CUDA device: "
                    f"torch {torch.__version__} built for CUDA {torch.version.cuda}, "
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}. "
                    "Check nvidia-smi and that this torch wheel is a CUDA build.")
    monkeypatch.setattr(Runtime, "augment_dtype",
                        property(lambda self: torch.float32 if self.precision == "fp32" else torch.float16))
    monkeypatch.setattr(ahead_mod, "runs_ahead", lambda runtime, augment: augment is not None)


def _synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _syncs(count: int) -> int | None:
    """What ``host_syncs`` counts on this device: ``count`` on CUDA, None on the stand-in."""
    return count if ON_CUDA else None


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in grey levels (0-255) of two normalised batches, on the CPU."""
    return (denormalize(a.detach().float().cpu()) - denormalize(b.detach().float().cpu())).abs() * 255


def _summary(levels: torch.Tensor) -> str:
    return (f"mean {levels.mean().item():.4f} levels, max {levels.max().item():.2f}, "
            f"{(levels > 2).float().mean().item():.3%} more than 2 apart")


def test_jpeg_tensor_on_cuda_gives_the_cpus_pixels():
    # smooth images with fine noise, one size that is not a multiple of the 16 px chroma blocks
    for size in (64, 61):
        rng = np.random.default_rng(size)
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        base = (ramp[None, None, :, None] * ramp[None, None, None, :] * rng.uniform(0.3, 1, (6, 3, 1, 1)))
        x = torch.from_numpy(np.clip(base + rng.normal(0, 0.05, (6, 3, size, size)), 0, 1).astype(np.float32))
        quality = torch.tensor([10, 25, 50, 75, 90, 95])
        cpu = jpeg_tensor(x, quality)
        cuda = jpeg_tensor(x.to(DEVICE), quality.to(DEVICE))
        assert cuda.device.type == DEVICE.type and cuda.dtype == torch.float32
        levels = (cpu - cuda.cpu()).abs() * 255
        # Only a rounding tie decided differently (a fused multiply-add on the GPU) may differ: a
        # block laid out or quantised wrongly is tens of levels off everywhere.
        assert levels.mean().item() < 0.02 and (levels > 2).float().mean().item() < 1e-3, _summary(levels)


def _cpu_and_cuda(cfg: AugmentConfig, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``DeviceAugment`` on the CPU in float32 and on CUDA in float16, both with the GPU's JPEG,
    applying the same draws (made on the CPU, copied to the GPU)."""
    on_cpu = DeviceAugment(cfg, jpeg=jpeg_tensor)
    on_cuda = DeviceAugment(cfg, jpeg=jpeg_tensor, dtype=torch.float16)  # CUDA's own JPEG, named for the stand-in
    n, _, height, width = images.shape
    draws = on_cpu.draw(n, height, width, torch.Generator().manual_seed(2))
    cuda_draws = Draws(**{f.name: getattr(draws, f.name).to(DEVICE) for f in dataclasses.fields(Draws)})
    cpu = on_cpu.apply(images, draws, torch.Generator().manual_seed(3))
    cuda = on_cuda.apply(images.to(DEVICE), cuda_draws, torch.Generator(DEVICE).manual_seed(3))
    assert cpu.dtype == torch.float32 and cuda.dtype == torch.float16 and cuda.device.type == DEVICE.type
    assert cuda.isfinite().all()
    return cpu, cuda


@pytest.mark.parametrize("op", [*sorted(set(RATE_CASES) - {"noise"}), "all but noise"])
def test_device_augment_on_cuda_in_float16_gives_the_cpus_float32_pixels_for_the_same_draws(op):
    # The bounds are the CPU's float16-against-float32 ones (tests/test_augment_device.py), with
    # room for the GPU's own roundings: a resample or a JPEG block may round the other way. An op
    # applied to the wrong samples, or not at all, is tens of levels off on most of them.
    field = RATE_CASES.get(op, (None,))[0]
    cfg = AugmentConfig(noise_p=0.0) if op == "all but noise" else _only(**{field: 0.8})
    cpu, cuda = _cpu_and_cuda(cfg, _images(n=64, size=32, lo=0, hi=255))
    levels = _levels(cpu, cuda)
    if op == "all but noise":
        assert levels.mean().item() < 0.4 and (levels > 2).float().mean().item() < 0.05, _summary(levels)
    else:
        assert levels.mean().item() < 0.1 and (levels > 2).float().mean().item() < 0.005, _summary(levels)


def test_noise_on_cuda_has_its_configured_strength():
    # the noise is drawn on the device, so its values differ from the CPU's: its spread is held
    cfg = _only(noise_p=1.0)
    images = _images(n=64, size=32)  # 48-160: no clipping at 0 or 1
    augment = DeviceAugment(cfg, dtype=torch.float16)
    noisy = augment(images.to(DEVICE), torch.Generator(DEVICE).manual_seed(0))
    clean = DeviceAugment(cfg)(images, torch.Generator(), strong=False)
    diff = denormalize(noisy.float().cpu()) - denormalize(clean)
    noised = diff.flatten(1).abs().amax(dim=1) > 1e-3  # float16 itself moves a pixel by 2.5e-4 at most
    p, std = augment.params.noise_p, augment.params.noise_std
    assert abs(noised.float().mean().item() - p) < 0.2, (noised.float().mean(), p)  # 64 coins of p
    spread = diff[noised]
    assert abs(spread.std().item() - std) < 0.05 * std and abs(spread.mean().item()) < 0.05 * std, (spread.std(), std)


def _paper():
    return load_config("paper", ["model.weights=none", "model.arch=resnet18", f"runtime.device={DEVICE.type}",
                               f"runtime.precision={PRECISION}"])


def test_a_batch_reads_the_device_back_once_and_a_training_step_never():
    cfg = _paper()
    augment = DeviceAugment(cfg.stage1.augment, dtype=torch.float16)
    images = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8).to(DEVICE)
    generator = torch.Generator(DEVICE).manual_seed(0)
    augment(images, generator)  # the first call loads kernels and makes cuBLAS's handles
    _synchronize()
    assert host_syncs(lambda: augment(images, generator), DEVICE) == _syncs(1)  # HostMasks.read

    state = _build_state(cfg, 1, None, DistInfo(0, 1))
    assert state.runtime.precision == "bf16" and state.runtime.augment_dtype == torch.float16
    batch = device_batches(64, 32, state.runtime, count=1)[0]  # made outside the count: its copy waits
    one_step(state, cfg.stage1, batch)  # the first step times cuDNN's algorithms, which waits
    _synchronize()
    assert host_syncs(lambda: one_step(state, cfg.stage1, batch), DEVICE) == _syncs(0)


def test_augmenting_ahead_on_the_side_stream_gives_the_inline_batches():
    cfg = _paper()
    runtime = Runtime.create(DEVICE.type, PRECISION)
    gen = torch.Generator().manual_seed(0)
    pin = (lambda t: t.pin_memory()) if ON_CUDA else (lambda t: t)
    loader = [(pin(torch.randint(0, 256, (64, 3, 128, 128), dtype=torch.uint8, generator=gen)),
               torch.arange(64) % 2, torch.arange(i * 64, (i + 1) * 64)) for i in range(6)]

    def batches(ahead: bool) -> list[torch.Tensor]:
        augment = EpochAugment(DeviceAugment(cfg.stage1.augment, dtype=runtime.augment_dtype),
                               torch.Generator(DEVICE).manual_seed(3), strong=True)
        assert ahead_mod.runs_ahead(runtime, augment)  # what train_one_epoch does on CUDA
        with training_batches(loader, runtime, augment, 5, ahead=ahead) as stream:
            # read on the step's stream the moment each is handed over, as the step does
            out = [x.clone() for x, _, _ in stream]
        _synchronize()
        return out

    inline, ahead = batches(False), batches(True)
    assert len(inline) == len(ahead) == 5
    for a, b in zip(inline, ahead):
        assert a.dtype == b.dtype == torch.float16
        # cuDNN may pick another blur algorithm between the runs (float16's last bits); a batch
        # read before its augmentation finished is off by many levels where an op had yet to run
        levels = _levels(a, b)
        assert levels.max().item() < 1.5, _summary(levels)
    assert not torch.equal(inline[0], inline[1])


def test_a_stage_trains_on_cuda_with_its_augmentation_a_batch_ahead_in_float16(tiny_root, tmp_path, device_calls,
                                                                                 monkeypatch):
    overrides = tiny_overrides(tiny_root, tmp_path) + [
        f"runtime.device={DEVICE.type}", f"runtime.precision={PRECISION}", "data.loader_workers=2", "stage1.epochs=2",
        "stage1.light_epochs=1", "stage1.augment.device=auto", "stage1.patience=0"]
    cfg, layout = resolve_run(load_config("demo", overrides))
    threads, real_thread = [], ahead_mod.AheadThread

    class CountedThread(real_thread):
        def __init__(self, *args, **kwargs):
            threads.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ahead_mod, "AheadThread", CountedThread)
    st = cfg.stage1
    result = run_stage(cfg, 1, layout.gather(st.domains, "train"), layout.gather(st.domains, "valid"),
                       tmp_path / "stage1", augment_on_device=None if ON_CUDA else True)

    assert result.epochs_run == 2 and all(np.isfinite(h["train/loss"]) for h in result.history)
    assert len(threads) == 2  # each epoch's batches were made a batch ahead
    assert {c["strong"] for c in device_calls} == {False, True}  # a light epoch, then a strong one
    for c in device_calls:
        assert (c["in"].device.type, c["in"].dtype, c["out"].device.type, c["out"].dtype) == (
            DEVICE.type, torch.uint8, DEVICE.type, torch.float16)
        assert c["out"].isfinite().all()
    assert 0.0 <= result.best_select_auc_ema <= 1.0
    saved = load_checkpoint(result.best_checkpoint)  # on a machine without CUDA too: every tensor on the CPU
    tensors = [t for t in saved["ema"].values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    model = build_model(cfg.model)
    model.load_state_dict(saved["ema"])
    assert model(torch.zeros(2, 3, 32, 32)).isfinite().all()

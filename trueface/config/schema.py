"""The typed configuration of a TrueFace run: frozen dataclasses whose defaults are the paper's.

Usage: ``from trueface.config import load_config; cfg = load_config("demo", ["stage2.mixup_alpha=0.3"])``

The defaults below are the settings of the original research code (DESIGN.md section 1), with its
flaws fixed (EMA warm-up, per-op augmentation probabilities, balanced Stage II sampling). Presets
in ``presets/`` override them; ``paper`` is these defaults. Every field is reachable by a dotted
key (``stage1.augment.strength``) from YAML files, the command line and search spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The config is the bottom layer: it imports nothing of trueface, and the data code reads these.
SYNTHETIC_DOMAINS = ("140k-real-vs-fake", "tpdne", "dalle")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SyntheticSpec:
    """The embedded synthetic data set (trueface.data.synthetic generates it): image side in
    pixels, images per class in each split, and the seed."""

    image_size: int = 128
    train_per_class: int = 100
    valid_per_class: int = 30
    test_per_class: int = 30
    seed: int = 0
    # Multiplies the GAN artefacts' amplitudes (grid, droplet). 1.0 is subtle (a linear spectral
    # detector needs about half of it); a ResNet-50 trained from scratch for a CPU demo's few
    # hundred steps needs them several times stronger to show learning.
    artefact_strength: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size < 16:  # as data.synthetic.image_size in the config checks
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if min(self.train_per_class, self.valid_per_class, self.test_per_class) < 0:
            raise ValueError("images per class must be >= 0")
        if self.artefact_strength < 0:
            raise ValueError(f"artefact_strength must be >= 0, got {self.artefact_strength}")

    def per_class(self, split: str) -> int:
        """Number of images of each class in ``split``."""
        return {"train": self.train_per_class, "valid": self.valid_per_class, "test": self.test_per_class}[split]

    def file_count(self) -> int:
        """Total number of image files in the data set."""
        return len(SYNTHETIC_DOMAINS) * 2 * sum(self.per_class(s) for s in SPLITS)


@dataclass(frozen=True)
class AugmentConfig:
    """Strong augmentation of one stage. Each op has its own probability (the original blurred
    every sample: flaw 6); ``strength`` in [0, 1] scales every probability and magnitude at once,
    so 0 means light augmentation only and 1 the values written here."""

    strength: float = 1.0
    crop_scale_min: float = 0.6  # RandomResizedCrop scale (min, 1.0); ratio 3/4..4/3
    randaugment_p: float = 1.0
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    color_jitter_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    grayscale_p: float = 0.1
    jpeg_p: float = 0.5
    jpeg_quality_min: int = 30
    jpeg_quality_max: int = 95
    blur_p: float = 0.5
    blur_kernel: int = 3  # the original's kernel, recorded only: the blur's support follows sigma
    blur_sigma_max: float = 2.0  # sigma ~ U[0.1, this], honoured exactly (PIL radius = sigma)
    noise_p: float = 0.5
    noise_std: float = 0.02  # on [0, 1] pixels
    erasing_p: float = 0.5
    erasing_scale_max: float = 0.2  # erased area fraction (0.02, this)
    # Where the strong ops after crop and flip run: cpu = per sample in the DataLoader
    # workers (trueface.augment); gpu = batched on the training device (trueface.augment_device);
    # auto = gpu when training on CUDA, else cpu.
    device: str = "auto"


@dataclass(frozen=True)
class StageConfig:
    """One training stage. ``batch_size`` is the GLOBAL batch of one optimizer step, summed over
    workers and accumulation micro-steps, so the learning rate keeps its meaning when the number
    of workers changes: each worker sees batch_size / (workers * accum_steps) images a micro-step."""

    image_size: int = 224
    epochs: int = 50
    patience: int = 4  # epochs without a better validation AUC (EMA) before stopping; 0 = never stop
    batch_size: int = 200
    accum_steps: int = 1
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1e-4
    final_lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0  # linear LR warm-up, then cosine to final_lr (per step)
    light_epochs: int = 5  # epochs of light augmentation before the strong one starts
    label_smoothing: float = 0.1
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + step) / (10 + step)): flaw 1
    mixup_alpha: float = 0.0  # 0 = off; one lambda per batch from Beta(alpha, alpha)
    balance: str = "none"  # none | class | domain_class
    samples_per_epoch: int = 0  # 0 = the train set's size (none) or cells x median cell (balanced)
    domains: tuple[str, ...] = ()  # training domains; () = see trueface.data.layout.pick_domains
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def _stage2_defaults() -> StageConfig:
    return StageConfig(
        image_size=1024,
        epochs=20,
        patience=2,
        batch_size=12,
        lr=5e-5,
        # One epoch at most: Stage II starts from trained weights, and its early stopping
        # (patience 2) must not be spent on epochs whose learning rate is still climbing.
        warmup_epochs=1.0,
        final_lr=1e-7,
        light_epochs=0,
        mixup_alpha=0.2,
        balance="domain_class",
        augment=AugmentConfig(
            blur_kernel=7, blur_sigma_max=3.0, noise_std=0.01, erasing_p=0.4
        ),
    )


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # "" = the embedded synthetic data set
    cache_dir: str = ".cache/trueface"  # where the synthetic set is generated
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)  # the embedded data set
    test_domains: tuple[str, ...] = ()  # () = every domain with a test split
    loader_workers: int = 4  # DataLoader processes per Train worker
    # Shrink an image by a power of two before resizing when it is at least twice the size needed:
    # the same step (PIL's reduce) for every format, so reals and fakes are downscaled alike.
    decode_draft: bool = True
    # What a file that cannot be used does (unreadable, not an image, too small, a label conflict...):
    # error = stop before training with the data check's summary; skip = leave it out, listed in the
    # report, the plan and the run's results (see trueface.data.check).
    on_bad_image: str = "error"
    min_image_side: int = 16  # an image whose shorter side is below this is bad (1x1, icons); 16 = the smallest stage size
    # none | jpeg:<quality>@<size>: re-encode every image once (cached), short side resized to
    # <size>, as JPEG at <quality>, before training and evaluation: removes a format shortcut.
    normalize: str = "none"
    # none | uint8: decode every training and validation image once, before training, into
    # memory-mapped shards under cache_dir (trueface.data.prepared); each epoch then reads pixels
    # instead of decoding files, with the same result bit for bit. On a cluster cache_dir must be a
    # file system every node sees, as data.root must be.
    prepared: str = "none"
    # Files left out, relative to root: set by the data check under on_bad_image=skip, so the saved
    # config says exactly what was trained on.
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"  # resnet50 (the method) | resnet18 (a fifth of the compute: tests, quick looks)
    weights: str = "imagenet"  # imagenet | none | path to a state dict or a TrueFace checkpoint
    dropout: float = 0.7
    num_classes: int = 2
    channels_last: bool = True


@dataclass(frozen=True)
class EvalConfig:
    threshold_policy: str = "youden"  # youden | max_f1 | max_accuracy | fixed:<p>
    # pooled: one threshold per weights on all validation domains together; per_domain: each test
    # domain at the threshold chosen on its own validation split (the pooled one where it has none)
    threshold_scope: str = "pooled"
    # What picks best.pt, stops early and is a search's objective: the EMA weights' validation AUC
    # mean_domain (mean of each training domain's AUC) | worst_domain (their minimum) | pooled
    select_on: str = "mean_domain"
    hflip_tta: bool = True  # average with the flipped image, for validation AND test alike
    batch_size: int = 64  # per worker


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: str = "auto"  # auto (when the cluster has GPUs) | true | false
    cpus_per_worker: int = 8
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up
    # BatchNorm statistics over the global micro-batch instead of each GPU's own (CUDA only: torch's
    # SyncBatchNorm does not run on CPU). Off: see README "Scaling settings" for when to turn it on.
    sync_batchnorm: bool = False


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | fp32
    log_every: int = 50  # optimizer steps between progress lines and TensorBoard points
    # torch.compile the training model (off by default: on a CPU its compile time outweighs the
    # gain for runs of minutes; on GPUs it fuses the BatchNorm/ReLU chains)
    compile: bool = False
    # glibc's malloc keeps freed memory for the next step instead of returning it to the OS and
    # faulting it back in (trueface/host_memory.py: ~20% of a CPU step); false keeps its defaults
    keep_freed_memory: bool = True


@dataclass(frozen=True)
class OutputConfig:
    runs_dir: str = "runs"  # checkpoints, TensorBoard logs, Ray's files: runs/<run_name>/
    results_dir: str = "results"  # tables users read: results/<run_name>/


@dataclass(frozen=True)
class Config:
    run_name: str = "paper"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=_stage2_defaults)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def stage(self, number: int) -> StageConfig:
        if number not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {number!r}")
        return self.stage1 if number == 1 else self.stage2

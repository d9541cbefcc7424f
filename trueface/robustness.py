"""Robustness sweeps: the test split re-encoded, blurred, downscaled and cropped, deterministically, cached.

Usage::

    plan = SweepPlan.of(root, relpaths, seed=0, cache_dir=Path(".cache/trueface"))
    roots = build_sweep(plan, run_chunks=run_here)     # perturbation name -> mirror root (layout kept)
    img = perturb(load_rgb("face.png"), PERTURBATIONS[3], image_seed(0, "dalle/test/fake/1.png", "jpeg-q30"))
    rows = sweep_rows(checkpoint, clean_report, {p: discover_layout(roots[p.name]) for p in PERTURBATIONS})

The perturbations (``PERTURBATIONS``; ``severity`` grows with the damage, the clean split is 0):

- ``jpeg``: re-encoded as a baseline JPEG at quality 95, 75, 50, 30 (4:2:0, trueface.data.normalize's
  encoder settings); severity 100 - quality.
- ``blur``: PIL's Gaussian blur with standard deviation 0.5, 1, 2 pixels of the stored image; severity sigma.
- ``downscale``: resized to x0.5 or x0.25 of each side and back to the original size (bicubic both
  ways, PIL's antialiased resize); severity 1 - factor.
- ``crop``: a crop keeping 90% or 75% of each side at a seeded random offset (so it always holds the
  central 80% or 50% of the face), resized back to the original size (bicubic); severity 1 - kept.

Every image is decoded with ``load_rgb`` (as training reads it), perturbed, and saved as PNG (lossless),
except the JPEG ones, saved as JPEG at that quality. The only randomness (the crop's offset) is seeded
per image from the run seed, the image's path relative to the data root and the perturbation: reruns and
other machines give the same pixels (and the same bytes, for one Pillow build).

The cache: ``<cache_dir>/robustness/<root name>-<key>/<perturbation>/<root name>/<domain>/test/<label>/``,
the data root's layout with the file's suffix made to fit its format (``a.jpg`` saved as PNG is
``a.jpg.png``), so ``trueface.data.layout.discover_layout`` reads it and a single-domain root keeps its
domain name. The key hashes every test file's relative path, size, mtime and ctime, the seed,
``RECIPE_VERSION`` and Pillow's version: a changed test file means a new folder, and an unchanged one
is reused as it is.
Each perturbation is built in a hidden temporary folder beside it and renamed into place once complete,
so a crash never leaves a half cache. ``run_chunks`` runs the chunks (jobs.evaluate: Ray tasks).
The tables and plot are in trueface.robustness_report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageFilter

from trueface.atomic import atomic_write_bytes, atomic_write_text
from trueface.checkpoint import load_checkpoint
from trueface.config import from_dict
from trueface.data.decode import ImageReadError, load_rgb
from trueface.data.layout import DataLayout, DataLayoutError, Sample, file_stamp
from trueface.data.normalize import JPEG_SETTINGS
from trueface.distributed import DistInfo
from trueface.evaluation import EvaluationReport, load_models
from trueface.inference import predict_scores
from trueface.precision import Runtime
from trueface.results import COMBINED, Predictions, evaluation_rows

#: Bump when a perturbation's recipe changes (filter, encoder settings): the cache key changes with it.
RECIPE_VERSION = 1
#: Images per chunk (one Ray task): enough to make a task's start-up cost small.
CHUNK_SIZE = 16
RESAMPLE = Image.Resampling.BICUBIC
PNG_SETTINGS = {"compress_level": 6, "optimize": False}
SPEC_FILE = "perturbation.json"
KINDS = ("jpeg", "blur", "downscale", "crop")


@dataclass(frozen=True)
class Perturbation:
    """One perturbation at one strength: ``value`` is the JPEG quality, the blur's sigma (pixels), the
    downscale factor, or the fraction of each side a crop keeps."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"perturbation kind {self.kind!r} must be one of {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        """Folder name, e.g. jpeg-q30, blur-s0.5, downscale-x0.25, crop-k0.9."""
        prefix = {"jpeg": "q", "blur": "s", "downscale": "x", "crop": "k"}[self.kind]
        return f"{self.kind}-{prefix}{self.value:g}"

    @property
    def label(self) -> str:
        """Severity label for tables, e.g. q30, sigma 2, x0.25, keep 75%."""
        return {"jpeg": f"q{self.value:g}", "blur": f"sigma {self.value:g}", "downscale": f"x{self.value:g}",
                "crop": f"keep {self.value:.0%}"}[self.kind]

    @property
    def severity(self) -> float:
        """How much damage, on the kind's own scale: 0 is the clean image."""
        return float(100 - self.value if self.kind == "jpeg" else self.value if self.kind == "blur" else 1 - self.value)

    @property
    def suffix(self) -> str:
        return ".jpg" if self.kind == "jpeg" else ".png"


PERTURBATIONS = (
    *(Perturbation("jpeg", q) for q in (95, 75, 50, 30)),
    *(Perturbation("blur", s) for s in (0.5, 1, 2)),
    *(Perturbation("downscale", f) for f in (0.5, 0.25)),
    *(Perturbation("crop", k) for k in (0.9, 0.75)),
)


def image_seed(seed: int, relpath: str, name: str) -> int:
    """A 64-bit seed for one image and perturbation, the same on every machine (no Python hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}\n{relpath}\n{name}".encode()).digest()[:8], "little")


def perturb(img: Image.Image, p: Perturbation, seed: int) -> Image.Image:
    """``img`` (RGB) perturbed; the size is kept. A JPEG perturbation returns the decoded JPEG."""
    if p.kind == "jpeg":
        with Image.open(io.BytesIO(_jpeg_bytes(img, int(p.value)))) as out:
            out.load()
            return out
    if p.kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=p.value))  # PIL's radius is the standard deviation
    if p.kind == "downscale":
        small = (max(1, round(img.width * p.value)), max(1, round(img.height * p.value)))
        return img.resize(small, RESAMPLE).resize(img.size, RESAMPLE)
    return _crop_back(img, p.value, np.random.default_rng(seed))


def perturbed_bytes(img: Image.Image, p: Perturbation, seed: int) -> bytes:
    """The file a perturbation writes: JPEG at its quality, or the perturbed pixels as PNG."""
    if p.kind == "jpeg":
        return _jpeg_bytes(img, int(p.value))
    buf = io.BytesIO()
    perturb(img, p, seed).save(buf, format="PNG", **PNG_SETTINGS)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **JPEG_SETTINGS)  # no EXIF, no ICC profile
    return buf.getvalue()


def _crop_back(img: Image.Image, keep: float, rng: np.random.Generator) -> Image.Image:
    """A crop of ``keep`` of each side at a random offset, resized back to the image's size."""
    w, h = max(1, round(img.width * keep)), max(1, round(img.height * keep))
    left, top = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    return img.resize(img.size, RESAMPLE, box=(left, top, left + w, top + h))


def output_relpath(relpath: str, p: Perturbation) -> str:
    """Where a perturbed copy goes: the same path, with the format's suffix appended unless it has it
    (``a.jpg`` -> ``a.jpg.png``, never ``a.png``, which may be another file of the folder)."""
    fits = (".jpg", ".jpeg") if p.kind == "jpeg" else (".png",)
    return relpath if Path(relpath).suffix.lower() in fits else relpath + p.suffix


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep perturbs: ``relpaths`` of ``root`` (its test files), into ``folder``."""

    root: Path
    relpaths: tuple[str, ...]
    seed: int
    folder: Path  # <cache_dir>/robustness/<root name>-<key>
    perturbations: tuple[Perturbation, ...] = PERTURBATIONS

    @classmethod
    def of(cls, root: Path, relpaths: Iterable[str], seed: int, cache_dir: Path,
           perturbations: Sequence[Perturbation] = PERTURBATIONS) -> "SweepPlan":
        root = Path(root).resolve()
        relpaths = tuple(sorted(relpaths))
        if not relpaths:
            raise DataLayoutError(f"robustness sweep: no test images under {root} to perturb")
        key = sweep_key(root, relpaths, seed)
        return cls(root, relpaths, seed, Path(cache_dir).absolute() / "robustness" / f"{root.name}-{key}",
                   tuple(perturbations))

    def mirror(self, p: Perturbation) -> Path:
        """The perturbed copy's data root (it ends in the root's own name: see the module docstring)."""
        return self.folder / p.name / self.root.name

    def missing(self) -> list[Perturbation]:
        return [p for p in self.perturbations if not (self.folder / p.name / SPEC_FILE).is_file()]


def sweep_key(root: Path, relpaths: Sequence[str], seed: int) -> str:
    """Hash of the test files (path, size, mtime, ctime), the seed, the recipe and Pillow's version."""
    digest = hashlib.sha1(f"{seed}\n{RECIPE_VERSION}\n{PIL.__version__}\n".encode())
    for rel in relpaths:
        try:
            stamp = file_stamp((root / rel).stat())
        except OSError as exc:
            raise ImageReadError(root / rel, f"cannot perturb it: {exc.strerror or exc}") from exc
        digest.update(f"{rel}\t{stamp}\n".encode())
    return digest.hexdigest()[:12]


#: A chunk of work: (source root, relpaths, seed, [(kind, value, temporary folder)]).
Chunk = tuple[str, list[str], int, list[tuple[str, float, str]]]


def perturb_chunk(chunk: Chunk) -> int:
    """Decode each image of the chunk once and write every perturbation of it; returns the files written.
    Module-level and plain-typed, so a Ray task (or a process) can run it."""
    source, relpaths, seed, targets = chunk
    written = 0
    for rel in relpaths:
        img = load_rgb(Path(source) / rel)
        for kind, value, folder in targets:
            p = Perturbation(kind, value)
            atomic_write_bytes(Path(folder) / output_relpath(rel, p), perturbed_bytes(img, p, image_seed(seed, rel, p.name)))
            written += 1
    return written


def run_here(fn: Callable[[Chunk], int], chunks: list[Chunk]) -> Iterator[int]:
    """Run the chunks one after the other in this process (tests, ``--no-ray``)."""
    for chunk in chunks:
        yield fn(chunk)


def build_sweep(plan: SweepPlan, run_chunks: Callable[[Callable[[Chunk], int], list[Chunk]], Iterable[int]] = run_here,
                progress: bool = True) -> dict[str, Path]:
    """Build the perturbations the cache lacks (``run_chunks`` runs ``perturb_chunk`` on each chunk and
    yields each one's count as it ends); return perturbation name -> mirror root, for all of them."""
    from tqdm import tqdm

    todo = plan.missing()
    if todo:
        plan.folder.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(plan.folder)
        temps = {p: Path(tempfile.mkdtemp(prefix=f".tmp-{p.name}-", dir=plan.folder)) for p in todo}
        targets = [(p.kind, p.value, str(temps[p] / plan.root.name)) for p in todo]
        chunks = [(str(plan.root), list(plan.relpaths[i:i + CHUNK_SIZE]), plan.seed, targets)
                  for i in range(0, len(plan.relpaths), CHUNK_SIZE)]
        try:
            with tqdm(total=len(plan.relpaths) * len(todo), desc=f"perturbing {plan.root.name} "
                      f"({len(todo)} perturbations)", unit="img", disable=not progress) as bar:
                for count in run_chunks(perturb_chunk, chunks):
                    bar.update(count)
            for p, temp in temps.items():
                _finish(plan, p, temp)
        finally:
            for temp in temps.values():
                shutil.rmtree(temp, ignore_errors=True)
    return {p.name: plan.mirror(p) for p in plan.perturbations}


def _finish(plan: SweepPlan, p: Perturbation, temp: Path) -> None:
    """Record the spec in the finished temporary folder and rename it into place."""
    spec = {"kind": p.kind, "value": p.value, "label": p.label, "severity": p.severity, "seed": plan.seed,
            "source": str(plan.root), "images": len(plan.relpaths), "recipe": RECIPE_VERSION, "pillow": PIL.__version__}
    atomic_write_text(temp / SPEC_FILE, json.dumps(spec, indent=1) + "\n")
    final = plan.folder / p.name
    shutil.rmtree(final, ignore_errors=True)  # an incomplete folder without its spec file (older code)
    os.replace(temp, final)


def _remove_leftovers(folder: Path) -> None:
    """Delete temporary folders a killed build left (not safe while another build of this root runs)."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------- scoring


def sweep_rows(checkpoint: Path, clean: EvaluationReport, perturbed: dict[Perturbation, DataLayout],
               dist_info: DistInfo | None = None) -> list[dict]:
    """One row per (perturbation, weights, domain incl. combined): the clean report's rows as severity 0,
    then each perturbed copy's test split scored by both weights and labelled at the CLEAN thresholds
    (``clean.chosen``: a perturbed copy has no validation split). ``auc_drop`` = clean AUC - AUC."""
    domains = [r["domain"] for r in clean.rows if r["weights"] == "ema" and r["domain"] != COMBINED]
    roles = {r["domain"]: r["role"] for r in clean.rows}
    clean_auc = {(r["weights"], r["domain"]): r["auc"] for r in clean.rows}
    chosen = clean.chosen
    out = [_sweep_row("clean", "clean", 0.0, r, r["auc"]) for r in clean.rows]
    score = _scorer(checkpoint, dist_info or DistInfo.current())
    for p, layout in perturbed.items():
        samples = _perturbed_samples(p, layout, domains, clean)
        test = {w: Predictions([s.path for s in samples], [s.domain for s in samples], [s.label for s in samples], sc)
                for w, sc in score(samples).items()}
        rows = evaluation_rows(test, chosen.pooled, chosen.policy, roles, threshold_file=str(clean.threshold_file),
                               per_domain=chosen.per_domain if chosen.scope == "per_domain" else None)
        out += [_sweep_row(p.kind, p.label, p.severity, r, clean_auc[(r["weights"], r["domain"])]) for r in rows]
    return out


def _sweep_row(kind: str, label: str, severity: float, row: dict, clean_auc: float) -> dict:
    return {"perturbation": kind, "severity": label, "severity_value": severity, "weights": row["weights"],
            "domain": row["domain"], "n": row["n"], "auc": row["auc"], "accuracy": row["accuracy"],
            "threshold": row["threshold"], "auc_drop": clean_auc - row["auc"]}


def _perturbed_samples(p: Perturbation, layout: DataLayout, domains: list[str], clean: EvaluationReport) -> list[Sample]:
    """The copy's test samples of ``domains``; an error naming the folder when they are not the clean
    split's images (a cache folder edited or damaged by hand)."""
    samples = [s for d in domains if d in layout.domains for s in layout.samples(d, "test")]
    counts = {d: sum(s.domain == d for s in samples) for d in domains}
    expected = {r["domain"]: r["n"] for r in clean.rows if r["weights"] == "ema" and r["domain"] != COMBINED}
    if counts != expected:
        raise ValueError(f"robustness cache {layout.root} ({p.name}) holds {counts} test images, the clean test "
                         f"split {expected}: delete {layout.root.parent} and run again to rebuild it")
    return samples


def _scorer(checkpoint: Path, di: DistInfo) -> Callable[[list[Sample]], dict[str, np.ndarray]]:
    """samples -> weights -> P(fake), as trueface.evaluation scores them (same transform, precision, TTA)."""
    state = load_checkpoint(checkpoint)
    cfg = from_dict(state["config"])
    size = cfg.stage(int(state["stage"])).image_size
    runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
    models = {k: m.to(runtime.device, memory_format=torch.channels_last) for k, m in load_models(state, cfg).items()}
    return lambda samples: {w: predict_scores(m, samples, size, runtime, cfg, di) for w, m in models.items()}

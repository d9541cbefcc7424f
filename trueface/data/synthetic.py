"""The embedded default data set: procedural face-like images, real and "generated", in three domains.

Usage: ``root = ensure_synthetic_dataset(Path(".cache/data"), SyntheticSpec())`` then read
``root / "tpdne" / "train" / "fake" / "00007.png"`` like the real data.

The demo and the tests train on this instead of the real (large, licensed) data. It is written in
the ORIGINAL on-disk layout of the real data, so every reader in ``trueface.data`` is exercised:

    <root>/140k-real-vs-fake/{train,valid,test}/{FAKE,REAL}/*.png   (upper-case labels, as shipped)
    <root>/tpdne/{train,valid,test}/{fake,real}/*.png
    <root>/dalle/{train,valid,test}/{fake,real}/*.png

Every image, real or fake, is drawn by the same procedural face renderer (background gradient,
hair, shaded face ellipse with eyes, brows, nose and mouth, 1/f skin texture, sensor noise), so
content alone never separates the classes. A fake additionally carries its domain's generator
artefact, faint to the eye but learnable, at frequencies that survive downscaling to half size:

* ``140k-real-vs-fake`` (StyleGAN-like): the periodic "checkerboard" that transposed convolutions
  leave, i.e. spectral peaks at multiples of 1/8 cycles per pixel.
* ``tpdne`` (StyleGAN2-like): a soft "water droplet" blob plus a weaker grid, rotated and of
  another period, so its spectral peaks lie elsewhere.
* ``dalle`` (diffusion-like): over-smoothed (texture and noise below ~0.25 cycles/pixel removed)
  with a slight colour-saturation boost; only the finest pixel grain of the noise is left.

File size must not separate the classes (a data set separable by PNG size is rejected by the
data-integrity check, and would teach nothing). So the noise level of each image, real and fake
alike, is drawn from a wide distribution (it dominates PNG size and buries the small shifts the
grids cause), and the amplitude of the dalle fakes' fine grain is calibrated to make up for the
detail their smoothing removes.

Generation is deterministic (one ``numpy`` Generator per image, seeded from (seed, domain, split,
label, index); PNG with fixed options), takes ~12 s for the default spec on one slow core, and is
cached under a folder named by the generator version and a hash of the spec. It is written to a
hidden temporary sibling folder and renamed into place only when complete (marker written last),
so an interrupted run never leaves a data set that looks complete; a killed run may leave a
``.synthetic-*.tmp-*`` folder behind, which is never read and may be deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from trueface.config.schema import SPLITS, SYNTHETIC_DOMAINS, SyntheticSpec  # noqa: F401  (the config owns them)

GENERATOR_VERSION = 1  # bump when the images change; part of the cache fingerprint

MARKER_NAME = "SYNTHETIC.json"
# (real, fake) folder names per domain: the real 140k data set ships upper-case label folders.
LABEL_DIRS = {
    "140k-real-vs-fake": ("REAL", "FAKE"),
    "tpdne": ("real", "fake"),
    "dalle": ("real", "fake"),
}
_PNG_COMPRESS_LEVEL = 1  # fixed, so bytes and sizes do not depend on Pillow defaults; 1: fast

# Sensor noise std in grey levels, log-uniform per image. The range is wide on purpose: the PNG
# size of an image is dominated by its noise, so a wide spread buries the small size shifts the
# artefacts cause (file size must not separate fake from real).
_NOISE_SIGMA_RANGE = (0.6, 4.5)


# --------------------------------------------------------------------------------------------
# Cache: fingerprint, marker, atomic publication
# --------------------------------------------------------------------------------------------


def spec_fingerprint(spec: SyntheticSpec) -> str:
    """Short stable hash of the spec and the generator version (names the cache folder)."""
    payload = json.dumps({"spec": asdict(spec), "version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def dataset_root(cache_dir: Path, spec: SyntheticSpec) -> Path:
    """Where the data set for ``spec`` lives (whether or not it has been generated yet)."""
    return Path(cache_dir) / f"synthetic-v{GENERATOR_VERSION}-{spec_fingerprint(spec)}"


def _marker_payload(spec: SyntheticSpec) -> dict:
    """What the marker file of a complete data set for ``spec`` holds."""
    return {"spec": asdict(spec), "version": GENERATOR_VERSION, "file_count": spec.file_count()}


def is_complete(root: Path, spec: SyntheticSpec) -> bool:
    """True if ``root`` holds a complete data set for ``spec`` (its marker matches the spec)."""
    try:
        marker = json.loads((Path(root) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker_payload(spec)


def ensure_synthetic_dataset(cache_dir: Path, spec: SyntheticSpec) -> Path:
    """Return the root of the data set for `spec`, generating it on first use."""
    root = dataset_root(cache_dir, spec)
    if is_complete(root, spec):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists() and not is_complete(root, spec):  # re-checked: it may just have been published
        # A folder without a valid marker was not published by us (we only rename complete ones
        # into place): move it out of the way so the rename below can succeed.
        _discard(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_into(tmp, spec)
        try:
            os.rename(tmp, root)
        except OSError:
            # Lost a race: a concurrent caller published first. Its data set is identical.
            if not is_complete(root, spec):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _discard(path: Path) -> None:
    """Remove a stale folder; renamed first so a half-deleted one never sits at ``path``."""
    trash = path.parent / f".{path.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def generate_into(out_dir: Path, spec: SyntheticSpec) -> int:
    """Write every image of ``spec`` under ``out_dir`` and, last, the marker. Returns the count."""
    count = 0
    for domain in SYNTHETIC_DOMAINS:
        for split in SPLITS:
            for label, folder in enumerate(LABEL_DIRS[domain]):
                target = Path(out_dir) / domain / split / folder
                target.mkdir(parents=True, exist_ok=True)
                for index in range(spec.per_class(split)):
                    image = render_image(spec, domain, split, label, index)
                    write_png(target / f"{index:05d}.png", image)
                    count += 1
    # The marker goes last: its presence means every image above was written.
    (Path(out_dir) / MARKER_NAME).write_text(json.dumps(_marker_payload(spec), indent=2, sort_keys=True))
    return count


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG with fixed options (no metadata)."""
    Image.fromarray(image, mode="RGB").save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def image_rng(spec: SyntheticSpec, domain: str, split: str, label: int, index: int) -> np.random.Generator:
    """The Generator of one image: independent of every other image and of generation order."""
    entropy = [spec.seed, SYNTHETIC_DOMAINS.index(domain), SPLITS.index(split), int(label), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def render_image(spec: SyntheticSpec, domain: str, split: str, label: int, index: int) -> np.ndarray:
    """Render one image (label 0 = real, 1 = fake) as an (N, N, 3) uint8 array."""
    rng = image_rng(spec, domain, split, label, index)
    n = spec.image_size
    clean = render_face(rng, n)
    # Drawn for every image, real or fake, so both classes share one noise-level distribution.
    lo, hi = _NOISE_SIGMA_RANGE
    sigma = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    noise = sigma * _sensor_noise(rng, n)
    if label == 0:
        image = clean + noise
    elif domain == "140k-real-vs-fake":
        image = add_checkerboard(clean, rng, spec.artefact_strength) + noise
    elif domain == "tpdne":
        image = add_droplet_and_grid(clean, rng, spec.artefact_strength) + noise
    elif domain == "dalle":
        image = diffusion_look(clean, noise)
    else:
        raise ValueError(f"unknown synthetic domain {domain!r}")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x right, y down), shape (n, n) each."""
    c = ((np.arange(n) + 0.5) / n * 2.0 - 1.0).astype(np.float32)  # float32: masks are faster
    return np.meshgrid(c, c, indexing="xy")


@lru_cache(maxsize=8)
def _radial_freq(n: int) -> np.ndarray:
    """|f| in cycles per pixel on the rfft2 grid of an (n, n) image."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    return np.sqrt(fx * fx + fy * fy)


@lru_cache(maxsize=16)
def _pink_amplitude(n: int, exponent: float) -> np.ndarray:
    """1/f**exponent amplitude on the rfft2 grid, zero at DC."""
    amplitude = 1.0 / np.maximum(_radial_freq(n), 1.0 / n) ** exponent
    amplitude[0, 0] = 0.0
    return amplitude


def pink_noise(rng: np.random.Generator, n: int, exponent: float = 1.0) -> np.ndarray:
    """Zero-mean unit-std noise with a 1/f**exponent amplitude spectrum (natural-image texture)."""
    # Drawn directly in the frequency domain (one inverse FFT instead of a forward and an inverse).
    amplitude = _pink_amplitude(n, exponent)
    # float32 draws: about twice as fast, and plenty for texture.
    spectrum = np.empty(amplitude.shape, dtype=np.complex128)
    spectrum.real = rng.standard_normal(amplitude.shape, dtype=np.float32)
    spectrum.imag = rng.standard_normal(amplitude.shape, dtype=np.float32)
    field = np.fft.irfft2(spectrum * amplitude, s=(n, n))
    return field / (field.std() + 1e-12)


def _fft_size(k: int) -> int:
    """The smallest 5-smooth integer >= k (FFTs of such sizes are fast; e.g. 134 = 2 * 67 is not)."""
    while True:
        m = k
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return k
        k += 1


def _rgb_spectrum(image: np.ndarray, pad: int, m: int) -> np.ndarray:
    """rfft2 of each channel of an (n, n, 3) image, reflect-padded to (m, m): ``pad`` pixels
    before, the rest after. Padding keeps a filter from wrapping the top into the bottom."""
    n = image.shape[0]
    widths = ((0, 0), (pad, m - n - pad), (pad, m - n - pad))
    # Channels first: FFTs over the last (contiguous) axes are faster.
    return np.fft.rfft2(np.pad(image.transpose(2, 0, 1), widths, mode="reflect"))


def _paint_ellipse(canvas, cx, cy, ax, ay, angle, colour, soft, shade=None, alpha=1.0) -> None:
    """Alpha-blend ``colour`` (RGB, times the (n, n) ``shade`` map if given) into ``canvas``
    inside a rotated, anti-aliased ellipse; ``soft`` is the edge width in grid units.

    Only the ellipse's bounding box is computed (speed: most features are small).
    """
    n = canvas.shape[0]
    reach = max(ax, ay) + soft
    r0, r1 = max(int((cy - reach + 1) * n / 2), 0), min(int((cy + reach + 1) * n / 2) + 2, n)
    c0, c1 = max(int((cx - reach + 1) * n / 2), 0), min(int((cx + reach + 1) * n / 2) + 2, n)
    if r0 >= r1 or c0 >= c1:
        return
    x, y = _grid(n)
    ca, sa = np.cos(angle), np.sin(angle)
    dx, dy = x[r0:r1, c0:c1] - cx, y[r0:r1, c0:c1] - cy
    u = (ca / ax) * dx + (sa / ax) * dy
    v = (-sa / ay) * dx + (ca / ay) * dy
    # (radius - 1) * the smaller semi-axis approximates the signed distance near the edge;
    # the mask ramps from 1 to 0 across the edge, over ``soft``.
    u *= u
    v *= v
    u += v
    r = np.sqrt(u, out=u)
    k = min(ax, ay) / soft
    m = 0.5 + k - k * r
    np.minimum(m, 1.0, out=m)
    np.maximum(m, 0.0, out=m)
    if alpha != 1.0:
        m *= alpha
    m = m[:, :, None]
    fill = np.asarray(colour, dtype=np.float64)
    if shade is not None:
        fill = fill * shade[r0:r1, c0:c1, None]
    window = canvas[r0:r1, c0:c1]
    window += m * (fill - window)


def render_face(rng: np.random.Generator, n: int) -> np.ndarray:
    """A clean (noise-free) face-like image, float RGB in grey levels, shape (n, n, 3)."""
    x, y = _grid(n)
    soft = 2.5 / n  # ~1.2 px edges: anti-aliased like a photo, not hard-edged like a drawing

    # Background: a gradient between two muted colours plus blotchy low-frequency structure.
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + 0.5 * (np.cos(theta) * x + np.sin(theta) * y), 0, 1)[:, :, None]
    canvas = c0 * (1 - t) + c1 * t
    canvas += rng.uniform(3, 12) * pink_noise(rng, n, 1.6)[:, :, None]

    # Pose and geometry: position, scale, in-plane roll and a yaw that shifts the features.
    cx, cy = rng.normal(0.0, 0.06), rng.normal(0.1, 0.06)
    ax = rng.uniform(0.36, 0.46)
    ay = ax * rng.uniform(1.2, 1.4)
    roll = rng.normal(0.0, 0.15)
    yaw = rng.uniform(-0.25, 0.25)
    ca, sa = np.cos(roll), np.sin(roll)

    def at(u, v):
        """Face-frame offset (fractions of the semi-axes) to image coordinates."""
        px, py = u * ax, v * ay
        return cx + ca * px - sa * py, cy + sa * px + ca * py

    # Skin tone on a light-to-dark continuum, with per-channel jitter; mostly dark hair.
    tone = rng.uniform(0, 1)
    skin = np.array([238, 203, 178]) * (1 - tone) + np.array([98, 62, 45]) * tone + rng.normal(0, 6, 3)
    hair_t = rng.beta(1.2, 3.0)
    hair = np.array([28, 20, 16]) * (1 - hair_t) + np.array([205, 165, 105]) * hair_t + rng.normal(0, 5, 3)
    hair_shade = 1 + 0.12 * pink_noise(rng, n, 0.8)  # strands-like texture
    cloth = rng.uniform(20, 230, 3)

    # Back to front: shoulders, neck, hair behind the head, face, fringe over the forehead.
    _paint_ellipse(canvas, cx, cy + ay * 1.9, ax * 2.4, ay * 0.9, roll * 0.3, cloth, soft)
    _paint_ellipse(canvas, *at(0, 0.9), ax * 0.5, ay * 0.6, roll, skin * 0.8, soft)
    _paint_ellipse(canvas, *at(0, -0.18), ax * 1.18, ay * 1.0, roll, hair, soft, hair_shade)

    # Face: smooth Lambertian shading of an ellipsoid lit from a random direction.
    ux = (ca * (x - cx) + sa * (y - cy)) / ax
    uy = (-sa * (x - cx) + ca * (y - cy)) / ay
    z = np.sqrt(np.clip(1 - ux * ux - uy * uy, 0, 1))
    light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.2), 1.0])
    light /= np.linalg.norm(light)
    shade = 0.55 + 0.5 * np.clip(ux * light[0] + uy * light[1] + z * light[2], 0, 1)
    _paint_ellipse(canvas, cx, cy, ax, ay, roll, skin, soft, shade)
    fringe = rng.uniform(0.5, 0.8)  # how far the hair comes down the forehead
    _paint_ellipse(canvas, *at(0, -1.0), ax * 1.05, ay * fringe, roll, hair, soft, hair_shade)

    # Eyes (sclera, iris, pupil) and brows, shaded like the face around them.
    iris = [np.array([70, 45, 25]), np.array([70, 110, 150]), np.array([80, 110, 60])][rng.integers(3)]
    eye_v, eye_u = rng.uniform(-0.15, -0.02), rng.uniform(0.34, 0.44)
    look = rng.normal(0, 0.03)
    brow_v = eye_v - rng.uniform(0.12, 0.18)
    eye_light = 0.6 + 0.4 * shade
    for side in (-1, 1):
        _paint_ellipse(canvas, *at(side * eye_u + yaw, eye_v), ax * 0.16, ay * 0.055, roll,
                       (232, 226, 220), soft, eye_light)
        iris_xy = at(side * eye_u + yaw + look, eye_v)
        _paint_ellipse(canvas, *iris_xy, ax * 0.065, ax * 0.065, roll, iris, soft, eye_light)
        _paint_ellipse(canvas, *iris_xy, ax * 0.03, ax * 0.03, roll, (12, 10, 10), soft)
        _paint_ellipse(canvas, *at(side * eye_u + yaw, brow_v), ax * 0.2, ay * 0.025,
                       roll - side * 0.1, hair * 0.9, soft)

    # Nose: a soft shadow on the side away from the light. Mouth: a reddish ellipse.
    nose_u = yaw * 1.1 - 0.05 * np.sign(light[0])
    _paint_ellipse(canvas, *at(nose_u, 0.2), ax * 0.07, ay * 0.16, roll, skin * 0.75, soft * 3, shade, alpha=0.35)
    lips = skin * np.array([0.95, 0.62, 0.62]) * rng.uniform(0.75, 0.95)
    _paint_ellipse(canvas, *at(yaw * 0.9, rng.uniform(0.42, 0.52)), ax * rng.uniform(0.25, 0.35),
                   ay * rng.uniform(0.04, 0.08), roll, lips, soft)

    # Skin-like 1/f texture over the whole picture (multiplicative: brighter areas vary more),
    # then exposure.
    texture = pink_noise(rng, n, 1.0)
    canvas *= 1.0 + rng.uniform(0.02, 0.05) * texture[:, :, None]
    canvas *= rng.uniform(0.85, 1.1)
    return canvas


def _grey(image: np.ndarray) -> np.ndarray:
    """Channel mean of an (n, n, 3) image (written out: much faster than ``mean(axis=2)``)."""
    return (image[:, :, 0] + image[:, :, 1] + image[:, :, 2]) / 3.0


def _sensor_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sensor-like noise, about unit std per channel: mostly luminance (correlated across the
    channels, as after demosaicing) plus some chroma noise."""
    chroma = rng.standard_normal((n, n, 3), dtype=np.float32).astype(np.float64)  # fast draws
    luma = chroma[:, :, 0] + chroma[:, :, 1] + chroma[:, :, 2]  # faster than .mean(axis=2)
    chroma *= 0.6
    chroma += 0.4 * luma[:, :, None]
    return chroma


# --------------------------------------------------------------------------------------------
# Generator artefacts (fakes only)
# --------------------------------------------------------------------------------------------

# Amplitudes in grey levels: a few levels, below what the eye notices next to the noise, but
# coherent over the whole image, so they stand out as spectral peaks.
_CHECKER_PERIOD = 8  # px; transposed-conv upsampling leaves a pattern of the stride's period
_CHECKER_AMPLITUDE = 1.5  # of the fundamental: the pattern's rms is ~1.8, its peak ~5.5 levels
_TPDNE_PERIOD = 6.0  # px, rotated: spectral peaks away from the 140k ones
_TPDNE_ANGLE = np.deg2rad(20.0)
_TPDNE_AMPLITUDE = 3.0  # peak of the two-wave grid (rms ~1.5 levels)
_DROPLET_AMPLITUDE = 10.0  # a local blob: larger, but smooth and small
_DALLE_BLUR_PX = 0.8  # over-smoothing: halves the amplitude at 0.25 cycles/pixel
_DALLE_SATURATION = 1.10
_DALLE_GRAIN_BAND = (0.25, 0.35)  # cycles/pixel: where the passed-through fine grain fades in
_DALLE_GRAIN_GAIN = 1.75  # calibrated so dalle PNG sizes match the real ones (see module docstring)


@lru_cache(maxsize=8)
def _checker_pattern(n: int) -> np.ndarray:
    """Zero-mean periodic pattern of a stride-``_CHECKER_PERIOD`` upsampler, in units of the
    amplitude of its fundamental (values from -1.5 to 3.7)."""
    # A transposed convolution whose kernel size does not divide by its stride weights the pixels
    # of each period unevenly, jointly in rows and columns (the checkerboard: diagonal spectral
    # peaks) and along each axis (axis peaks), with a weaker second harmonic.
    k = np.arange(n) * 2 * np.pi / _CHECKER_PERIOD
    cy, cx = np.cos(k)[:, None], np.cos(k)[None, :]
    harmonic = 0.3 * (np.cos(2 * k + 0.6)[:, None] + np.cos(2 * k + 0.6)[None, :])
    return 2.0 * cy * cx + 0.6 * (cy + cx) + harmonic


def add_checkerboard(image: np.ndarray, rng: np.random.Generator, gain: float = 1.0) -> np.ndarray:
    """StyleGAN-like fake: add the periodic upsampling grid, slightly stronger in bright areas."""
    n = image.shape[0]
    strength = gain * _CHECKER_AMPLITUDE * rng.uniform(0.8, 1.2)
    luminance = _grey(image)[:, :, None] / 128.0
    weights = np.array([1.0, 0.9, 1.1])  # a touch of colour, as the artefact is per-channel
    return image + strength * (0.6 + 0.4 * luminance) * _checker_pattern(n)[:, :, None] * weights


@lru_cache(maxsize=8)
def _tpdne_grid(n: int) -> np.ndarray:
    """Zero-mean unit-peak grid of two plane waves, rotated by ``_TPDNE_ANGLE``."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    f = 2 * np.pi / _TPDNE_PERIOD
    a = _TPDNE_ANGLE
    g = np.cos(f * (np.cos(a) * xx + np.sin(a) * yy)) + np.cos(f * (-np.sin(a) * xx + np.cos(a) * yy))
    return g / np.abs(g).max()


def add_droplet_and_grid(image: np.ndarray, rng: np.random.Generator, gain: float = 1.0) -> np.ndarray:
    """StyleGAN2-like fake: a soft "water droplet" blob somewhere, plus a weaker rotated grid."""
    n = image.shape[0]
    x, y = _grid(n)
    dx, dy = rng.uniform(-0.7, 0.7, 2)
    r = rng.uniform(0.06, 0.12)
    d2 = ((x - dx) ** 2 + (y - dy) ** 2) / (r * r)
    # A bright core with a darker rim: the droplet's characteristic look.
    droplet = np.exp(-d2) - 0.5 * np.exp(-d2 / 2.5)
    tint = np.array([1.0, 0.95, 0.85]) * rng.choice([-1.0, 1.0])
    out = image + gain * _DROPLET_AMPLITUDE * rng.uniform(0.6, 1.0) * droplet[:, :, None] * tint
    return out + gain * _TPDNE_AMPLITUDE * rng.uniform(0.8, 1.2) * _tpdne_grid(n)[:, :, None]


@lru_cache(maxsize=8)
def _diffusion_transfers(m: int) -> tuple[np.ndarray, np.ndarray]:
    """rfft2 transfer functions on an (m, m) grid: the over-smoothing (a Gaussian) applied to
    the image, and the fine-grain band (above ~0.3 cycles/pixel) kept of the noise."""
    f = _radial_freq(m)
    smooth = np.exp(-2.0 * (np.pi * _DALLE_BLUR_PX * f) ** 2)
    lo, hi = _DALLE_GRAIN_BAND
    t = np.clip((f - lo) / (hi - lo), 0.0, 1.0)
    grain = _DALLE_GRAIN_GAIN * t * t * (3.0 - 2.0 * t)  # smoothstep: a soft edge, no ringing
    return smooth, grain


def diffusion_look(image: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Diffusion-like fake: over-smoothed (texture and noise below ~0.25 cycles/pixel removed),
    with a saturation boost and only the finest grain of ``noise`` left.

    The "denoiser" removes all the noise, but the decoder adds back fine pixel grain: it keeps
    the PNG size of these fakes in line with the real images (fully denoised, they would
    compress far better and file size alone would give them away). It lies above what survives
    downscaling to half size, so at 64 px these fakes are simply smooth.
    """
    n = image.shape[0]
    grey = _grey(image)[:, :, None]
    # Saturation is a per-pixel linear mix of the channels: boosting it before the smoothing is
    # the same as after, and leaves the grain (and so the PNG size calibration) untouched.
    saturated = grey + _DALLE_SATURATION * (image - grey)
    pad = int(np.ceil(3 * _DALLE_BLUR_PX)) + 1
    m = _fft_size(n + 2 * pad)
    smooth, grain = _diffusion_transfers(m)
    # One inverse FFT for both parts: the filters are linear.
    spectrum = _rgb_spectrum(saturated, pad, m) * smooth + _rgb_spectrum(noise, pad, m) * grain
    return np.fft.irfft2(spectrum, s=(m, m))[:, pad : pad + n, pad : pad + n].transpose(1, 2, 0)

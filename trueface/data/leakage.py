"""Find duplicate images that leak across splits, domains or labels: exact copies (same bytes)
and near duplicates (re-encodes, resizes and mirror images: perceptual hashes a few bits apart).

Usage::

    phash = perceptual_hash(Image.open(path))          # "c3a1..." (16 hex digits, 64 bits)
    phash, mirrored = perceptual_hashes(img)           # and the hash of the mirror image (phash_flip)
    thumb = thumbnail(Image.open(path))                # 16x16 gray bytes: confirms near pairs
    pairs = find_leakage(rows)                          # rows: the scan table as a list of dicts
    for p in pairs:
        if p.cross_split:
            print(p.kind, p.a, p.b, p.distance)
    summary = leak_summary(pairs)                       # counts for the report
    pairs.warnings                                      # buckets too big to compare, if any

Threshold, by measurement (``NEAR_DUPLICATE_BITS = 4``) on faces140k-mini (2,000 256 px q75
JPEGs: FFHQ reals, StyleGAN fakes). A pHash has 32 bits set (each bit is "above the median of 64",
barring ties), so distances between pHashes are even: 4 and 5 are the same threshold.

- Copies of each of the 2,000 images, distance to the original (mean / p99 / max): JPEG q50
  0.20 / 2 / 4; JPEG q30 0.28 / 2 / 4; resized x0.5 0.04 / 2 / 2; x0.5 then JPEG q50 0.29 / 2 / 4;
  x0.25 0.08 / 2 / 2; x2 0.02 / 2 / 2; PNG (8-bit RGB, 16-bit gray) 0 / 0 / 0. All within 4.
- Crops are another matter: 5% trimmed evenly (2.5% a side) 6.0 / 12 / 14, only 34% within 4;
  5% off one corner 12.0 / 20 / 28. Aligned faces share their low frequencies, so a cropped copy
  is as far as a different face: pHash cannot catch crops without flooding the report.
- Distinct images: each image's distance to its nearest other image: min 2, 1st percentile 8,
  5th 10, median 14. Pairs within 0/2/4/6/8/10 bits: 0/2/2/5/63/337 of 2.0 M pairs. The two
  within 4 (both distance 2): train/FAKE 0B925CPFSK and 1A8SFV254Q are one StyleGAN identity
  rendered twice (a "sibling", below: different images), train/FAKE 0VNPD85RZU and valid/FAKE
  0YX00K947S are two different men (a chance match).

So 4 catches every re-encode and resize. But chance matches grow with the square of the data:
at about 1 per 2 M pairs, the full 140K set (10^10 pairs) would hold thousands of them. Hence a
confirmation stage: a candidate pair is kept only when the pixels agree too, as the correlation
of 16x16 grayscale thumbnails (``thumbnail``, 256 bytes an image, stored by the scan) of at least
``NEAR_DUPLICATE_MIN_CORRELATION = 0.995``. Measured on faces140k-mini (every 4th image, 500
copies of each kind): copies JPEG q30 / q50 / x0.25 / x0.5 then q30 at least 0.9996 / 0.9998 /
0.9998 / 0.9993; smooth synthetic pictures, 64 px q90 against 56 px q40, at least 0.999.
Distinct images (all 2.0 M pairs): max 0.9934, 99.99th percentile 0.870; six pairs above 0.95,
all siblings (below). The chance match above is at 0.875 and is dropped. A 256-bit pHash was
tried first and rejected: on smooth pictures its high-frequency bits are noise (a 64 px picture
and its 56 px re-encode were 58-72 bits apart).

Mirrored copies (flipped left to right, the commonest augmentation saved to disk) are 24-38 bits
from their original (median 30; 100 mini faces): no threshold could take them. So the scan also
keeps the hash of each image's mirror (``perceptual_hashes``: the same DCT with its odd horizontal
frequencies negated, bit for bit the hash of the mirrored image, at no measurable cost per image),
and ``find_leakage`` matches every hash against the others' mirrored ones too; the thumbnail is
mirrored before it confirms. Measured on 100 mini faces: flipped and re-saved as JPEG q75, 0 bits
from the mirrored hash, correlation 1.000; flipped, halved and saved at q50, at most 2 bits,
correlation at least 0.9996: all caught (none before). The band search compares twice the
hashes, about twice the time (140,000 random hashes on a busy 2-core machine: 4.6-9.6 s without,
7.4-8.0 s with).

What this does not catch: rotated copies (2 degrees: 0-14 bits, median 4, but the thumbnails
correlate only 0.957 or more, so 3 of 100 were confirmed; 5 degrees: 2-20 bits, correlation down
to 0.72, none caught), crops (above; 6 px trimmed off each side of 256: none caught), a mirror that is also
rotated or cropped, and StyleGAN "siblings", one generated identity rendered twice with small
changes (hair, background, expression). The mini set holds a few (thumbnail correlation
0.97-0.993; test/FAKE/1DKCGEETES and train/FAKE/0YYEKMF3GY are one man across train/test, 64-bit
pHash too far apart to be a candidate): they are different images, at the distance of the closest
distinct faces, and only an identity model (face embeddings) could tell them from look-alikes.

Timing: ``find_leakage`` on 140,000 random hashes, without mirrored ones, takes about 1 s at 4 bits (0.7-1.3 s on a busy
2-core machine; 1.5-1.7 s at 6 bits, 5-6 s at 8), against 10^10 comparisons for all pairs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.fft import dctn

log = logging.getLogger(__name__)

#: Largest Hamming distance (inclusive) between two pHashes that makes them near duplicates.
NEAR_DUPLICATE_BITS = 4
#: Smallest thumbnail correlation (inclusive) that confirms a candidate near pair.
NEAR_DUPLICATE_MIN_CORRELATION = 0.995
THUMB_SIDE = 16
#: A band value shared by more images than this is not compared pair by pair (see find_leakage).
MAX_BUCKET = 5000

HASH_BITS = 64
_SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_MIRROR_SIGNS = (-1.0) ** np.arange(8)[None, :]  # columns are the horizontal frequencies


def perceptual_hash(img: Image.Image) -> str:
    """The 64-bit DCT perceptual hash of ``img`` as 16 hex digits (most significant bit first).

    Grayscale, Lanczos resize to 32x32 (in float, so 8- and 16-bit copies of a picture agree),
    2-D DCT-II, the top-left 8x8 coefficients (the DC term included), each bit = coefficient >
    their median. The same algorithm as ``imagehash.phash``; we do not depend on ``imagehash``
    because it is this one small function, and that package would bring PyWavelets with it.
    The data check hashes what ``load_rgb`` returns (EXIF rotation applied), as training reads it.
    """
    return perceptual_hashes(img)[0]


def perceptual_hashes(img: Image.Image) -> tuple[str, str]:
    """``perceptual_hash`` of ``img`` and of its mirror image (flipped left to right), from one DCT.

    Mirroring a row reverses it, which multiplies its DCT-II coefficient k by (-1)^k; the Lanczos
    resize is symmetric, so it commutes with the flip. Hence the mirrored hash is the same
    coefficients with the odd horizontal frequencies negated, then thresholded at their own median:
    equal, bit for bit, to hashing ``ImageOps.mirror(img)`` (measured on 50 mini faces), at no
    extra resize or transform."""
    gray = _grayscale(img)
    pixels = np.asarray(gray.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(pixels, type=2)[:8, :8]
    mirrored = low * _MIRROR_SIGNS
    return _bits_hex(low), _bits_hex(mirrored)


def _bits_hex(low: np.ndarray) -> str:
    return np.packbits((low > np.median(low)).ravel()).tobytes().hex()


def mirror_thumbnail(thumb: bytes) -> bytes:
    """The thumbnail of the mirrored image: each row of ``thumbnail``'s bytes reversed."""
    return np.frombuffer(thumb, dtype=np.uint8).reshape(-1, THUMB_SIDE)[:, ::-1].tobytes()


def thumbnail(img: Image.Image) -> bytes:
    """``img`` as THUMB_SIDE x THUMB_SIDE grayscale, 8 bits, row by row (Lanczos in float, the
    hash's grayscale): the pixels that confirm a candidate near pair."""
    small = _grayscale(img).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    if img.mode in _HIGH_DEPTH_MODES:  # any scale: stretch to 8 bits
        values = np.asarray(small, dtype=np.float64)
        top = values.max()
        values = values * (255.0 / top) if top > 0 else values
    else:
        values = np.asarray(small, dtype=np.float64)
    return np.clip(np.round(values), 0, 255).astype(np.uint8).tobytes()


def thumbnail_correlation(a: bytes, b: bytes) -> float:
    """Pearson correlation of two thumbnails: 1 for the same picture whatever its brightness and
    contrast; two flat thumbnails (no variance) correlate 1 when their levels agree within 2."""
    x = np.frombuffer(a, dtype=np.uint8).astype(np.float64)
    y = np.frombuffer(b, dtype=np.uint8).astype(np.float64)
    if len(x) != len(y):
        raise ValueError(f"thumbnails of {len(x)} and {len(y)} bytes: rescan the data")
    x, y = x - x.mean(), y - y.mean()
    norm = np.linalg.norm(x) * np.linalg.norm(y)
    if norm == 0:
        flat_a, flat_b = np.frombuffer(a, dtype=np.uint8).mean(), np.frombuffer(b, dtype=np.uint8).mean()
        return float(np.linalg.norm(x) == np.linalg.norm(y) == 0 and abs(flat_a - flat_b) <= 2)
    return float(x @ y / norm)


def _grayscale(img: Image.Image) -> Image.Image:
    """Luma as a float image. Transparent pixels become white (their stored colour is arbitrary);
    high bit-depth modes go to float directly rather than through 8 bits (any positive scale of
    the values gives the same hash, so 16-bit needs no rescaling)."""
    if img.mode in _HIGH_DEPTH_MODES:
        return img.convert("F")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L").convert("F")


def hamming(a: str, b: str) -> int:
    """The number of bits in which two hex hashes differ."""
    try:
        return (int(a, 16) ^ int(b, 16)).bit_count()
    except ValueError:
        raise ValueError(f"hamming: {a!r} or {b!r} is not a hex hash") from None


@dataclass(frozen=True)
class LeakPair:
    """Two files that show the same picture. ``a`` is the one in the earlier split (train, valid,
    test), then the real one, then by name; ``distance`` is the pHash Hamming distance (0 for
    exact copies); ``mirrored``: ``b`` is a left-right mirror image of ``a`` (the distance is
    between one's hash and the other's mirrored hash)."""

    kind: str  # "exact" (same sha1) | "near" (pHash within the threshold, different bytes)
    a: str  # relpath (the path when the row has no relpath)
    b: str
    distance: int
    a_domain: str
    a_split: str
    a_label: int
    b_domain: str
    b_split: str
    b_label: int
    mirrored: bool = False

    @property
    def cross_split(self) -> bool:
        return self.a_split != self.b_split

    @property
    def cross_domain(self) -> bool:
        return self.a_domain != self.b_domain

    @property
    def cross_label(self) -> bool:
        return self.a_label != self.b_label

    @property
    def same_cell(self) -> bool:
        return not (self.cross_split or self.cross_domain or self.cross_label)


class LeakPairs(list):
    """The pairs ``find_leakage`` found (a plain list of LeakPair), plus ``warnings``: what it
    could not check, e.g. a band bucket over the cap (the images in it were not compared)."""

    def __init__(self, pairs: Iterable[LeakPair] = (), warnings: Sequence[str] = ()):
        super().__init__(pairs)
        self.warnings = list(warnings)


def find_leakage(rows: list[dict], near_bits: int = NEAR_DUPLICATE_BITS, max_bucket: int = MAX_BUCKET,
                 min_correlation: float = NEAR_DUPLICATE_MIN_CORRELATION) -> LeakPairs:
    """Exact and near duplicate pairs among the scan ``rows``; rows with an ``error`` are ignored.

    Exact: files with the same sha1. Each group of k copies gives k-1 pairs, each copy against the
    group's first file (earliest split, then real before fake, then name). Exact pairs are
    reported even inside one domain/split/label cell (``same_cell``): a file twice in a training
    cell counts twice.

    Near: pHash distance <= ``near_bits`` with different (or unknown) sha1, confirmed by a
    thumbnail correlation >= ``min_correlation`` where both rows have a ``thumb``; every such pair once,
    and only when it crosses a split, a domain or a label: a near duplicate inside one cell is
    ordinary data (two shots of one scene), not leakage. A row's ``phash_flip`` (the hash of its
    mirror image) is searched too, so a left-right mirrored copy is found like any other near copy
    (``mirrored`` set; its thumbnail is mirrored before the correlation). Rows without one (scanned
    before SCAN_VERSION 5) are matched unmirrored only.

    Not all pairs are compared: the 64 bits are cut into near_bits+1 bands, and by pigeonhole
    any two hashes within near_bits differ in at most near_bits bands, so they agree exactly on
    one band. Only hashes in the same bucket of some band are compared. A bucket of more than
    ``max_bucket`` hashes (blank or uniform images all hash alike) is skipped with a warning in
    ``.warnings`` rather than compared pair by pair: its pairs there are missed.
    """
    if not 0 <= near_bits < HASH_BITS:
        raise ValueError(f"near_bits must be in [0, {HASH_BITS - 1}], got {near_bits}")
    usable = [r for r in rows if not r.get("error")]
    usable.sort(key=_order_key)  # so the earlier split is always "a"
    pairs = _exact_pairs(usable)
    near, warnings = _near_pairs(usable, near_bits, max_bucket, min_correlation)
    pairs.extend(near)
    for text in warnings:
        log.warning("find_leakage: %s", text)
    return LeakPairs(sorted(pairs, key=lambda p: (p.kind, p.a, p.b)), warnings)


def _order_key(row: dict) -> tuple:
    return (_SPLIT_ORDER.get(row.get("split", ""), 3), int(row.get("label", -1)), _name(row), row.get("domain", ""))


def _name(row: dict) -> str:
    return row.get("relpath") or row.get("path", "")


def _pair(kind: str, a: dict, b: dict, distance: int, mirrored: bool = False) -> LeakPair:
    return LeakPair(kind, _name(a), _name(b), distance, a.get("domain", ""), a.get("split", ""), int(a.get("label", -1)),
                    b.get("domain", ""), b.get("split", ""), int(b.get("label", -1)), mirrored)


def _exact_pairs(rows: list[dict]) -> list[LeakPair]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("sha1"):
            groups[row["sha1"]].append(row)
    return [_pair("exact", group[0], other, 0) for group in groups.values() if len(group) > 1 for other in group[1:]]


def _near_pairs(rows: list[dict], near_bits: int, max_bucket: int, min_correlation: float) -> tuple[list[LeakPair], list[str]]:
    hashed = [r for r in rows if r.get("phash")]
    if len(hashed) < 2:
        return [], []
    hashes, owner, mirrored = _hashes_and_mirrors(hashed)
    found, warnings = near_pairs_by_bands(hashes, near_bits, max_bucket)
    i, j, dist, flipped = _row_pairs(found, owner, mirrored)
    # Only what leaks: different bytes, and across a split, a domain or a label.
    codes = {key: _codes([str(r.get(key, "")) for r in hashed]) for key in ("split", "domain", "label")}
    sha1 = [r.get("sha1") or f"unknown {k}" for k, r in enumerate(hashed)]  # not hex: equals no other sha1
    sha1_codes = _codes(sha1)
    keep = sha1_codes[i] != sha1_codes[j]
    keep &= np.logical_or.reduce([c[i] != c[j] for c in codes.values()])
    keep &= np.array([_confirmed(hashed[a], hashed[b], min_correlation, m) for a, b, m in zip(i, j, flipped.tolist())],
                     dtype=bool)
    pairs = [_pair("near", hashed[a], hashed[b], int(d), m)
             for a, b, d, m in zip(i[keep], j[keep], dist[keep], flipped[keep].tolist())]
    return pairs, warnings


def _hashes_and_mirrors(hashed: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's hash, then the mirrored hash of each row that has one (``phash_flip``, scanned
    since SCAN_VERSION 5), as one array, with the row each belongs to and whether it is mirrored."""
    names = [_name(r) for r in hashed]
    flips = [k for k, r in enumerate(hashed) if r.get("phash_flip")]
    hashes = np.concatenate([hashes_to_uint64([r["phash"] for r in hashed], names),
                             hashes_to_uint64([hashed[k]["phash_flip"] for k in flips], [names[k] for k in flips])])
    owner = np.concatenate([np.arange(len(hashed)), np.asarray(flips, dtype=np.int64)])
    mirrored = np.concatenate([np.zeros(len(hashed), dtype=bool), np.ones(len(flips), dtype=bool)])
    return hashes, owner, mirrored


def _row_pairs(found: tuple[np.ndarray, np.ndarray, np.ndarray], owner: np.ndarray, mirrored: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hash pairs as row pairs (i, j, distance, mirrored), i < j, each pair once: a plain match wins
    over a mirrored one (a nearly symmetric picture matches both ways), else the smaller distance.
    Two mirrored hashes compare as the plain pair does, and a row against its own mirror is no pair."""
    a, b, dist = found
    flipped = mirrored[a] != mirrored[b]
    use = (owner[a] != owner[b]) & ~(mirrored[a] & mirrored[b])
    i, j = np.minimum(owner[a], owner[b])[use], np.maximum(owner[a], owner[b])[use]
    dist, flipped = dist[use], flipped[use]
    order = np.lexsort((dist, flipped, j, i))  # per row pair: plain first, then the nearest
    i, j, dist, flipped = i[order], j[order], dist[order], flipped[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], dist[first], flipped[first]


def _confirmed(a: dict, b: dict, min_correlation: float, mirrored: bool = False) -> bool:
    """The thumbnails correlate at least ``min_correlation`` (``b``'s mirrored for a mirrored pair);
    a row without one (a table scanned before they existed) cannot refute the candidate, so it stays."""
    if not (a.get("thumb") and b.get("thumb")):
        return True
    other = mirror_thumbnail(b["thumb"]) if mirrored else b["thumb"]
    return thumbnail_correlation(a["thumb"], other) >= min_correlation


def _codes(values: list[str]) -> np.ndarray:
    return np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)[1]


def hashes_to_uint64(hashes: Sequence[str], names: Sequence[str] | None = None) -> np.ndarray:
    """16-hex-digit hashes as uint64; a malformed one raises, naming its file when ``names`` is given."""
    out = np.empty(len(hashes), dtype=np.uint64)
    for k, h in enumerate(hashes):
        try:
            if len(h) != HASH_BITS // 4:
                raise ValueError
            out[k] = int(h, 16)
        except ValueError:
            where = f" ({names[k]})" if names is not None else ""
            raise ValueError(f"phash {h!r}{where} is not {HASH_BITS // 4} hex digits; rescan the data") from None
    return out


def near_pairs_by_bands(hashes: np.ndarray, near_bits: int, max_bucket: int = MAX_BUCKET
                        ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], list[str]]:
    """All index pairs (i < j) whose uint64 hashes are within ``near_bits``, as arrays (i, j,
    distance) sorted by (i, j), found by the multi-index banding described in find_leakage."""
    n = len(hashes)
    found: list[np.ndarray] = []
    warnings: list[str] = []
    for lo, width in _bands(near_bits + 1):
        keys = (hashes >> np.uint64(lo)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        too_big = sizes > max_bucket
        for start, size in zip(starts[too_big], sizes[too_big]):
            warnings.append(f"bits {lo}-{lo + width - 1} = {int(sorted_keys[start]):#x} are shared by {size} images "
                            f"(over the cap of {max_bucket}): near duplicates among them were not checked in this band; "
                            "such a crowd is usually blank or uniform images")
        # Position of each sorted element inside its bucket, and how many follow it there.
        group_size = np.repeat(np.where(too_big, 0, sizes), sizes)
        rank = np.arange(n) - np.repeat(starts, sizes)
        following = group_size - rank - 1
        active = np.flatnonzero(following > 0)
        offset = 1
        while active.size:  # compare each element with the one `offset` places later in its bucket
            a, b = order[active], order[active + offset]
            dist = np.bitwise_count(hashes[a] ^ hashes[b])
            close = dist <= near_bits
            if close.any():
                lo_idx, hi_idx = np.minimum(a[close], b[close]), np.maximum(a[close], b[close])
                found.append(lo_idx.astype(np.int64) * n + hi_idx)
            offset += 1
            active = active[following[active] >= offset]
    if not found:
        empty = np.empty(0, dtype=np.int64)
        return (empty, empty, empty), warnings
    keys = np.unique(np.concatenate(found))  # a pair close in several bands is found once per band
    i, j = keys // n, keys % n
    return (i, j, np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int64)), warnings


def _bands(count: int) -> list[tuple[int, int]]:
    """(lowest bit, width) of ``count`` bands covering the 64 bits, widths differing by at most one."""
    base, extra = divmod(HASH_BITS, count)
    bands, lo = [], 0
    for k in range(count):
        width = base + (k < extra)
        bands.append((lo, width))
        lo += width
    return bands


def leak_summary(pairs: Sequence[LeakPair]) -> dict:
    """Counts for the report: per kind, all pairs and those crossing a split / domain / label (a
    pair can cross several) or inside one cell, and the mirrored ones; per kind and split pair (e.g. "train/test"); and
    the warnings of ``find_leakage``."""
    summary: dict = {"pairs": len(pairs)}
    for kind in ("exact", "near"):
        of_kind = [p for p in pairs if p.kind == kind]
        by_splits: dict[str, int] = defaultdict(int)
        for p in of_kind:
            by_splits[f"{p.a_split}/{p.b_split}"] += 1
        summary[kind] = {
            "pairs": len(of_kind),
            "cross_split": sum(p.cross_split for p in of_kind),
            "cross_domain": sum(p.cross_domain for p in of_kind),
            "cross_label": sum(p.cross_label for p in of_kind),
            "same_cell": sum(p.same_cell for p in of_kind),
            "mirrored": sum(p.mirrored for p in of_kind),
            "by_splits": dict(sorted(by_splits.items())),
        }
    summary["warnings"] = list(getattr(pairs, "warnings", []))
    return summary

"""Find the domains, splits and labelled images of a data root laid out as users have it.

Usage: ``layout = discover_layout(Path("/data/faces")); layout.samples("tpdne", "test")``

Two shapes are understood, with every folder name matched case-insensitively:

- ``ROOT/<domain>/{train,valid,test}/{real,fake}/*.jpg`` (the original: ``140k-real-vs-fake``,
  ``dalle``, ``tpdne``; any domain name works), and
- ``ROOT/{train,valid,test}/{real,fake}/*.jpg``: one domain, named after ROOT's folder.

``val`` and ``validation`` are accepted for ``valid``. Labels: 0 = real, 1 = fake.

Discovery never stops at the first oddity: what it cannot use goes to ``layout.problems`` (a broken
or escaping symbolic link, a file name that is not UTF-8, a one-class split, an unknown label folder,
a missing split), each naming the path, and the data check (trueface.data.check) reports them and
decides by ``data.on_bad_image``. A file whose link points outside the root is never read: every
sample resolves inside its data root. ``exclude`` (relative paths) leaves out files the data check
found bad; a split left with one class is dropped, as a problem. A domain is named by its folder's
own name (a symbolic link's, not its target's). Domain folders beside a root's own splits are never
read (a warning says so). A folder beside the domains that cannot be listed is a warning; one inside
a domain stops discovery with an error that names it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
LABELS = {"real": 0, "fake": 1}
LABEL_NAMES = {0: "real", 1: "fake"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


class DataLayoutError(ValueError):
    """The data root does not have the expected layout; the message names the folder."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    domain: str
    split: str


@dataclass(frozen=True)
class LayoutProblem:
    """Something under the root discovery could not use. ``severity``: error (a file or split that
    is bad: on_bad_image decides) or warning (ignored, reported)."""

    path: str  # relative to the data root
    problem: str
    severity: str = "error"


@dataclass
class DataLayout:
    root: Path
    # domain -> split -> samples, each list sorted by path so every rank sees the same order
    domains: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    problems: list[LayoutProblem] = field(default_factory=list)

    def samples(self, domain: str, split: str) -> list[Sample]:
        if domain not in self.domains:
            raise DataLayoutError(
                f"domain {domain!r} not found under {self.root} (found: {', '.join(self.domains)})"
            )
        return list(self.domains[domain].get(split, []))

    def gather(self, domains: tuple[str, ...] | list[str], split: str) -> list[Sample]:
        return [s for d in domains for s in self.samples(d, split)]

    def domains_with(self, split: str) -> list[str]:
        return [d for d, splits in self.domains.items() if splits.get(split)]

    def all_samples(self) -> list[Sample]:
        return [s for splits in self.domains.values() for xs in splits.values() for s in xs]

    def relpath(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """domain -> split -> {'real': n, 'fake': n}, for plans and logs."""
        return {
            d: {
                s: {name: sum(x.label == y for x in xs) for y, name in LABEL_NAMES.items()}
                for s, xs in splits.items()
            }
            for d, splits in self.domains.items()
        }


def discover_layout(root: Path | str, exclude: Iterable[str] = ()) -> DataLayout:
    """The layout under ``root``, without the files in ``exclude`` (paths relative to ``root``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"data root {root} does not exist or is not a folder")
    try:
        return _discover(root, frozenset(exclude))
    except PermissionError as exc:  # a folder this user cannot list: name it rather than a traceback
        raise DataLayoutError(f"cannot read {exc.filename or root} under data root {root}: {exc.strerror or exc} "
                              f"(give this user read and execute permission on it, or move it out of the root)") from exc


def _discover(root: Path, exclude: frozenset[str]) -> DataLayout:
    reader = _Reader(root, exclude)
    layout = DataLayout(root, problems=reader.problems)
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    own_splits = _split_dirs(root)
    if own_splits:
        name = _domain_name(root)
        layout.domains[name] = reader.domain(root, name, own_splits)
        for child in children:  # ROOT/dalle/train/... beside ROOT/train/...: a mistake, never read
            if child.name.lower() not in SPLIT_ALIASES and reader.split_dirs(child):
                reader.problem(child, "ignored: a domain folder beside the root's own train/valid/test folders (a "
                                      "root holds either one domain's splits or one folder per domain)", "warning")
    else:
        for child in children:
            found = reader.split_dirs(child)
            if found:
                layout.domains[child.name] = reader.domain(child, child.name, found)
            elif found is not None:
                reader.problem(child, "ignored: it has no train/valid/test folder", "warning")
    layout.domains = {d: splits for d, splits in layout.domains.items() if splits}
    if not layout.domains:
        errors_first = sorted(layout.problems, key=lambda p: p.severity != "error")
        found = "".join(f"\n  {p.path}: {p.problem}" for p in errors_first[:10])
        raise DataLayoutError(
            f"no images found under {root}: expected ROOT/<domain>/{{train,valid,test}}/{{real,fake}}/"
            f"*.jpg or ROOT/{{train,valid,test}}/{{real,fake}}/*.jpg (folder names in any case)" + found
        )
    return layout


def file_stamp(st: os.stat_result) -> tuple[int, int, int]:
    """(size, mtime_ns, ctime_ns): what a cache built from a file's content compares to know it is
    still that file's. ctime too: a file replaced by another of the same size with its mtime kept
    (``cp -p``, ``rsync -a``) changes neither size nor mtime, but the kernel sets ctime on every change."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _domain_name(root: Path) -> str:
    return root.resolve().name or "data"


def _split_dirs(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for child in sorted(folder.iterdir()):
        split = SPLIT_ALIASES.get(child.name.lower())
        if split and child.is_dir():
            if split in found:
                raise DataLayoutError(f"{folder}: both {found[split].name}/ and {child.name}/ mean split {split!r}")
            found[split] = child
    return found


class _Reader:
    """Reads domains under one root, collecting problems instead of stopping at the first."""

    def __init__(self, root: Path, exclude: frozenset[str]) -> None:
        self.root, self.real_root, self.exclude = root, root.resolve(), exclude
        self.problems: list[LayoutProblem] = []

    def problem(self, path: Path, text: str, severity: str = "error") -> None:
        """Recorded relative to the root, as the data check's report names files."""
        self.problems.append(LayoutProblem(display_path(os.path.relpath(path, self.root)), text, severity))

    def split_dirs(self, folder: Path) -> dict[str, Path] | None:
        """``_split_dirs`` of a folder beside the domains; None, with a warning, when it cannot be
        listed (a root at a mount point holds a lost+found only root reads)."""
        try:
            return _split_dirs(folder)
        except PermissionError as exc:
            self.problem(folder, f"ignored: cannot list it ({exc.strerror or exc})", "warning")
            return None

    def domain(self, folder: Path, domain: str, found: dict[str, Path]) -> dict[str, list[Sample]]:
        """``folder``'s splits (``found``: its ``_split_dirs``), its samples named ``domain``: the
        name the layout keys them by (a symbolic link's own name, not its target's, so two links to
        ``.../v2`` stay two domains)."""
        splits: dict[str, list[Sample]] = {}
        for split in SPLITS:
            if split not in found:
                self.problem(folder / split, f"domain {domain!r} has no {split}/ split ({_SPLIT_ROLE[split]})", "warning")
        for split, split_dir in found.items():
            samples = self._split(domain, split, split_dir)
            if samples:
                splits[split] = sorted(samples, key=lambda s: s.path)
        return splits

    def _split(self, domain: str, split: str, split_dir: Path) -> list[Sample]:
        samples: list[Sample] = []
        label_dirs: dict[int, Path] = {}
        loose = 0  # image files right in the split folder, where none is read
        for child in sorted(split_dir.iterdir()):
            label = LABELS.get(child.name.lower())
            if not child.is_dir():
                loose += child.suffix.lower() in IMAGE_SUFFIXES and not child.name.startswith(".") and child.is_file()
                continue
            if label is None:
                n = sum(1 for _ in child.iterdir())
                self.problem(child, f"ignored: unknown label folder with {n} entries (label folders are real/ and fake/)",
                             "warning")
                continue
            if label in label_dirs:
                self.problem(child, f"two folders for one label ({label_dirs[label].name}/ and {child.name}/): "
                                    f"both are read")
            label_dirs[label] = child
            samples += [Sample(str(p), label, domain, split) for p in self._images_in(child)]
        if loose:
            self.problem(split_dir, f"ignored: {loose} image file(s) right in this folder (images go in its real/ and "
                                    f"fake/ folders)", "warning")
        present = {s.label for s in samples}
        if present != {0, 1}:
            missing = [LABEL_NAMES[y] for y in (0, 1) if y not in present]
            self.problem(split_dir, f"{split}/ of {domain!r} has no usable {' or '.join(missing)} images: a split "
                                    f"needs both classes, so it is left out")
            return []
        return samples

    def _images_in(self, folder: Path) -> list[Path]:
        out, subfolders, unknown = [], [], {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:  # the suffix first: no stat for an image's name
                if p.is_dir() and not p.is_symlink():
                    subfolders.append(p)
                else:
                    kind = p.suffix.lower() or "no suffix"
                    unknown[kind] = unknown.get(kind, 0) + 1
                continue
            if self._excluded(p):
                continue
            if not _is_utf8(p.name):
                self.problem(p, "file name is not valid UTF-8 (shown with escapes): rename the file")
            elif p.is_symlink() and not p.exists():
                self.problem(p, f"broken symbolic link (to {os.readlink(p)})")
            elif not p.resolve().is_relative_to(self.real_root):
                self.problem(p, f"refused: it resolves to {p.resolve()}, outside the data root")
            elif p.is_file():
                out.append(p)
        for sub in subfolders:  # not searched: a label folder's images sit directly in it
            n = sum(1 for _ in sub.rglob("*"))
            self.problem(sub, f"ignored: subfolder with {n} entries (images must sit directly in {folder.name}/)",
                         "warning")
        if unknown:
            kinds = ", ".join(f"{suffix} {n}" for suffix, n in sorted(unknown.items()))
            self.problem(folder, f"ignored: {sum(unknown.values())} file(s) with no image suffix ({kinds}; read are "
                                 f"{', '.join(sorted(IMAGE_SUFFIXES))})", "warning")
        return out

    def _excluded(self, path: Path) -> bool:
        return bool(self.exclude) and str(path.relative_to(self.root)) in self.exclude


_SPLIT_ROLE = {"train": "it cannot be trained on", "valid": "it is not validated: no selection or thresholds on it",
               "test": "it is not in the test tables"}


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates (surrogateescape)
        return False
    return True


def display_path(path: Path | str) -> str:
    """A path as valid UTF-8 text for reports and tables (undecodable bytes shown as \\xNN)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def pick_domains(layout: DataLayout, requested: tuple[str, ...], role: str) -> list[str]:
    """The domains a role uses: the requested ones (each must exist), else the default rule.

    Defaults: ``stage1`` -> the domains whose name contains '140k' (the paper pretrains on the
    140K set), or every domain with a train split when none does; ``stage2`` -> every domain with
    a train split; ``test`` -> every domain with a test split.
    """
    split = "test" if role == "test" else "train"
    available = layout.domains_with(split)
    if requested:
        missing = [d for d in requested if d not in layout.domains]
        if missing:
            raise DataLayoutError(
                f"{role} domain(s) {', '.join(missing)} not found under {layout.root} "
                f"(found: {', '.join(layout.domains)})"
            )
        empty = [d for d in requested if d not in available]
        if empty:
            raise DataLayoutError(f"{role} domain(s) {', '.join(empty)} have no {split}/ split under {layout.root}")
        return list(requested)
    if not available:
        raise DataLayoutError(f"no domain under {layout.root} has a {split}/ split")
    if role == "stage1":
        preferred = [d for d in available if "140k" in d.lower()]
        return preferred or available
    return available

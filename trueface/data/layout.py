"""Find the domains, splits and labelled images of a data root laid out as users have it.

Usage: ``layout = discover_layout(Path("/data/faces")); layout.samples("tpdne", "test")``

Two shapes are understood, with every folder name matched case-insensitively:

- ``ROOT/<domain>/{train,valid,test}/{real,fake}/*.jpg`` (the original: ``140k-real-vs-fake``,
  ``dalle``, ``tpdne``; any domain name works), and
- ``ROOT/{train,valid,test}/{real,fake}/*.jpg``: one domain, named after ROOT's folder.

``val`` and ``validation`` are accepted for ``valid``. Labels: 0 = real, 1 = fake.
"""

from __future__ import annotations

import logging
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


@dataclass
class DataLayout:
    root: Path
    # domain -> split -> samples, each list sorted by path so every rank sees the same order
    domains: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)

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

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """domain -> split -> {'real': n, 'fake': n}, for plans and logs."""
        return {
            d: {
                s: {name: sum(x.label == y for x in xs) for y, name in LABEL_NAMES.items()}
                for s, xs in splits.items()
            }
            for d, splits in self.domains.items()
        }


def discover_layout(root: Path | str) -> DataLayout:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"data root {root} does not exist or is not a folder")
    if _split_dirs(root):
        layout = DataLayout(root, {_domain_name(root): _read_domain(root)})
    else:
        layout = DataLayout(root)
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _split_dirs(child):
                layout.domains[child.name] = _read_domain(child)
            else:
                log.warning("ignoring %s: it has no train/valid/test folder", child)
    if not layout.domains:
        raise DataLayoutError(
            f"no images found under {root}: expected ROOT/<domain>/{{train,valid,test}}/{{real,fake}}/"
            f"*.jpg or ROOT/{{train,valid,test}}/{{real,fake}}/*.jpg (folder names in any case)"
        )
    return layout


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


def _read_domain(folder: Path) -> dict[str, list[Sample]]:
    domain = _domain_name(folder)
    splits: dict[str, list[Sample]] = {}
    for split, split_dir in _split_dirs(folder).items():
        samples: list[Sample] = []
        labels_found = []
        for child in sorted(split_dir.iterdir()):
            label = LABELS.get(child.name.lower())
            if label is None or not child.is_dir():
                if child.is_dir():
                    log.warning("ignoring %s: label folders are real/ and fake/", child)
                continue
            labels_found.append(label)
            samples += [Sample(str(p), label, domain, split) for p in _images_in(child)]
        if not labels_found:
            raise DataLayoutError(f"{split_dir} has no real/ or fake/ folder (any case)")
        if len(set(labels_found)) != len(labels_found):
            raise DataLayoutError(f"{split_dir} has two folders for one label (e.g. REAL/ and real/)")
        if not samples:
            raise DataLayoutError(f"{split_dir}: its real/ and fake/ folders hold no images")
        splits[split] = sorted(samples, key=lambda s: s.path)
    return splits


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


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

from pathlib import Path

import pytest

from tests.conftest import MINI_140K, write_tiny_root
from trueface.data.layout import DataLayoutError, discover_layout, pick_domains


def test_multi_domain_root_with_mixed_label_case(tiny_root: Path):
    layout = discover_layout(tiny_root)
    assert list(layout.domains) == ["140k-real-vs-fake", "dalle"]
    for domain in layout.domains:
        for split in ("train", "valid", "test"):
            samples = layout.samples(domain, split)
            assert sorted({s.label for s in samples}) == [0, 1]
            assert sum(s.label for s in samples) == 8 and len(samples) == 16
            assert all(s.domain == domain and s.split == split for s in samples)
    fake = [s for s in layout.samples("dalle", "train") if s.label == 1]
    assert all("/fake/" in s.path for s in fake)


def test_single_domain_root_takes_the_folder_name(tmp_path: Path):
    root = write_tiny_root(tmp_path / "my-faces", {"": "upper"}, per_class=2)
    layout = discover_layout(root)
    assert list(layout.domains) == ["my-faces"]
    assert len(layout.samples("my-faces", "test")) == 4


def test_val_alias_and_any_domain_name(tmp_path: Path):
    root = write_tiny_root(tmp_path / "r", {"Some Generator": "lower"}, per_class=1, splits=("train", "val", "test"))
    layout = discover_layout(root)
    assert len(layout.samples("Some Generator", "valid")) == 2


def test_images_where_none_is_read_are_named_in_warnings(tmp_path: Path):
    root = write_tiny_root(tmp_path / "faces", {"": "lower"}, per_class=2)
    before = discover_layout(root).counts()
    nested = root / "train" / "real" / "batch2"
    nested.mkdir()
    for i in range(3):
        (nested / f"{i}.png").write_bytes((root / "train" / "real").glob("*.png").__next__().read_bytes())
    (root / "train" / "loose.png").write_bytes(b"")
    for name in ("a.gif", "b.jfif", "c.jfif", "labels"):
        (root / "train" / "fake" / name).write_bytes(b"")
    (root / "train" / "fake" / ".DS_Store").write_bytes(b"")  # hidden: not worth a word
    layout = discover_layout(root)
    assert layout.counts() == before  # what is read is unchanged
    said = sorted((p.path, p.problem, p.severity) for p in layout.problems)
    assert said == [
        ("train", "ignored: 1 image file(s) right in this folder (images go in its real/ and fake/ folders)", "warning"),
        ("train/fake", "ignored: 4 file(s) with no image suffix (.gif 1, .jfif 2, no suffix 1; read are .bmp, .jpeg, "
                       ".jpg, .png, .tif, .tiff, .webp)", "warning"),
        ("train/real/batch2", "ignored: subfolder with 3 entries (images must sit directly in real/)", "warning"),
    ]


def test_errors_name_the_folder(tmp_path: Path):
    with pytest.raises(DataLayoutError, match="does not exist"):
        discover_layout(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match="no images found under"):
        discover_layout(tmp_path / "empty")
    bad = tmp_path / "bad" / "train" / "maybe"
    bad.mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"no images found under .*/bad: expected .*\n  train: train/ of 'bad' has no usable real or fake"):
        discover_layout(tmp_path / "bad")


def test_pick_domains_rules(tmp_path: Path):
    root = write_tiny_root(tmp_path / "r", {"140k-real-vs-fake": "upper", "dalle": "lower", "tpdne": "lower"}, per_class=1)
    layout = discover_layout(root)
    assert pick_domains(layout, (), "stage1") == ["140k-real-vs-fake"]
    assert pick_domains(layout, (), "stage2") == ["140k-real-vs-fake", "dalle", "tpdne"]
    assert pick_domains(layout, ("tpdne",), "stage1") == ["tpdne"]
    with pytest.raises(DataLayoutError, match=r"stage2 domain\(s\) midjourney not found"):
        pick_domains(layout, ("midjourney",), "stage2")
    other = discover_layout(write_tiny_root(tmp_path / "o", {"a": "lower", "b": "lower"}, per_class=1))
    assert pick_domains(other, (), "stage1") == ["a", "b"]


@pytest.mark.skipif(not MINI_140K.is_dir(), reason=f"real sample {MINI_140K} is absent on this machine")
def test_real_140k_mini_sample_is_one_domain():
    layout = discover_layout(MINI_140K)
    counts = layout.counts()
    assert list(counts) == ["faces140k-mini"]
    assert counts["faces140k-mini"]["train"] == {"real": 700, "fake": 700}
    assert counts["faces140k-mini"]["test"] == {"real": 150, "fake": 150}


def test_symbolic_links_to_domain_folders_keep_their_own_names(tmp_path: Path):
    # two versioned folders of the same name, linked in as two domains: two domains, each balanced
    # apart (the links resolve inside the root, as every sample must)
    root = tmp_path / "root"
    store = root / "_versions"
    write_tiny_root(store / "dalle", {"v2": "lower"}, per_class=1)
    write_tiny_root(store / "tpdne", {"v2": "lower"}, per_class=3)
    (root / "dalle").symlink_to(store / "dalle" / "v2")
    (root / "tpdne").symlink_to(store / "tpdne" / "v2")
    layout = discover_layout(root)
    assert list(layout.domains) == ["dalle", "tpdne"]
    for domain, n in (("dalle", 2), ("tpdne", 6)):
        samples = layout.samples(domain, "train")
        assert len(samples) == n and {s.domain for s in samples} == {domain}


def test_domain_folders_beside_the_roots_own_splits_are_warned_of(tmp_path: Path):
    root = write_tiny_root(tmp_path / "faces", {"": "lower"}, per_class=1)
    write_tiny_root(root, {"dalle": "lower"}, per_class=1)
    (root / "notes").mkdir()  # a folder without splits beside them is nothing to warn of
    layout = discover_layout(root)
    assert list(layout.domains) == ["faces"]
    assert [(p.path, p.severity) for p in layout.problems] == [("dalle", "warning")]
    assert "beside the root's own train/valid/test" in layout.problems[0].problem


def test_a_folder_that_cannot_be_listed_is_named(tmp_path: Path, monkeypatch):
    # chmod 000 stops nobody when the tests run as root (CI containers): refuse the listing instead
    root = write_tiny_root(tmp_path / "data", {"140k": "upper", "dalle": "lower"}, per_class=1)
    (root / "lost+found").mkdir()
    locked = {root / "lost+found"}
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self in locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    # beside the domains (a mount point's lost+found): a warning, the domains are read
    layout = discover_layout(root)
    assert list(layout.domains) == ["140k", "dalle"]
    assert [(p.path, p.severity) for p in layout.problems] == [("lost+found", "warning")]
    assert "cannot list it (Permission denied)" in layout.problems[0].problem
    # inside a domain: an error that names the folder and what to do, not a traceback
    locked.add(root / "dalle" / "valid" / "fake")
    with pytest.raises(DataLayoutError, match=r"cannot read .*dalle/valid/fake under data root .*read and execute"):
        discover_layout(root)

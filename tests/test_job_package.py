"""The package `ray job submit --working-dir .` uploads: complete, and without local state or data.

Built with Ray's own packaging code, honouring .gitignore and .rayignore as Ray does. A pattern meant
for the repository root but written without a leading "/" (such as "data/") matches at any depth and
drops source (trueface/data/); the job then imports it from a local install, or fails on a cluster.

Usage::

    .venv/bin/python -m pytest tests/test_job_package.py -q
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ray._private.runtime_env.packaging import create_package

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("trueface", "jobs", "search_spaces", ".ci")  # .ci/ holds the job's entrypoint wrapper
SOURCE_SUFFIXES = (".py", ".yaml")
# Local state, outputs, data and checkpoints a developer's tree holds: none may be uploaded.
PLANTED = (".git/HEAD", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".cache/torch/x.bin",
           "runs/demo/stage1/best.pt", "runs/demo/config.yaml", "results/demo/summary.md", "results/x",
           "data/faces/train/REAL/x.jpg", "trueface/model.pt", "jobs/weights.pth",
           "trueface/__pycache__/model.cpython-311.pyc", "trueface.egg-info/PKG-INFO", "build/lib/x.py")
LOGGER = logging.getLogger(__name__)


def git_files(*pathspecs: str) -> list[str]:
    """Tracked files (git ls-files) of REPO under ``pathspecs``."""
    listing = subprocess.run(["git", "ls-files", "-z", "--", *pathspecs], cwd=REPO, capture_output=True,
                             check=True)
    return [name for name in listing.stdout.decode().split("\0") if name]


def tracked_sources() -> list[str]:
    # A tracked file deleted in the working tree (not yet committed) cannot be uploaded: skip it.
    sources = [name for name in git_files(*SOURCE_DIRS) if name.endswith(SOURCE_SUFFIXES) and (REPO / name).is_file()]
    assert any(name.startswith("trueface/data/") for name in sources), "git ls-files listed no trueface/data/"
    return sources


def build_package(root: Path, scratch: Path) -> Path:
    """The zip Ray builds of ``root``, as `ray job submit --working-dir` does (ignore files honoured)."""
    zip_path = scratch / "package.zip"
    create_package(str(root), zip_path, include_gitignore=True, logger=LOGGER)
    return zip_path


def package_names(root: Path, scratch: Path) -> set[str]:
    with zipfile.ZipFile(build_package(root, scratch)) as package:
        return set(package.namelist())


def copy_of_tree(dest: Path) -> Path:
    """The tracked files of REPO (their working-tree content, ignore files included) under ``dest``."""
    for name in git_files():
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def missing_sources(names: set[str]) -> list[str]:
    return [name for name in tracked_sources() if name not in names]


def test_the_package_of_the_repository_holds_every_tracked_module(tmp_path):
    names = package_names(REPO, tmp_path)
    assert missing_sources(names) == [], (
        "the package `ray job submit --working-dir .` uploads leaves these tracked files out: a pattern in "
        ".rayignore or .gitignore matches too deep (anchor root-only folders with a leading '/')")
    local_state = [name for name in names if name.split("/")[0] in {".git", ".venv", "runs", "results", "data"}
                   or name.endswith((".pt", ".pth"))]
    assert local_state == []


def test_the_package_leaves_out_local_state_outputs_data_and_checkpoints(tmp_path):
    tree = copy_of_tree(tmp_path / "tree")
    for name in PLANTED:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"planted by tests/test_job_package.py")
    names = package_names(tree, tmp_path)
    assert [name for name in PLANTED if name in names] == [], "uploaded although .rayignore/.gitignore should drop it"
    assert missing_sources(names) == []
    # README.md and benchmarks.md are tracked, but the cluster needs no results folder
    assert [name for name in names if name.startswith("results/")] == []


def run_wrapper(upload: Path, module: str, pythonpath: Path) -> subprocess.CompletedProcess:
    """.ci/run_job_checked.py run as a job's entrypoint: from ``upload``, the project also on PYTHONPATH."""
    return subprocess.run([sys.executable, str(upload / ".ci" / "run_job_checked.py"), module], cwd=upload,
                          env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=60)


def test_the_job_wrapper_fails_naming_a_module_that_did_not_come_from_the_upload(tmp_path):
    upload = tmp_path / "upload"
    with zipfile.ZipFile(build_package(REPO, tmp_path)) as package:
        package.extractall(upload)
    ran = run_wrapper(upload, "trueface.data.layout", pythonpath=REPO)
    assert ran.returncode == 0, ran.stderr
    checked = re.search(r"checked (\d+) project modules .*: all from (\S+) ", ran.stdout)
    assert checked, ran.stdout
    assert int(checked[1]) >= 3 and checked[2] == str(upload.resolve())  # trueface, .data, .data.layout

    shutil.rmtree(upload / "trueface")  # an incomplete upload: the project now comes from PYTHONPATH
    ran = run_wrapper(upload, "trueface.data.layout", pythonpath=REPO)
    assert ran.returncode == 1
    assert f"trueface.data: {REPO / 'trueface' / 'data' / '__init__.py'}" in ran.stderr
    assert "outside the job's working directory" in ran.stderr

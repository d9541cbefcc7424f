"""The Makefile's test targets, run with a stand-in Python that records how it was called: ``make
test`` runs the CPU suite with every GPU hidden (as CI runs it, on any machine: tests/test_cuda.py
on its CPU stand-in), ``make test-gpu`` the CUDA checks with the GPU left visible and required."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(target: str, tmp_path: Path) -> tuple[dict[str, str | None], list[str]]:
    """Runs ``make <target>`` with the interpreter replaced; returns CUDA_VISIBLE_DEVICES and
    TRUEFACE_REQUIRE_CUDA as the interpreter saw them (None: unset) and its arguments."""
    record = tmp_path / "record"
    stub = tmp_path / "python"
    words = '"${CUDA_VISIBLE_DEVICES-<unset>}" "${TRUEFACE_REQUIRE_CUDA-<unset>}" "$@"'
    stub.write_text(f'#!/bin/sh\n{{ for v in {words}; do echo "$v"; done; }} > {record}\n')
    stub.chmod(0o755)
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than pyproject.toml: setup has nothing to do
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}  # a GPU machine's
    env.pop("TRUEFACE_REQUIRE_CUDA", None)
    subprocess.run(["make", "-s", "-C", str(REPO), target, f"PY={stub}", f"STAMP={stamp}"], env=env, check=True,
                   capture_output=True, timeout=60)
    cuda, require, *args = record.read_text().splitlines()
    seen = {"CUDA_VISIBLE_DEVICES": cuda, "TRUEFACE_REQUIRE_CUDA": require}
    return {k: None if v == "<unset>" else v for k, v in seen.items()}, args


def test_make_test_hides_every_gpu_from_the_suite(tmp_path):
    env, args = make("test", tmp_path)
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # set and empty: torch and Ray see no GPU
    assert env["TRUEFACE_REQUIRE_CUDA"] is None  # so tests/test_cuda.py runs on its CPU stand-in
    assert args[:2] == ["-m", "pytest"] and "tests/test_cuda.py" not in args


def test_make_test_gpu_runs_the_cuda_checks_on_the_gpu(tmp_path):
    env, args = make("test-gpu", tmp_path)
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # the machine's own setting, untouched
    assert env["TRUEFACE_REQUIRE_CUDA"] == "1"  # no stand-in: no CUDA device fails
    assert args[:3] == ["-m", "pytest", "tests/test_cuda.py"]

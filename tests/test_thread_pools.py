"""Importing the project starts no OpenMP thread pool.

A Ray Train worker imports the training code on its main thread and runs the training function
on a thread of its own. libgomp (PyTorch's OpenMP on Linux) gives every thread that starts a
parallel region a pool of its own, and once the pools' threads outnumber the cores it cuts its
spin-waits to a few hundred spins: every parallel region then sleeps and wakes its threads. One
torch op over 65,536 values at import time (augment's noise table) made the engine's step 0.66x
as fast on a worker thread as on the main thread (2-core AMX CPU, ResNet-50 64 px bf16: 46.6
against 71.1 img/s; 68.7 against 72.8 with the import fixed).

The check: after the imports, a parallel region on the main thread must start a new pool thread;
if one was there already, an import started it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not torch.backends.openmp.is_available(),
    reason="counts threads in /proc/self/task; needs PyTorch built with OpenMP")

PROBE = """
import importlib, os, pkgutil, sys
import torch

def threads():
    return len(os.listdir("/proc/self/task"))

if sys.argv[1] == "project":
    import jobs, trueface
    for pkg in (trueface, jobs):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(mod.name)
else:  # the control: what an import-time torch op does
    torch.set_num_threads(2)
    torch.ones(1 << 20).exp_()
torch.set_num_threads(2)
before = threads()
torch.ones(1 << 20).exp_()  # a parallel region: starts this thread's pool unless it exists
print("new pool" if threads() > before else "pool already started")
"""


def _probe(what: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, what], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_the_probe_sees_a_pool_an_earlier_torch_op_started():
    assert _probe("control") == "pool already started"


def test_importing_every_trueface_and_jobs_module_starts_no_openmp_pool():
    assert _probe("project") == "new pool", (
        "a module runs a parallel torch op at import: a Ray Train worker's training thread then "
        "shares the cores with that idle pool and libgomp throttles it; compute it lazily or without torch")

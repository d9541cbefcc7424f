"""trueface.host_memory: freed host memory stays with the process (glibc), so a training step
does not fault its pages back in every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import jobs.common
import trueface.train
from trueface.config import load_config
from trueface.distributed import DistInfo
from trueface.host_memory import WORKER_TUNABLES, _glibc, worker_env

glibc_only = pytest.mark.skipif(_glibc() is None, reason="the settings are glibc's; other C libraries are left alone")

# Allocates, touches and frees a 48 MiB block (over glibc's largest automatic mmap threshold, as a
# training step's activations are) ten times, on the main thread or on a thread of its own (where
# a Ray Train worker runs the training function), and prints the page faults per cycle before and
# after keep_freed_memory(), once the heap has grown.
_PROBE = textwrap.dedent("""
    import json, resource, sys, threading
    import torch
    from trueface.host_memory import keep_freed_memory

    def faults_per_cycle():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            block = torch.empty(12 << 20)  # 48 MiB of float32
            block.fill_(1.0)
            del block
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

    def measure(out):
        faults_per_cycle()  # the first cycles grow the heap once, kept or not
        out["default"] = faults_per_cycle()
        if sys.argv[1] == "keep":
            out["applied"] = keep_freed_memory()
            faults_per_cycle()
            out["kept"] = faults_per_cycle()

    out = {}
    if sys.argv[2] == "thread":
        t = threading.Thread(target=measure, args=(out,)); t.start(); t.join()
    else:
        measure(out)
    print(json.dumps(out))
""")
PAGES_48MIB = (48 << 20) // 4096  # 12,288: every page faulted again


def _probe(mode: str, where: str, env: dict[str, str] | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = subprocess.run([sys.executable, "-c", _PROBE, mode, where], env={**base, **(env or {})},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@glibc_only
def test_keep_freed_memory_stops_the_page_faults_of_reallocating_a_large_block():
    out = _probe("keep", "main")
    assert out["applied"] is True
    assert out["default"] > 0.9 * PAGES_48MIB  # glibc's default: mmap'd, unmapped, faulted in again
    assert out["kept"] < 0.02 * PAGES_48MIB


@glibc_only
def test_a_worker_started_with_worker_env_keeps_freed_memory_on_a_thread():
    """Ray Train runs the training function on a thread, whose arena mallopt in a running process
    does not fully govern: the workers get the settings in their environment from the start."""
    assert _probe("default", "thread")["default"] > 0.9 * PAGES_48MIB
    assert _probe("default", "thread", env=worker_env())["default"] < 0.02 * PAGES_48MIB


def test_worker_env_leaves_a_users_tunables_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert worker_env() == {}
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert worker_env() == ({"GLIBC_TUNABLES": WORKER_TUNABLES} if _glibc() else {})


@pytest.mark.parametrize("keep", [True, False])
def test_the_setting_decides_for_training_and_the_local_rays_workers(keep, tiny_cfg, monkeypatch):
    cfg = load_config("demo", [f"runtime.keep_freed_memory={str(keep).lower()}", f"data.root={tiny_cfg.data.root}"])
    calls, started = [], []
    monkeypatch.setattr(trueface.train, "keep_freed_memory", lambda: calls.append(1) or True)
    trueface.train._build_state(cfg, 1, None, DistInfo(0, 1))
    assert calls == ([1] if keep else [])

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(jobs.common, "start_local_ray", lambda cpus, **kw: started.append(kw))
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    jobs.common.init_ray(None, cfg)
    assert started == [{"worker_env": worker_env() if keep else None}]
    assert not keep or not _glibc() or started[0]["worker_env"]["GLIBC_TUNABLES"] == WORKER_TUNABLES

"""trueface.host_memory: freed host memory stays with the process (glibc), so a training step
does not fault its pages back in every step."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

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


class _FreezeCountDataset(torch.utils.data.Dataset):
    """Each sample: how many objects the reading process's collector holds frozen, and its pid."""

    labels = [0, 1] * 4
    domains = ["a"] * 8

    def __init__(self) -> None:
        from tests.test_epoch_keys import EpochSwitch

        self.transform = EpochSwitch(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.tensor([gc.get_freeze_count(), os.getpid()], dtype=torch.float64), self.labels[index], index


def test_the_training_loaders_workers_freeze_what_they_inherit_and_the_trainer_freezes_nothing():
    from trueface.data.sampler import BalancedSampler
    from trueface.precision import Runtime

    cfg = load_config("demo", ["data.loader_workers=2"])
    ds = _FreezeCountDataset()
    data = trueface.train.TrainingData(ds, BalancedSampler(ds.labels, ds.domains, "domain_class", None, 0, 1, 0), None)
    try:
        loader, _ = data.epoch(0, 2, cfg, Runtime.create("cpu", "fp32"), rank=0)
        rows = torch.cat([x for x, _, _ in loader])
    finally:
        data.close()
    inherited = len(gc.get_objects())  # what a worker forked now would inherit, about
    assert {int(p) for p in rows[:, 1].tolist()} - {os.getpid()} and len(rows[:, 1].unique()) == 2  # two workers
    assert rows[:, 0].min() > inherited / 2  # every sample read in a worker whose inherited heap is frozen
    assert gc.get_freeze_count() == 0  # the training process's own collections are untouched


def test_the_evaluation_loader_freezes_its_workers_inherited_objects_too(monkeypatch):
    import trueface.inference
    from trueface.data.layout import Sample
    from trueface.host_memory import freeze_inherited_objects
    from trueface.precision import Runtime

    seen = {}

    class Loader:  # stands in for the DataLoader: records how predict_scores builds it, yields nothing
        def __init__(self, ds, **kwargs):
            seen.update(kwargs)

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(trueface.inference, "DataLoader", Loader)
    monkeypatch.setattr(trueface.inference, "_score_loader", lambda *a: [])
    cfg = load_config("demo", ["data.loader_workers=2"])
    trueface.inference.predict_scores(torch.nn.Identity(), [Sample("x.jpg", 0, "a", "test")], 32,
                                      Runtime.create("cpu", "fp32"), cfg)
    assert seen["worker_init_fn"] is freeze_inherited_objects and seen["num_workers"] == 2


def test_frozen_heap_freezes_what_exists_and_still_collects_what_the_block_makes():
    from trueface.host_memory import frozen_heap

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 1000  # torch and the test session's objects
        cycle = []
        cycle.append(cycle)
        ref = weakref.ref(_Node(cycle))
        del cycle
        gc.collect()
        assert ref() is None  # garbage made inside the block is collected as ever
    assert gc.get_freeze_count() == 0  # and everything is unfrozen after


class _Node:
    def __init__(self, other) -> None:
        self.other = other
        other.append(self)

"""What a Ray Train worker trains on (``jobs.ray_train._worker_setup``), with Ray's and CUDA's
answers stood in for: no Ray is started and no GPU is needed. Ray 2.60 leaves
``CUDA_VISIBLE_DEVICES`` alone for a worker given no GPU, so on a GPU node such a worker still sees
the node's GPUs; it must train on the CPU, not on a GPU Ray gave another worker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray.train
import ray.train.torch
import torch

from jobs.ray_train import _worker_setup
from trueface.config import load_config
from trueface.distributed import DistInfo
from trueface.precision import Runtime


@pytest.fixture
def worker(monkeypatch):
    """A Ray Train worker of rank 1 of 2 on a node with GPUs; ``device`` is what Ray gave it."""
    calls = {"set_device": [], "threads": []}
    given = SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: given.device)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 1,
                                                                          get_world_size=lambda: 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the node's GPUs, in view
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls["threads"].append(n))
    return given, calls


def test_a_worker_given_a_gpu_trains_on_that_one(worker):
    given, calls = worker
    given.device = torch.device("cuda", 1)
    cfg = load_config("paper", ["scaling.cpus_per_worker=3"])
    used, di = _worker_setup(cfg)
    assert calls == {"set_device": [torch.device("cuda", 1)], "threads": []}
    assert used == cfg and di == DistInfo(1, 2)


def test_a_worker_given_no_gpu_trains_on_the_cpu_though_the_node_has_gpus(worker):
    _, calls = worker
    cfg = load_config("paper", ["scaling.cpus_per_worker=3", "scaling.use_gpu=false"])
    assert cfg.runtime.device == "auto"
    used, di = _worker_setup(cfg)
    # before: torch.cuda.set_device(cpu) raised ValueError in every worker; auto would have picked a GPU
    assert calls == {"set_device": [], "threads": [3]}
    assert used.runtime.device == "cpu" and Runtime.create(used.runtime.device, "fp32").device.type == "cpu"
    assert used.scaling == cfg.scaling and used.stage1 == cfg.stage1 and di == DistInfo(1, 2)


def test_runtime_device_cuda_on_a_worker_given_no_gpu_names_the_keys(worker):
    cfg = load_config("paper", ["runtime.device=cuda"])
    with pytest.raises(ValueError, match=r"runtime\.device=cuda, but Ray gave this worker no GPU: set scaling\.use_gpu=true"):
        _worker_setup(cfg)

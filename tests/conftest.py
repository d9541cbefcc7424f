"""Shared fixtures: tiny image folders in the original layout, tiny configs, one Ray per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trueface.config import load_config

REPO = Path(__file__).resolve().parents[1]
MINI_140K = REPO.parent / "shared" / "data" / "faces140k-mini"


def write_tiny_root(root: Path, domains: dict[str, str], per_class: int = 4, size: int = 32,
                    splits=("train", "valid", "test")) -> Path:
    """Images whose fakes carry a bright diagonal stripe: learnable in a few steps at 32 px.
    ``domains`` maps a domain name to the case of its label folders ('upper' or 'lower');
    the empty name '' writes the splits directly under ``root`` (a single-domain root)."""
    for domain, case in domains.items():
        # Seeded by the domain's name: two calls (or two roots) never repeat an image under another
        # name, which the data check would rightly call leakage.
        rng = np.random.default_rng(zlib.crc32(domain.encode()))
        for split in splits:
            for label, name in ((0, "real"), (1, "fake")):
                folder = root / domain / split / (name.upper() if case == "upper" else name)
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    img = rng.integers(60, 180, (size, size, 3), dtype=np.uint8)
                    if label:
                        idx = np.arange(size)
                        img[idx, idx] = 250
                    Image.fromarray(img).save(folder / f"{domain or 'x'}_{split}_{i}.png")
    return root


def pytest_configure(config) -> None:
    """Under ``make test`` (pytest-xdist), each pytest process gets its share of the cores for
    torch's threads, and so do the jobs it starts (OMP_NUM_THREADS is inherited): two processes
    each running two OpenMP threads on two cores spin-wait on one another, and the same test files
    took 104 s that way against 75 s with one thread each. Ray Train workers set their own threads
    from scaling.cpus_per_worker either way."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a whole job's run (marked ``slow``) first, then files that start a local Ray,
    then the rest; the order within a file is kept. ``make test`` hands whole files to two
    pytest processes in this order: the long runs start at once and the quick files fill in
    beside them, instead of one long run finishing alone at the end."""
    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("ray") else 2

    file_rank: dict[Path, int] = {}
    for item in items:
        file_rank[item.path] = min(file_rank.get(item.path, 2), rank(item))
    items.sort(key=lambda item: file_rank[item.path])  # a stable sort


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    return write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=8)


def tiny_overrides(root: Path, out: Path, run_name: str = "t") -> list[str]:
    """The demo preset shrunk to seconds: 32 px, batch 8, 1-2 epochs, no loader processes, on a
    ResNet-18: the orchestration is the same for either arch (tests/test_model.py builds and loads
    both), and each checkpoint is 2.3x smaller to write, copy to Ray's storage and upload."""
    return [
        f"data.root={root}", f"output.runs_dir={out / 'runs'}", f"output.results_dir={out / 'results'}",
        f"run_name={run_name}", "data.loader_workers=0", "runtime.log_every=1", "eval.batch_size=8",
        "scaling.cpus_per_worker=1", "scaling.max_failures=0",
        "stage1.image_size=32", "stage1.epochs=2", "stage1.batch_size=8", "stage1.lr=0.001", "stage1.samples_per_epoch=0", "stage1.light_epochs=1",
        "stage2.image_size=32", "stage2.epochs=1", "stage2.batch_size=8", "stage2.lr=0.001", "stage2.samples_per_epoch=16",
        "model.arch=resnet18",
    ]


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Path:
    """A folder for the run a module's tests share, removed after the module unless one of its
    tests failed. Every run writes ResNet-50 checkpoints (best.pt + last.pt: 0.5 GB a stage): kept
    to the session's end, they added up to over 16 GB and filled CI's disk."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def device_calls(monkeypatch):
    """Every ``DeviceAugment`` call: its input, ``strong`` and output (copies)."""
    from trueface.augment_device import DeviceAugment

    calls, real = [], DeviceAugment.__call__

    def spy(self, images, generator, strong=True):
        out = real(self, images, generator, strong=strong)
        calls.append({"in": images.clone(), "strong": strong, "out": out.detach().clone()})
        return out

    monkeypatch.setattr(DeviceAugment, "__call__", spy)
    return calls


@pytest.fixture
def tiny_cfg(tiny_root: Path, tmp_path: Path):
    return load_config("demo", tiny_overrides(tiny_root, tmp_path))


class SuiteRay:
    """The one local Ray a pytest process's Ray tests share (ray.init costs seconds and memory):
    started by the first module that asks for it (``ray_session``), and stopped once the next
    module this process runs asks for none. The files that use Ray run first (the ordering above),
    so the rest of the suite has the cores without Ray's resting daemons: 19 processes that took
    7.2% of a core at rest (measured over a minute). A later module that asks starts it again."""

    def __init__(self) -> None:
        self.ray = None

    def start(self):
        if self.ray is not None:
            return self.ray
        from jobs.common import DRIVER_ENV, set_env_defaults, start_local_ray

        set_env_defaults(DRIVER_ENV)  # as jobs.common.init_ray sets them before it starts a Ray
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
        import ray

        # As jobs.init_ray starts one (loopback only, token auth; tests/test_ray_binding.py checks it),
        # dashboard included: Ray Train's placement-group cleaner polls the state API it serves, and
        # without it an interrupted trial's worker group keeps its CPUs and the next one hangs. Its
        # logical CPUs are those a local jobs.tune or jobs.ablate gives itself for one-CPU trials
        # (jobs.ray_tune.local_cpus: the cores plus one for the trial functions), so the suite's
        # searches run trials side by side as users' do.
        start_local_ray(num_cpus=(os.cpu_count() or 1) + 1, log_to_driver=False)
        self.ray = ray
        return ray

    def stop(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()
            self.ray = None


SUITE_RAY = SuiteRay()


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """The suite's local Ray (``SuiteRay``), started after the local S3 (``s3_server``) has put its
    credentials in the environment, which every Ray worker inherits from the raylet, as a
    cluster's workers get theirs: a search on this Ray can keep its trials in the bucket
    (tests/test_tune_ray.py)."""
    return SUITE_RAY.start()


def _uses_ray(item: pytest.Item) -> bool:
    """Whether any test of ``item``'s module asks for ``ray_session`` (directly or through a fixture)."""
    return any("ray_session" in other.fixturenames for other in item.session.items if other.path == item.path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After a module's last test (its fixtures torn down), stop the suite's Ray unless the next
    module needs it; after this process's last test, stop it."""
    try:
        return (yield)
    finally:
        if SUITE_RAY.ray is not None and (nextitem is None or (nextitem.path != item.path and not _uses_ray(nextitem))):
            SUITE_RAY.stop()


@pytest.fixture(autouse=True)
def _no_leaked_placement_groups(request):
    """After each Ray test, every placement group must be gone (Ray Train's cleaner removes those of
    a killed trial within seconds). One left behind holds CPUs, and every later Ray test would wait
    for them until its timeout: fail here instead, name it, and free it for the rest of the session."""
    yield
    if request.node.get_closest_marker("ray") is None:
        return
    import ray

    if not ray.is_initialized():
        return
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    def alive():
        return {pg_id: info for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}

    end = time.time() + 30
    while alive() and time.time() < end:
        time.sleep(1)
    leaked = alive()
    for pg_id in leaked:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    if leaked:
        pytest.fail(f"{request.node.name} left {len(leaked)} placement group(s) reserved 30 s after it ended: "
                    + "; ".join(f"{i} {info['state']} {list(info['bundles'].values())}" for i, info in leaked.items()))


class JobProcess:
    """``python -m <module> <args>`` in a process of its own, as a user runs it (with its own local
    Ray), so a test can press Ctrl-C on it, kill it, or kill one of its Ray workers."""

    def __init__(self, module: str, args: list[str], log: Path):
        env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30", "RAY_USAGE_STATS_ENABLED": "0"}
        for inherited in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the test session's Ray, not the job's
            env.pop(inherited, None)
        self.log = log  # a file, not a pipe: a pipe nobody reads fills up and blocks the job
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, text=True)

    def wait_until(self, condition, timeout: float, what: str) -> None:
        """Poll ``condition()`` until true; fail (with the job's output) if the job ends or time runs out."""
        end = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (exit {self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.time() > end:
                self.proc.kill()
                pytest.fail(f"no {what} within {timeout:.0f} s:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the job did not end within {timeout:.0f} s:\n{self.output()[-4000:]}")
        return self.proc.returncode, self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 (moto's server mode) on 127.0.0.1 with one bucket, ``trueface-test``. The client
    side is configured as users configure theirs: credentials and endpoint in the environment, which
    also reaches every process the tests start."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret-key-do-not-log",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           # Checksums only where S3 requires them. With the SDK's default (on every upload) bodies
           # come aws-chunked, which moto decodes in Python by concatenating bytes: 28-34% of its CPU
           # time for a checkpoint, spent in the test's own process. The calls are the same.
           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="trueface-test")
    yield {"bucket": "trueface-test", "env": env, "client": boto3.client("s3")}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def s3_object(s3_server, key: str) -> bytes:
    """The bytes of one object in the test bucket."""
    return s3_server["client"].get_object(Bucket=s3_server["bucket"], Key=key)["Body"].read()


def s3_keys(s3_server, prefix: str) -> dict[str, int]:
    """Key -> size of every object under ``prefix`` in the test bucket, without the empty ``dir/``
    markers pyarrow leaves so that a folder outlives the deletion of its last file."""
    pages = s3_server["client"].get_paginator("list_objects_v2").paginate(Bucket=s3_server["bucket"], Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")}

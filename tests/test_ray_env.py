"""What the jobs put in the environment before Ray Train starts (jobs.common): the driver's
defaults on a cluster, on a local Ray and in a process that already runs Ray; the local Ray's own
(no preemption watcher, workers polled every 0.5 s) only where this machine's Ray is started. Ray
itself is never started here (tests/test_pipeline_ray.py checks a real local run for the watcher)."""

from __future__ import annotations

import os

import pytest

import jobs.common
from trueface.config import load_config

PRINT_PATCH, WATCHER = "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
SETTINGS = (PRINT_PATCH, WATCHER, POLL)


class _Stop(Exception):
    pass


@pytest.fixture
def ray_calls(monkeypatch):
    """ray.is_initialized -> False, and each ray.init records its arguments and the settings as
    they were when it was called (a local start then stops there)."""
    import ray

    for name in (*SETTINGS, "RAY_API_SERVER_ADDRESS"):
        monkeypatch.setenv(name, "")  # so that the test's end restores it, also where the job set it
        monkeypatch.delenv(name)
    monkeypatch.setattr(jobs.common, "ensure_private_auth_token", lambda: None)  # no token file written
    calls = []

    def init(*args, **kwargs):
        calls.append({"kwargs": kwargs, **{name: os.environ.get(name) for name in SETTINGS}})
        if "address" not in kwargs:
            raise _Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return calls


def test_a_cluster_keeps_ray_trains_preemption_watcher(ray_calls):
    jobs.common.init_ray("ray://head:10001", load_config("demo"))
    assert ray_calls == [{"kwargs": {"address": "ray://head:10001"}, PRINT_PATCH: "0", WATCHER: None, POLL: None}]


def test_a_local_ray_starts_without_the_preemption_watcher_and_polls_its_workers_often(ray_calls):
    with pytest.raises(_Stop):
        jobs.common.init_ray(None, load_config("demo"))
    assert [tuple(c[name] for name in SETTINGS) for c in ray_calls] == [("0", "0", "0.5")]
    assert ray_calls[0]["kwargs"]["dashboard_host"] == jobs.common.LOOPBACK  # start_local_ray's start


def test_a_process_already_running_ray_still_gets_the_drivers_settings(ray_calls, monkeypatch):
    """A notebook's Ray, or the test suite's: init_ray returns at once, but Ray Train reads these in
    the driver when a trainer starts, so they must be set all the same."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    jobs.common.init_ray(None, load_config("demo"))
    assert ray_calls == [] and os.environ[PRINT_PATCH] == "0"
    assert WATCHER not in os.environ and POLL not in os.environ  # whose Ray it is, and where, is not known here


def test_settings_a_user_gave_are_kept(ray_calls, monkeypatch):
    monkeypatch.setenv(PRINT_PATCH, "1")
    monkeypatch.setenv(WATCHER, "1")
    monkeypatch.setenv(POLL, "2")
    with pytest.raises(_Stop):
        jobs.common.init_ray(None, load_config("demo"))
    assert [tuple(c[name] for name in SETTINGS) for c in ray_calls] == [("1", "1", "2")]

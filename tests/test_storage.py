"""trueface.storage against a real S3 protocol server (moto on 127.0.0.1) and against plain paths."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import s3_keys, s3_object
from trueface import storage
from trueface.storage import Mirror, StorageError


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_push_uploads_a_folder_then_only_what_changed(s3_server, tmp_path):
    mirror = Mirror.of("s3://trueface-test/push/run", tmp_path / "cache")
    assert mirror.local == tmp_path / "cache" / "staging" / "s3" / "trueface-test" / "push" / "run"
    write(mirror.local / "stage1" / "last.pt", b"a" * 1000)
    write(mirror.local / "tensorboard" / "stage1" / "events.1", b"ev")
    write(mirror.local / "stage1" / ".last.pt.x.tmp", b"partial")  # a cut-off local write: never sent
    assert sorted(mirror.push()) == ["stage1/last.pt", "tensorboard/stage1/events.1"]
    assert s3_keys(s3_server, "push/") == {"push/run/stage1/last.pt": 1000, "push/run/tensorboard/stage1/events.1": 2}
    assert mirror.push() == []  # nothing changed
    time.sleep(0.01)
    write(mirror.local / "stage1" / "last.pt", b"b" * 1000)  # same size, newer: a checkpoint of the next epoch
    assert mirror.push("stage1") == ["stage1/last.pt"]
    body = s3_object(s3_server, "push/run/stage1/last.pt")
    assert body == b"b" * 1000


def test_pull_fetches_what_is_missing_or_older_here(s3_server, tmp_path):
    source = Mirror.of("s3://trueface-test/pull/run", tmp_path / "a")
    write(source.local / "stage1" / "stage.json", b"{}")
    write(source.local / "stage1" / "best.pt", b"x" * 10)
    write(source.local / "config.yaml", b"run_name: r\n")
    source.push()
    other = Mirror.of("s3://trueface-test/pull/run", tmp_path / "b")  # another node's working copy
    assert sorted(other.pull("stage1", "config.yaml", "stage2/stage.json")) == [
        "config.yaml", "stage1/best.pt", "stage1/stage.json"]  # stage2 does not exist: skipped
    assert (other.local / "stage1" / "best.pt").read_bytes() == b"x" * 10
    assert other.pull() == []  # up to date
    assert other.pull("stage1", skip_suffixes=(".pt",)) == []
    # a stale copy of the same size (an earlier run's) is replaced by the newer upload
    old = time.time() - 3600
    os.utime(other.local / "stage1" / "best.pt", (old, old))
    assert other.pull("stage1/best.pt") == ["stage1/best.pt"]


def test_exists_delete_and_fetch(s3_server, tmp_path):
    mirror = Mirror.of("s3://trueface-test/misc/run", tmp_path / "cache")
    write(mirror.local / "ray" / "job" / "checkpoint.pt", b"c")
    write(mirror.local / "stage2" / "best.pt", b"best")
    mirror.push()
    assert mirror.exists("ray/job") and mirror.exists("stage2/best.pt") and not mirror.exists("stage1/last.pt")
    mirror.delete("ray/job")
    assert not mirror.exists("ray/job") and not (mirror.local / "ray" / "job").exists()
    fetched = storage.fetch("s3://trueface-test/misc/run/stage2/best.pt", tmp_path / "elsewhere")
    assert fetched.read_bytes() == b"best"
    with pytest.raises(StorageError, match="s3://trueface-test/misc/run/stage1/best.pt does not exist"):
        storage.fetch("s3://trueface-test/misc/run/stage1/best.pt", tmp_path / "elsewhere")


def test_a_file_deleted_at_the_uri_leaves_the_working_copy_too(s3_server, tmp_path):
    """The URI is where the files are kept: a stage deleted there (as the pipeline says to do, to
    train it again) must not stay finished in a node's staged copy, nor a deleted checkpoint or
    thresholds file be served from it."""
    mirror = Mirror.of("s3://trueface-test/gone/run", tmp_path / "cache")
    for name in ("stage1/stage.json", "stage1/last.pt", "stage1/best.pt", "stage1/thresholds.json", "keep.txt"):
        write(mirror.local / name, b"x")
    mirror.push()
    client = s3_server["client"]
    for key in ("stage1/stage.json", "stage1/last.pt", "stage1/best.pt", "stage1/thresholds.json"):
        client.delete_object(Bucket=s3_server["bucket"], Key=f"gone/run/{key}")
    storage._MIRRORS.clear()  # a new process on the same node
    again = Mirror.of("s3://trueface-test/gone/run", tmp_path / "cache")
    assert again.pull("stage1/stage.json", "stage1/last.pt", "stage2/stage.json") == []
    assert not (again.local / "stage1" / "stage.json").exists() and not (again.local / "stage1" / "last.pt").exists()
    with pytest.raises(StorageError, match="gone/run/stage1/best.pt does not exist"):
        storage.fetch("s3://trueface-test/gone/run/stage1/best.pt", tmp_path / "cache")
    from trueface.thresholds import pull_beside

    pull_beside("s3://trueface-test/gone/run/stage1/best.pt", tmp_path / "cache")
    assert not (again.local / "stage1" / "thresholds.json").exists()
    # a folder pull keeps what it was not asked about, and a file still kept there stays (whether
    # it is downloaded again depends on the clocks: S3 keeps its upload time in whole seconds)
    again.pull("tensorboard", "keep.txt")
    assert (again.local / "keep.txt").read_bytes() == b"x"


def test_file_uris_are_paths_on_this_machine(tmp_path):
    spaced = tmp_path / "dir with space" / "best.pt"
    assert storage.as_path(spaced.as_uri()) == spaced
    assert storage.as_path(f"file://localhost{tmp_path}/x") == tmp_path / "x"
    with pytest.raises(StorageError, match="file:///path"):
        storage.as_path("file://otherhost/x")


def test_an_upload_cut_off_never_replaces_the_good_object(s3_server, tmp_path, monkeypatch):
    mirror = Mirror.of("s3://trueface-test/cut/run", tmp_path / "cache")
    write(mirror.local / "last.pt", b"good")
    mirror.push()
    write(mirror.local / "last.pt", b"a newer checkpoint")

    def cut_off(src, dst, length=0):
        dst.write(src.read(5))
        raise KeyboardInterrupt  # the process is stopped mid-upload

    monkeypatch.setattr(storage.shutil, "copyfileobj", cut_off)
    with pytest.raises(KeyboardInterrupt):
        mirror.push()
    assert s3_keys(s3_server, "cut/") == {"cut/run/last.pt": 4}  # no partial object, no temporary left
    monkeypatch.undo()
    assert mirror.push() == ["last.pt"]  # not marked as sent: the next push sends it


def test_a_temporary_object_left_by_a_killed_uploader_is_removed_before_the_next_writes(s3_server, tmp_path):
    """SIGKILL between _upload's copy to the target and its delete of the staged name (no handler
    runs) leaves the staged object; the stage's next start removes it and nothing else."""
    mirror = Mirror.of("s3://trueface-test/orphan/run", tmp_path / "cache")
    write(mirror.local / "stage1" / "best.pt", b"best")
    mirror.push()
    client = s3_server["client"]
    for key in ("orphan/run/stage1/best.pt.1a2b3c4d.tmp", "orphan/run/tensorboard/stage1/events.5e6f7a8b.tmp"):
        client.put_object(Bucket=s3_server["bucket"], Key=key, Body=b"best")  # what the killed uploader left
    assert mirror.remove_partial_uploads("stage1", "stage2") == ["stage1/best.pt.1a2b3c4d.tmp"]
    assert s3_keys(s3_server, "orphan/run/stage1/") == {"orphan/run/stage1/best.pt": 4}
    assert s3_keys(s3_server, "orphan/run/tensorboard/")  # another folder: not asked, untouched
    assert Mirror.of(tmp_path / "local", tmp_path / "c").remove_partial_uploads("stage1") == []


def test_bad_locations_are_refused_with_the_key_and_what_to_check(s3_server, tmp_path):
    with pytest.raises(StorageError, match="output.runs_dir: cannot write to s3://no-such-bucket/x.*AWS_ACCESS_KEY_ID"):
        storage.check_writable("s3://no-such-bucket/x", "output.runs_dir")
    with pytest.raises(StorageError, match="secret_key") as err:
        storage.check_location("s3://trueface-test/x?secret_key=hunter2", "output.runs_dir")
    assert "hunter2" not in str(err.value)
    with pytest.raises(StorageError, match="output.results_dir: cannot open nosuch://x"):
        storage.check_location("nosuch://x", "output.results_dir")
    storage.check_writable("s3://trueface-test/ok", "output.runs_dir")
    assert s3_keys(s3_server, "ok/") == {}  # the probe cleans up after itself


def test_a_path_location_is_its_own_working_copy(tmp_path):
    mirror = Mirror.of(tmp_path / "runs" / "r", tmp_path / "cache")
    assert mirror.local == tmp_path / "runs" / "r" and mirror.remote is None
    write(mirror.local / "a.txt", b"a")
    assert mirror.push() == [] and mirror.pull() == [] and mirror.exists("a.txt")
    assert storage.fetch(str(mirror.local / "a.txt"), tmp_path / "cache") == mirror.local / "a.txt"
    assert storage.join("s3://b/p?endpoint_override=h", "runs", "x") == "s3://b/p/runs/x?endpoint_override=h"
    assert storage.split_file("s3://b/p/best.pt?region=x") == ("s3://b/p?region=x", "best.pt")

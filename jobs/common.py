"""Shared pieces of the entry points: config arguments and starting or joining Ray.

Ray is imported lazily, inside functions, so ``--dry-run`` and config errors return at once.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import socket
import sys
from pathlib import Path

from trueface.config import Config, ConfigError, load_config, preset_names
from trueface.host_memory import worker_env
from trueface.storage import is_uri

LOOPBACK = "127.0.0.1"
#: The driver's defaults, on a cluster too. Train V2 re-routes print() through a logger AND tees
#: it, so every line of the engine's progress would reach the driver twice.
DRIVER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
#: A local Ray's defaults. Ray Train's preemption watcher (an actor of its own for each worker
#: group, polling for nodes being drained) is for clouds' spot instances: a cluster keeps it;
#: locally it costs a process each stage and only ever logs a scary actor error. Train's
#: controller learns that its workers finished (or died) by polling them, every 2 s by default, and
#: a run's end waits on about two polls: on a 2-core machine 2.5-4.2 s from a stage's last
#: checkpoint to the next stage's start, 1.2-1.5 s polling every 0.5 s, for about 0.2% of a core
#: more in the controller and in each worker. A cluster keeps Ray's 2 s.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def set_env_defaults(values: dict[str, str]) -> None:
    """Each of ``values`` into this process's environment, unless the user has set it already."""
    for name, value in values.items():
        os.environ.setdefault(name, value)


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "demo") -> None:
    parser.add_argument("--config", default=default,
                        help=f"preset ({', '.join(preset_names())}) or YAML file; default: {default}")
    parser.add_argument("--data-root", help="data root in the original layout (default: the embedded synthetic set)")
    parser.add_argument("--run-name", help="run name: runs/<name>/ and results/<name>/ (same name = resume)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. stage2.mixup_alpha=0.3 stage1.epochs=2")


def text_override(key: str, value: str) -> str:
    """``key=value`` with the value quoted: a flag's value is text as given, where an override's
    is read as YAML (``--data-root "/data/faces #2"`` would lose its comment, ``--run-name on``
    become true)."""
    return f"{key}={json.dumps(value)}"  # a JSON string is a YAML double-quoted string


def config_from_args(args: argparse.Namespace) -> Config:
    """The config the arguments describe; exits with the error message on a bad key or value."""
    overrides = list(args.overrides)
    if args.data_root is not None and not args.data_root.strip():  # the embedded set would train instead
        sys.exit("error: --data-root is empty (an unset variable?); give the data root, or leave the flag out "
                 "to use the embedded synthetic set")
    if args.data_root:
        overrides.append(text_override("data.root", args.data_root))
    if args.run_name is not None and not args.run_name.strip():  # the preset's run would be resumed instead
        sys.exit("error: --run-name is empty (an unset variable?); give a name, or leave the flag out to use the "
                 "config's run_name")
    if args.run_name:
        overrides.append(text_override("run_name", args.run_name))
    try:
        return load_config(args.config, overrides)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")


def warn_if_outputs_vanish(cfg: Config, more: tuple[tuple[str, str], ...] = ()) -> None:
    """Under ``ray job submit`` the driver runs in Ray's temporary copy of ``--working-dir``, which
    Ray deletes: relative output folders would be lost with it, so say where they go and what to pass.
    ``more`` adds other ``(flag, path)`` outputs, e.g. jobs.tune's ``--storage``."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray's job supervisor for the driver
        return
    outputs = (("output.runs_dir", cfg.output.runs_dir), ("output.results_dir", cfg.output.results_dir), *more)
    for key, value in outputs:
        if not is_uri(value) and not Path(value).is_absolute():
            sep = " " if key.startswith("--") else "="
            print(f"warning: running as a Ray job, {key} {value!r} resolves to {Path(value).absolute()}, inside the "
                  f"job's temporary copy of --working-dir, which Ray deletes. Pass {key}{sep}/absolute/path on "
                  f"storage every node mounts, or a URI such as s3://bucket/prefix, to keep it.", file=sys.stderr, flush=True)


def check_model_weights(cfg: Config, what: str = "model.weights", advice: str = "") -> None:
    """Load ``model.weights`` here, before Ray starts: a missing, unsafe or ill-fitting file stops the
    job with TrueFace's message instead of a training worker's traceback. ``what`` names where the
    value came from, ``advice`` (where given) what to do."""
    if cfg.model.weights == "none":
        return
    from trueface.model import WeightsError, build_model

    try:
        build_model(cfg.model)
    except WeightsError as exc:
        sys.exit(f"error: {what}: {exc}" + (f". {advice}" if advice else ""))


def nonempty(text: str) -> str:
    """An argparse ``type`` for a flag whose empty value (an unset variable) would otherwise mean its
    default, silently: argparse then names the flag and says why."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset variable?); give a value, or leave the flag out")
    return text


def nonempty_path(text: str) -> Path:
    """``nonempty`` for a path flag: Path("") would be the current folder."""
    return Path(nonempty(text))


def exit_on_output_problems(cfg: Config, keys: tuple[str, ...] = ("data.cache_dir", "output.runs_dir",
                                                                   "output.results_dir")) -> None:
    """End the job, before any work, where a local folder of ``keys`` cannot be written (a file on its
    path, no permission): otherwise the first write, maybe after the data check or Stage I, ends in
    a raw traceback. URIs are probed by trueface.storage.check_writable instead."""
    values = {"data.cache_dir": cfg.data.cache_dir, "output.runs_dir": cfg.output.runs_dir,
              "output.results_dir": cfg.output.results_dir}
    exit_on_config_problems([output_problem(Path(values[key]).expanduser(), key, folder_wanted=True)
                             for key in keys if not is_uri(values[key])])


def exit_on_config_problems(problems: list[str]) -> None:
    """End the job with every problem listed once, in order (empty ones skipped); nothing where
    there is none."""
    problems = list(dict.fromkeys(p for p in problems if p))
    if problems:
        sys.exit("config error:\n  " + "\n  ".join(problems))


def output_problem(path: Path, flag: str, folder_wanted: bool = False) -> str:
    """Why ``path`` cannot take the file (or with ``folder_wanted`` the folder) ``flag`` names, ''
    when it can. Checked before the work: scoring a folder of images must not end in a traceback
    at the write."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() != folder_wanted:
        return (f"{flag} {path} is a file: give a folder" if folder_wanted else
                f"{flag} {path} is a folder: give a file name inside it")
    folder = path if folder_wanted else path.parent
    while not folder.exists():  # the nearest folder that exists: the write creates the rest
        folder = folder.parent
    if not folder.is_dir():
        return f"{flag} {path}: {folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path}: this user cannot write in {folder}"
    return ""


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray on this machine)")


def init_ray(address: str | None, cfg: Config, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray with ``num_cpus`` logical CPUs
    (default: enough for one worker group of ``cfg``, and at least the machine's cores)."""
    import ray

    # Set even when this process already runs Ray (a notebook's, the test suite's): Ray Train reads
    # them in the driver when a trainer starts and passes them on to its controller and workers.
    set_env_defaults(DRIVER_ENV)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    # A local Ray gets at least the CPUs one worker group asks for, so a 2-core laptop can run
    # one worker with 2 threads (measured faster than 2 workers x 1 thread).
    cpus = num_cpus or max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    start_local_ray(cpus, worker_env=worker_env() if cfg.runtime.keep_freed_memory else None)


def start_local_ray(num_cpus: int, log_to_driver: bool = True, worker_env: dict[str, str] | None = None) -> None:
    """Start a Ray on this machine that only this machine can reach: GCS, raylet, object manager,
    workers, dashboard and its agents all listen on loopback, and token authentication is on, so
    another user of this machine needs the token too. ``worker_env``: environment variables of
    every worker (the job's runtime environment). The test suite's shared Ray (tests/conftest.py)
    starts through here as well."""
    import ray
    import ray._private.ray_constants as ray_constants

    set_env_defaults(LOCAL_ENV)
    # Token auth: Ray 2.60 turns it on for a new local Ray unless RAY_AUTH_MODE says otherwise. Not
    # set here: Ray reads the mode when imported and only refreshes it when it picks the default.
    auth_mode_given = "RAY_AUTH_MODE" in os.environ
    ensure_private_auth_token()
    # Every Ray process listens on the node's address. On Linux Ray takes the machine's network
    # address for it and turns even an explicit _node_ip_address="127.0.0.1" into that address;
    # only with ENABLE_RAY_CLUSTER off (its default on macOS and Windows, to spare firewall pop-ups)
    # does it pick loopback, and then GCS, raylet, workers and agents bind to loopback (Ray 2.60,
    # checked by tests/test_ray_binding.py). Off only while this node starts: its address is fixed
    # then, and a later ray.init(address=...) in this process must find a cluster's node as usual.
    cluster_default = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves. The
    # cleaner finds that API by RAY_API_SERVER_ADDRESS, else by looking for running Rays, and with a
    # second local Ray on the machine (a test suite's, another user's job) it finds two, fails, and
    # an interrupted trial's worker group keeps its CPUs: the next trial then waits until it times
    # out. So the dashboard gets a known port, named in the environment that the raylet (started
    # from this process) passes on to every worker and actor.
    dashboard_port = _free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{dashboard_port}"
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                 log_to_driver=log_to_driver, runtime_env={"env_vars": worker_env} if worker_env else None)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_default
    token_auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if not auth_mode_given and not token_auth:
        print("warning: this local Ray started without token authentication (a Ray other than 2.60?); "
              "set RAY_AUTH_MODE=token to require it.", file=sys.stderr, flush=True)
    node_ip = ray._private.worker.global_worker.node.node_ip_address
    if not ipaddress.ip_address(node_ip).is_loopback:
        guard = "only its token authentication guards it" if token_auth else "and nothing guards it"
        print(f"warning: this local Ray listens on {node_ip}, not loopback, so other machines can reach it "
              f"(a Ray other than 2.60?); {guard}.", file=sys.stderr, flush=True)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def ensure_private_auth_token() -> None:
    """With token auth on (RAY_AUTH_MODE=token, or unset: Ray's default for a local Ray) and no
    token given, Ray writes one to ~/.ray/auth_token with the default umask: readable by every local
    user. Write it first, readable by its owner only; warn about a token file others can read."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if os.name == "posix" and path.stat().st_mode & 0o077:
            print(f"warning: Ray's auth token {path} can be read by other users of this machine, who could "
                  f"then use this Ray; make it private with: chmod 600 {path}", file=sys.stderr, flush=True)
        return
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits


def metrics_table(results_dir: Path) -> str:
    """The evaluation table written to ``results_dir/metrics.parquet``, as the console shows it."""
    import pyarrow.parquet as pq

    from trueface.results import format_table

    return format_table(pq.read_table(Path(results_dir) / "metrics.parquet").to_pylist())


def print_metrics_table(results_dir: Path) -> None:
    print("\n" + metrics_table(results_dir))


def exit_on_batch_problems(configs: list[Config], layout, stages) -> None:
    """End the job, before Ray starts, where the workers could not share a stage's batches in one
    of ``configs`` (a run's; each a search's trials may draw, or each row of an ablation)."""
    from trueface.run import batch_problems

    exit_on_config_problems([p for cfg in configs for p in batch_problems(cfg, layout, stages)])


def prepared_run_or_exit(cfg: Config):
    """``trueface.run.prepare_run`` (data check, exclusions, normalisation), a bad root, a failed
    data check or an unusable storage ending the job with its message and what to run next."""
    from trueface.data.check import DataCheckError
    from trueface.data.layout import DataLayoutError
    from trueface.run import prepare_run
    from trueface.storage import StorageError

    try:
        return prepare_run(cfg)
    except DataLayoutError as exc:
        sys.exit(f"data error: {exc}")
    except DataCheckError as exc:
        sys.exit(f"{exc}\nRun python -m jobs.check_data --data-root {cfg.data.root or '<root>'} for the full report.")
    except StorageError as exc:
        sys.exit(f"storage error: {exc}")
    except OSError as exc:  # e.g. a folder of data.cache_dir made unwritable after the checks
        sys.exit(f"error: {exc}\n(while checking data.root {cfg.data.root or '(the embedded set)'} into data.cache_dir "
                 f"{cfg.data.cache_dir})")


def exit_unless_data_here(cfg: Config, what: str) -> None:
    """A resumed search or ablation trains on the data.root it was started with (its trials' configs
    hold it): where that folder is not on this machine, every trial would fail in its worker, so the
    job stops before Ray starts. The embedded set's folder is generated again where it was: the
    same images (its name is their spec's fingerprint)."""
    from trueface.data.synthetic import dataset_root, ensure_synthetic_dataset

    root, cache = Path(cfg.data.root), Path(cfg.data.cache_dir)
    if root.is_dir():
        return
    why = ""
    if root == dataset_root(cache, cfg.data.synthetic):
        try:
            ensure_synthetic_dataset(cache, cfg.data.synthetic)
            return
        except OSError as exc:
            why = f" (the embedded data set could not be generated there again: {exc})"
    sys.exit(f"error: {what} trains on data.root {root}, as it was started, and that folder is not on this "
             f"machine{why}. A resumed job keeps its settings: make the data available at that path (mount or "
             "link it there), then resume again.")

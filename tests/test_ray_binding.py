"""The local Ray that jobs.* start is reachable from this machine only: every listening socket of
its processes is bound to loopback, and its dashboard refuses requests that lack the auth token.

Usage:
    .venv/bin/pytest -q tests/test_ray_binding.py

Uses the session's shared Ray (tests/conftest.py::ray_session), which jobs.common.start_local_ray
starts exactly as jobs.common.init_ray does for a run without --address.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.ray

# Ray services allowed to listen on a non-loopback address, as {process name: why that is safe}.
# Empty: under start_local_ray every Ray process binds to loopback (Ray 2.60). A service added
# here must say what guards it, e.g. "dashboard agent HTTP: every route needs the auth token".
ALLOWED_NON_LOOPBACK: dict[str, str] = {}


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1, which gRPC's dual-stack
    sockets report); False for wildcards (0.0.0.0, ::) and every other address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id such as fe80::1%eth0
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def ray_session_processes(psutil, session_dir: str) -> list:
    """This process, everything it started (GCS, raylet, dashboard, their workers and agents), and
    any process whose command line names this Ray session's folder (in case one was re-parented)."""
    me = psutil.Process()
    found = {p.pid: p for p in [me, *me.children(recursive=True)]}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in arg for arg in proc.info["cmdline"] or ()):
                found.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
        except psutil.Error:
            continue
    return list(found.values())


def process_label(proc) -> str:
    """The process name, and for a Python process its script too: ``python (dashboard.py)``."""
    name = proc.name()
    if name.startswith("python"):
        scripts = [os.path.basename(arg) for arg in proc.cmdline()[1:] if arg.endswith(".py")]
        name += f" ({scripts[0]})" if scripts else ""
    return name


def listening_sockets(psutil, procs: list) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``procs``."""
    rows = []
    for proc in procs:
        try:
            name = process_label(proc)
            conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that exited between listing and inspecting
        rows += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return rows


def test_is_loopback_tells_loopback_from_wildcard_and_network_addresses():
    assert [is_loopback(a) for a in ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1")] == [True] * 4
    assert [is_loopback(a) for a in ("0.0.0.0", "::", "192.0.2.2", "fd00::2", "::ffff:192.0.2.2")] == [False] * 5


def test_every_socket_of_the_local_ray_listens_on_loopback_only(ray_session):
    ray = ray_session
    import psutil  # Ray ships it (ray/thirdparty_files, on sys.path once ray is imported)

    # A task starts a worker process, so worker sockets are checked along with the daemons'.
    assert ray.get(ray.remote(lambda: os.getpid()).remote()) != os.getpid()
    node = ray._private.worker.global_worker.node

    sockets = listening_sockets(psutil, ray_session_processes(psutil, node.get_session_dir_path()))
    names = {name for name, _, _ in sockets}
    # Without these the check would pass on an empty list (e.g. psutil seeing no process of Ray's).
    assert {"gcs_server", "raylet"} <= names, f"no listening socket found for GCS or raylet: {sorted(sockets)}"
    exposed = sorted((name, ip, port) for name, ip, port in sockets
                     if not is_loopback(ip) and name not in ALLOWED_NON_LOOPBACK)
    assert not exposed, ("Ray processes listen beyond loopback (reachable from the network):\n"
                         + "\n".join(f"  {name}: {ip}:{port}" for name, ip, port in exposed))
    # What the daemons advertise to each other and to workers: loopback too.
    assert is_loopback(node.node_ip_address), f"the node's address is {node.node_ip_address}, not loopback"


def test_the_dashboard_refuses_a_request_without_the_auth_token(ray_session):
    ray = ray_session
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    url = f"http://{ray._private.worker.get_dashboard_url()}/api/v0/nodes"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401


def test_an_actor_finds_its_own_ray_state_api_while_another_ray_runs_on_the_machine(ray_session):
    """Ray Train's placement-group cleaner asks the state API whether the controller lives. With a
    second Ray on the machine, an actor without RAY_API_SERVER_ADDRESS finds two and fails ("Found
    multiple active Ray instances"), and an interrupted trial then keeps its CPUs."""
    import signal
    import subprocess
    import sys

    ray = ray_session
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://{ray._private.worker.get_dashboard_url()}"
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(num_cpus=0, include_dashboard=False); "
                               "print('up', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_A")})
    try:
        assert other.stdout.readline().strip() == "up", "the second Ray did not start"

        @ray.remote(num_cpus=0)
        class Probe:
            def alive(self, actor_id: str) -> bool:
                from ray.train.v2._internal.state.util import is_actor_alive
                return is_actor_alive(actor_id, timeout=20)

        probe = Probe.remote()
        assert ray.get(probe.alive.remote(probe._actor_id.hex()), timeout=60)
    finally:
        other.send_signal(signal.SIGINT)  # KeyboardInterrupt -> ray.shutdown() stops its processes
        try:
            other.wait(timeout=30)
        except subprocess.TimeoutExpired:
            other.kill()

"""One benchmark part's figures beside its reference, printed and written as JSON + markdown.

Usage::

    bench = Bench("input", context={"cpu": "2 cores", "images": 64})
    bench.add(Row("Stage I 256->224 strong", project=2.1, reference=9.8, unit="ms/img", target=3.0))
    print(bench.markdown()); bench.write(Path("results"))   # results/bench-input/bench.{json,md}

Every row holds the project's figure and, where there is one, its reference measured in the same
process run, so the ratio holds on a noisy machine. ``ratio`` is always "how many times better the
project is": reference / project where lower is better (times, bytes), project / reference where
higher is better (rates). Each row says which (``lower_is_better``): given, or taken from its unit
where the unit is one of ``UNIT_LOWER_IS_BETTER``'s; any other unit must say it (a row with
neither is an error, never a guess). ``target`` is the least acceptable ratio (3.0: three times the
reference; 0.95: at most 5% slower); a row without a reference (an absolute GPU figure) compares
``project`` itself with ``target`` in the row's unit. A row without a target may say why in
``no_target`` (printed in the target column).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from trueface.atomic import atomic_write_text
from trueface.results import markdown_table


T = TypeVar("T")

#: the units whose direction a row may leave out: exact names, never a prefix or a guess
UNIT_LOWER_IS_BETTER = {"ms/img": True, "img/s": False, "%": False, "GiB": True}


@dataclass(frozen=True)
class Row:
    what: str
    project: float
    reference: float | None
    unit: str
    target: float | None = None
    note: str = ""
    lower_is_better: bool | None = None  # None: from UNIT_LOWER_IS_BETTER, where the unit is there
    no_target: str = ""  # why no target applies, for the target column (where ``target`` is None)

    def __post_init__(self) -> None:
        if self.lower_is_better is None:
            if self.unit not in UNIT_LOWER_IS_BETTER:
                raise ValueError(f"row {self.what!r}: say whether lower is better in {self.unit!r} "
                                 f"(lower_is_better=True or False); known units: {', '.join(UNIT_LOWER_IS_BETTER)}")
            object.__setattr__(self, "lower_is_better", UNIT_LOWER_IS_BETTER[self.unit])

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.project or not self.reference:
            return None
        return self.reference / self.project if self.lower_is_better else self.project / self.reference

    @property
    def met(self) -> bool | None:
        """None where no target is set."""
        if self.target is None:
            return None
        if self.reference is not None:
            return self.ratio is not None and self.ratio >= self.target
        return self.project <= self.target if self.lower_is_better else self.project >= self.target


@dataclass
class Bench:
    name: str
    context: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # what could not be measured, and why

    def failed(self, what: str, error: BaseException | str, fix: str = "") -> str:
        """Records that ``what`` was not measured because of ``error`` (an exception, or why in
        words), and ``fix``, what to do about it, where the error alone does not say; returns the
        line, printed as it happens so a long run's log says so before the table."""
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        line = f"{what}: not measured ({why})" + (f"; {fix}" if fix else "")
        self.failures.append(line)
        print(f"  {line}", flush=True)
        return line

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        header = ["measured", "project", "reference", "unit", "ratio", "target", "met"]
        body = [[r.what, _num(r.project), _num(r.reference), r.unit, _ratio(r.ratio), _target(r),
                 {None: "", True: "yes", False: "**no**"}[r.met]] for r in self.rows]
        notes = [f"- {r.what}: {r.note}" for r in self.rows if r.note]
        failed = ["**Not measured:**", ""] + [f"- {line}" for line in self.failures] if self.failures else []
        lines = [f"## Benchmark `{self.name}`", "", _context_line(self.context), "", markdown_table(header, body)]
        return "\n".join(lines + ([""] + notes if notes else []) + ([""] + failed if failed else [])) + "\n"

    def write(self, results_dir: Path) -> Path:
        """results_dir/bench-<name>/bench.json and bench.md (atomically); returns the folder."""
        out = Path(results_dir) / f"bench-{self.name}"
        payload = {"name": self.name, "context": self.context,
                   "rows": [{**asdict(r), "ratio": r.ratio, "met": r.met} for r in self.rows],
                   "failures": self.failures}
        atomic_write_text(out / "bench.json", json.dumps(payload, indent=2, default=str))
        atomic_write_text(out / "bench.md", self.markdown())
        return out


#: what to do where a Ray row failed (``ray_attempt``'s ``fix``)
RAY_FIX = ("the rows without Ray are kept; check that a local Ray starts here (`ray start --head`, then `ray status`) "
           "and read its logs (/tmp/ray/session_latest/logs)")


def ray_attempt(bench: Bench, what: str, measure: Callable[[], T], fix: str) -> T | None:
    """``measure()``, a Ray run (handed in by jobs/: the library never imports Ray); where Ray
    fails (it could not start, an actor or worker died, the run raised), the failure goes to
    ``bench.failed`` with ``fix``, what to do, and the answer is None: the rows measured without
    Ray, and the parts after this one, must not be lost to it, and the exit status says so."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 -- Ray's errors share no base class; reported with type and message
        bench.failed(what, exc, fix)
        return None


def alternate_rates(sides: dict[str, Callable[[], T]], items: int,
                    rounds: int) -> tuple[dict[str, list[float]], dict[str, T]]:
    """``rounds`` rounds of one call of each side, in A B, B A, A B ... order (neither always goes
    first, so a burst of load from another process hits both sides alike): each side's ``items``
    per second in every call, and its last call's answer. Each side's figure is then the median
    of its calls, from the same rounds as the other's."""
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, T] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            last[name] = sides[name]()
            rates[name].append(items / (time.perf_counter() - start))
    return rates, last


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for a measurement, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class OtherLoad:
    """How much of the machine's CPUs every OTHER process kept busy during a ``with`` block: the
    machine's busy time (Linux ``/proc/stat``) less this process's own CPU time, over the block's
    wall time x the CPU count. A side-by-side figure is only as fair as the load beside it: on a
    2-core machine, a local Ray's own processes (GCS, raylet, dashboard and its agents, the Train
    controller) take a measurable share from the worker they serve. ``share`` is None where
    ``/proc/stat`` is missing (macOS, Windows)."""

    def __enter__(self) -> "OtherLoad":
        self.share: float | None = None
        self._start = (_machine_busy_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, wall0 = self._start
        busy1, wall = _machine_busy_s(), time.perf_counter() - wall0
        if busy0 is not None and busy1 is not None and wall > 0:
            others = (busy1 - busy0) - (time.process_time() - own0)
            self.share = min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


QUIET_SHARE = 0.10  # other processes below this share of the CPUs: the machine is back to its resting load
QUIET_WINDOW_S = 0.25
QUIET_MAX_S = 10.0


def wait_for_quiet(max_s: float = QUIET_MAX_S) -> float | None:
    """Seconds waited until other processes kept under ``QUIET_SHARE`` of the machine's CPUs busy
    for one ``QUIET_WINDOW_S`` window, or None where that did not happen within ``max_s``. After
    ``ray.shutdown()`` returns, a local Ray's processes go on exiting for about a second, at about
    half of a 2-core machine (measured): the steps timed next would pay for it. Without
    ``/proc/stat`` it waits one window."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        with OtherLoad() as load:
            time.sleep(QUIET_WINDOW_S)
        if load.share is None or load.share < QUIET_SHARE:
            return time.perf_counter() - start
    return None


def _machine_busy_s() -> float | None:
    """CPU seconds the machine's processes have spent busy since boot: user, nice, system and
    interrupts; not idle, I/O wait, or steal (time the hypervisor gave to other machines)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, _steal = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def share_text(share: float | None) -> str:
    return "unknown (no /proc/stat)" if share is None else f"{share:.1%}"


def machine_context() -> dict:
    """What every part states about where it ran."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _target(r: Row) -> str:
    if r.target is None:
        return r.no_target
    if r.reference is not None:
        return f">= {r.target:g}x"
    return f"{'<=' if r.lower_is_better else '>='} {r.target:g} {r.unit}"


def _context_line(context: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in context.items())

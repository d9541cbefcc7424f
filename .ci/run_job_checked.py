"""Run a project module as a Ray job's entrypoint, then prove it ran only the uploaded code.

Usage (the entrypoint of ``ray job submit --working-dir .``; see .ci/job_submit_check.sh)::

    python .ci/run_job_checked.py jobs.pipeline --run-name ci-job output.runs_dir=...

Runs MODULE as ``python -m MODULE ARGS...`` would. Afterwards it fails (exit 1), naming the
module and its file, if any loaded ``trueface``/``jobs`` module lies outside the job's working
directory (the unpacked upload): such a module came from an install on the node, so the
upload alone would not have run the job. It prints how many project modules it checked.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

PROJECT_PACKAGES = ("trueface", "jobs")


def run_module(module: str, args: list[str]) -> int:
    """Runs ``module`` as ``__main__`` with ``args``; returns its exit status."""
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # a module's sys.exit(): keep its status, check the imports anyway
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def project_module_files(entry_module: str, entry_origin: str | None) -> dict[str, str | None]:
    """Every loaded trueface/jobs module and its file; the entry module ran as ``__main__``."""
    files = {name: getattr(mod, "__file__", None) for name, mod in list(sys.modules.items())
             if name.split(".")[0] in PROJECT_PACKAGES}
    files[f"{entry_module} (as __main__)"] = entry_origin
    return files


def outside_upload(files: dict[str, str | None], upload: Path) -> list[str]:
    """The modules whose file is not under ``upload``, as 'name: file' lines."""
    bad = []
    for name, file in sorted(files.items()):
        if file is None:  # a namespace package: its directory was missing from the upload
            bad.append(f"{name}: no __file__ (a namespace package, so not a package of the upload)")
        elif not Path(file).resolve().is_relative_to(upload):
            bad.append(f"{name}: {file}")
    return bad


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: python .ci/run_job_checked.py MODULE [ARGS...]", file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    upload = Path.cwd().resolve()  # Ray starts the entrypoint in the unpacked working_dir
    sys.path.insert(0, str(upload))  # as `python -m` does; sys.path[0] is .ci/ for this script
    spec = importlib.util.find_spec(module)
    if spec is None:
        print(f"run_job_checked: no module named {module!r} under {upload} or the installed packages", file=sys.stderr)
        return 1
    status = run_module(module, args)
    files = project_module_files(module, spec.origin)
    bad = outside_upload(files, upload)
    if bad:
        print(f"run_job_checked: {len(bad)} of {len(files)} project modules were loaded from outside the "
              f"job's working directory {upload}, so the uploaded package is incomplete (check .rayignore "
              f"and .gitignore):\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"run_job_checked: checked {len(files)} project modules ({', '.join(PROJECT_PACKAGES)}): all from "
          f"{upload} (python {sys.executable}); {module} exited with status {status}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Check a data root before training on it: bad files, leakage, format shortcuts. No Ray needed.

Usage::

    python -m jobs.check_data --data-root ../shared/data/faces140k-mini
    python -m jobs.check_data --data-root /data/faces --config paper data.on_bad_image=skip
    python -m jobs.check_data --data-root /data/faces --dry-run      # the summary only, no report

Scans every image once (a process pool with a progress bar; cached by path, size and mtime, so a
rerun on an unchanged root takes seconds) and writes ``<output.results_dir>/<root name>-data/``:
``report.md``, ``images.parquet``, ``problems.csv``, ``leakage.csv`` and a shortcut plot per domain.
Any root is checked, whatever splits it has: a test-only root, or one without test/, too.
The pipeline and jobs.tune run the same check before training. Exit status 1 when the check finds
errors that would stop a run under ``data.on_bad_image`` (error, the default), else 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jobs.common import add_config_arguments, config_from_args, output_problem
from trueface.data.check import scan_and_check
from trueface.data.layout import DataLayoutError, discover_layout
from trueface.run import absolute_location, data_root
from trueface.storage import Mirror, StorageError, join


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.check_data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--out", help="report folder, a path or a URI (default: <output.results_dir>/<root name>-data)")
    parser.add_argument("--workers", type=int, help="scanning processes (default: one per core)")
    parser.add_argument("--dry-run", action="store_true", help="print the summary; write no report")
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides on either side of the flags
    cfg = config_from_args(args)
    started = time.time()
    try:
        # The layout as found, whatever splits it has: no training or test domains are chosen, so
        # a test-only root (what jobs.evaluate asks to be checked) or one without test/ is checked too.
        layout = discover_layout(data_root(cfg))
        results_dir = absolute_location(cfg.output.results_dir, "output.results_dir")  # a URI is checked
        out = absolute_location(args.out, "--out") if args.out else \
            join(results_dir, f"{layout.root.resolve().name}-data")
        report = Mirror.of(out, cfg.data.cache_dir)  # a URI's report is written here, then uploaded
        # Before the scan, which can take long: a report folder that cannot be written stops here.
        problem = "" if args.dry_run else output_problem(report.local, "--out" if args.out else "report folder",
                                                         folder_wanted=True)
        if problem:
            sys.exit(f"error: {problem}")
        # The check itself, never stopping on what it finds: judging is this job's output.
        check = scan_and_check(layout, cfg, workers=args.workers)
    except DataLayoutError as exc:
        sys.exit(f"data error: {exc}")
    except StorageError as exc:
        sys.exit(f"storage error: {exc}")
    print(check.summary(limit=20))
    if not args.dry_run:
        from trueface.data.report import write_report

        write_report(check, report.local)
        try:
            report.push()
        except StorageError as exc:
            sys.exit(f"storage error: {exc} (the report is kept in {report.local})")
        print(f"report: {join(report.location, 'report.md')} (+ images.parquet, problems.csv, leakage.csv, "
              f"shortcut plots)")
    print(f"checked {len(check.rows)} images in {time.time() - started:.1f} s")
    return 1 if check.blocking else 0


if __name__ == "__main__":
    sys.exit(main())

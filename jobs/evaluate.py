"""Evaluate any TrueFace checkpoint on any data root into the cross-domain tables.

Usage::

    python -m jobs.evaluate --checkpoint runs/demo/stage2/best.pt --data-root /data/other-faces
    python -m jobs.evaluate --checkpoint CKPT --data-root PATH --threshold-from valid --no-ray
    python -m jobs.evaluate --checkpoint s3://bucket/trueface/runs/demo/stage2/best.pt \
        --data-root /data/other-faces --out s3://bucket/trueface/results/demo-on-other
    python -m jobs.evaluate --checkpoint CKPT --data-root PATH --robustness     # + <out>/robustness/

Domain names come from the folders found under the root. Thresholds: ``auto`` uses the ones the
pipeline saved beside the checkpoint (``thresholds.json``, chosen on the run's validation data)
when their policy and scope match, and otherwise chooses on this root's validation splits;
``valid`` always chooses on this root's validation splits; ``saved`` (old name ``checkpoint``)
requires the saved file. A saved file left from an earlier training of the checkpoint is refused.
``--save-thresholds`` writes the ones chosen here beside the checkpoint, for jobs.predict. The
checkpoint itself is never modified.

The root gets the data check first (trueface.data.check, by the checkpoint's data.on_bad_image
unless ``--on-bad-image`` says otherwise) and its images the checkpoint's ``data.normalize``. A test
image whose decoded pixels or bytes are also in the checkpoint's training or validation data (its
run's manifest, see trueface.data.overlap) makes the evaluation refuse, unless ``--allow-overlap``: then every row of
the table counts them (``train_overlap``).

``--robustness`` also scores the test splits JPEG re-encoded, blurred, downscaled and cropped
(trueface.robustness: deterministic, built by Ray tasks, cached under ``<data.cache_dir>/robustness/``)
at the thresholds of the clean evaluation, in the same Ray Train worker run, into ``<out>/robustness/``
(trueface.robustness_report). The perturbed copies get the checkpoint's ``data.normalize`` too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from jobs.common import add_ray_arguments, init_ray, nonempty, nonempty_path, output_problem, print_metrics_table
from trueface.checkpoint import CheckpointError, load_checkpoint
from trueface.config import Config, from_dict
from trueface.config.choices import parse_normalize
from trueface.config.loading import repeated
from trueface.data.check import scan_and_check
from trueface.data.decode import ImageReadError
from trueface.data.layout import DataLayout, DataLayoutError, discover_layout, pick_domains
from trueface.data.normalize import normalized_root
from trueface.data.overlap import overlap_counts, training_hashes
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint, saved_thresholds
from trueface.robustness import PERTURBATIONS, SweepPlan, build_sweep, output_relpath, run_here
from trueface.robustness_report import FOLDER, run_sweep, sweep_table
from trueface.storage import Mirror, StorageError, check_writable, fetch, is_uri, join
from trueface.thresholds import SCOPES, ThresholdsError, pull_beside, push_beside


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=nonempty, help="a stage1/ or stage2/ best.pt or last.pt: a path or a URI")
    parser.add_argument("--data-root", required=True, type=nonempty_path, help="root in the original layout (any domain names)")
    parser.add_argument("--out", type=nonempty, help="results folder, a path or a URI (default: <the run's output.results_dir>/"
                                      "<run>-on-<root name>)")
    parser.add_argument("--test-domains", type=nonempty,
                        help="comma-separated domains (default: all with a test split)")
    parser.add_argument("--threshold-from", choices=("auto", "valid", "saved", "checkpoint"), default="auto",
                        help="auto | valid | saved: the checkpoint's thresholds.json (checkpoint: old name of saved)")
    parser.add_argument("--threshold-scope", choices=SCOPES,
                        help="pooled | per_domain, when choosing on valid (default: the checkpoint's eval.threshold_scope)")
    parser.add_argument("--save-thresholds", action="store_true",
                        help="write the thresholds chosen on this root's validation splits beside the checkpoint "
                             "(thresholds.json), where jobs.predict reads them; needs --threshold-from valid")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="evaluate even when test images are also in the checkpoint's training data (counted in the table)")
    parser.add_argument("--on-bad-image", choices=("error", "skip"),
                        help="what the data check does with bad files of this root (default: the checkpoint's data.on_bad_image)")
    parser.add_argument("--robustness", action="store_true",
                        help="also score the test splits JPEG re-encoded (q95-30), blurred (sigma 0.5-2), downscaled "
                             "(x0.5, x0.25) and cropped (90%%, 75%%), at the clean thresholds, into <out>/robustness/")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process instead of a Ray Train worker")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    if args.save_thresholds and args.threshold_from != "valid":
        parser.error("--save-thresholds writes newly chosen thresholds: use it with --threshold-from valid")
    domains = tuple(d.strip() for d in (args.test_domains or "").split(",") if d.strip())
    if args.test_domains is not None and not domains:  # "," would otherwise score every domain
        parser.error(f"--test-domains {args.test_domains!r} names no domain; give domain names, or leave the flag "
                     f"out to score every domain with a test split")
    if repeated(domains):  # each would be scored, and counted in the combined row, twice
        parser.error(f"--test-domains lists {', '.join(repeated(domains))} more than once; name each domain once")
    try:
        checkpoint = fetch(args.checkpoint, Config().data.cache_dir)  # the run's own cache is in the checkpoint
        state = load_checkpoint(checkpoint)
        layout = discover_layout(args.data_root)
        cfg = from_dict(state["config"])
        if args.threshold_scope:
            cfg = replace(cfg, eval=replace(cfg.eval, threshold_scope=args.threshold_scope))
        if args.threshold_from != "valid":  # a missing or stale thresholds file stops here, not on a worker
            pull_beside(args.checkpoint, Config().data.cache_dir)
            saved_thresholds(checkpoint, args.threshold_from, cfg.eval.threshold_policy, cfg.eval.threshold_scope)
        out = args.out or join(cfg.output.results_dir, f"{cfg.run_name}-on-{layout.root.resolve().name}")
        check_writable(out, "--out")
        # before any image is scored or --save-thresholds writes: a file named --out ended in a traceback after both
        problem = "" if is_uri(out) else output_problem(Path(out), "--out", folder_wanted=True)
        if problem:
            sys.exit(f"error: {problem}")
        layout, exclude, overlap = checked_test_root(layout, cfg, args)
        # before any image is scored (the scoring asks for them after the validation splits)
        pick_domains(layout, domains, "test")
        if not args.no_ray:
            init_ray(args.address, cfg)  # before the sweep: its perturbations are Ray tasks
        sweep = perturbed_test_roots(args.data_root, exclude, cfg, on_ray=not args.no_ray) if args.robustness else None
    except (CheckpointError, DataLayoutError, StorageError, ThresholdsError, ImageReadError) as exc:
        sys.exit(f"error: {exc}")
    results = Mirror.of(out, cfg.data.cache_dir)
    if args.no_ray:
        report = evaluate_checkpoint(checkpoint, layout, results.local, test_domains=domains, thresholds=ThresholdRequest(
            args.threshold_from, scope=cfg.eval.threshold_scope, save=args.save_thresholds, chosen_by="jobs.evaluate"),
            train_overlap=overlap)
        if sweep:
            run_sweep(checkpoint, report, sweep, results.local / FOLDER)
        results.push()
        if args.save_thresholds:
            push_beside(args.checkpoint, Config().data.cache_dir)
    else:
        from jobs import ray_train

        ray_train.evaluate(cfg, f"{cfg.run_name}-evaluate-{layout.root.resolve().name}", args.checkpoint,
                           layout.root, out, test_domains=domains, thresholds=ThresholdRequest(
                               args.threshold_from, save=args.save_thresholds, chosen_by="jobs.evaluate"),
                           exclude=exclude, train_overlap=overlap, robustness=sweep)
        results.pull()
    print_metrics_table(results.local)
    print(f"results: {results.location}/summary.md")
    if sweep:
        print_sweep_table(results.local / FOLDER)
        print(f"robustness: {join(str(results.location), FOLDER)}/robustness.md")
    return 0


def perturbed_test_roots(data_root: Path, exclude: tuple[str, ...], cfg: Config,
                         on_ray: bool) -> list[tuple[str, float, str]]:
    """(kind, value, data root) of each perturbed copy of the root's test files (those the data check
    kept), built where the cache lacks them (Ray tasks, or this process), normalised as the checkpoint
    was trained."""
    source = discover_layout(data_root, exclude)
    relpaths = [source.relpath(s.path) for s in source.gather(source.domains_with("test"), "test")]
    plan = SweepPlan.of(source.root, relpaths, cfg.seed, Path(cfg.data.cache_dir))
    roots = build_sweep(plan, run_chunks_on_ray if on_ray else run_here)
    out = []
    for p in PERTURBATIONS:
        root = roots[p.name]
        if parse_normalize(cfg.data.normalize) is not None:
            root = normalized_root(root, [output_relpath(r, p) for r in relpaths], cfg.data.normalize,
                                   Path(cfg.data.cache_dir))
        out.append((p.kind, p.value, str(root)))
    return out


def run_chunks_on_ray(fn, chunks: list):
    """``fn`` on each chunk as a Ray task (1 CPU each, in parallel); yields each result as its task ends.
    A task's error is raised as itself (e.g. ImageReadError naming the file), not as Ray's wrapper."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=1)(fn)
    pending = [task.remote(chunk) for chunk in chunks]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                raise exc.cause from None
    finally:
        for ref in pending:  # interrupted or failed: stop the rest
            ray.cancel(ref)


def print_sweep_table(folder: Path) -> None:
    import pyarrow.parquet as pq

    print("\nrobustness (AUC of the ema weights; in brackets its change from clean):\n"
          + sweep_table(pq.read_table(Path(folder) / "robustness.parquet").to_pylist(), "ema"))


def checked_test_root(layout: DataLayout, cfg: Config,
                      args: argparse.Namespace) -> tuple[DataLayout, tuple[str, ...], dict | None]:
    """The root after the data check (bad files left out, or a stop), normalised as the checkpoint
    was trained; the files left out; its overlap with the training data (None: nothing to compare with)."""
    policy = args.on_bad_image or cfg.data.on_bad_image
    check_cfg = replace(cfg, data=replace(cfg.data, root=str(layout.root), on_bad_image=policy, exclude=()))
    check = scan_and_check(layout, check_cfg)
    if check.blocking:
        sys.exit(f"{check.summary()}\n(--on-bad-image skip leaves them out; python -m jobs.check_data --data-root "
                 f"{layout.root} writes the full report)")
    if check.excluded:
        print(check.summary(), flush=True)
        layout = discover_layout(layout.root, check.excluded)
    trained = training_hashes(args.checkpoint, cfg)
    overlap = None
    if trained is None:
        print(f"warning: test/train overlap not checked: neither {args.checkpoint}'s run manifest nor its data root "
              f"{cfg.data.root} is reachable from here", file=sys.stderr)
    else:
        overlap = overlap_counts(check.rows, trained)
        if sum(overlap.values()) and not args.allow_overlap:
            per = ", ".join(f"{d} {n}" for d, n in overlap.items() if n)
            sys.exit(f"error: {sum(overlap.values())} test images of {layout.root} are also in the checkpoint's "
                     f"training data ({per}; compared by content with {trained.source}). Its scores on them say "
                     "nothing about new images. Pass --allow-overlap to evaluate anyway: the table counts them.")
    if parse_normalize(cfg.data.normalize) is not None:
        relpaths = [layout.relpath(s.path) for s in layout.all_samples()]
        layout = discover_layout(normalized_root(layout.root, relpaths, cfg.data.normalize, Path(cfg.data.cache_dir)),
                                 check.excluded)
    return layout, check.excluded, overlap


if __name__ == "__main__":
    sys.exit(main())

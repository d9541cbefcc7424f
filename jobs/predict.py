"""Probability that each image is generated, calibrated, and its label at the checkpoint's chosen threshold.

Usage::

    python -m jobs.predict --checkpoint runs/demo/stage2/best.pt face.jpg more_faces/
    python -m jobs.predict --checkpoint CKPT folder/ --out predictions.csv
    python -m jobs.predict --checkpoint CKPT dalle_faces/ --domain dalle   # that domain's own threshold
    python -m jobs.predict --checkpoint CKPT faces/ --explain explained/   # + Grad-CAM overlays
    python -m jobs.predict --ray --checkpoint CKPT --input DIR_OR_URI --out preds.parquet   # Ray Data

The threshold comes from ``thresholds.json`` beside the checkpoint (written by the pipeline's
evaluation): the pooled one, or with ``--domain`` the one chosen on that domain's validation split
(``eval.threshold_scope: per_domain``). The console and the CSV's ``threshold_source`` say which.

``p_calibrated`` is ``p_generated`` after temperature scaling with the temperature fitted beside the
threshold (the same file, the same domain), ``temperature`` and ``temperature_source`` say which.
Without one (no file, or a file written before calibration) ``p_calibrated`` equals ``p_generated``
and ``temperature_source`` reads "uncalibrated (temperature 1)". The label is the same either way:
the threshold applies to ``p_generated``, and calibration is monotone.

``--explain OUT_DIR`` writes a Grad-CAM overlay PNG per image (the fake class's map over the image as
the model saw it, trueface/explain.py) and adds the columns ``explanation`` (the PNG),
``cam_region`` (the quadrant of the map's peak) and ``cam_peak_x``/``cam_peak_y`` (in the prepared,
centre-cropped image's pixels); an image where nothing raised the fake score has an empty map:
region "none", no peak.

``--ray`` scores a folder or bucket on Ray Data into one parquet file (jobs/predict_ray.py).

An unreadable image is reported by name (stderr, and an ``error`` row in the CSV); the others
are still scored. Exit status 1 when any image could not be read.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from jobs.common import add_ray_arguments, output_problem
from trueface.atomic import atomic_write_text
from trueface.checkpoint import CheckpointError
from trueface.config.schema import DataConfig
from trueface.predict import Predictor, expand_inputs
from trueface.storage import StorageError
from trueface.thresholds import ThresholdsError, fetch_checkpoint


def _device(text: str) -> str:
    """--device's value: auto, cpu, cuda or cuda:N."""
    kind, _, index = text.partition(":")
    if text not in ("auto", "cpu") and not (kind == "cuda" and (not index or index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, cuda or cuda:N")
    return text


def _device_problem(text: str) -> str:
    """Why this machine cannot score on --device ``text`` ('' when it can)."""
    import torch

    kind, _, index = text.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {text}: torch sees no CUDA device here; use auto or cpu"
    if index and int(index) >= torch.cuda.device_count():
        return f"--device {text}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # a str: Path("s3://b/k") would become "s3:/b/k", no longer a URI
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or its s3:// / gs:// URI")
    parser.add_argument("inputs", nargs="*", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", type=Path, help="write a CSV here instead of printing")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    parser.add_argument("--device", default="auto", type=_device,
                        help="auto (a GPU where torch sees one), cpu, cuda or cuda:N")
    parser.add_argument("--domain", help="label at this domain's own threshold (eval.threshold_scope per_domain); "
                                         "default: the pooled one")
    parser.add_argument("--explain", type=Path, metavar="OUT_DIR",
                        help="write a Grad-CAM overlay PNG per image here, and its peak's region to the CSV")
    parser.add_argument("--ray", action="store_true",
                        help="score --input on Ray Data actors into the parquet file --out (jobs/predict_ray.py)")
    parser.add_argument("--input", help="with --ray: a folder or an s3:// / gs:// URI of images")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    for flag, path, folder in (("--out", args.out, False), ("--explain", args.explain, True)):
        problem = path is not None and output_problem(path, flag, folder)
        if problem:
            parser.error(problem)
    if args.ray:
        if not args.input or args.inputs or not args.out or args.explain:
            parser.error("--ray takes --input DIR_OR_URI and --out FILE.parquet (no positional inputs, no --explain)")
        from jobs import predict_ray

        try:
            return predict_ray.run(args.checkpoint, args.input, args.out, args.weights, args.domain, args.address)
        except (CheckpointError, ThresholdsError, StorageError) as exc:
            sys.exit(f"error: {exc}")
    if not args.inputs:
        parser.error("give image files or folders to score (or --ray --input DIR_OR_URI)")
    device_problem = _device_problem(args.device)  # here, not with --ray: the actors pick their own devices
    if device_problem:
        parser.error(device_problem)
    try:
        local = fetch_checkpoint(args.checkpoint, DataConfig().cache_dir)
        predictor = Predictor.from_checkpoint(local, args.weights, args.device, domain=args.domain)
    except (CheckpointError, ThresholdsError, StorageError) as exc:
        sys.exit(f"error: {exc}")
    print(predictor.describe_labelling(args.weights), file=sys.stderr)
    paths = expand_inputs(args.inputs)
    if not paths:
        sys.exit(f"error: no images found in {' '.join(args.inputs)}")
    rows, failed = [], 0
    for p in tqdm(predictor.score(paths), total=len(paths), unit="img", disable=args.out is None, file=sys.stderr):
        rows.append(p)
        if p.error:
            failed += 1
            print(f"error: {p.error}", file=sys.stderr)
    explained = None
    if args.explain:
        from trueface.explain import explain_files

        explained = explain_files(predictor.model, predictor.load, [r.path for r in rows if not r.error], args.explain)
        print(f"explanations: {len(explained)} Grad-CAM overlays in {args.explain}", file=sys.stderr)
    text = _csv(rows, predictor, explained)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"{len(rows) - failed} scored, {failed} unreadable -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 1 if failed else 0


def _csv(rows, predictor: Predictor, explained: dict | None = None) -> str:
    """The table; with ``explained`` (--explain) four more columns, empty for an unreadable file."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = ["explanation", "cam_region", "cam_peak_x", "cam_peak_y"] if explained is not None else []
    writer.writerow(["path", "p_generated", "p_calibrated", "label", "threshold", "threshold_source", "temperature",
                     "temperature_source", "error", *extra])
    for r in rows:
        p, c = ("", "") if r.probability is None else (f"{r.probability:.6f}", f"{r.calibrated:.6f}")
        cells = [r.path, p, c, r.label, f"{predictor.threshold:.6f}", predictor.threshold_source,
                 f"{predictor.temperature:.6g}", predictor.temperature_source, r.error]
        if explained is not None:
            e = explained.get(r.path)
            cells += [e.overlay, e.region, *(e.peak or ("", ""))] if e else ["", "", "", ""]  # empty map: no peak
        writer.writerow(cells)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())

"""Decision thresholds chosen on validation data, kept in a file beside the checkpoint (never in it).

Usage::

    chosen = choose_thresholds(val_labels, val_domains, {"raw": raw_scores, "ema": ema_scores},
                               policy="youden", scope="per_domain")
    write_thresholds(Path("runs/demo/stage2/best.pt"), chosen)   # -> runs/demo/stage2/thresholds.json
    saved = read_thresholds(Path("runs/demo/stage2/best.pt"))     # None if there is no file
    value, source = saved.threshold("ema", domain="dalle")
    temperature, source = saved.temperature("ema", domain="dalle")   # (1.0, "uncalibrated ...") in old files

A trained checkpoint is never rewritten after its stage: its bytes are what early stopping chose,
and a report or a sha256 that names it stays true. The thresholds, chosen later, go to
``thresholds.json`` beside ``best.pt`` (``<stem>.thresholds.json`` beside any other checkpoint,
e.g. ``last.thresholds.json``). The file records the checkpoint's sha256, so thresholds left from
an earlier training of the same run are refused rather than silently applied to new weights.

Scopes: ``pooled`` chooses one threshold per weights on all validation domains together;
``per_domain`` also chooses one per validation domain on that domain's images alone (the pooled
one still stands in for any domain without a validation split of its own, e.g. a held-out domain).

Calibration: ``choose_thresholds`` also fits a temperature (trueface.calibration) per weights on
the same validation images, and under ``per_domain`` one per validation domain with both classes;
the file keeps them under ``calibration``. A file written before calibration existed has no such
key: it still loads, as uncalibrated (temperature 1), and ``describe_calibration`` says so. The
thresholds are chosen on the raw scores: temperature scaling is monotone, so it would move a
threshold but not change a single decision (see trueface.calibration).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trueface.atomic import atomic_write_text
from trueface.calibration import Temperatures, domain_or_pooled, fit_temperature
from trueface.config.choices import THRESHOLD_SCOPES
from trueface.metrics import choose_threshold
from trueface.storage import Mirror, fetch, is_uri, split_file

FORMAT_VERSION = 1
#: Valid values of ``eval.threshold_scope``.
SCOPES = THRESHOLD_SCOPES
#: The file beside a checkpoint called ``best.pt``.
FILE_NAME = "thresholds.json"


class ThresholdsError(ValueError):
    """A thresholds file is unreadable, stale or lacks what was asked of it; the message names it."""


@dataclass(frozen=True)
class Thresholds:
    """What was chosen, and on what: per weights a pooled threshold, and with the per_domain scope
    one per validation domain that has both classes."""

    policy: str
    scope: str
    pooled: dict[str, float]  # weights -> threshold on all validation images together
    per_domain: dict[str, dict[str, float]]  # weights -> domain -> threshold on that domain's images
    validation: dict[str, dict[str, int]]  # domain -> {"real": n, "fake": n}: the images used
    chosen_by: str = ""  # the program that chose them, e.g. "jobs.pipeline"
    chosen_at: str = ""  # UTC, ISO 8601
    data_root: str = ""  # where the validation images were
    checkpoint: dict = field(default_factory=dict)  # file, sha256, bytes of the checkpoint they belong to
    calibration: Temperatures | None = None  # fitted on the same validation images; None in files written before

    @property
    def temperatures(self) -> Temperatures:
        """The fitted temperatures, or temperature 1 for every weights (uncalibrated) when there are none."""
        return self.calibration or Temperatures.identity(list(self.pooled))

    def temperature(self, weights: str, domain: str | None = None) -> tuple[float, str]:
        """(temperature, where it comes from) for ``weights``, like :meth:`threshold`; (1.0,
        UNCALIBRATED) when none was fitted."""
        if weights not in self.pooled:
            raise ThresholdsError(f"no temperature for weights {weights!r}; have {sorted(self.pooled)}")
        return self.temperatures.temperature(weights, domain)

    def describe_calibration(self) -> str:
        """One line for reports: the temperatures and what they were fitted on, or why there are none."""
        if self.calibration is not None:
            return f"temperature scaling fitted on the validation images above: {self.calibration.describe()}"
        why = ("no validation split to fit one on" if not self.validation else
               "these thresholds were chosen before temperatures were fitted; choose them again "
               "(python -m jobs.evaluate ... --threshold-from valid --save-thresholds) to calibrate")
        return f"{self.temperatures.describe()}: {why}"

    def threshold(self, weights: str, domain: str | None = None) -> tuple[float, str]:
        """(threshold, where it comes from) for ``weights``; ``domain``'s own under the per_domain
        scope when it has one, else the pooled one."""
        return domain_or_pooled(self.pooled, self.per_domain, weights, domain, "threshold", ThresholdsError)

    def domains(self) -> list[str]:
        """Domains with a threshold of their own (none under the pooled scope)."""
        return sorted({d for per in self.per_domain.values() for d in per})

    def describe(self) -> str:
        """One line for reports: policy, scope and the validation images."""
        used = ", ".join(f"{d} ({c['real'] + c['fake']} images)" for d, c in self.validation.items())
        return f"{self.policy} on validation ({used or 'none'}), scope {self.scope}"

    def to_json(self) -> str:
        weights = {w: {"pooled": t, **({"domains": self.per_domain[w]} if w in self.per_domain else {})}
                   for w, t in self.pooled.items()}
        return json.dumps({
            "format": FORMAT_VERSION,
            "checkpoint": self.checkpoint,
            "policy": self.policy,
            "scope": self.scope,
            "thresholds": weights,
            "validation": {"data_root": self.data_root, "domains": self.validation},
            "chosen": {"by": self.chosen_by, "at": self.chosen_at},
            **({"calibration": self._calibration_json()} if self.calibration is not None else {}),
        }, indent=2) + "\n"

    def _calibration_json(self) -> dict:
        per = self.calibration.per_domain
        return {"method": "temperature scaling: sigmoid(logit(p) / T), T minimising the validation NLL",
                "temperatures": {w: {"pooled": t, **({"domains": per[w]} if w in per else {})}
                                 for w, t in self.calibration.pooled.items()}}

    @classmethod
    def from_json(cls, text: str, source: str) -> "Thresholds":
        """Parse a thresholds file's text; ``source`` names it in errors."""
        try:
            data = json.loads(text)
            weights = data["thresholds"]
            out = cls(
                policy=str(data["policy"]), scope=str(data["scope"]),
                pooled={w: float(v["pooled"]) for w, v in weights.items()},
                per_domain={w: {d: float(t) for d, t in v["domains"].items()} for w, v in weights.items() if "domains" in v},
                validation={d: {k: int(n) for k, n in c.items()} for d, c in data["validation"]["domains"].items()},
                chosen_by=str(data["chosen"]["by"]), chosen_at=str(data["chosen"]["at"]),
                data_root=str(data["validation"]["data_root"]), checkpoint=dict(data["checkpoint"]),
                calibration=_calibration_from_json(data.get("calibration")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ThresholdsError(f"{source} is not a TrueFace thresholds file ({type(exc).__name__}: {exc}); "
                                  "delete it and evaluate again (python -m jobs.evaluate ... --save-thresholds)") from exc
        if data.get("format") != FORMAT_VERSION or out.scope not in SCOPES:
            raise ThresholdsError(f"{source}: format {data.get('format')!r}, scope {out.scope!r} not understood "
                                  f"(this version reads format {FORMAT_VERSION}, scopes {', '.join(SCOPES)})")
        return out


def _calibration_from_json(data: dict | None) -> Temperatures | None:
    """The ``calibration`` entry of a thresholds file; None where there is none (an older file)."""
    if data is None:
        return None
    temps = data["temperatures"]
    pooled = {w: float(v["pooled"]) for w, v in temps.items()}
    per_domain = {w: {d: float(t) for d, t in v["domains"].items()} for w, v in temps.items() if "domains" in v}
    if not all(0 < t < math.inf for t in [*pooled.values(), *(t for per in per_domain.values() for t in per.values())]):
        raise ValueError(f"temperatures must be finite and > 0, got {temps}")
    return Temperatures(pooled, per_domain)


def choose_thresholds(labels: np.ndarray, domains: list[str], scores: dict[str, np.ndarray], policy: str,
                      scope: str) -> Thresholds:
    """Choose on validation ``labels`` / per-weights ``scores`` of images from ``domains`` (one
    name per image), and fit a temperature on the same images. A domain gets its own threshold
    and temperature (per_domain scope) only when its images hold both classes: every policy but
    ``fixed`` is undefined on one class, and a temperature fitted on one class only pushes every
    score towards it."""
    if scope not in SCOPES:
        raise ValueError(f"threshold scope {scope!r} must be one of {', '.join(SCOPES)}")
    labels = np.asarray(labels, dtype=np.int64)
    names = np.asarray(domains, dtype=object)
    order = list(dict.fromkeys(domains))
    validation = {d: {"real": int(((names == d) & (labels == 0)).sum()), "fake": int(((names == d) & (labels == 1)).sum())}
                  for d in order}
    own = [d for d in order if min(validation[d].values()) > 0]
    pooled, per_domain, temperature, domain_temperature = {}, {}, {}, {}
    for weights, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        pooled[weights] = float(choose_threshold(labels, s, policy))
        temperature[weights] = fit_temperature(labels, s)
        if scope == "per_domain":
            per_domain[weights] = {d: float(choose_threshold(labels[names == d], s[names == d], policy)) for d in own}
            domain_temperature[weights] = {d: fit_temperature(labels[names == d], s[names == d]) for d in own}
    calibration = Temperatures(temperature, domain_temperature)
    return Thresholds(policy, scope, pooled, per_domain, validation, calibration=calibration)


def thresholds_path(checkpoint: Path | str) -> Path:
    """The thresholds file of ``checkpoint``: ``thresholds.json`` beside ``best.pt``,
    ``<stem>.thresholds.json`` beside any other name (so two checkpoints in a folder never share one)."""
    checkpoint = Path(checkpoint)
    name = FILE_NAME if checkpoint.name == "best.pt" else f"{checkpoint.stem}.{FILE_NAME}"
    return checkpoint.with_name(name)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def stamp(chosen: Thresholds, checkpoint: Path, chosen_by: str, data_root: str) -> Thresholds:
    """``chosen`` with its provenance: the checkpoint's identity, the program, the time and the data."""
    identity = {"file": checkpoint.name, "sha256": file_sha256(checkpoint), "bytes": checkpoint.stat().st_size}
    return replace(chosen, checkpoint=identity, chosen_by=chosen_by, data_root=data_root,
                   chosen_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def write_thresholds(checkpoint: Path, chosen: Thresholds) -> Path:
    """Write ``chosen`` (stamped for ``checkpoint``) to the checkpoint's thresholds file, atomically."""
    identity = chosen.checkpoint
    if identity.get("file") != checkpoint.name or identity.get("bytes") != checkpoint.stat().st_size:
        raise ThresholdsError(f"these thresholds were stamped for {identity or 'no checkpoint'}, not {checkpoint}")
    return atomic_write_text(thresholds_path(checkpoint), chosen.to_json())


def read_thresholds(checkpoint: Path) -> Thresholds | None:
    """The checkpoint's thresholds, or None if it has no thresholds file. A file chosen for other
    bytes (the checkpoint was retrained or replaced since) is refused with ``ThresholdsError``."""
    path = thresholds_path(checkpoint)
    if not path.is_file():
        return None
    saved = Thresholds.from_json(path.read_text(), str(path))
    actual = file_sha256(checkpoint)
    if saved.checkpoint.get("sha256") != actual:
        raise ThresholdsError(
            f"{path} is stale: it was chosen on {saved.chosen_at} for a checkpoint with sha256 "
            f"{str(saved.checkpoint.get('sha256'))[:12]}..., but {checkpoint} now has sha256 {actual[:12]}... "
            "(retrained or replaced since). Choose new thresholds: rerun the run's pipeline (it evaluates "
            f"again), or python -m jobs.evaluate --checkpoint {checkpoint} --data-root ROOT --threshold-from valid "
            "--save-thresholds; or delete the file to label at 0.5")
    return saved


def pull_beside(location: str, cache_dir: str | Path) -> None:
    """For a checkpoint at a URI: download its thresholds file, if it has one, beside the copy
    ``trueface.storage.fetch`` staged (a path needs nothing)."""
    if is_uri(location):
        parent, name = split_file(location)
        Mirror.of(parent, cache_dir).pull(thresholds_path(name).name)


def fetch_checkpoint(location: str | Path, cache_dir: str | Path) -> Path:
    """A local file for the checkpoint at ``location`` (the path itself, or a URI's file staged by
    ``trueface.storage.fetch``), with its thresholds file beside it where it has one: a scorer that
    read a URI's checkpoint alone would label at 0.5, uncalibrated, without a word."""
    local = fetch(location, cache_dir)
    pull_beside(str(location), cache_dir)
    return local


def push_beside(location: str, cache_dir: str | Path) -> None:
    """For a checkpoint at a URI: upload the thresholds file written beside its staged copy."""
    if is_uri(location):
        parent, name = split_file(location)
        Mirror.of(parent, cache_dir).push(thresholds_path(name).name)

"""The allowed values of the config's text keys that more than one module reads.

Usage: ``validate_threshold_policy("fixed:0.5")``; ``SELECT_MODES``

The config is the bottom layer (it imports nothing else of trueface), so these live here and
``trueface.metrics`` and ``trueface.train`` import them.
"""

from __future__ import annotations

from typing import Any

#: Valid values of ``eval.threshold_policy``; ``fixed:<p>`` stands for e.g. ``fixed:0.5``.
THRESHOLD_POLICIES = ("youden", "max_f1", "max_accuracy", "fixed:<p>")

#: Valid values of ``eval.select_on``: what model selection compares (see trueface.train).
SELECT_MODES = ("mean_domain", "worst_domain", "pooled")

#: Valid values of ``eval.threshold_scope`` (see trueface.thresholds).
THRESHOLD_SCOPES = ("pooled", "per_domain")

#: eval.* keys that move no AUC, with the reason: neither a search (its objective is a validation
#: AUC) nor an ablation (it compares test AUCs) can tell their values apart.
NO_AUC_EVAL_KEYS = {"eval.threshold_policy": "thresholds move no AUC",
                    "eval.threshold_scope": "thresholds move no AUC",
                    "eval.batch_size": "the scoring batch size moves no score"}


def _policy_error(policy: Any, detail: str = "") -> ValueError:
    valid = ", ".join(THRESHOLD_POLICIES)
    extra = f" ({detail})" if detail else ""
    return ValueError(f"unknown threshold policy {policy!r}{extra}; valid policies: {valid}, e.g. 'fixed:0.5'")


def parse_fixed_threshold(policy: str) -> float:
    """Value of a ``fixed:<p>`` policy, checked to be a number in [0, 1]."""
    text = policy[len("fixed:"):].strip()
    try:
        value = float(text)
    except ValueError:
        raise _policy_error(policy, f"'{text}' is not a number") from None
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"threshold policy {policy!r}: fixed threshold must be in [0, 1], got {text}")
    return value


def validate_threshold_policy(policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of :data:`THRESHOLD_POLICIES`."""
    if not isinstance(policy, str):
        raise _policy_error(policy, f"expected a string, got {type(policy).__name__}")
    if policy.startswith("fixed:"):
        parse_fixed_threshold(policy)
    elif policy not in THRESHOLD_POLICIES[:3]:
        raise _policy_error(policy)


#: Valid values of ``stageN.augment.device``: where the strong ops run (see trueface.augment_device).
AUGMENT_DEVICES = ("cpu", "gpu", "auto")

#: Valid values of ``model.arch`` (see trueface.model: resnet50 is the method, resnet18 its small kin).
MODEL_ARCHS = ("resnet50", "resnet18")

#: Valid values of ``data.prepared`` (see trueface.data.prepared).
PREPARED = ("none", "uint8")
#: Valid values of ``data.on_bad_image`` (see trueface.data.check).
ON_BAD_IMAGE = ("error", "skip")


def parse_normalize(spec: str) -> tuple[int, int] | None:
    """``data.normalize`` as (JPEG quality, short side in px), or None for ``none``; ValueError
    with the expected form otherwise."""
    if spec == "none":
        return None
    form = "expected none or jpeg:<quality>@<size>, e.g. jpeg:95@256"
    if not isinstance(spec, str) or not spec.startswith("jpeg:") or "@" not in spec:
        raise ValueError(f"{spec!r}: {form}")
    quality, _, size = spec[len("jpeg:"):].partition("@")
    try:
        q, n = int(quality), int(size)
    except ValueError:
        raise ValueError(f"{spec!r}: quality and size must be whole numbers ({form})") from None
    if not 1 <= q <= 100:
        raise ValueError(f"{spec!r}: JPEG quality must be in [1, 100]")
    if n < 16:
        raise ValueError(f"{spec!r}: size must be >= 16 px")
    return q, n

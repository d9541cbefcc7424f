"""Ablation specs and plans: which recipe components to switch off, and what to train for it.

Usage::

    spec = load_ablation_spec("search_spaces/ablation.yaml")
    plan = plan_ablation(spec, base_cfg, stages=(1, 2))   # checks every key and value first
    plan.variants      # rows of the table: full, no-ema, ..., plain
    plan.groups        # what is trained: one Tune trial per group and seed
    plan.dropped       # variants that would change nothing here, with the reason

    plan = plan_leave_one_domain_out(base_cfg, stages=(2,))  # one group per Stage II domain left out

A spec file (``search_spaces/ablation*.yaml``)::

    description: what this ablation is for
    reference: full                # the row every other row is compared with
    plain: true                    # add a row with every component off at once
    components:
      ema:
        what: EMA weights (the raw weights are scored)
        when_off: {weights: raw}
      strong-augmentation:
        what: strong augmentation
        when_off: {set: {stage1.augment.strength: 0, stage2.augment.strength: 0}}
      stage2:
        what: Stage II (Stage I's weights are scored directly)
        when_off: {stages: [1]}

``when_off`` (not ``off``: YAML reads that as false) takes ``set`` (config values, dotted keys as in search spaces), ``weights: raw`` (score
the raw weights instead of the EMA ones) and ``stages`` (train and score only these stages).
With ``plain: true`` two components that set one key must give it the same value: the plain row
sets every component's values at once, and a spec where one would silently win is refused.

What is trained is as little as the table needs. Keys under ``eval.`` (but ``eval.select_on``,
which picks best.pt and stops early: a training key) and ``weights: raw`` change how a checkpoint
is scored, not how it is trained (``eval.hflip_tta`` is an evaluation protocol here: the
reference's checkpoint, scored without the flip); ``stages: [1]`` scores Stage I's checkpoint,
which the full recipe's run has trained already (same config, same seed). So such variants are
evaluations of the reference run, and only variants that change training get trials of their
own. A component that changes nothing in this config (its value is the config's already, or its
keys belong to a stage that is not trained, or only move thresholds, which change no AUC) is
dropped with the reason, never run as a copy of the reference. ``stages`` must keep Stage I
where Stage II is trained: Stage II always starts from Stage I's weights, so "Stage II alone"
would be the reference again, and the spec is refused.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trueface.config import Config, ConfigError, apply_values, flatten, to_dict
from trueface.config.choices import NO_AUC_EVAL_KEYS
from trueface.config.loading import read_yaml_file

REFERENCE = "full"
PLAIN = "plain"
WEIGHTS = ("ema", "raw")
_TOP_KEYS = {"description", "reference", "plain", "components"}
_COMPONENT_KEYS = {"what", "when_off"}
_OFF_KEYS = {"set", "weights", "stages"}
# eval.* keys that change training: what picks best.pt and stops early
_TRAINING_EVAL_KEYS = frozenset({"eval.select_on"})


class AblationSpecError(ConfigError):
    """An ablation spec that cannot be run; the message names the file, component and key."""


@dataclass(frozen=True)
class Component:
    """One part of the recipe and how to switch it off."""

    name: str
    what: str
    values: dict[str, Any] = field(default_factory=dict)  # config values that switch it off
    weights: str = "ema"  # "raw": score the raw weights
    stages: tuple[int, ...] | None = None  # train and score only these stages


@dataclass(frozen=True)
class AblationSpec:
    source: str
    description: str
    reference: str
    components: tuple[Component, ...]
    plain: bool


@dataclass(frozen=True)
class Evaluation:
    """One scoring of a trial's checkpoint: the variant it serves, the stage whose best.pt is
    scored, and the eval.* values it is scored with."""

    variant: str
    stage: int
    eval_values: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """Where its report goes, relative to the ablation's results folder (per seed below it)."""
        return f"evals/{self.variant}"


@dataclass(frozen=True)
class Variant:
    """A row of the ablation table: the evaluation it reads, and which weights."""

    name: str
    description: str
    evaluation: str  # the Evaluation (by variant name) it reads
    weights: str  # ema | raw


@dataclass(frozen=True)
class TrainingGroup:
    """One stage trained per seed (one Tune trial each): the base config with ``values``, from
    ``init_group``'s Stage I checkpoint of the same seed (Stage II; None: the run's --init), then
    ``evaluations`` of the stage's best.pt. Its run folder is ``<folder>-seed<k>``."""

    name: str
    stage: int
    values: dict[str, Any]
    evaluations: tuple[Evaluation, ...] = ()
    init_group: str | None = None

    @property
    def folder(self) -> str:
        # A Stage II group continues the run folder of the Stage I group of its own name.
        return self.name

    def config(self, base: Config, seed: int) -> Config:
        return apply_values(base, {**self.values, "seed": base.seed + seed})


@dataclass
class AblationPlan:
    kind: str  # "ablation" | "leave-one-domain-out"
    reference: str
    stages: tuple[int, ...]
    variants: list[Variant]
    groups: list[TrainingGroup]  # Stage I groups first: Stage II ones start from them
    dropped: list[tuple[str, str]]  # (variant, why it is not run)

    def phase(self, stage: int) -> list[TrainingGroup]:
        return [g for g in self.groups if g.stage == stage]

    def evaluation(self, name: str) -> tuple[TrainingGroup, Evaluation]:
        return next((g, e) for g in self.groups for e in g.evaluations if e.variant == name)

    def describe(self, seeds: int) -> str:
        lines = [f"{len(self.variants)} rows; trials: " + ", ".join(
            f"Stage {'I' * s} {len(self.phase(s))} config(s) x {seeds} seed(s)" for s in self.stages)
            + f"; reference: {self.reference}"]
        for v in self.variants:
            group, ev = self.evaluation(v.evaluation)
            detail = [f"Stage {'I' * ev.stage} best.pt of trials {group.name!r}", f"{v.weights.upper()} weights"]
            detail += [f"{k}={val}" for k, val in ev.eval_values.items()]
            lines.append(f"  {v.name:<24} {', '.join(detail)}: {v.description}")
        for g in self.groups:
            changes = ", ".join(f"{k}={val}" for k, val in g.values.items()) or "the config as given"
            start = f" from {g.init_group!r}'s Stage I" if g.init_group else ""
            lines.append(f"  trials {g.name!r}: Stage {'I' * g.stage}{start}; {changes}")
        lines += [f"  dropped {name}: {why}" for name, why in self.dropped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- spec files


def load_ablation_spec(path: str | Path) -> AblationSpec:
    return parse_ablation_spec(read_ablation_yaml(path), str(path))


def read_ablation_yaml(path: str | Path) -> Any:
    return read_yaml_file(path, AblationSpecError, "ablation spec")


def parse_ablation_spec(data: Any, source: str = "ablation spec") -> AblationSpec:
    if not isinstance(data, dict):
        raise AblationSpecError(f"{source}: expected a mapping with 'components:', got {type(data).__name__}")
    _refuse_unknown(data, _TOP_KEYS, source, "top-level key")
    components = data.get("components")
    if not isinstance(components, dict) or not components:
        raise AblationSpecError(f"{source}: 'components' must map names to {{what: ..., when_off: ...}}, e.g. "
                                f"mixup: {{what: MixUp, when_off: {{set: {{stage2.mixup_alpha: 0}}}}}}")
    reference = str(data.get("reference") or REFERENCE)
    plain = data.get("plain", True)
    if not isinstance(plain, bool):
        raise AblationSpecError(f"{source}: plain must be true or false, got {plain!r}")
    parsed = tuple(_parse_component(str(name), spec, source) for name, spec in components.items())
    taken = {reference, PLAIN} & {f"no-{c.name}" for c in parsed}
    if taken:
        raise AblationSpecError(f"{source}: a component's row name no-<name> clashes with {', '.join(sorted(taken))}")
    return AblationSpec(source, str(data.get("description") or ""), reference, parsed, plain)


def _parse_component(name: str, spec: Any, source: str) -> Component:
    where = f"{source}: components.{name}"
    if not isinstance(spec, dict):
        raise AblationSpecError(f"{where}: expected {{what: ..., when_off: {{...}}}}, got {spec!r}")
    _refuse_unknown(spec, _COMPONENT_KEYS, where, "key")
    off = spec.get("when_off")
    if not isinstance(off, dict) or not off:
        raise AblationSpecError(f"{where}: 'when_off' must say how to switch it off: set, weights and/or stages")
    _refuse_unknown(off, _OFF_KEYS, f"{where}.when_off", "key")
    values = off.get("set", {})
    if not isinstance(values, dict):
        raise AblationSpecError(f"{where}.when_off.set: expected dotted config keys and values, got {values!r}")
    weights = str(off.get("weights", "ema"))
    if weights not in WEIGHTS:
        raise AblationSpecError(f"{where}.when_off.weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    stages = off.get("stages")
    if stages is not None:
        if not (isinstance(stages, list) and stages and all(s in (1, 2) for s in stages) and stages == sorted(set(stages))):
            raise AblationSpecError(f"{where}.when_off.stages: expected a list of stages such as [1], got {stages!r}")
        stages = tuple(stages)
    return Component(name, str(spec.get("what") or name), {str(k): v for k, v in values.items()}, weights, stages)


def _refuse_unknown(data: dict, known: set[str], where: str, what: str) -> None:
    if (False in data or "off" in data) and "when_off" in known:
        raise AblationSpecError(f"{where}: write 'when_off:' where it says 'off:' (YAML reads a bare off as false)")
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AblationSpecError(f"{where}: unknown {what} {unknown[0]!r}{hint}; expected {', '.join(sorted(known))}")


# --------------------------------------------------------------------------- plans


def plan_ablation(spec: AblationSpec, base: Config, stages: tuple[int, ...]) -> AblationPlan:
    """The rows and trials of ``spec`` on ``base`` when the recipe trains ``stages``. Raises
    AblationSpecError for a key the config lacks or a value it refuses (before anything runs)."""
    if spec.plain:
        _refuse_plain_clashes(spec)
    flat = flatten(to_dict(base))
    builder = _Builder(stages)
    builder.add(spec.reference, "the full recipe", _Off({}, "ema", stages))
    offs, dropped = [], []
    for c in spec.components:
        off, why = _effective_off(c, spec.source, base, flat, stages)
        if why:
            dropped.append((f"no-{c.name}", why))
            continue
        offs.append(off)
        builder.add(f"no-{c.name}", f"without {c.what}", off)
    if spec.plain and len(offs) > 1:
        values = {k: v for o in offs for k, v in o.values.items()}
        # Off together, one knob can idle another (at strength 0 the light warm-up changes nothing):
        # without it, plain shares its trials with the row that differs only by that idle knob.
        everything_off = _plain_config(spec, base, values)
        plain = _Off({k: v for k, v in values.items() if not _cannot_act(k, everything_off)},
                     "raw" if any(o.weights == "raw" for o in offs) else "ema",
                     min((o.stages for o in offs), key=len))
        builder.add(PLAIN, "every component above off at once", plain)
    elif spec.plain:
        dropped.append((PLAIN, "fewer than two components act here, so it would repeat a row above"))
    return AblationPlan("ablation", spec.reference, stages, builder.variants, builder.groups(), dropped)


def _refuse_plain_clashes(spec: AblationSpec) -> None:
    """AblationSpecError where two components set one key to different values: the plain row sets
    every component's values at once, so one would silently win and the other component would not
    be off there. Checked on the values the spec gives, acting here or not: a value the config has
    already still says what "off" means for its component."""
    first: dict[str, tuple[str, Any]] = {}  # key -> (component, value) that set it first
    for c in spec.components:
        for key, value in c.values.items():
            other, before = first.setdefault(key, (c.name, value))
            if not _same(before, value):
                raise AblationSpecError(
                    f"{spec.source}: components {other} and {c.name} both set {key} ({other}: {before!r}, "
                    f"{c.name}: {value!r}), and the {PLAIN} row switches every component off at once: one value "
                    f"would silently win. Give {key} one value in both, set it in one component only, "
                    f"or set plain: false")


def _plain_config(spec: AblationSpec, base: Config, values: dict[str, Any]) -> Config:
    """``base`` with every component's values at once (the plain row), or AblationSpecError naming
    the components whose values the config refuses together."""
    try:
        return apply_values(base, values)
    except ConfigError as exc:
        names = ", ".join(c.name for c in spec.components if set(c.values) & set(values))
        raise AblationSpecError(f"{spec.source}: the {PLAIN} row switches every component off at once, and the "
                                f"config refuses their values together (components {names}): {exc.one_line()}; "
                                f"change those values in {spec.source}, or set plain: false") from exc


@dataclass(frozen=True)
class _Off:
    values: dict[str, Any]
    weights: str
    stages: tuple[int, ...]


def _effective_off(c: Component, source: str, base: Config, flat: dict, stages: tuple[int, ...]) -> tuple[_Off, str]:
    """What switching ``c`` off changes here, or why it changes nothing."""
    where = f"{source}: components.{c.name}"
    values, idle = {}, []
    for key in c.values:
        if key not in flat:
            close = difflib.get_close_matches(key, list(flat), n=1, cutoff=0.6)
            raise AblationSpecError(f"{where}: {key} is not a config key" + (f" (did you mean {close[0]!r}?)" if close else ""))
    # The whole set at once: its values switch the component off together, so each alone may be
    # refused where together they are fine (JPEG quality 96 to 100 where the max is 95), and the
    # reverse (min 90 with max 50).
    try:
        apply_values(base, c.values)
    except ConfigError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in c.values.items())
        verb = "is rejected" if len(c.values) == 1 else "are rejected together"
        raise AblationSpecError(f"{where}.when_off.set {given} {verb} by the config: {exc.one_line()}; change "
                                f"{'this value' if len(c.values) == 1 else 'these values'} in {source}") from exc
    for key, value in c.values.items():
        stage = _stage_of(key)
        if stage is not None and stage not in stages:
            idle.append(f"{key} (Stage {'I' * stage} is not trained)")
        elif _same(flat[key], value):
            idle.append(f"{key} (already {flat[key]!r})")
        elif why := _cannot_act(key, base):
            idle.append(f"{key} ({why})")
        else:
            values[key] = value
    kept = tuple(s for s in (c.stages or stages) if s in stages) or stages
    if kept != stages[:len(kept)]:
        raise AblationSpecError(f"{where}: stages {list(c.stages)} trains Stage II without Stage I, but Stage II "
                                f"always starts from Stage I's weights: it would be the reference again. "
                                f"stages [1] scores Stage I's checkpoint without Stage II")
    if c.stages is not None and kept == stages:
        idle.append(f"stages {list(c.stages)} (the recipe trains {list(stages)})")
    off = _Off(values, c.weights, kept)
    if not values and c.weights == "ema" and kept == stages:
        return off, "changes nothing here: " + "; ".join(idle)
    return off, ""


def _cannot_act(key: str, base: Config) -> str:
    """Why changing ``key`` cannot change the table on ``base`` (a knob that never acts), else ''."""
    if key in NO_AUC_EVAL_KEYS:
        return f"{NO_AUC_EVAL_KEYS[key]}, the number an ablation compares"
    stage = _stage_of(key)
    if stage is None:
        return ""
    sc = base.stage(stage)
    if key.endswith(".balance") and len(sc.domains) == 1:
        return f"one Stage {'I' * stage} domain: balancing domains and classes is balancing classes"
    if key.endswith(".augment.strength") and sc.light_epochs >= sc.epochs:
        return f"strong augmentation never starts: light_epochs {sc.light_epochs} >= epochs {sc.epochs}"
    if key.endswith(".light_epochs") and sc.augment.strength == 0:
        return "at augment.strength 0 the light and strong augmentation are the same"
    return ""


class _Builder:
    """Groups variants into as few trained stages as the table needs: variants with the same
    training values share trials, and Stage II groups whose Stage I values agree share Stage I."""

    def __init__(self, stages: tuple[int, ...]) -> None:
        self.stages = stages
        self.variants: list[Variant] = []
        self._groups: dict[tuple[int, str], TrainingGroup] = {}  # (stage, name) -> group

    def add(self, name: str, description: str, off: _Off) -> None:
        scoring = {k: v for k, v in off.values.items() if k.startswith("eval.") and k not in _TRAINING_EVAL_KEYS}
        training = {k: v for k, v in off.values.items() if k not in scoring}
        stage = off.stages[-1]
        evaluation = Evaluation(name, stage, scoring)
        owner = self._group(stage, name, training if stage == 2 else _stage1_values(training))
        same = next((e for e in owner.evaluations if (e.stage, e.eval_values) == (stage, scoring)), None)
        if same is None:
            self._groups[(stage, owner.name)] = replace(owner, evaluations=owner.evaluations + (evaluation,))
        self.variants.append(Variant(name, description, (same or evaluation).variant, off.weights))

    def _group(self, stage: int, name: str, values: dict) -> TrainingGroup:
        """The group of ``stage`` training ``values`` (new ones are named ``name``), with the Stage I
        group it starts from made first."""
        found = next((g for (s, _), g in self._groups.items() if s == stage and g.values == values), None)
        if found is not None:
            return found
        init = None
        if stage == 2 and 1 in self.stages:
            init = self._group(1, name, _stage1_values(values)).name
        group = TrainingGroup(name, stage, values, (), init)
        self._groups[(stage, name)] = group
        return group

    def groups(self) -> list[TrainingGroup]:
        return sorted(self._groups.values(), key=lambda g: g.stage)


def _stage1_values(values: dict[str, Any]) -> dict[str, Any]:
    """What of ``values`` Stage I trains with: all but the stage2.* keys."""
    return {k: v for k, v in values.items() if not k.startswith("stage2.")}


def plan_leave_one_domain_out(base: Config, stages: tuple[int, ...]) -> AblationPlan:
    """One trained config per Stage II domain, fine-tuned without it and scored on every test
    domain, beside the reference fine-tuned on all. Needs Stage II (``stages`` ends with 2) and
    at least two Stage II domains (``base`` resolved: ``stage2.domains`` listed)."""
    if stages[-1] != 2:
        raise AblationSpecError("leave-one-domain-out leaves a domain out of Stage II: train Stage II "
                                "(--stage both, or --stage 2 with --init)")
    domains = list(base.stage2.domains)
    if len(domains) < 2:
        raise AblationSpecError(f"leave-one-domain-out needs at least 2 Stage II domains; this data has "
                                f"{len(domains)} ({', '.join(domains) or 'none'}): the question 'does it detect a "
                                f"generator it never saw' needs one to train on and one to hold out")
    builder = _Builder(stages)
    builder.add(REFERENCE, "fine-tuned on every Stage II domain", _Off({}, "ema", stages))
    for d in domains:
        builder.add(f"without-{d}", f"Stage II without {d}",
                    _Off({"stage2.domains": [x for x in domains if x != d]}, "ema", stages))
    return AblationPlan("leave-one-domain-out", REFERENCE, stages, builder.variants, builder.groups(), [])


def held_out_domain(variant: str) -> str | None:
    """The domain a leave-one-domain-out row held out (``without-<domain>``), else None."""
    return variant.removeprefix("without-") if variant.startswith("without-") else None


def _stage_of(key: str) -> int | None:
    head = key.split(".", 1)[0]
    return int(head[5:]) if head in ("stage1", "stage2") else None


def _same(current: Any, value: Any) -> bool:
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, (int, float)):
        return float(current) == float(value)
    if isinstance(current, tuple):
        return list(current) == value
    return current == value

"""Hyperparameter search spaces: YAML files keyed by the config's own dotted names.

Usage::

    space = load_search_space("search_spaces/demo.yaml")
    space.check(base_cfg, stages=(1,))         # every key and every range, before any trial starts
    space.suggest(optuna_trial)                # define-by-run: what Optuna samples
    cfg = space.apply(base_cfg, trial_params)  # the trial's config

A file looks like::

    description: what this space is for
    grace_period: 3                              # optional: jobs.tune's --grace-period default
    params:
      stage1.lr:               {loguniform: [1.0e-4, 3.0e-3]}
      stage1.ema_decay:        {decay: [0.99, 0.9999]}   # log-uniform in 1 - decay
      stage1.augment.strength: {uniform: [0.2, 1.0]}
      stage1.mixup_alpha:      {choice: [0.0, 0.2, 0.4]}
      stage1.epochs:           {int: [2, 6]}

``decay`` samples ``1 - value`` log-uniformly, so 0.99 ... 0.9999 is covered evenly per decade
(uniform sampling would put 90% of trials above 0.999). Optuna sees that parameter under the
name ``1-<key>``; ``values()`` turns trial parameters back into config values.

``first_effects()`` says from which epoch each key changes training at all: strong augmentation
starts after ``light_epochs``, and two EMA decays train alike until the decay warm-up passes the
lower one. A scheduler that judges a trial earlier judges the key on epochs where it did nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


from trueface.config.choices import NO_AUC_EVAL_KEYS
from trueface.config.loading import ConfigError, apply_values, flatten, read_yaml_file, to_dict
from trueface.config.schema import Config

FORMS = {
    "uniform": "uniform in [low, high]",
    "loguniform": "log-uniform in [low, high] (both > 0)",
    "int": "integer in [low, high], inclusive",
    "choice": "one of a list of values",
    "decay": "1 - value log-uniform, for EMA decays in (0, 1)",
}


# Keys that define what trials are compared on: a search over them compares unlike scores.
OBJECTIVE_KEYS = {"eval.select_on": "it chooses the validation AUC that is the search's objective",
                  "eval.hflip_tta": "it changes how the validation AUC that is the search's objective is measured"}
# Keys no trial acts on, by exact key or by prefix (ending in "."), with the reason: a search over
# them would compare copies of one trial.
_DATA_ONCE = "the data is checked, normalised and (the embedded set) generated once, before the trials"
_UNSEARCHABLE = {
    "seed": "every trial trains with the search's seed (search seeds by rerunning it with seed=N)",
    "run_name": "the search names its trials", "output.": "the search places its trials' files",
    "data.root": _DATA_ONCE, "data.exclude": _DATA_ONCE, "data.normalize": _DATA_ONCE, "data.synthetic.": _DATA_ONCE,
    "data.test_domains": "test domains are never scored during a search",
    "data.on_bad_image": _DATA_ONCE, "data.min_image_side": _DATA_ONCE, "data.cache_dir": _DATA_ONCE,
    "data.prepared": "the prepared cache holds the same pixels as the files",
    # how a trial runs, not what it trains
    "data.loader_workers": "it sets how many processes read the images, not which or how",
    "runtime.log_every": "it sets how often progress is printed",
    "runtime.keep_freed_memory": "it sets how the process keeps memory",
    "scaling.max_failures": "it sets how often a failed worker group is restarted",
    **NO_AUC_EVAL_KEYS,
}
#: Epoch sizes: ASHA's rungs compare trials epoch by epoch, so an epoch must hold as many images in
#: every trial, or the rung compares budgets, not values.
_EPOCH_SIZE = ("it changes how many images an epoch holds, and ASHA compares trials epoch by epoch: a "
               "rung would compare unequal amounts of training")


def _why_unsearchable(key: str) -> str:
    return next((why for k, why in _UNSEARCHABLE.items() if key == k or (k.endswith(".") and key.startswith(k))), "")


def _why_epoch_size(key: str, cfg: Config) -> str:
    """Why searching ``key`` would make epochs unequal between trials ('' when it would not):
    ``samples_per_epoch`` sets the epoch's size, and ``balance`` does where that is 0 (an epoch is
    then the cells times the median cell, or every image)."""
    stage = _stage_of(key)
    if stage is None:
        return ""
    name = key.split(".", 1)[1]
    if name == "samples_per_epoch":
        return _EPOCH_SIZE
    if name == "balance" and cfg.stage(stage).samples_per_epoch == 0:
        return f"{_EPOCH_SIZE} (with stage{stage}.samples_per_epoch 0, the balancing sets the epoch's size: set it)"
    return ""


class SearchSpaceError(ConfigError):
    """A search space that cannot be searched; the message names the file, key and problem."""


@dataclasses.dataclass(frozen=True)
class Param:
    key: str  # dotted config key
    form: str  # one of FORMS
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()

    @property
    def name(self) -> str:
        """The parameter's name in Optuna and Tune (the value they sample)."""
        return f"1-{self.key}" if self.form == "decay" else self.key

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial (or anything with its ``suggest_*`` methods) for a value."""
        if self.form == "uniform":
            return trial.suggest_float(self.name, self.low, self.high)
        if self.form == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.form == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        if self.form == "decay":
            return trial.suggest_float(self.name, 1 - self.high, 1 - self.low, log=True)
        return trial.suggest_categorical(self.name, list(self.values))

    def value(self, sampled: Any) -> Any:
        """The config value of a sampled parameter."""
        return 1 - float(sampled) if self.form == "decay" else sampled

    def to_sampled(self, value: Any) -> Any:
        """The value Optuna samples (under ``name``) for a config value: ``value``'s inverse."""
        return 1 - float(value) if self.form == "decay" else value

    def distribution(self) -> Any:
        """The Optuna distribution ``suggest`` samples from (to rebuild a study from finished trials)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.form == "choice":
            return CategoricalDistribution(list(self.values))
        if self.form == "int":
            return IntDistribution(int(self.low), int(self.high))
        if self.form == "decay":
            return FloatDistribution(1 - self.high, 1 - self.low, log=True)
        return FloatDistribution(self.low, self.high, log=self.form == "loguniform")

    def extremes(self) -> list[Any]:
        """Config values that span the range: its ends, or every choice (``value_combinations``
        says when their acceptance means every sample's)."""
        if self.form == "choice":
            return list(self.values)
        if self.form == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def int_values(self) -> range:
        """Every value of an ``int`` range, both ends included (value_combinations and jobs.tune's
        batch check try each where the ends do not stand for the values between)."""
        return range(int(self.low), int(self.high) + 1)

    def describe(self) -> str:
        if self.form == "choice":
            return f"{self.key}: choice of {', '.join(map(str, self.values))}"
        note = " (log-uniform in 1 - value)" if self.form == "decay" else ""
        return f"{self.key}: {self.form} {self.low:g} .. {self.high:g}{note}"


@dataclasses.dataclass(frozen=True)
class FirstEffect:
    """Epoch ``epoch`` (1-based) of stage ``stage`` is the first in which two values of ``key``'s
    range train differently; ``epoch`` None: never within the stage. ``why`` says how that was
    worked out (and, for None, what to change)."""

    key: str
    stage: int
    epoch: int | None
    why: str = ""


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = ""
    description: str = ""
    grace_period: int | None = None  # the space's default for jobs.tune --grace-period

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial: Any) -> None:
        """Optuna define-by-run function: samples every parameter, in file order."""
        for param in self.params:
            param.suggest(trial)

    def values(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Trial parameters (Optuna names) -> ``{dotted config key: value}``."""
        missing = [p.name for p in self.params if p.name not in sampled]
        if missing:
            raise SearchSpaceError(f"{self.source}: trial parameters lack {', '.join(missing)}")
        return {p.key: p.value(sampled[p.name]) for p in self.params}

    def apply(self, cfg: Config, sampled: Mapping[str, Any]) -> Config:
        return apply_values(cfg, self.values(sampled))

    def check(self, cfg: Config, stages: Iterable[int]) -> None:
        """Raise SearchSpaceError unless every key exists, fits its type, affects the stages the
        trials train, and every value a trial can draw is one the config accepts, together with the
        other searched keys' values (see ``check_values``)."""
        stages = tuple(stages)
        flat = flatten(to_dict(cfg))
        for p in self.params:
            where = f"{self.source or 'search space'}: {p.key}"
            if p.key not in flat:
                close = difflib.get_close_matches(p.key, list(flat), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SearchSpaceError(f"{where}: not a config key{hint}")
            current = flat[p.key]
            if isinstance(current, (list, tuple, dict)):
                raise SearchSpaceError(f"{where}: is a list in the config; search single values only")
            if isinstance(current, bool) and p.form != "choice":
                raise SearchSpaceError(f"{where}: is true/false; use choice: [true, false]")
            if isinstance(current, int) and not isinstance(current, bool) and p.form in ("uniform", "loguniform", "decay"):
                raise SearchSpaceError(f"{where}: is an integer; use int: [low, high] or choice")
            if p.key in OBJECTIVE_KEYS:
                raise SearchSpaceError(f"{where}: cannot be searched: {OBJECTIVE_KEYS[p.key]}, and trials must "
                                       f"be compared on one measure; set it for the whole search ({p.key}=VALUE)")
            if why := _why_unsearchable(p.key):
                raise SearchSpaceError(f"{where}: cannot be searched: no trial acts on it ({why}); set it for the "
                                       f"whole search ({p.key}=VALUE)")
            if why := _why_epoch_size(p.key, cfg):
                raise SearchSpaceError(f"{where}: cannot be searched: {why}; set it for the whole search "
                                       f"({p.key}=VALUE)")
            if p.key == "model.weights" and stages == (2,):
                raise SearchSpaceError(f"{where}: cannot be searched with --stage 2: no trial acts on it (Stage II "
                                       f"starts from the Stage I checkpoint's weights)")
            if p.key == "model.arch" and stages == (2,):
                raise SearchSpaceError(f"{where}: cannot be searched with --stage 2: every trial starts from the "
                                       f"Stage I checkpoint's weights, which fit its own architecture only (set "
                                       f"model.arch to the checkpoint's, or search it with --stage both)")
            stage = _stage_of(p.key)
            if stage is not None and stage not in stages:
                trains = " and ".join(f"Stage {'I' * s}" for s in stages)
                raise SearchSpaceError(
                    f"{where}: has no effect, the trials train {trains} only; "
                    f"remove it or choose --stage {'both' if len(stages) == 1 and stage == 2 else stage}")

        self.check_values(cfg)

    def check_values(self, cfg: Config) -> None:
        """Raise SearchSpaceError where the config refuses values a trial can draw: one key's, or
        several keys' together (``stage1.lr`` 1e-4 with ``stage1.final_lr`` 1e-3; the JPEG quality's
        min above its max), each accepted alone. Checked on ``value_combinations``; the message names
        the keys whose values clash (those a change of which to another of their ends lets the
        combination pass) and what to change in the space file."""
        for values in value_combinations(self.params):
            if (problem := _refusal(cfg, values)) is None:
                continue
            clash = self._clashing(cfg, values)
            file = self.source or "the search space file"
            if len(clash) == 1:
                ((key, value),) = clash.items()
                raise SearchSpaceError(f"{file}: {key}: value {value!r} of its range is rejected by the config: "
                                       f"{problem}; narrow {key}'s range in {file}, or list values that work "
                                       f"with choice: [...]")
            named = " with ".join(f"{k}={v!r}" for k, v in clash.items())
            keys = ", ".join(list(clash)[:-1]) + f" and {list(clash)[-1]}"
            raise SearchSpaceError(
                f"{file}: {named} is rejected by the config: {problem}. A trial can draw these values together: "
                f"narrow the ranges of {keys} in {file} so that no combination of them is refused, or search "
                f"one of them and set the others for the whole search (KEY=VALUE)")

    def _clashing(self, cfg: Config, values: dict[str, Any]) -> dict[str, Any]:
        """The keys of the refused ``values`` that take part: those for which another value of their
        own range makes the combination pass. All of ``values`` where no single change does (two
        refusals at once)."""
        ends = {p.key: p.extremes() for p in self.params}
        taking_part = {k: v for k, v in values.items()
                       if any(_refusal(cfg, {**values, k: other}) is None for other in ends.get(k, ()) if other != v)}
        return taking_part or values

    def first_effects(self, cfg: Config, stages: Sequence[int], steps_per_epoch: Mapping[int, int]) -> list[FirstEffect]:
        """For each key, the first epoch (of its stage) in which its values train differently:
        ``stageN.augment.*`` from epoch ``light_epochs + 1`` (light augmentation before); an EMA
        decay from the epoch where the decay warm-up passes the range's low end (the step count
        restarts each stage; ``steps_per_epoch`` maps a stage to its optimizer steps per epoch);
        ``stageN.light_epochs`` from epoch low + 1; ``stageN.epochs`` and ``stageN.final_lr`` from
        the epoch of the first step after the LR warm-up; ``stageN.patience`` from the epoch after
        its lowest value above 0 can first have stopped a trial; every other key from epoch 1 of its
        stage, or of the trial's first stage for keys outside ``stageN.*``. Where a searched key moves
        ``light_epochs`` or ``epochs``, the latest start and the longest stage count."""
        return [self._first_effect(p, cfg, tuple(stages), steps_per_epoch) for p in self.params]

    def _first_effect(self, p: Param, cfg: Config, stages: tuple[int, ...], steps_per_epoch: Mapping[int, int]) -> FirstEffect:
        stage = _stage_of(p.key) or stages[0]
        key = f"stage{stage}"
        st = cfg.stage(stage)
        epochs = int(self._most(f"{key}.epochs", st.epochs))
        name = f"Stage {'I' * stage}"
        if p.key.startswith(f"{key}.augment."):
            light = int(self._most(f"{key}.light_epochs", st.light_epochs))
            why = f"strong augmentation starts after {key}.light_epochs = {light}"
            if light >= epochs:
                return FirstEffect(p.key, stage, None, f"{why}, and {name} trains {epochs} epochs: lower "
                                                       f"{key}.light_epochs or raise {key}.epochs")
            return FirstEffect(p.key, stage, light + 1, why)
        if p.key == f"{key}.light_epochs":
            first = int(min(p.extremes())) + 1
            return _within_stage(p.key, stage, first, epochs, "light augmentation ends after the lowest value")
        if p.key == f"{key}.ema_decay" and self._may_be(f"{key}.ema_warmup", st.ema_warmup, True):
            return _decay_effect(p, stage, epochs, int(steps_per_epoch[stage]))
        if p.key == f"{key}.patience":
            return _patience_effect(p, stage, epochs, self._most(f"{key}.warmup_epochs", st.warmup_epochs),
                                    int(steps_per_epoch[stage]))
        if p.key in (f"{key}.epochs", f"{key}.final_lr"):
            # the cosine starts at the warm-up's end at the base LR, whatever its length and floor
            # (trueface.schedule.lr_at): the first step that differs is the one after the warm-up
            spe = int(steps_per_epoch[stage])
            warmup = round(float(self._most(f"{key}.warmup_epochs", st.warmup_epochs)) * spe)
            first = (warmup + 1) // spe + 1
            return _within_stage(p.key, stage, first, epochs,
                                 f"the LR schedule is the same for every value until {warmup} warm-up steps are over")
        return FirstEffect(p.key, stage, 1)

    def _most(self, key: str, default: Any) -> Any:
        """The largest value ``key`` takes in the trials: its range's top if searched, else ``default``."""
        param = next((p for p in self.params if p.key == key), None)
        return max(param.extremes()) if param is not None else default

    def _may_be(self, key: str, default: Any, value: Any) -> bool:
        """Whether some trial has ``key`` == ``value`` (its range holds it, or ``default`` is it)."""
        param = next((p for p in self.params if p.key == key), None)
        return value in param.extremes() if param is not None else default == value

    def to_dict(self) -> dict:
        out = {"description": self.description, "params": {p.key: _param_spec(p) for p in self.params}}
        return {**out, "grace_period": self.grace_period} if self.grace_period is not None else out

    def describe(self) -> str:
        return "\n".join(f"  {p.describe()}" for p in self.params)


#: The most combinations of range ends ``value_combinations`` gives as a full product: 10 ranges,
#: at a few milliseconds each on a slow core. Past it, each three keys' combinations (see there).
MAX_COMBINATIONS = 1024
#: Int ranges up to this many values are checked at every value, not only at their ends.
MAX_INT_VALUES = 64


def value_combinations(params: Sequence[Param]) -> Iterable[dict[str, Any]]:
    """The values of the searched keys whose acceptance by the config means every trial's is.

    Every combination of the keys' ``extremes()`` (range ends, every choice). The config's rules
    that tie keys together are monotone: ``final_lr <= lr``, ``jpeg_quality_min <= max``, and
    rules refusing a flag or a count above 1 beside another setting (``scaling.sync_batchnorm`` with
    ``runtime.compile``; ``scaling.gpus_per_worker`` below 1 with ``scaling.num_workers`` above 1).
    Such a rule holds on a box of values wherever it holds at the box's corners, so the corners
    suffice. Past MAX_COMBINATIONS, the combinations of every three keys stand in for the full
    product, the other keys at their low ends (a trial's values, never the config's, which the
    range may not hold): no rule ties more than three keys (``sync_batchnorm``, ``num_workers``
    and ``use_gpu`` or ``runtime.device`` do).

    Where the corners do not suffice: a rule on one key that is not monotone (``blur_kernel``
    must be odd) is met by checking every value of short int ranges, beside the other keys' low
    ends; and the workers' share of a batch (divisible by workers x accum_steps), which is no rule
    of the config, is checked by jobs.tune on every value of those int ranges."""
    per_key = [[(p.key, v) for v in p.extremes()] for p in params]
    width = len(per_key) if math.prod(map(len, per_key)) <= MAX_COMBINATIONS else min(3, len(per_key))
    lows = {p.key: p.extremes()[0] for p in params}
    for group in itertools.combinations(per_key, width):
        for combination in itertools.product(*group):
            yield {**lows, **dict(combination)}
    for p in params:
        if p.form == "int" and p.high - p.low < MAX_INT_VALUES:
            for inside in p.int_values()[1:-1]:
                yield {**lows, p.key: inside}


def _refusal(cfg: Config, values: Mapping[str, Any]) -> str | None:
    """The config's message refusing ``values`` on ``cfg``, None where it accepts them."""
    try:
        apply_values(cfg, values)
    except ConfigError as exc:
        return exc.one_line()
    return None


def _within_stage(key: str, stage: int, first: int, epochs: int, why: str) -> FirstEffect:
    """``key`` first acts in epoch ``first`` of ``stage``, or never where that is past its ``epochs``."""
    if first <= epochs:
        return FirstEffect(key, stage, first, why)
    return FirstEffect(key, stage, None, f"{why}, after Stage {'I' * stage}'s {epochs} epochs")


def _patience_effect(p: Param, stage: int, epochs: int, warmup_epochs: float, steps_per_epoch: int) -> FirstEffect:
    """Patience only ends trials: every value trains and reports alike until the smallest one above
    0 (0: never stop) can first have stopped a trial, and differs from the epoch after. Epoch 1 is
    always an improvement and epochs inside the LR warm-up never count (trueface.train.Progress)."""
    positive = ([int(v) for v in p.values if int(v) > 0] if p.form == "choice"
                else [max(int(p.low), 1)] if p.high >= 1 else [])
    if not positive:
        return FirstEffect(p.key, stage, None, "patience 0 never stops a trial early; search values above 0")
    spe = max(1, steps_per_epoch)
    in_warmup = round(float(warmup_epochs) * spe) // spe  # epochs that end inside the LR warm-up
    lowest = min(positive)
    stop = max(1, in_warmup) + lowest
    return _within_stage(p.key, stage, stop + 1, epochs,
                         f"patience {lowest} can stop a trial after epoch {stop} at the earliest (epoch 1 always "
                         f"improves, and the {in_warmup} warm-up epoch(s) never count)")


def warmup_decay(step: int) -> float:
    """The EMA decay warm-up's ceiling after ``step`` optimizer steps (trueface.ema.ema_decay_at)."""
    return (1 + step) / (10 + step)


def first_step_above(decay: float) -> int:
    """The first optimizer step (1-based) at which the warm-up ceiling exceeds ``decay``: from there
    on ``decay`` and any larger one give different averages; before it both are the ceiling."""
    step = max(1, math.floor((10 * decay - 1) / (1 - decay)) + 1)
    while step > 1 and warmup_decay(step - 1) > decay:  # float rounding in the closed form
        step -= 1
    while warmup_decay(step) <= decay:
        step += 1
    return step


def _decay_text(decay: float) -> str:
    """A decay with 3 significant digits of 1 - decay: 0.735, 0.999647 (not 1)."""
    places = max(3, 2 - math.floor(math.log10(1 - decay))) if decay < 1 else 3
    return f"{decay:.{places}f}".rstrip("0").rstrip(".")


def _decay_effect(p: Param, stage: int, epochs: int, steps_per_epoch: int) -> FirstEffect:
    low, high = min(p.extremes()), max(p.extremes())
    steps = max(1, steps_per_epoch)
    first = first_step_above(low)
    epoch = (first - 1) // steps + 1
    total = epochs * steps
    why = f"decays from {low:g} up differ from step {first}, ~{steps} steps/epoch"
    if epoch > epochs:
        return FirstEffect(p.key, stage, None,
                           f"{why}, and Stage {'I' * stage} has ~{total} steps: the decay warm-up "
                           f"min(decay, (1 + step) / (10 + step)) reaches only {_decay_text(warmup_decay(total))}, so "
                           f"every value trains alike; search decays below {_decay_text(warmup_decay(total))} or train "
                           f"more steps")
    top = first_step_above(high) if high < 1 else None
    if top is not None and top <= total:
        why += f"; the warm-up passes the top, {high:g}, at step {top} (epoch {(top - 1) // steps + 1})"
    else:
        why += f"; it never reaches the top, {high:g}: decays above {_decay_text(warmup_decay(total))} train alike"
    return FirstEffect(p.key, stage, epoch, why)


def _stage_of(key: str) -> int | None:
    head = key.split(".", 1)[0]
    return {"stage1": 1, "stage2": 2}.get(head)


def _param_spec(p: Param) -> dict:
    return {p.form: list(p.values)} if p.form == "choice" else {p.form: [p.low, p.high]}


def load_search_space(path: str | Path) -> SearchSpace:
    return parse_search_space(read_yaml_file(path, SearchSpaceError, "search space"), str(path))


def parse_search_space(data: Any, source: str = "search space") -> SearchSpace:
    if not isinstance(data, dict):
        raise SearchSpaceError(f"{source}: expected a mapping with 'params:', got {type(data).__name__}")
    unknown = set(data) - {"description", "params", "grace_period"}
    if unknown:
        raise SearchSpaceError(f"{source}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                               f"a search space has 'description', 'params' and optionally 'grace_period'")
    grace = data.get("grace_period")
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 1):
        raise SearchSpaceError(f"{source}: grace_period must be a whole number of epochs >= 1, got {grace!r}")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise SearchSpaceError(f"{source}: 'params' must map dotted config keys to ranges, e.g. "
                               f"stage1.lr: {{loguniform: [1.0e-4, 1.0e-2]}}")
    return SearchSpace(tuple(_parse_param(str(k), v, source) for k, v in params.items()), source,
                       str(data.get("description") or ""), grace)


def _parse_param(key: str, spec: Any, source: str) -> Param:
    where = f"{source}: {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SearchSpaceError(f"{where}: expected one form as {{form: range}}, e.g. {{uniform: [0.1, 0.5]}}; "
                               f"forms: {', '.join(FORMS)}")
    (form, arg), = spec.items()
    if form not in FORMS:
        close = difflib.get_close_matches(str(form), list(FORMS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SearchSpaceError(f"{where}: unknown form {form!r}{hint}; forms: "
                               + "; ".join(f"{k} = {v}" for k, v in FORMS.items()))
    if form == "choice":
        if not isinstance(arg, list) or not arg:
            raise SearchSpaceError(f"{where}: choice needs a non-empty list of values")
        if len({repr(v) for v in arg}) != len(arg):
            raise SearchSpaceError(f"{where}: choice lists a value twice")
        return Param(key, form, values=tuple(arg))
    if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg)):
        raise SearchSpaceError(f"{where}: {form} needs [low, high] numbers, got {arg!r}")
    low, high = (float(v) for v in arg)
    if not low < high:
        raise SearchSpaceError(f"{where}: low {low:g} must be below high {high:g}")
    if form == "int" and not all(float(v).is_integer() for v in arg):
        raise SearchSpaceError(f"{where}: int needs integer bounds, got {arg!r}")
    if form == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}: loguniform needs low > 0, got {low:g}")
    if form == "decay" and not (0 < low and high < 1):
        raise SearchSpaceError(f"{where}: decay needs 0 < low < high < 1 (e.g. [0.99, 0.9999]), got {arg!r}")
    return Param(key, form, low, high)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, (int, float)) and math.isfinite(value)

"""Hyperparameter search spaces: YAML files keyed by the config's own dotted names.

Usage::

    space = load_search_space("search_spaces/demo.yaml")
    space.check(base_cfg, stages=(1,))         # every key and every range, before any trial starts
    space.suggest(optuna_trial)                # define-by-run: what Optuna samples
    cfg = space.apply(base_cfg, trial_params)  # the trial's config

A file looks like::

    description: what this space is for
    params:
      stage1.lr:               {loguniform: [1.0e-4, 3.0e-3]}
      stage1.ema_decay:        {decay: [0.99, 0.9999]}   # log-uniform in 1 - decay
      stage1.augment.strength: {uniform: [0.2, 1.0]}
      stage1.mixup_alpha:      {choice: [0.0, 0.2, 0.4]}
      stage1.epochs:           {int: [2, 6]}

``decay`` samples ``1 - value`` log-uniformly, so 0.99 ... 0.9999 is covered evenly per decade
(uniform sampling would put 90% of trials above 0.999). Optuna sees that parameter under the
name ``1-<key>``; ``values()`` turns trial parameters back into config values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from trueface.config.loading import ConfigError, apply_values, flatten, to_dict
from trueface.config.schema import Config

FORMS = {
    "uniform": "uniform in [low, high]",
    "loguniform": "log-uniform in [low, high] (both > 0)",
    "int": "integer in [low, high], inclusive",
    "choice": "one of a list of values",
    "decay": "1 - value log-uniform, for EMA decays in (0, 1)",
}


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

    def extremes(self) -> list[Any]:
        """Config values that span the range: if these validate, every sample does."""
        if self.form == "choice":
            return list(self.values)
        if self.form == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        if self.form == "choice":
            return f"{self.key}: choice of {', '.join(map(str, self.values))}"
        note = " (log-uniform in 1 - value)" if self.form == "decay" else ""
        return f"{self.key}: {self.form} {self.low:g} .. {self.high:g}{note}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = ""
    description: str = ""

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
        trials train, and every value of its range is one the config accepts."""
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
            stage = _stage_of(p.key)
            if stage is not None and stage not in stages:
                trains = " and ".join(f"Stage {'I' * s}" for s in stages)
                raise SearchSpaceError(
                    f"{where}: has no effect, the trials train {trains} only; "
                    f"remove it or choose --stage {'both' if len(stages) == 1 and stage == 2 else stage}")
            for value in p.extremes():
                try:
                    apply_values(cfg, {p.key: value})
                except ConfigError as exc:
                    raise SearchSpaceError(f"{where}: value {value!r} of its range is rejected by the config: {exc}") from exc

    def to_dict(self) -> dict:
        return {"description": self.description, "params": {p.key: _param_spec(p) for p in self.params}}

    def describe(self) -> str:
        return "\n".join(f"  {p.describe()}" for p in self.params)


def _stage_of(key: str) -> int | None:
    head = key.split(".", 1)[0]
    return {"stage1": 1, "stage2": 2}.get(head)


def _param_spec(p: Param) -> dict:
    return {p.form: list(p.values)} if p.form == "choice" else {p.form: [p.low, p.high]}


def load_search_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"{path}: not valid YAML: {exc}") from exc
    return parse_search_space(data, str(path))


def parse_search_space(data: Any, source: str = "search space") -> SearchSpace:
    if not isinstance(data, dict):
        raise SearchSpaceError(f"{source}: expected a mapping with 'params:', got {type(data).__name__}")
    unknown = set(data) - {"description", "params"}
    if unknown:
        raise SearchSpaceError(f"{source}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                               f"a search space has 'description' and 'params'")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise SearchSpaceError(f"{source}: 'params' must map dotted config keys to ranges, e.g. "
                               f"stage1.lr: {{loguniform: [1.0e-4, 1.0e-2]}}")
    return SearchSpace(tuple(_parse_param(str(k), v, source) for k, v in params.items()), source,
                       str(data.get("description") or ""))


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

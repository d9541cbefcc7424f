"""Strict loading of configs: presets, YAML files, dotted ``key=value`` overrides.

Usage: ``cfg = load_config("demo", ["stage2.mixup_alpha=0.3", "stage1.epochs=2"])``

Every mistake is a ``ConfigError`` that names the dotted key and what is wrong, raised before any
cluster work starts: an unknown key (with the closest valid one suggested), a wrong type, a value
out of range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from trueface.config.choices import AUGMENT_DEVICES, MODEL_ARCHS, ON_BAD_IMAGE, PREPARED, SELECT_MODES, THRESHOLD_SCOPES, parse_normalize, validate_threshold_policy
from trueface.config.schema import Config

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key (or file) and the problem."""

    def one_line(self) -> str:
        """The message on one line, "; " between its problems ("invalid config: KEY: problem; KEY:
        problem"), for a message that quotes it."""
        first, *rest = [line.strip() for line in str(self).splitlines() if line.strip()] or [""]
        return " ".join([first, "; ".join(rest)]).strip()


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping that names one key twice (YAML forbids it; PyYAML would keep the last silently)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: PyYAML keeps the last one
    without a word, so a second ``stage1:`` would silently drop every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` is meant to be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise _DuplicateKeyError(f"key {key!r} given twice (lines {first_line[key]} and {line}): "
                                             "only the last would count; merge them into one")
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, error: type[ConfigError], what: str) -> typing.Any:
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not a YAML text file (a checkpoint or other binary file?): "
                    f"give the path of a YAML {what}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc


def read_yaml_file(path: str | Path, error: type[ConfigError], what: str) -> typing.Any:
    """The content of the YAML file ``path`` (a search space, an ablation spec, ...); ``error``
    names the file and what is wrong when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    return _read_yaml(path, error, what)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(source: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve a preset name or YAML file (``None`` = the paper defaults), then apply overrides."""
    files = _layer_files(source, seen=()) if source is not None else []
    layers = [layer for _, layer in files] + [parse_overrides(overrides)]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer)
    try:
        cfg = from_dict(merged)
    except _YesNoError as exc:  # the hint quotes what the user wrote (on, yes, no...), not YAML's reading of it
        written = _written_override(exc.key, overrides) or _written_in_files(exc.key, [path for path, _ in files])
        raise ConfigError(_yes_no_message(exc.key, exc.value, written)) from None
    validate(cfg)
    _check_folders(cfg)
    return cfg


def _check_folders(cfg: Config) -> None:
    """Where a job writes, refused empty (an unset variable): the files would land in the current
    folder. Checked where a job's config is loaded, not in validate(): a checkpoint saved with an
    empty one is still scored."""
    empty = [key for key, value in (("output.runs_dir", cfg.output.runs_dir), ("output.results_dir",
             cfg.output.results_dir), ("data.cache_dir", cfg.data.cache_dir)) if not str(value).strip()]
    if empty:
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{key}: must be a folder or URI, not empty (an unset "
                                                              "variable?)" for key in empty))


def _layer_files(source: str | Path, seen: tuple[str, ...], named_by: Path | None = None) -> list[tuple[Path, dict]]:
    """The chain of YAML files (and their mappings) a source stands for, base first (``base:`` names its parent)."""
    path = _resolve_source(source, named_by)
    if str(path.resolve()) in seen:  # resolved: ./a.yaml and ../dir/a.yaml are one file
        raise ConfigError(f"{path}: 'base' chain loops back on itself: {' -> '.join(seen)}")
    data = _read_yaml(path, ConfigError, "config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base must be one config name or path, got {base!r}; "
                          "write e.g. base: demo or base: ../mine.yaml")
    parents = _layer_files(base, seen + (str(path.resolve()),), path) if base else []
    return parents + [(path, data)]


def _resolve_source(source: str | Path, named_by: Path | None = None) -> Path:
    """A YAML file or a preset's. A relative ``base:`` is looked up next to the file that names it
    first, so a config and its base can be moved together, then from the current folder."""
    path = Path(source)
    if named_by is not None and not path.is_absolute() and (named_by.parent / path).is_file():
        return named_by.parent / path
    if path.is_file():
        return path
    origin = f"{named_by}: base: " if named_by is not None else ""
    if path.suffix in (".yaml", ".yml"):
        where = f", neither next to {named_by} nor in the current folder" if named_by and not path.is_absolute() else ""
        raise ConfigError(f"{origin}config file {path} does not exist{where}")
    # not a file (a folder named like a preset, say): the preset of that name
    preset = PRESETS_DIR / f"{source}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"{origin}unknown config {source!r}: neither a YAML file nor a preset "
            f"(presets: {', '.join(preset_names())})"
        )
    return preset


def apply_values(cfg: Config, values: typing.Mapping[str, Any]) -> Config:
    """``cfg`` with ``{"stage1.lr": 0.01, ...}`` applied (typed values, not YAML text), validated."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    new = from_dict(tree, default=cfg)
    validate(new)
    return new


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """``["a.b=1", "a.c=[x, y]"]`` -> ``{"a": {"b": 1, "c": ["x", "y"]}}``; values are YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        if not raw.strip():
            # `data.root=$DATA` with $DATA unset: an empty value would mean the default (for data.root
            # the embedded synthetic set) without a word. The one text key where empty means something
            # is data.root, and there it can be asked for on purpose: data.root="" (quoted).
            raise ConfigError(f"override {key}: the value is empty (an unset variable?); give a value, or leave "
                              f"the override out to keep the config's (to set it empty on purpose, quote it: {key}=\"\")")
        try:
            value = yaml.load(raw, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} was already given a plain value")
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(data: dict, default: Any = None, prefix: str = "") -> Any:
    """Update the dataclass instance ``default`` (``Config()`` when None) from a partial mapping.

    Missing keys keep the default's values, so a partial ``stage2:`` mapping keeps Stage II's own
    defaults rather than the generic StageConfig ones."""
    default = Config() if default is None else default
    cls = type(default)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), [prefix + n for n in names]))
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, getattr(default, name))
    try:
        return dataclasses.replace(default, **kwargs)
    except ValueError as exc:  # a dataclass that checks its own values (e.g. SyntheticSpec)
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; valid keys here: {', '.join(valid)}"


# Text keys whose values include true and false: YAML's bool is read back as that text.
_TRUE_FALSE_TEXT = frozenset({"scaling.use_gpu"})


def _coerce(value: Any, hint: Any, key: str, default: Any) -> Any:
    """Check ``value`` against the field's type; the only conversions are lossless ones."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} keys, got {value!r}")
        return from_dict(value, default, key + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string, so numeric strings are accepted for floats.
        number = _as_float(value)
        if number is not None:
            # inf and nan pass every range check (nan compares false) and fail later, in a worker
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            if key in _TRUE_FALSE_TEXT:  # YAML reads scaling.use_gpu=true as a bool; the field says "true"
                return "true" if value else "false"
            raise _YesNoError(key, value)
    elif typing.get_origin(hint) is tuple:
        return _coerce_tuple(value, typing.get_args(hint), key)
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


class _YesNoError(ConfigError):
    """A text key given an unquoted yes/no word; load_config finds the word the user wrote for its hint."""

    def __init__(self, key: str, value: bool) -> None:
        super().__init__(_yes_no_message(key, value, None))
        self.key, self.value = key, value


def _yes_no_message(key: str, value: bool, written: str | None) -> str:
    # YAML reads several words as each bool (on, yes, true...): quote the one the user wrote where it
    # is known, else YAML's own spelling of the value
    word = written if written is not None else str(value).lower()
    leaf = key.rpartition(".")[2]
    where = (f"e.g. {leaf}: '{word}' in a file or \"{key}='{word}'\" on a command line" if "[" not in key
             else f"e.g. '{word}'")
    return (f"{key}: expected text, got a yes/no value ({str(value).lower()}): YAML reads an unquoted "
            f"true/false/yes/no/on/off as one; quote the text, {where}")


def _written_override(key: str, overrides: typing.Sequence[str]) -> str | None:
    """The text after ``key=`` in the last override that sets ``key`` (the one that wins)."""
    for item in reversed(overrides):
        name, _, raw = item.partition("=")
        if name.strip() == key:
            return raw.strip()
    return None


def _written_in_files(key: str, files: list[Path]) -> str | None:
    """The plain scalar ``key`` (``a.b`` or ``a.b[2]``) is written as in the last of ``files`` that sets it."""
    parts = [int(p) if p.isdigit() else p for p in key.replace("[", ".").replace("]", "").split(".")]
    for path in reversed(files):
        node = yaml.compose(path.read_text(), Loader=_StrictLoader)  # nodes only: nothing is constructed
        for part in parts:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
            else:
                node = None
            if node is None:
                break
        if isinstance(node, yaml.ScalarNode):
            return node.value
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    # Python's float() also reads "1_0" and non-ASCII digits; inf and nan are refused by the caller
    if isinstance(value, str) and value.isascii() and "_" not in value:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]", None) for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}")
    return tuple(_coerce(v, t, f"{key}[{i}]", None) for i, (v, t) in enumerate(zip(value, args)))


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def to_dict(cfg: Any) -> dict:
    """Plain mapping (tuples as lists) that ``from_dict`` turns back into an equal config."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg_dict: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys search spaces and overrides use."""
    out: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Range checks: what a value may be beyond its type. Tune's search spaces reuse validate().

_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "balance": ("none", "class", "domain_class"),
    "augment_device": AUGMENT_DEVICES,
}


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first key whose value the pipeline could not use."""
    errors: list[str] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(f"{key}: {message}")

    check(is_run_name(cfg.run_name), "run_name", f"{cfg.run_name!r} must be a non-empty name of letters, digits, '-', '_', '.', '=', ','")
    # numpy's SeedSequence takes non-negative seeds only, and fails in the worker that seeds first
    check(cfg.seed >= 0, "seed", "must be >= 0")
    for number in (1, 2):
        _validate_stage(cfg.stage(number), f"stage{number}", check)
    check(cfg.model.arch in MODEL_ARCHS, "model.arch", f"{cfg.model.arch!r} must be one of {', '.join(MODEL_ARCHS)}")
    check(0.0 <= cfg.model.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    check(cfg.model.num_classes == 2, "model.num_classes", "must be 2 (real, fake)")
    check(bool(cfg.model.weights), "model.weights", "must be imagenet, none or a file path")
    check(cfg.data.loader_workers >= 0, "data.loader_workers", "must be >= 0")
    check(cfg.data.prepared in PREPARED, "data.prepared",
          f"{cfg.data.prepared!r} must be none (decode the files each epoch) or uint8 (decode once into the "
          "prepared cache under data.cache_dir)")
    check(cfg.data.on_bad_image in ON_BAD_IMAGE, "data.on_bad_image",
          f"{cfg.data.on_bad_image!r} must be error (stop before training) or skip (leave bad files out, listed)")
    check(cfg.data.min_image_side >= 1, "data.min_image_side", "must be >= 1")
    _check_no_repeats(cfg.data.test_domains, "data.test_domains", check)
    try:
        parse_normalize(cfg.data.normalize)
    except ValueError as exc:
        errors.append(f"data.normalize: {exc}")
    syn = cfg.data.synthetic
    check(syn.image_size >= 16, "data.synthetic.image_size", "must be >= 16")
    check(syn.seed >= 0, "data.synthetic.seed", "must be >= 0")
    check(syn.artefact_strength >= 0, "data.synthetic.artefact_strength", "must be >= 0")
    for split in ("train", "valid", "test"):
        check(getattr(syn, f"{split}_per_class") >= 1, f"data.synthetic.{split}_per_class", "must be >= 1")
    check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    try:
        validate_threshold_policy(cfg.eval.threshold_policy)
    except ValueError as exc:
        errors.append(f"eval.threshold_policy: {exc}")
    check(cfg.eval.threshold_scope in THRESHOLD_SCOPES, "eval.threshold_scope",
          f"{cfg.eval.threshold_scope!r} must be pooled (one threshold for all domains) or per_domain (each domain its own)")
    check(cfg.eval.select_on in SELECT_MODES, "eval.select_on", f"must be one of {', '.join(SELECT_MODES)}")
    sc = cfg.scaling
    check(sc.num_workers >= 1, "scaling.num_workers", "must be >= 1")
    check(sc.use_gpu in ("auto", "true", "false"), "scaling.use_gpu", "must be auto, true or false")
    check(sc.cpus_per_worker >= 1, "scaling.cpus_per_worker", "must be >= 1")
    check(0 < sc.gpus_per_worker <= 1, "scaling.gpus_per_worker",
          "must be > 0 and at most 1: a worker trains on one GPU (DDP runs a process a GPU); "
          "scaling.num_workers sets how many GPUs a run uses")
    # Ray may put two fractional workers of one group on the same GPU, and NCCL refuses two ranks
    # on one device. Fractions are for one-worker trials sharing a GPU (jobs.tune --gpus-per-worker).
    check(sc.num_workers == 1 or sc.gpus_per_worker == 1 or sc.use_gpu == "false", "scaling.gpus_per_worker",
          f"must be 1 with scaling.num_workers={sc.num_workers}: Ray may place two workers with a fraction of "
          "a GPU each on the same GPU, and NCCL refuses two ranks on one device; fractions suit one-worker "
          "trials sharing a GPU")
    # dynamo graph-breaks at every SyncBatchNorm (pytorch/pytorch#161302, open), 53 of them in
    # ResNet-50, and DDP with SyncBatchNorm has failed to compile (pytorch/pytorch#107372, open)
    check(not (sc.sync_batchnorm and cfg.runtime.compile), "scaling.sync_batchnorm",
          "cannot be combined with runtime.compile=true: torch.compile breaks its graph at every SyncBatchNorm "
          "(pytorch/pytorch#161302), 53 times in ResNet-50, which leaves compiling little to fuse; set one of them false")
    # The next two fail in every Ray worker otherwise (jobs.ray_train, trueface.train); checked here
    # only where the answer is certain: use_gpu=auto depends on the cluster the job runs on.
    check(not (cfg.runtime.device == "cuda" and sc.use_gpu == "false"), "runtime.device",
          "is cuda, but scaling.use_gpu=false gives the workers no GPU: set scaling.use_gpu=true (or auto), "
          "or runtime.device=auto or cpu")
    check(not (sc.sync_batchnorm and sc.num_workers > 1 and (sc.use_gpu == "false" or cfg.runtime.device == "cpu")),
          "scaling.sync_batchnorm", "needs GPUs: torch's SyncBatchNorm runs on CUDA only, and scaling.use_gpu=false "
          "or runtime.device=cpu trains on the CPU; set scaling.sync_batchnorm=false")
    check(sc.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "scaling.placement_strategy", "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    check(sc.max_failures >= -1, "scaling.max_failures", "must be >= -1 (-1 = retry forever)")
    check(cfg.runtime.device in ("auto", "cpu", "cuda"), "runtime.device", "must be auto, cpu or cuda")
    check(cfg.runtime.precision in ("auto", "bf16", "fp16", "fp32"), "runtime.precision", "must be auto, bf16, fp16 or fp32")
    check(cfg.runtime.log_every >= 1, "runtime.log_every", "must be >= 1")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _validate_stage(st, key: str, check) -> None:
    check(st.image_size >= 16, f"{key}.image_size", "must be >= 16")
    check(st.epochs >= 1, f"{key}.epochs", "must be >= 1")
    check(st.patience >= 0, f"{key}.patience", "must be >= 0 (0 = no early stopping)")
    check(st.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
    check(st.accum_steps >= 1, f"{key}.accum_steps", "must be >= 1")
    check(st.optimizer in _CHOICES["optimizer"], f"{key}.optimizer", f"must be one of {_CHOICES['optimizer']}")
    check(st.lr > 0 and math.isfinite(st.lr), f"{key}.lr", "must be > 0")
    # both keys and values: lowering lr alone (a key the user set) would otherwise blame final_lr (one they did not)
    check(0 <= st.final_lr <= st.lr, f"{key}.final_lr",
          f"{st.final_lr:g} must be in [0, {key}.lr] = [0, {st.lr:g}] (the cosine ends at final_lr): lower "
          f"{key}.final_lr or raise {key}.lr")
    check(0 <= st.momentum < 1, f"{key}.momentum", "must be in [0, 1)")
    check(st.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
    check(st.warmup_epochs >= 0, f"{key}.warmup_epochs", "must be >= 0")
    # Longer than the stage, the warm-up never reaches lr (nor the cosine final_lr), and its epochs never
    # count towards early stopping. Equal is allowed: a one-epoch look at the demo (warm-up 1) trains all
    # warm-up, on purpose, and the plan says so.
    check(st.warmup_epochs <= st.epochs, f"{key}.warmup_epochs",
          f"{st.warmup_epochs:g} is longer than {key}.epochs={st.epochs}: the LR would still be climbing when the "
          f"stage ends (never reaching {key}.lr, nor its cosine to final_lr) and no epoch would count towards "
          f"early stopping; lower {key}.warmup_epochs or raise {key}.epochs")
    check(st.light_epochs >= 0, f"{key}.light_epochs", "must be >= 0")
    check(0 <= st.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)")
    check(0 <= st.ema_decay < 1, f"{key}.ema_decay", "must be in [0, 1)")
    check(st.mixup_alpha >= 0, f"{key}.mixup_alpha", "must be >= 0 (0 = off)")
    check(st.balance in _CHOICES["balance"], f"{key}.balance", f"must be one of {_CHOICES['balance']}")
    check(st.samples_per_epoch >= 0, f"{key}.samples_per_epoch", "must be >= 0 (0 = automatic)")
    _check_no_repeats(st.domains, f"{key}.domains", check)
    _validate_augment(st.augment, f"{key}.augment", check)


def _check_no_repeats(domains: tuple[str, ...], key: str, check) -> None:
    """A domain listed twice would train (and count in mean_domain) twice, or be scored twice."""
    twice = repeated(domains)
    check(not twice, key, f"lists {', '.join(twice)} more than once; name each domain once")


def repeated(values: typing.Sequence[str]) -> list[str]:
    """The values listed more than once, sorted."""
    return sorted({v for v in values if values.count(v) > 1})


def _validate_augment(aug, key: str, check) -> None:
    check(0 <= aug.strength <= 1, f"{key}.strength", "must be in [0, 1]")
    for name in ("randaugment_p", "color_jitter_p", "grayscale_p", "jpeg_p", "blur_p", "noise_p", "erasing_p"):
        check(0 <= getattr(aug, name) <= 1, f"{key}.{name}", "is a probability: must be in [0, 1]")
    check(0 < aug.crop_scale_min <= 1, f"{key}.crop_scale_min", "must be in (0, 1]")
    check(0 <= aug.randaugment_ops <= 14, f"{key}.randaugment_ops", "must be in [0, 14]")
    check(0 <= aug.randaugment_magnitude <= 30, f"{key}.randaugment_magnitude", "must be in [0, 30]")
    check(all(v >= 0 for v in aug.color_jitter) and aug.color_jitter[3] <= 0.5, f"{key}.color_jitter", "needs 4 values >= 0 (brightness, contrast, saturation, hue <= 0.5)")
    check(1 <= aug.jpeg_quality_min <= aug.jpeg_quality_max <= 100, f"{key}.jpeg_quality_min",
          f"need 1 <= jpeg_quality_min <= jpeg_quality_max <= 100, got {aug.jpeg_quality_min} and {aug.jpeg_quality_max}")
    check(aug.blur_kernel >= 1 and aug.blur_kernel % 2 == 1, f"{key}.blur_kernel", "must be an odd integer >= 1")
    check(aug.blur_sigma_max > 0.1, f"{key}.blur_sigma_max", "must be > 0.1 (sigma is drawn from [0.1, max])")
    check(aug.noise_std >= 0, f"{key}.noise_std", "must be >= 0")
    check(0.02 < aug.erasing_scale_max <= 1, f"{key}.erasing_scale_max", "must be in (0.02, 1]")
    check(aug.device in _CHOICES["augment_device"], f"{key}.device", f"must be one of {_CHOICES['augment_device']}")


def is_run_name(name: str) -> bool:
    """One safe path component. '=' and ',' are allowed: Tune trial folders are named by their
    values (``ab12_s1.lr=0.001,...``) and a trial's config.yaml names its run after its folder."""
    return bool(name) and all(c.isalnum() or c in "-_.=," for c in name) and not name.startswith(".")

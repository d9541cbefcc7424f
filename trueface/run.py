"""A run before it trains: its data root, resolved config, folders and human-readable plan.

Usage::

    cfg, layout = resolve_run(load_config("demo"))
    prepared = prepare_run(load_config("demo"))      # the same, plus the data check it ran
    paths = RunPaths.of(cfg); print(describe_plan(cfg, layout, paths, prepared.check))

Resolving makes every implicit choice explicit (absolute paths, the domains of each stage and of
the test tables, the files the data check leaves out, the normalised copy of the data), so the
config saved beside checkpoints and results says exactly what was trained on.

The data check (trueface.data.check) runs before anything trains: from its cache it costs seconds.
Under ``data.on_bad_image=error`` it raises ``DataCheckError`` with its summary; under ``skip`` the
bad files go to ``data.exclude``. ``data.normalize`` then swaps the root for a re-encoded copy
(trueface.data.normalize) with the same relative paths.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trueface.atomic import atomic_write_bytes, atomic_write_text
from trueface.config import Config, to_yaml
from trueface.config.choices import parse_normalize
from trueface.data.check import DataCheck, DataCheckError, scan_and_check, shortcut_text
from trueface.data.layout import LABEL_NAMES, DataLayout, discover_layout, pick_domains
from trueface.data.normalize import normalized_root
from trueface.data.sampler import BalancedSampler
from trueface.data.synthetic import ensure_synthetic_dataset
from trueface.storage import Mirror, absolute, check_location, is_uri, join, mirror, staging_dir


@dataclass(frozen=True)
class RunPaths:
    """A run's folders. ``run_dir``/``results_dir`` are local: the folders themselves for a path
    location, staging copies for a URI one (see trueface.storage). ``run_location`` and
    ``results_location`` are where they are kept, as users name them."""

    run_dir: Path
    results_dir: Path
    run_location: str
    results_location: str

    @classmethod
    def of(cls, cfg: Config) -> "RunPaths":
        runs, results = join(cfg.output.runs_dir, cfg.run_name), join(cfg.output.results_dir, cfg.run_name)
        return cls(staging_dir(runs, cfg.data.cache_dir), staging_dir(results, cfg.data.cache_dir), runs, results)

    def stage_dir(self, stage: int) -> Path:
        return self.run_dir / f"stage{stage}"

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def stage_tensorboard_dir(self, stage: int) -> Path:
        return self.tensorboard_dir / f"stage{stage}"

    @property
    def ray_storage(self) -> str:
        """Ray Train's own storage (a URI is fine: Ray writes through pyarrow too)."""
        return join(self.run_location, "ray")

    def run_mirror(self) -> Mirror:
        return mirror(self.run_dir, self.run_location)

    def results_mirror(self) -> Mirror:
        return mirror(self.results_dir, self.results_location)

    def location(self, relpath: str) -> str:
        """Where a file of the run is kept, e.g. ``location("stage1/best.pt")``."""
        return join(self.run_location, relpath)


def data_root(cfg: Config) -> Path:
    """The configured root, or the embedded synthetic data set (generated on first use)."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser().absolute()
    return ensure_synthetic_dataset(Path(cfg.data.cache_dir).expanduser().absolute(), cfg.data.synthetic)


def absolute_location(location: str, key: str) -> str:
    """A path made absolute, or a URI checked (credentials in it, unknown schemes: an error naming ``key``)."""
    check_location(location, key)
    return absolute(location)


@dataclass(frozen=True)
class PreparedRun:
    cfg: Config
    layout: DataLayout
    check: DataCheck | None = None  # None when the check was not asked for


def prepare_run(cfg: Config, data_check: bool = True, progress: bool = True) -> PreparedRun:
    """The resolved config and layout, after the data check (``data_check``) and normalisation."""
    asked = cfg
    cfg, layout = resolve_layout(cfg)
    root = Path(cfg.data.root)
    check = None
    if data_check:
        check = scan_and_check(layout, cfg, progress=progress)
        if check.blocking:
            raise DataCheckError(check.summary(limit=20))
        if check.excluded:
            layout = discover_layout(root, check.excluded)
            # From the config as asked: a split left with one class drops out of the default domains.
            cfg = _resolved(replace(asked, data=replace(asked.data, exclude=check.excluded)), layout, root)
    spec = parse_normalize(cfg.data.normalize)
    if spec is not None:
        mirror_root = normalized_root(root, [layout.relpath(s.path) for s in layout.all_samples()], cfg.data.normalize,
                                      Path(cfg.data.cache_dir))
        layout = discover_layout(mirror_root, cfg.data.exclude)
        cfg = replace(cfg, data=replace(cfg.data, root=str(mirror_root)))
    return PreparedRun(cfg, layout, check)


def resolve_layout(cfg: Config) -> tuple[Config, DataLayout]:
    """The config resolved against its data root as found: no data check, no normalisation."""
    root = data_root(cfg)
    layout = discover_layout(root)
    return _resolved(cfg, layout, root), layout


def resolve_run(cfg: Config, data_check: bool = True) -> tuple[Config, DataLayout]:
    prepared = prepare_run(cfg, data_check, progress=False)
    return prepared.cfg, prepared.layout


def _resolved(cfg: Config, layout: DataLayout, root: Path) -> Config:
    """Every implicit choice made explicit (the user's unset domains keep being derived from ``layout``)."""
    return replace(
        cfg,
        # Absolute: Ray Train workers run in folders of their own, where relative paths mislead.
        output=replace(cfg.output, runs_dir=absolute_location(cfg.output.runs_dir, "output.runs_dir"),
                       results_dir=absolute_location(cfg.output.results_dir, "output.results_dir")),
        data=replace(cfg.data, root=str(root), cache_dir=str(Path(cfg.data.cache_dir).absolute()),
                     test_domains=tuple(pick_domains(layout, cfg.data.test_domains, "test"))),
        stage1=replace(cfg.stage1, domains=tuple(pick_domains(layout, cfg.stage1.domains, "stage1"))),
        stage2=replace(cfg.stage2, domains=tuple(pick_domains(layout, cfg.stage2.domains, "stage2"))),
    )


def write_run_files(cfg: Config, layout: DataLayout, paths: RunPaths, check: DataCheck | None = None) -> None:
    """The resolved config and the manifest of every image (``manifest_table``), beside the checkpoints."""
    atomic_write_text(paths.run_dir / "config.yaml", to_yaml(cfg))
    sink = pa.BufferOutputStream()
    pq.write_table(manifest_table(layout, check), sink)
    atomic_write_bytes(paths.run_dir / "manifest.parquet", sink.getvalue().to_pybytes())


def manifest_table(layout: DataLayout, check: DataCheck | None) -> pa.Table:
    """Every image with its domain, split and label. With the data check, each file's sha1 and
    pixel_sha1 (of the file as found, before any normalisation): jobs.evaluate compares a test root
    against them (trueface.data.overlap), and a resume from a moved root (``image_differences``)."""
    samples = layout.all_samples()
    sha1 = {r["relpath"]: r["sha1"] for r in check.rows} if check else {}
    pixel_sha1 = {r["relpath"]: r.get("pixel_sha1") or "" for r in check.rows} if check else {}
    return pa.table({
        "path": [s.path for s in samples], "domain": [s.domain for s in samples],
        "split": [s.split for s in samples], "label": [s.label for s in samples],
        "sha1": [sha1.get(layout.relpath(s.path), "") for s in samples],
        "pixel_sha1": [pixel_sha1.get(layout.relpath(s.path), "") for s in samples],
    })


_ROLE = ("domain", "split", "label", "sha1")  # what an image is to a run, whatever its path


def image_differences(saved: pa.Table, now: pa.Table) -> str:
    """"" when ``now`` holds the very images of ``saved`` (a run's manifest) in the same domains,
    splits and labels, by each file's sha1: the same data mounted at another path, or the synthetic
    set rebuilt in another data.cache_dir. Otherwise what differs, in words, with an example path."""
    if not set(_ROLE) <= set(saved.column_names) or "" in saved.column("sha1").to_pylist():
        return "the run's manifest.parquet does not record every image's sha1, so its images cannot be compared"
    old, new = (Counter(_columns(t, _ROLE)) for t in (saved, now))
    if old == new:
        return ""
    if Counter(saved.column("sha1").to_pylist()) == Counter(now.column("sha1").to_pylist()):
        # same files, other roles: some sha1's roles differ, so at least one copy is named
        relabelled = _other_roles(old, new, now)
        path, was, is_now = relabelled[0]
        return (f"the same images, but {len(relabelled)} of them under another domain, split or label (e.g. {path}: "
                f"{was} in the run, {is_now} now; a root without domain folders is one domain named after its folder)")
    problems = []
    for table, extra, where in ((saved, old - new, "the run trained on are not in the new root"),
                                (now, new - old, "in the new root are not in the run's manifest")):
        if extra:
            example = next(path for path, *role in _columns(table, ("path", *_ROLE)) if tuple(role) in extra)
            problems.append(f"{sum(extra.values())} images {where} (e.g. {example})")
    return "; ".join(problems)


def _columns(table: pa.Table, names: tuple[str, ...]) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in names)))


def _other_roles(old: Counter, new: Counter, now: pa.Table) -> list[tuple[str, str, str]]:
    """(path, role in the run, role now) of each of ``now``'s images that the run had under another
    domain, split or label (role: domain/split/label). ``old`` and ``new`` count the (domain, split,
    label, sha1) of the run's images and of ``now``'s. Roles are compared per sha1 as multisets, so
    a file the run held under two roles (two domains, say) that kept both is not named."""
    run_roles, roles_now = _roles_by_sha1(old), _roles_by_sha1(new)
    gained = {sha1: roles - run_roles[sha1] for sha1, roles in roles_now.items()}
    lost = {sha1: list((run_roles[sha1] - roles).elements()) for sha1, roles in roles_now.items()}
    moved = []
    for path, domain, split, label, sha1 in _columns(now, ("path", *_ROLE)):
        role = (domain, split, label)
        if gained[sha1][role]:
            gained[sha1][role] -= 1
            moved.append((path, _role_text(*lost[sha1].pop()), _role_text(*role)))
    return moved


def _roles_by_sha1(images: Counter) -> dict[str, Counter]:
    roles: dict[str, Counter] = {}
    for (domain, split, label, sha1), count in images.items():
        roles.setdefault(sha1, Counter())[(domain, split, label)] += count
    return roles


def _role_text(domain: str, split: str, label: int) -> str:
    return f"{domain}/{split}/{LABEL_NAMES[label]}"


# Keys a run may change when it resumes: they decide where the files go, how fast and on what it
# trains, or only the tables (the evaluation runs again on every resume), not the data, the model or
# the recipe its checkpoints learnt from. scaling.* and runtime.* change rounding at most (the global
# batch and the LR keep their meaning on any number of workers), and a run resumed on other hardware
# is what they are for. data.cache_dir only places caches, and data.synthetic.* acts only through the
# synthetic set's resolved data.root (its folder is named by the spec's fingerprint), which is
# compared; data.prepared reads the same pixels bit for bit; data.on_bad_image and
# data.min_image_side act through data.exclude, which is compared.
_RESUMABLE = ("run_name", "output.", "runtime.", "scaling.", "data.cache_dir", "data.synthetic.", "data.loader_workers",
              "data.prepared", "data.test_domains", "data.on_bad_image", "data.min_image_side",
              "eval.threshold_policy", "eval.threshold_scope", "eval.batch_size", "model.channels_last")
# What an interrupted (not finished) stage may change: how long it goes on, the resume README documents.
_EXTENDABLE = ("epochs", "patience")


def config_changes(old: Config, new: Config) -> dict[str, str]:
    """``{dotted key: "key: old -> new"}`` for each key whose value differs."""
    from trueface.config import flatten, to_dict

    before, after = flatten(to_dict(old)), flatten(to_dict(new))
    return {key: f"{key}: {before.get(key)!r} -> {value!r}" for key, value in after.items()
            if before.get(key) != value}


def training_changes(changes: dict[str, str], started: dict[int, bool]) -> list[str]:
    """``key: old -> new`` of ``changes`` (config_changes: every difference, which a resume warns
    of) for each key whose change would make the run's record (config.yaml, manifest.parquet)
    describe training its checkpoints never had. ``started`` maps each stage with a checkpoint to
    whether it finished (``stage.json``). A stage that never started may change freely; data,
    model and the rest (what is not in ``_RESUMABLE``) once any stage has started."""
    if not started:
        return []
    return [line for key, line in changes.items() if _decides_training(key, started)]


def _decides_training(key: str, started: dict[int, bool]) -> bool:
    stage, _, name = key.partition(".")
    if stage in ("stage1", "stage2"):
        number = int(stage[-1])
        return number in started and (started[number] or name not in _EXTENDABLE)
    return not any(key == r or (r.endswith(".") and key.startswith(r)) for r in _RESUMABLE)


DATA_CHECK_DIR = "data-check"


def write_data_check(check: DataCheck | None, paths: RunPaths) -> None:
    """The data check's report in the run's results (``data-check/``): what was left out and why."""
    if check is None:
        return
    from trueface.data.report import write_report  # matplotlib: only when a report is written

    write_report(check, paths.results_dir / DATA_CHECK_DIR)
    paths.results_mirror().push(DATA_CHECK_DIR)


def epoch_samples(cfg: Config, layout: DataLayout, stage: int) -> int:
    """Images drawn in an epoch of ``stage`` over all workers (``samples_per_epoch``, or where it is 0
    the size the balancing gives)."""
    st = cfg.stage(stage)
    train = layout.gather(st.domains, "train")
    return BalancedSampler([s.label for s in train], [s.domain for s in train], st.balance,
                           st.samples_per_epoch, 0, cfg.scaling.num_workers, cfg.seed).epoch_size


def planned_steps_per_epoch(cfg: Config, layout: DataLayout, stage: int) -> int:
    """Optimizer steps per epoch of ``stage``, counted as trueface.train counts them: the epoch's
    whole global batches (at least 1 here: batch_problems says why not)."""
    from trueface.train import steps_per_epoch  # torch: only where a job plans

    return max(1, steps_per_epoch(epoch_samples(cfg, layout, stage), cfg.stage(stage).batch_size))


def batch_problems(cfg: Config, layout: DataLayout, stages: tuple[int, ...] | list[int]) -> list[str]:
    """What training would refuse about the stages' batches on the configured workers, found
    before any worker starts: otherwise Stage II's refusal comes after Stage I has trained."""
    from trueface.train import batch_split_problem, too_few_samples  # torch: only where a job checks

    problems = []
    for stage in stages:
        st, key, workers = cfg.stage(stage), f"stage{stage}", cfg.scaling.num_workers
        problem = batch_split_problem(st, workers, key)
        samples = epoch_samples(cfg, layout, stage)
        if not problem and samples < st.batch_size:
            problem = too_few_samples(key, samples, st.batch_size)
        problems += [problem] if problem else []
    return problems


def describe_plan(cfg: Config, layout: DataLayout, paths: RunPaths, check: DataCheck | None = None) -> str:
    lines = [f"run {cfg.run_name}: data {layout.root}"]
    if check is not None:
        lines += _describe_check(check, paths, cfg.data.normalize)
    lines.append("images (real/fake)" + (" after the data check:" if cfg.data.exclude else ":"))
    for domain, splits in layout.counts().items():
        parts = [f"{split} {c['real']}/{c['fake']}" for split, c in splits.items()]
        lines.append(f"  {domain:<28} " + "  ".join(parts))
    if is_uri(paths.run_location):
        lines.append(f"storage: {paths.run_location} and {paths.results_location} (working copies under "
                     f"{paths.run_dir.parent} and {paths.results_dir.parent})")
    for stage in (1, 2):
        st = cfg.stage(stage)
        train = layout.gather(st.domains, "train")
        sampler = BalancedSampler([s.label for s in train], [s.domain for s in train], st.balance, st.samples_per_epoch)
        steps = planned_steps_per_epoch(cfg, layout, stage)
        val = sum(len(layout.samples(d, "valid")) for d in st.domains)
        lines += [
            f"stage {stage}: {st.image_size} px on {', '.join(st.domains)}; {st.epochs} epochs max "
            f"(patience {st.patience}), ~{steps} steps/epoch of {st.batch_size} (global, accum {st.accum_steps}), "
            f"lr {st.lr:g} -> {st.final_lr:g}, EMA {st.ema_decay:g}, MixUp {st.mixup_alpha:g}, "
            f"augment strength {st.augment.strength:g} (light for {st.light_epochs} epochs); {val} validation images"
            + (f"\n  all warm-up (warmup_epochs {st.warmup_epochs:g} = epochs): the LR reaches {st.lr:g} at the last "
               "step, the cosine never starts and no epoch counts towards early stopping"
               if st.warmup_epochs >= st.epochs else ""),
            "  " + sampler.plan().describe().replace("\n", "\n  "),
        ]
    sc = cfg.scaling
    if cfg.data.normalize != "none":
        lines.append(f"data.normalize {cfg.data.normalize}: every image re-encoded alike, cached in {cfg.data.root}")
    lines += [
        f"test tables: {', '.join(cfg.data.test_domains)} + combined; threshold {cfg.eval.threshold_policy} on validation",
        f"workers: {sc.num_workers} x ({sc.cpus_per_worker} CPU, GPU {sc.use_gpu} x {sc.gpus_per_worker:g}), "
        f"max_failures {sc.max_failures}; weights {cfg.model.weights}",
        f"checkpoints: {paths.run_location}/stage{{1,2}}/{{last,best}}.pt",
        f"tensorboard: tensorboard --logdir {paths.tensorboard_dir}"
        + (f" (a working copy of {paths.location('tensorboard')})" if is_uri(paths.run_location) else ""),
        f"results: {paths.results_location}/",
    ]
    return "\n".join(lines)


def _describe_check(check: DataCheck, paths: RunPaths, normalize: str) -> list[str]:
    report = f"{paths.results_location}/{DATA_CHECK_DIR}/report.md"
    lines = [f"data check: {len(check.rows)} images, {len(check.errors)} errors, {len(check.warnings)} warnings, "
             f"{len(check.shortcut_warnings)} metadata shortcuts (report: {report})"]
    if check.excluded:
        lines.append(f"  left out {len(check.excluded)} files (data.on_bad_image=skip; listed in the report's "
                     f"problems.csv and the config's data.exclude)")
    for a in check.shortcut_warnings:
        lines.append(f"  warning: {shortcut_text(a)}")
        if normalize != "none":
            lines.append(f"    this run trains on the copy data.normalize={normalize} re-encoded alike")
    return lines

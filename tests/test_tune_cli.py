"""jobs.tune without Ray: every mistake is refused before Ray starts; resources and names."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs import ray_tune
from jobs import tune as tune_job
from tests.conftest import tiny_overrides, write_tiny_root
from trueface.checkpoint import save_checkpoint
from trueface.config import load_config
from trueface.config.search_space import parse_search_space

# The tiny data's Stage I has 2 steps per epoch: decays from 0.1 up differ from its first step.
SPACE = "params:\n  stage1.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  stage1.ema_decay: {decay: [0.1, 0.5]}\n"


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray must not start for this command")

    monkeypatch.setattr(tune_job, "init_ray", refuse)


def args_for(tiny_root: Path, tmp_path: Path, *extra: str, space: str = SPACE) -> list[str]:
    space_file = tmp_path / "space.yaml"
    space_file.write_text(space)
    return ["--space", str(space_file), "--storage", str(tmp_path / "tune"), "--name", "s",
            *extra, *tiny_overrides(tiny_root, tmp_path)]


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_root, tmp_path, capsys, no_ray):
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--num-samples", "5")) == 0
    out = capsys.readouterr().out
    assert "search s: 5 trials of Stage I, at most 2 epochs each" in out
    assert "stage1.ema_decay: decay 0.1 .. 0.5 (log-uniform in 1 - value)" in out
    assert "objective: Stage I's best/select_auc_ema" in out
    assert "ASHA: clock 'objective_epoch' = Stage I's epoch; rungs at Stage I epochs 1 of 2" in out
    assert "stage1.ema_decay  epoch 1 (decays from 0.1 up differ from step 1, ~2 steps/epoch" in out
    assert f"tensorboard --logdir {tmp_path / 'tune' / 's'}" in out
    assert not (tmp_path / "tune").exists()
    # --startup-trials 0 (TPE from the first trial) is a value, not "use the default"
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--num-samples", "5", "--startup-trials", "0")) == 0
    assert "first 0 trials random" in capsys.readouterr().out


@pytest.mark.parametrize("extra, space, message", [
    ((), "params:\n  stage1.mixup_alfa: {uniform: [0, 1]}\n", "did you mean 'stage1.mixup_alpha'"),
    ((), "params:\n  stage2.mixup_alpha: {uniform: [0, 1]}\n", "choose --stage both"),
    ((), "params:\n  stage1.lr: {uniform: [0.0, 0.1]}\n", "value 0.0 of its range is rejected"),
    (("--stage", "2"), SPACE.replace("stage1", "stage2"), "--stage 2 needs --init CKPT"),
    (("--init", "x.pt"), SPACE, "--init is for --stage 2"),
    (("--num-samples", "0"), SPACE, "--num-samples must be >= 1"),
    (("--reduction-factor", "1"), SPACE, "--reduction-factor must be >= 2"),
    (("--startup-trials", "-1"), SPACE, "--startup-trials must be >= 0"),
    (("--workers-per-trial", "0"), SPACE, "scaling.num_workers: must be >= 1"),
    (("--name", "a b"), SPACE, "--name 'a b' must be"),
    # a trial drawing MixUp 0.2 on micro-batches of one image (8 over 8 workers) would fail in its worker
    (("--workers-per-trial", "8"), "params:\n  stage1.mixup_alpha: {choice: [0.0, 0.2]}\n",
     "stage1.mixup_alpha=0.2 mixes the images within each worker's micro-batch"),
])
def test_mistakes_are_refused_before_ray_starts(tiny_root, tmp_path, no_ray, extra, space, message):
    with pytest.raises(SystemExit) as exc:
        tune_job.main(args_for(tiny_root, tmp_path, *extra, space=space))
    assert message in str(exc.value)


def test_a_searched_batch_size_replaces_the_base_one_in_the_batch_check(tiny_root, tmp_path, no_ray):
    # the base batch of 8 does not divide over 3 workers, but no trial trains it: 6 and 12 do
    space = "params:\n  stage1.batch_size: {choice: [6, 12]}\n"
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--workers-per-trial", "3", space=space)) == 0
    with pytest.raises(SystemExit, match=r"stage1.batch_size=8 is the global batch .* 3 x 1"):
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--workers-per-trial", "3"))


def test_a_batch_inside_a_searched_int_range_that_the_workers_cannot_share_is_refused(tiny_root, tmp_path, no_ray):
    # 6 and 12 divide over 3 workers; 7 to 11, which trials draw too, mostly do not
    space = "params:\n  stage1.batch_size: {int: [6, 12]}\n"
    with pytest.raises(SystemExit, match=r"stage1.batch_size=7 is the global batch .* 3 x 1.*inside a searched int"):
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--workers-per-trial", "3", space=space))
    # and accum_steps: a batch of 12 over 3 x 1..4 workers and steps breaks at 3 x 3 = 9
    space = "params:\n  stage1.batch_size: {choice: [12]}\n  stage1.accum_steps: {int: [1, 4]}\n"
    with pytest.raises(SystemExit, match=r"stage1.batch_size=12 .* 3 x 3.*inside a searched int"):
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--workers-per-trial", "3", "stage1.mixup_alpha=0",
                               space=space))
    # a range every value of which divides passes (1 worker)
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "stage1.mixup_alpha=0",
                                  space="params:\n  stage1.batch_size: {int: [6, 12]}\n")) == 0


def test_an_ablation_row_whose_batch_the_workers_cannot_share_is_refused_before_ray(tiny_root, tmp_path, no_ray):
    from jobs import ablate as ablate_job

    spec = tmp_path / "spec.yaml"
    spec.write_text("components:\n  big-batch:\n    what: a batch of 9\n"
                    "    when_off: {set: {stage1.batch_size: 9}}\n")
    args = ["--spec", str(spec), "--stage", "1", "--workers-per-trial", "2", "--storage", str(tmp_path / "abl"),
            "--dry-run", *tiny_overrides(tiny_root, tmp_path)]
    with pytest.raises(SystemExit, match=r"stage1.batch_size=9 is the global batch .* 2 x 1"):
        ablate_job.main(args)


def test_an_ablation_gives_every_row_the_references_epoch_size(tmp_path, no_ray, capsys):
    # Stage II's epoch is the balancing's (samples_per_epoch 0): 4 domain-class cells x the median
    # cell (8) is 32 images, where class balancing would make it 2 x 10 = 20. Fixed at 32 for every row.
    from jobs import ablate as ablate_job
    from trueface.config import apply_values
    from trueface.run import epoch_samples, resolve_layout

    root = write_tiny_root(tmp_path / "data", {"big": "lower"}, per_class=8)
    write_tiny_root(root, {"small": "lower"}, per_class=2)
    overrides = [*tiny_overrides(root, tmp_path), "stage2.samples_per_epoch=0", "stage2.balance=domain_class",
                 "stage1.domains=[big]", "stage2.domains=[big,small]"]
    cfg, layout = resolve_layout(load_config("demo", overrides))
    off = {"stage2.balance": "class"}
    assert (epoch_samples(cfg, layout, 2), epoch_samples(apply_values(cfg, off), layout, 2)) == (32, 20)
    fixed = ablate_job.fixed_epoch_sizes(cfg, layout, (1, 2))
    assert epoch_samples(fixed, layout, 2) == epoch_samples(apply_values(fixed, off), layout, 2) == 32
    assert fixed.stage1.samples_per_epoch == epoch_samples(cfg, layout, 1) == 16  # the same epoch, now named
    # the job fixes it before it plans
    spec = tmp_path / "spec.yaml"
    spec.write_text("components:\n  domain-balance:\n    what: domain balancing\n"
                    "    when_off: {set: {stage2.balance: class}}\n")
    assert ablate_job.main(["--spec", str(spec), "--stage", "both", "--storage", str(tmp_path / "abl"),
                            "--dry-run", *overrides]) == 0
    assert "stage2.samples_per_epoch fixed at 32, the reference's epoch, for every row" in capsys.readouterr().out


def test_init_must_be_a_stage_one_checkpoint(tiny_root, tmp_path, no_ray):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt"):
        tune_job.main(args_for(tiny_root, tmp_path, "--stage", "2", "--init", str(bad), space=SPACE.replace("stage1", "stage2")))


def test_an_existing_name_is_refused_with_how_to_resume(tiny_root, tmp_path, no_ray):
    (tmp_path / "tune" / "s").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        tune_job.main(args_for(tiny_root, tmp_path))
    message = str(exc.value)
    assert "already exists" in message and "python -m jobs.tune --resume s --storage" in message
    assert "--name" in message


@pytest.mark.parametrize("flag", ["--name", "--resume", "--storage", "--init", "--space"])
def test_an_empty_name_is_refused_not_replaced_by_a_default(tiny_root, tmp_path, no_ray, capsys, flag):
    # --name "": not <space>-<date>-<time>; --resume "": not a new search; --storage "": not the current
    # folder; --init "": not ignored; --space "": not a vague missing-file error (an unset variable, most likely)
    with pytest.raises(SystemExit):
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", flag, ""))
    assert f"argument {flag}: is empty (an unset variable?)" in capsys.readouterr().err


def test_resume_refuses_new_settings(tmp_path, no_ray):
    with pytest.raises(SystemExit, match="drop --num-samples, KEY=VALUE overrides"):
        tune_job.main(["--resume", "s", "--num-samples", "3", "stage1.lr=0.1"])


def test_a_storage_uri_is_planned_offline_and_one_holding_credentials_is_refused(tmp_path, no_ray, capsys, s3_server):
    # s3_server: pyarrow resolves an S3 URI's region with a request; the local S3 answers it here
    # (without it the test passed only after another test had started that server).
    assert tune_job.main(["--storage", "s3://bucket/tune", "--name", "n", "--dry-run", f"data.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "trials:      s3://bucket/tune/n/<trial>/" in out
    assert f"tensorboard --logdir {tmp_path}/staging/s3/bucket/tune/n (a working copy of s3://bucket/tune/n)" in out
    with pytest.raises(SystemExit, match="the URI holds secret_key") as exc:
        tune_job.main(["--storage", "s3://bucket/tune?secret_key=hunter2", "--dry-run"])
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize("job", ["tune", "ablate", "check_data"])
def test_an_output_location_no_filesystem_opens_is_a_message_not_a_traceback(job, tmp_path, no_ray):
    import importlib

    main = importlib.import_module(f"jobs.{job}").main
    with pytest.raises(SystemExit, match=r"error: output.results_dir: cannot open ftp://host/results"):
        main(["--dry-run", "output.results_dir=ftp://host/results", f"data.cache_dir={tmp_path}"])


def test_resume_of_an_unknown_search_lists_the_known_ones(tmp_path, no_ray):
    (tmp_path / "tune" / "old").mkdir(parents=True)
    (tmp_path / "tune" / "old" / ray_tune.SPEC_FILE).write_text("{}")
    with pytest.raises(SystemExit) as exc:
        tune_job.main(["--resume", "nope", "--storage", str(tmp_path / "tune")])
    assert "no search named 'nope'" in str(exc.value) and "old" in str(exc.value)


def test_steps_per_epoch_are_the_fewest_any_trial_takes(tiny_root):
    # an EMA decay or the LR warm-up acts at a step: its epoch is latest with the fewest steps per epoch
    from trueface.run import resolve_run

    def planned(*overrides: str, space=None) -> int:
        cfg, layout = resolve_run(load_config("demo", [*tiny_overrides(tiny_root, tiny_root.parent),
                                                       "stage1.batch_size=2", *overrides]), data_check=False)
        return tune_job.steps_per_epoch(cfg, layout, [1], space)["1"]

    searched = parse_search_space({"params": {"stage1.samples_per_epoch": {"int": [4, 64]},
                                              "stage1.batch_size": {"choice": [2, 4]}}}, "t.yaml")
    assert planned(space=searched) == planned("stage1.samples_per_epoch=4", "stage1.batch_size=4") == 1 < planned()


def test_concurrency_follows_the_scarcest_resource():
    cpu_trial = {"CPU": 2.1}
    assert ray_tune.derive_max_concurrent({"CPU": 16.0}, cpu_trial, 100) == 7
    assert ray_tune.derive_max_concurrent({"CPU": 16.0}, cpu_trial, 3) == 3
    assert ray_tune.derive_max_concurrent({"CPU": 1.0}, cpu_trial, 3) == 1  # never zero
    gpu_trial = {"CPU": 8.1, "GPU": 2.0}
    assert ray_tune.derive_max_concurrent({"CPU": 64.0, "GPU": 4.0}, gpu_trial, 10) == 2


def test_per_trial_resources_and_local_cpus(monkeypatch):
    cfg = load_config("tune-demo")  # 1 worker x 1 CPU
    assert ray_tune.per_trial_resources(cfg, use_gpu=False) == {"CPU": 1 + ray_tune.TRIAL_DRIVER_CPUS}
    gpu = load_config("paper", ["scaling.num_workers=3"])
    assert ray_tune.per_trial_resources(gpu, use_gpu=True)["GPU"] == 3.0
    shared = load_config("paper", ["scaling.gpus_per_worker=0.5"])  # one worker, half a GPU: two trials a GPU
    assert ray_tune.per_trial_resources(shared, use_gpu=True)["GPU"] == 0.5
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # two 1-CPU trials side by side on 2 cores, plus room for the trial functions' shares
    assert ray_tune.local_cpus(cfg, None, 8) == 3
    assert ray_tune.derive_max_concurrent({"CPU": 3.0}, ray_tune.per_trial_resources(cfg, False), 8) == 2


def test_a_search_over_the_workers_counts_trials_at_the_most_a_trial_draws(tiny_root, tmp_path, capsys, monkeypatch):
    cfg = load_config("tune-demo")  # 1 worker x 1 CPU; trials draw up to 2 workers x 3 CPUs
    space = parse_search_space({"params": {"scaling.num_workers": {"choice": [2, 1]},
                                           "scaling.cpus_per_worker": {"int": [1, 3]}}}, "s.yaml")
    per_trial = ray_tune.per_trial_resources(cfg, use_gpu=False, space=space)
    assert per_trial == {"CPU": 2 * 3 + ray_tune.TRIAL_DRIVER_CPUS}
    assert ray_tune.derive_max_concurrent({"CPU": 8.0}, per_trial, 8) == 1  # not the 7 of 1-CPU trials
    gpu = load_config("paper", ["scaling.gpus_per_worker=0.5"])
    workers = parse_search_space({"params": {"scaling.num_workers": {"int": [1, 4]}}}, "w.yaml")
    assert ray_tune.per_trial_resources(gpu, use_gpu=True, space=workers)["GPU"] == 2.0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert ray_tune.local_cpus(cfg, None, 8, space) == 2 * 3 + 1  # one 6-CPU trial fits, though not on 2 cores
    assert ray_tune.local_cpus(cfg, 3, 8, space) == 3 * 6 + 1
    # the plan says so
    searched = "params:\n  scaling.num_workers: {choice: [1, 2]}\n"
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "stage1.mixup_alpha=0", space=searched)) == 0
    out = capsys.readouterr().out
    assert "per trial: 2 worker(s) x 1 CPU (GPU auto x 1) (at most: the space searches them)" in out


def test_trial_folders_are_named_by_their_config_values():
    space = parse_search_space({"params": {"stage1.ema_decay": {"decay": [0.9, 0.99]},
                                           "stage1.augment.strength": {"uniform": [0, 1]}}})
    trial = SimpleNamespace(trial_id="ab12cd34", config={"1-stage1.ema_decay": 0.01, "stage1.augment.strength": 0.25})
    assert ray_tune.TrialNamer(space)(trial) == "ab12cd34_s1.ema_decay=0.99,s1.strength=0.25"


def test_a_ray_job_with_relative_outputs_is_told_where_they_go(tiny_root, tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for a job's driver
    monkeypatch.chdir(tmp_path)
    assert tune_job.main(["--dry-run", "--storage", "tune", "--data-root", str(tiny_root), "output.results_dir=res"]) == 0
    err = capsys.readouterr().err
    assert f"--storage 'tune' resolves to {tmp_path / 'tune'}" in err and "Ray deletes" in err
    assert "output.results_dir 'res'" in err and "output.runs_dir" in err
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert tune_job.main(["--dry-run", "--data-root", str(tiny_root)]) == 0
    assert "Ray deletes" not in capsys.readouterr().err


AUGMENT = "params:\n  stage1.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  stage1.augment.strength: {uniform: [0.0, 1.0]}\n"


def test_a_key_that_acts_after_asha_s_first_rung_is_refused_with_the_grace_that_fits(tiny_root, tmp_path, capsys, no_ray):
    """Strong augmentation starts at epoch 2 (light_epochs 1): ASHA's rung at epoch 1 would judge
    the strength on an epoch where it was off."""
    with pytest.raises(SystemExit) as exc:
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", space=AUGMENT) + ["stage1.epochs=4"])
    message = str(exc.value)
    assert "stage1.augment.strength first acts at Stage I epoch 2" in message
    assert "rungs at Stage I epochs 1, 2 of 4" in message and "Use --grace-period 2" in message
    assert "ASHA would then stop trials at Stage I epochs 2" in message
    assert "rungs at Stage I epochs 1, 2 of 4" in capsys.readouterr().out  # the plan was printed first
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--grace-period", "2", space=AUGMENT) + ["stage1.epochs=4"]) == 0
    assert "rungs at Stage I epochs 2 of 4; --grace-period 2" in capsys.readouterr().out
    # the space's own default
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", space="grace_period: 2\n" + AUGMENT) + ["stage1.epochs=4"]) == 0
    assert "--grace-period 2" in capsys.readouterr().out


def test_with_both_stages_only_stage_two_keys_meet_asha(tiny_root, tmp_path, capsys, no_ray):
    both = AUGMENT + "  stage2.mixup_alpha: {uniform: [0.0, 0.8]}\n"
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--stage", "both", space=both) + ["stage2.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert "rungs at Stage II epochs 1, 2 of 4" in out and "Stage I runs to its own end unjudged" in out
    assert "stage1.augment.strength  Stage I epoch 2: before Stage II" in out
    late = both + "  stage2.augment.strength: {uniform: [0.0, 1.0]}\n"
    with pytest.raises(SystemExit, match="stage2.augment.strength first acts at Stage II epoch 3.*--grace-period 3"):
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--stage", "both", space=late)
                      + ["stage2.epochs=4", "stage2.light_epochs=2"])


def test_a_key_that_never_acts_is_refused(tiny_root, tmp_path, no_ray):
    """The tiny Stage I trains 2 epochs of 2 steps: the EMA warm-up caps every decay at 5/14."""
    with pytest.raises(SystemExit) as exc:
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", space=SPACE.replace("[0.1, 0.5]", "[0.9, 0.99]")))
    assert "stage1.ema_decay never changes training" in str(exc.value) and "search decays below 0.357" in str(exc.value)
    assert "steps per epoch ({'1': 2} by stage)" in str(exc.value)


def test_the_paper_search_on_the_embedded_data_shows_its_rungs_and_is_refused(tmp_path, capsys, no_ray):
    """The synthetic set is far smaller than the paper's data: Stage I has one step per epoch."""
    with pytest.raises(SystemExit) as exc:
        tune_job.main(["--dry-run", "--space", "paper", "--config", "paper", "--stage", "both",
                       "--storage", str(tmp_path / "tune")])
    out = capsys.readouterr().out
    assert "rungs at Stage II epochs 1, 2, 4, 8, 16 of 20" in out
    assert "stage2.augment.strength  epoch 1" in out
    assert "stage1.ema_decay never changes training" in str(exc.value)


def test_the_demo_space_runs_at_its_default_grace(tmp_path, capsys, no_ray):
    assert tune_job.main(["--dry-run", "--storage", str(tmp_path / "tune")]) == 0
    assert "rungs at Stage I epochs 1, 2 of 3" in capsys.readouterr().out


def test_the_stage_two_demo_space_runs_at_its_default_grace(tmp_path, capsys, no_ray):
    init = tmp_path / "stage1.pt"
    save_checkpoint(init, {"stage": 1, "config": {}, "ema": {}, "model": {}})  # all --init checks read
    assert tune_job.main(["--dry-run", "--space", "demo-stage2", "--config", "demo", "--stage", "2", "--init", str(init),
                          "--storage", str(tmp_path / "tune")]) == 0
    assert "rungs at Stage II epochs 1, 2 of 3" in capsys.readouterr().out


@pytest.mark.parametrize("grace, max_t, rf", [(1, 3, 2), (1, 4, 2), (1, 20, 2), (2, 20, 3), (3, 50, 2), (5, 5, 2), (7, 4, 2)])
def test_asha_rungs_are_ray_s(grace, max_t, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket

    g = min(grace, max_t)  # as make_search passes it
    assert ray_tune.asha_rungs(grace, max_t, rf) == sorted(m for m, _ in _Bracket(g, max_t, rf, 0)._rungs if m < max_t)


def test_a_search_started_before_the_final_stage_objective_is_not_resumed(tmp_path, no_ray):
    (tmp_path / "tune" / "old").mkdir(parents=True)
    (tmp_path / "tune" / "old" / ray_tune.SPEC_FILE).write_text('{"version": 1}')
    with pytest.raises(SystemExit, match="started by an older TrueFace.*Start a new search"):
        tune_job.main(["--resume", "old", "--storage", str(tmp_path / "tune")])


@pytest.mark.parametrize("space, message", [
    # the tiny batch of 8 divides over 1 and 4 workers, not over 3: an end of a choice, or inside an int range
    ("params:\n  scaling.num_workers: {choice: [1, 3]}\n",
     r"stage1.batch_size=8 is the global batch .* 3 x 1.*a trial can draw scaling.num_workers=3 from .*space.yaml"),
    ("params:\n  scaling.num_workers: {int: [1, 4]}\n",
     r"stage1.batch_size=8 .* 3 x 1.*inside a searched int range.*scaling.num_workers"),
])
def test_searched_workers_that_cannot_share_the_batch_are_refused(tiny_root, tmp_path, no_ray, space, message):
    with pytest.raises(SystemExit, match=message):
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "stage1.mixup_alpha=0", space=space))
    assert tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "stage1.mixup_alpha=0",
                                  space="params:\n  scaling.num_workers: {choice: [1, 2, 4]}\n")) == 0


def test_lr_and_its_floor_searched_together_are_refused_before_ray(tiny_root, tmp_path, no_ray):
    space = "params:\n  stage1.lr: {loguniform: [1.0e-4, 3.0e-3]}\n  stage1.final_lr: {loguniform: [1.0e-6, 1.0e-3]}\n"
    with pytest.raises(SystemExit, match=r"space.yaml: stage1.lr=0.0001 with stage1.final_lr=0.001 is rejected"):
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", space=space))


@pytest.mark.parametrize("dry_run", [(), ("--dry-run",)])
def test_searched_weights_files_are_checked_and_name_their_trial_folders(tiny_root, tmp_path, no_ray, dry_run):
    from trueface.config.loading import is_run_name

    missing = tmp_path / "w" / "missing.pt"
    space = f"params:\n  model.weights: {{choice: [none, {missing}]}}\n"
    with pytest.raises(SystemExit) as exc:  # before Ray, and in a dry run, which checks everything
        tune_job.main(args_for(tiny_root, tmp_path, *dry_run, space=space))
    assert "space.yaml: model.weights choice" in str(exc.value) and "missing.pt" in str(exc.value)
    assert "does not exist" in str(exc.value)
    namer = ray_tune.TrialNamer(parse_search_space({"params": {"model.weights": {"choice": ["none", str(missing)]},
                                                               "stage1.lr": {"uniform": [1e4, 2e4]}}}))
    name = namer(SimpleNamespace(trial_id="ab12_00001", config={"model.weights": str(missing), "stage1.lr": 12000.0}))
    assert name == "00001_model.weights=missing.pt,s1.lr=1.2e_04" and is_run_name(name)


def test_init_of_another_architecture_is_refused_naming_both(tiny_root, tmp_path, no_ray):
    init = tmp_path / "stage1.pt"
    save_checkpoint(init, {"stage": 1, "config": {"model": {"arch": "resnet50"}}, "ema": {}, "model": {}})
    with pytest.raises(SystemExit) as exc:  # the tiny config trains a resnet18
        tune_job.main(args_for(tiny_root, tmp_path, "--dry-run", "--stage", "2", "--init", str(init),
                               space=SPACE.replace("stage1", "stage2")))
    message = str(exc.value)
    assert f"--init {init} holds a resnet50" in message and "model.arch=resnet18" in message
    assert "Set model.arch=resnet50" in message


def test_a_space_name_wins_over_a_local_folder_and_a_missing_one_lists_the_spaces(tmp_path, no_ray, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert tune_job.main(["--dry-run", "--space", "demo", "--storage", str(tmp_path / "tune")]) == 0
    assert f"space {tune_job.SPACES_DIR / 'demo.yaml'}:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        tune_job.main(["--dry-run", "--space", "demoo", "--storage", str(tmp_path / "tune")])
    assert "--space demoo: no search space of that name (spaces: demo, demo-stage2, paper, paper-stage2)" in str(exc.value)
    (tmp_path / "demo" / "mine.yaml").write_text(SPACE)
    with pytest.raises(SystemExit) as exc:  # ./demo is the folder, as written: not a missing file
        tune_job.main(["--dry-run", "--space", "./demo", "--storage", str(tmp_path / "tune")])
    assert "--space ./demo is a folder; a search space is a .yaml file: give the path to one (demo/mine.yaml)" \
        in str(exc.value) and "does not exist" not in str(exc.value)
    (tmp_path / "mine").mkdir()  # no space of that name: the local folder of that name
    with pytest.raises(SystemExit, match=r"--space mine is a folder; a search space is a .yaml file: give the path "
                                         r"to one, or a space name"):
        tune_job.main(["--dry-run", "--space", "mine", "--storage", str(tmp_path / "tune")])


def test_an_ablation_component_whose_values_clash_is_a_message_naming_it(tiny_root, tmp_path, no_ray):
    from jobs import ablate as ablate_job

    spec = tmp_path / "spec.yaml"
    spec.write_text("plain: false\ncomponents:\n  jpeg-narrow:\n    what: JPEG quality range\n    when_off: {set: "
                    "{stage1.augment.jpeg_quality_min: 90, stage1.augment.jpeg_quality_max: 50}}\n")
    args = ["--spec", str(spec), "--storage", str(tmp_path / "abl"), "--dry-run", *tiny_overrides(tiny_root, tmp_path)]
    with pytest.raises(SystemExit, match=r"error: .*spec.yaml: components.jpeg-narrow.when_off.set .* are rejected together"):
        ablate_job.main(args)


@pytest.mark.parametrize("extra, flags", [(("--spec", "nosuch.yaml"), "--spec"), (("--components", "ema"), "--components"),
                                          (("--spec", "x.yaml", "--components", "ema"), "--spec and --components")])
def test_leave_one_domain_out_refuses_components_it_would_ignore(tmp_path, no_ray, extra, flags):
    from jobs import ablate as ablate_job

    with pytest.raises(SystemExit, match=f"--leave-one-domain-out .* so {flags} would be ignored: drop {flags}"):
        ablate_job.main(["--leave-one-domain-out", "--stage", "both", "--config", "demo", "--dry-run", *extra,
                         "--storage", str(tmp_path / "abl"), f"data.cache_dir={tmp_path}"])


def test_a_resumed_search_whose_data_root_is_not_here_stops_before_ray(tiny_root, tmp_path, no_ray):
    """A search resumed on a machine without its data: one message before Ray, not a failed worker per trial."""
    with pytest.raises(AssertionError, match="Ray must not start"):
        tune_job.main(args_for(tiny_root, tmp_path))  # started (its spec written), then stopped where Ray starts
    tiny_root.rename(tmp_path / "gone")
    for dry_run in ([], ["--dry-run"]):
        with pytest.raises(SystemExit) as exc:
            tune_job.main(["--resume", "s", "--storage", str(tmp_path / "tune"), *dry_run])
        assert str(exc.value) == (
            f"error: search s trains on data.root {tiny_root}, as it was started, and that folder is not on this "
            "machine. A resumed job keeps its settings: make the data available at that path (mount or link it "
            "there), then resume again.")
    (tmp_path / "gone").rename(tiny_root)
    with pytest.raises(AssertionError, match="Ray must not start"):
        tune_job.main(["--resume", "s", "--storage", str(tmp_path / "tune")])


def test_a_resumed_ablation_generates_the_embedded_set_again_where_it_was(tmp_path, monkeypatch):
    import hashlib
    import shutil

    from jobs import ablate as ablate_job

    monkeypatch.setattr(ablate_job, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    spec = tmp_path / "spec.yaml"
    spec.write_text("plain: false\ncomponents:\n  mixup:\n    what: MixUp\n    when_off: {set: {stage1.mixup_alpha: 0.0}}\n")
    synthetic = ["data.synthetic.train_per_class=4", "data.synthetic.valid_per_class=1", "data.synthetic.test_per_class=1",
                 "data.synthetic.image_size=16", f"data.cache_dir={tmp_path / 'cache'}", "stage1.batch_size=4",
                 "stage2.batch_size=4", "stage1.samples_per_epoch=8", "stage2.samples_per_epoch=8"]
    with pytest.raises(pytest.fail.Exception, match="Ray started"):
        ablate_job.main(["--spec", str(spec), "--storage", str(tmp_path / "abl"), "--name", "a", *synthetic])
    (root,) = (tmp_path / "cache").glob("synthetic-*")

    def digests() -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = digests()
    shutil.rmtree(root)
    with pytest.raises(pytest.fail.Exception, match="Ray started"):  # past the check: the folder is back
        ablate_job.main(["--resume", "a", "--storage", str(tmp_path / "abl")])
    assert digests() == before

"""Search spaces: parsing, every error before a trial starts, sampling and the decay form."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from trueface.config import load_config
from trueface.config.search_space import SearchSpaceError, first_step_above, load_search_space, parse_search_space
from trueface.ema import ema_decay_at

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def space(params: dict, **extra):
    return parse_search_space({"params": params, **extra}, "test.yaml")


@pytest.mark.parametrize("path", sorted(p for p in SPACES.glob("*.yaml") if not p.stem.startswith("ablation")),
                         ids=lambda p: p.stem)
def test_shipped_spaces_check_against_their_configs(path):
    sp = load_search_space(path)
    stages = sorted({int(k[5]) for k in sp.keys if k.startswith("stage")})
    base = load_config("paper" if path.stem.startswith("paper") else "tune-demo")
    sp.check(base, stages)
    assert sp.description


def test_every_form_parses_and_samples_inside_its_range():
    sp = space({
        "stage1.lr": {"loguniform": ["1e-4", 1.0e-2]},  # YAML 1.1 reads 1e-4 as a string
        "stage1.ema_decay": {"decay": [0.99, 0.9999]},
        "stage1.augment.strength": {"uniform": [0.2, 1.0]},
        "stage1.epochs": {"int": [2, 5]},
        "stage1.mixup_alpha": {"choice": [0.0, 0.2]},
    })
    sp.check(load_config("demo"), (1,))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        sp.suggest(trial)
        values = sp.values(trial.params)
        assert 1e-4 <= values["stage1.lr"] <= 1e-2
        assert 0.99 <= values["stage1.ema_decay"] <= 0.9999
        assert 0.2 <= values["stage1.augment.strength"] <= 1.0
        assert values["stage1.epochs"] in range(2, 6) and isinstance(values["stage1.epochs"], int)
        assert values["stage1.mixup_alpha"] in (0.0, 0.2)
        cfg = sp.apply(load_config("demo"), trial.params)
        assert cfg.stage1.ema_decay == pytest.approx(values["stage1.ema_decay"])
        study.tell(trial, 0.5)


def test_decay_is_log_uniform_in_one_minus_decay():
    """Half the samples of [0.99, 0.9999] fall below 0.999 (uniform sampling puts 91% above)."""
    sp = space({"stage1.ema_decay": {"decay": [0.99, 0.9999]}})
    param = sp.params[0]
    assert param.name == "1-stage1.ema_decay"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    decays = []
    for _ in range(400):
        trial = study.ask()
        sp.suggest(trial)
        decays.append(sp.values(trial.params)["stage1.ema_decay"])
        study.tell(trial, 0.0)
    below = sum(d < 0.999 for d in decays) / len(decays)
    assert 0.4 < below < 0.6
    assert min(decays) >= 0.99 and max(decays) <= 0.9999


@pytest.mark.parametrize("params, message", [
    ({"stage2.mixup_alfa": {"uniform": [0, 1]}}, "did you mean 'stage2.mixup_alpha'"),
    ({"augment.strength": {"uniform": [0, 1]}}, "not a config key"),
    ({"stage1.lr": {"logunifrom": [1e-4, 1e-2]}}, "did you mean 'loguniform'"),
    ({"stage1.lr": {"loguniform": [0, 1e-2]}}, "loguniform needs low > 0"),
    ({"stage1.lr": {"uniform": [0.1, 0.01]}}, "must be below high"),
    ({"stage1.lr": [0.1, 0.2]}, "expected one form"),
    ({"stage1.lr": {"uniform": [0.1]}}, "needs [low, high] numbers"),
    ({"stage1.ema_decay": {"decay": [0.9, 1.0]}}, "0 < low < high < 1"),
    ({"stage1.epochs": {"int": [1.5, 4]}}, "integer bounds"),
    ({"stage1.epochs": {"uniform": [1, 4]}}, "is an integer"),
    ({"stage1.mixup_alpha": {"choice": []}}, "non-empty list"),
    ({"stage1.mixup_alpha": {"choice": [0.2, 0.2]}}, "twice"),
    ({"model.channels_last": {"uniform": [0, 1]}}, "true/false"),
    ({"stage1.domains": {"choice": [["a"]]}}, "is a list"),
    ({"stage1.augment.strength": {"uniform": [0.5, 1.5]}}, "value 1.5 of its range is rejected"),
    ({"stage1.optimizer": {"choice": ["sgd", "adam"]}}, "value 'adam' of its range is rejected"),
    ({"stage2.mixup_alpha": {"uniform": [0, 1]}}, "has no effect, the trials train Stage I only"),
])
def test_errors_name_the_key_and_the_problem(params, message):
    with pytest.raises(SearchSpaceError) as err:
        space(params).check(load_config("demo"), (1,))
    assert message in str(err.value)
    assert "test.yaml" in str(err.value)


@pytest.mark.parametrize("key, spec, stages, message", [
    ("stage1.samples_per_epoch", {"int": [32, 512]}, (1,), "how many images an epoch holds"),
    ("stage1.balance", {"choice": ["class", "domain_class"]}, (1,), "balancing sets the epoch's size"),
    ("data.loader_workers", {"int": [0, 4]}, (1,), "no trial acts on it"),
    ("runtime.log_every", {"int": [1, 3]}, (1,), "no trial acts on it"),
    ("scaling.max_failures", {"int": [0, 2]}, (1,), "no trial acts on it"),
    ("model.weights", {"choice": ["imagenet", "none"]}, (2,), "Stage II starts from the Stage I checkpoint"),
])
def test_keys_that_make_trials_unlike_or_alike_are_refused(key, spec, stages, message):
    cfg = load_config("demo", ["stage1.samples_per_epoch=0"])
    with pytest.raises(SearchSpaceError, match=message):
        space({key: spec}).check(cfg, stages)


def test_balance_is_searchable_where_the_epoch_has_a_fixed_size_and_weights_where_stage_one_trains():
    space({"stage1.balance": {"choice": ["class", "domain_class"]}}).check(
        load_config("demo", ["stage1.samples_per_epoch=64"]), (1,))
    space({"model.weights": {"choice": ["imagenet", "none"]}}).check(load_config("demo"), (1, 2))


def test_patience_acts_only_once_its_lowest_value_above_zero_can_have_stopped_a_trial():
    # epoch 1 always improves and the warm-up's epochs never count: patience 2 after 1 warm-up epoch
    # can stop a trial after epoch 3 at the earliest, so two values differ from epoch 4
    cfg = load_config("demo", ["stage1.epochs=8", "stage1.warmup_epochs=1"])
    for spec in ({"int": [2, 4]}, {"choice": [0, 2, 3]}):
        (effect,) = space({"stage1.patience": spec}).first_effects(cfg, (1,), {1: 10})
        assert effect.epoch == 4, (spec, effect)
    (effect,) = space({"stage1.patience": {"int": [0, 4]}}).first_effects(cfg, (1,), {1: 10})
    assert effect.epoch == 3  # patience 1
    (never,) = space({"stage1.patience": {"choice": [0]}}).first_effects(cfg, (1,), {1: 10})
    assert never.epoch is None
    (late,) = space({"stage1.patience": {"int": [7, 9]}}).first_effects(cfg, (1,), {1: 10})
    assert late.epoch is None  # after the stage's 8 epochs


def test_stage_one_keys_are_refused_when_trials_fine_tune_stage_two():
    with pytest.raises(SearchSpaceError, match="--stage 1"):
        space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}}).check(load_config("demo"), (2,))
    space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.5]}}).check(
        load_config("demo"), (1, 2))


@pytest.mark.parametrize("data, message", [
    ({"params": {}}, "'params' must map"),
    ({"parmas": {"stage1.lr": {"uniform": [0.1, 0.2]}}}, "unknown top-level key"),
    ([1, 2], "expected a mapping"),
])
def test_file_structure_errors(data, message):
    with pytest.raises(SearchSpaceError, match=message):
        parse_search_space(data, "test.yaml")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_search_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {stage1.lr: [\n")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_search_space(bad)


def test_round_trip_through_to_dict():
    sp = space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}, "stage1.mixup_alpha": {"choice": [0.0, 0.4]}},
               description="d")
    again = parse_search_space(sp.to_dict(), sp.source)
    assert again == sp
    assert math.isclose(again.params[0].low, 1e-4)


def effects(params: dict, cfg_overrides=(), stages=(1,), steps=None, **extra):
    cfg = load_config("demo", list(cfg_overrides))
    return {e.key: e for e in space(params, **extra).first_effects(cfg, stages, steps or {1: 10, 2: 10})}


def test_augmentation_keys_act_once_strong_augmentation_starts():
    got = effects({"stage1.augment.strength": {"uniform": [0, 1]}, "stage1.lr": {"loguniform": [1e-4, 1e-2]},
                   "model.dropout": {"uniform": [0.1, 0.5]}}, ["stage1.light_epochs=2", "stage1.epochs=4"])
    assert (got["stage1.augment.strength"].stage, got["stage1.augment.strength"].epoch) == (1, 3)
    assert got["stage1.lr"].epoch == 1 and (got["model.dropout"].stage, got["model.dropout"].epoch) == (1, 1)
    # a searched light_epochs: the augmentation keys wait for its top, the key itself acts after its low
    got = effects({"stage1.augment.erasing_p": {"uniform": [0, 0.5]}, "stage1.light_epochs": {"int": [1, 3]}},
                  ["stage1.epochs=6"])
    assert got["stage1.augment.erasing_p"].epoch == 4 and got["stage1.light_epochs"].epoch == 2
    # keys outside stageN.* act from the first epoch of the trial's first stage
    assert effects({"model.dropout": {"uniform": [0.1, 0.5]}}, stages=(2,))["model.dropout"].stage == 2


def test_augmentation_that_never_starts_is_flagged():
    got = effects({"stage1.augment.strength": {"uniform": [0, 1]}}, ["stage1.light_epochs=4", "stage1.epochs=4"])
    e = got["stage1.augment.strength"]
    assert e.epoch is None and "stage1.light_epochs = 4" in e.why and "Stage I trains 4 epochs" in e.why
    # a searched epochs range counts with its top
    got = effects({"stage1.augment.strength": {"uniform": [0, 1]}, "stage1.epochs": {"int": [3, 6]}},
                  ["stage1.light_epochs=4", "stage1.epochs=4"])
    assert got["stage1.augment.strength"].epoch == 5


def test_the_length_and_floor_of_the_lr_schedule_act_after_its_warm_up():
    # the cosine starts at the base LR at the warm-up's end, whatever epochs and final_lr are:
    # 10 steps an epoch, 1.5 warm-up epochs (15 steps): step 16 (0-based) is the first to differ
    got = effects({"stage1.final_lr": {"loguniform": [1e-6, 1e-4]}, "stage1.epochs": {"int": [4, 6]},
                   "stage1.lr": {"loguniform": [1e-4, 1e-2]}}, ["stage1.warmup_epochs=1.5"])
    assert got["stage1.final_lr"].epoch == got["stage1.epochs"].epoch == 2 and got["stage1.lr"].epoch == 1
    assert "until 15 warm-up steps are over" in got["stage1.final_lr"].why
    assert effects({"stage1.final_lr": {"loguniform": [1e-6, 1e-4]}}, ["stage1.warmup_epochs=2"])["stage1.final_lr"].epoch == 3
    late = effects({"stage1.final_lr": {"loguniform": [1e-6, 1e-4]}}, ["stage1.warmup_epochs=4", "stage1.epochs=4"])
    assert late["stage1.final_lr"].epoch is None and "after Stage I's 4 epochs" in late["stage1.final_lr"].why


@pytest.mark.parametrize("decay", [0.0, 0.1, 0.3, 0.5, 0.9, 0.95, 0.99, 0.999, 0.9999])
def test_first_step_above_matches_the_ema_warmup(decay):
    """Before that step the warm-up caps every decay >= ``decay`` at the same value; from it on not."""
    step = first_step_above(decay)
    assert ema_decay_at(step, decay, True) != ema_decay_at(step, 1.0, True)
    for s in range(max(1, step - 3), step):  # optimizer steps count from 1
        assert ema_decay_at(s, decay, True) == ema_decay_at(s, 1.0, True)


def test_an_ema_decay_acts_once_the_warmup_passes_the_range_low_end():
    # 0.9 first differs from larger decays at step 81: epoch 9 of 10 steps, epoch 1 of 100
    assert effects({"stage1.ema_decay": {"decay": [0.9, 0.99]}}, ["stage1.epochs=20"])["stage1.ema_decay"].epoch == 9
    got = effects({"stage2.ema_decay": {"decay": [0.9, 0.99]}}, ["stage2.epochs=20"], stages=(1, 2), steps={1: 1, 2: 100})
    assert (got["stage2.ema_decay"].stage, got["stage2.ema_decay"].epoch) == (2, 1)  # the step count restarts per stage
    assert "passes the top, 0.99, at step 891 (epoch 9)" in got["stage2.ema_decay"].why
    # never within the stage: 4 epochs x 10 steps end with the warm-up at 41/50 = 0.82
    e = effects({"stage1.ema_decay": {"decay": [0.9, 0.99]}}, ["stage1.epochs=4"])["stage1.ema_decay"]
    assert e.epoch is None and "reaches only 0.82" in e.why and "search decays below 0.82" in e.why
    # without the warm-up a decay acts from the first step
    assert effects({"stage1.ema_decay": {"decay": [0.9, 0.99]}}, ["stage1.epochs=4", "stage1.ema_warmup=false"]
                   )["stage1.ema_decay"].epoch == 1


def test_grace_period_in_the_file():
    sp = space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}}, grace_period=3)
    assert sp.grace_period == 3 and parse_search_space(sp.to_dict(), sp.source) == sp
    assert space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}}).grace_period is None
    for bad in (0, 1.5, "2", True):
        with pytest.raises(SearchSpaceError, match="grace_period must be a whole number of epochs >= 1"):
            space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}}, grace_period=bad)


def test_the_objective_s_own_definition_cannot_be_searched():
    with pytest.raises(SearchSpaceError, match="eval.select_on: cannot be searched.*compared on one measure"):
        space({"eval.select_on": {"choice": ["mean_domain", "pooled"]}}).check(load_config("demo"), (1,))
    with pytest.raises(SearchSpaceError, match="eval.hflip_tta: cannot be searched: it changes how the validation"):
        space({"eval.hflip_tta": {"choice": [True, False]}}).check(load_config("demo"), (1,))


@pytest.mark.parametrize("key, spec, why", [
    ("seed", {"int": [0, 9]}, "every trial trains with the search's seed"),
    ("data.normalize", {"choice": ["none", "jpeg:90@48"]}, "generated once, before the trials"),
    ("data.synthetic.artefact_strength", {"uniform": [5.0, 30.0]}, "generated once, before the trials"),
    ("eval.threshold_policy", {"choice": ["youden", "max_f1"]}, "thresholds move no AUC"),
])
def test_keys_no_trial_acts_on_cannot_be_searched(key, spec, why):
    with pytest.raises(SearchSpaceError) as err:
        space({key: spec}).check(load_config("demo"), (1,))
    assert f"{key}: cannot be searched: no trial acts on it (" in str(err.value) and why in str(err.value)
    space({"data.decode_draft": {"choice": [True, False]}}).check(load_config("demo"), (1,))  # one that does act


@pytest.mark.parametrize("name, stages, steps", [
    ("paper", (1, 2), {1: 500, 2: 2000}),  # the original's ~500 steps per Stage I epoch (DESIGN.md)
    ("paper-stage2", (2,), {2: 2000}),
])
def test_paper_spaces_fit_asha_on_paper_sized_data(name, stages, steps):
    """On data of the paper's size every key acts by ASHA's first rung at the default grace 1
    (on the embedded synthetic set they do not, which jobs.tune says: see test_tune_cli)."""
    sp = load_search_space(SPACES / f"{name}.yaml")
    got = sp.first_effects(load_config("paper"), stages, steps)
    final = [e for e in got if e.stage == stages[-1]]
    assert all(e.epoch == 1 for e in final), [(e.key, e.epoch) for e in final]
    assert all(e.epoch is not None for e in got)


@pytest.mark.parametrize("params, clash", [
    # each end is accepted with the config's other values; a trial may draw the two together
    ({"stage1.lr": {"loguniform": [1e-4, 3e-3]}, "stage1.final_lr": {"loguniform": [1e-6, 1e-3]}},
     "stage1.lr=0.0001 with stage1.final_lr=0.001"),
    ({"stage1.augment.jpeg_quality_min": {"int": [40, 90]}, "stage1.augment.jpeg_quality_max": {"int": [60, 95]}},
     "stage1.augment.jpeg_quality_min=90 with stage1.augment.jpeg_quality_max=60"),
    ({"scaling.sync_batchnorm": {"choice": [False, True]}, "runtime.compile": {"choice": [False, True]},
      "stage1.lr": {"loguniform": [1e-4, 1e-2]}},  # a key that takes no part is not named
     "scaling.sync_batchnorm=True with runtime.compile=True is rejected"),
])
def test_values_refused_only_together_are_refused_naming_the_keys_and_values(params, clash):
    with pytest.raises(SearchSpaceError) as err:
        space(params).check(load_config("demo"), (1,))
    message = str(err.value)
    assert message.startswith("test.yaml: ") and clash in message
    assert "A trial can draw these values together: narrow the ranges of" in message and "in test.yaml" in message
    assert ("stage1.lr" in message) == ("stage1.lr" in clash)


def test_values_accepted_only_together_pass():
    # demo's stage1.lr is 1e-3: a final_lr of 1.5e-3 is refused beside it, but every trial's lr is >= 2e-3
    space({"stage1.lr": {"loguniform": [2e-3, 1e-2]}, "stage1.final_lr": {"loguniform": [1e-5, 1.5e-3]}}).check(
        load_config("demo"), (1,))


def test_every_value_of_a_short_int_range_is_checked():
    # blur_kernel must be odd: both ends of [3, 7] are, the 4 a trial can draw is not
    with pytest.raises(SearchSpaceError, match=r"test.yaml: stage1.augment.blur_kernel: value 4 of its range is "
                                               r"rejected by the config: .*choice: \[...\]"):
        space({"stage1.augment.blur_kernel": {"int": [3, 7]}}).check(load_config("demo"), (1,))
    space({"stage1.augment.blur_kernel": {"choice": [3, 5, 7]}}).check(load_config("demo"), (1,))


def test_the_values_between_an_int_range_s_ends_are_listed_once_for_both_checks():
    """value_combinations and jobs.tune's batch check (_every_value) share Param.int_values."""
    from jobs.tune import _every_value
    from trueface.config.search_space import value_combinations

    param = space({"stage1.augment.blur_kernel": {"int": [3, 7]}}).params[0]
    assert list(param.int_values()) == [3, 4, 5, 6, 7]
    listed = [v["stage1.augment.blur_kernel"] for v in value_combinations([param])]
    assert listed == [3, 7, 4, 5, 6]  # the ends (extremes), then the values between them
    assert list(_every_value(param, 9)) == list(param.int_values()) and list(_every_value(None, 9)) == [9]


def test_a_wide_space_checks_every_three_keys_together():
    wide = {f"stage1.augment.{k}": {"uniform": [0.1, 0.9]} for k in
            ("randaugment_p", "color_jitter_p", "grayscale_p", "jpeg_p", "blur_p", "noise_p", "erasing_p")}
    wide.update({"stage1.momentum": {"uniform": [0.5, 0.9]}, "stage1.weight_decay": {"uniform": [0.0, 0.01]},
                 "stage1.label_smoothing": {"uniform": [0.0, 0.2]}})
    clash = {"stage1.lr": {"loguniform": [1e-4, 3e-3]}, "stage1.final_lr": {"loguniform": [1e-6, 1e-3]}}
    with pytest.raises(SearchSpaceError, match="stage1.lr=0.0001 with stage1.final_lr=0.001"):
        space({**wide, **clash}).check(load_config("demo"), (1,))
    # and a pair valid only together passes there too: the keys outside a triple take a trial's values
    together = {"stage1.lr": {"loguniform": [2e-3, 1e-2]}, "stage1.final_lr": {"loguniform": [1e-5, 1.5e-3]}}
    space({**wide, **together}).check(load_config("demo"), (1,))
    from trueface.config.search_space import MAX_COMBINATIONS

    assert 2 ** len(wide) <= MAX_COMBINATIONS < 2 ** len({**wide, **clash})  # so the triples did it


def test_model_arch_cannot_be_searched_from_a_stage_one_checkpoint():
    arch = {"model.arch": {"choice": ["resnet18", "resnet50"]}}
    with pytest.raises(SearchSpaceError, match="model.arch: cannot be searched with --stage 2"):
        space(arch).check(load_config("demo"), (2,))
    space(arch).check(load_config("demo"), (1, 2))

"""Search spaces: parsing, every error before a trial starts, sampling and the decay form."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from trueface.config import load_config
from trueface.config.search_space import SearchSpaceError, load_search_space, parse_search_space

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def space(params: dict, **extra):
    return parse_search_space({"params": params, **extra}, "test.yaml")


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
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


def test_stage_one_keys_are_refused_when_trials_fine_tune_stage_two():
    with pytest.raises(SearchSpaceError, match="--stage 1"):
        space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}}).check(load_config("demo"), (2,))
    space({"stage1.lr": {"loguniform": [1e-4, 1e-2]}, "seed": {"int": [0, 3]}}).check(load_config("demo"), (1, 2))


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

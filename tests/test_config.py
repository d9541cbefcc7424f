import re
from pathlib import Path

import pytest

from trueface.config import ConfigError, Config, flatten, from_dict, load_config, parse_overrides, to_dict, to_yaml
from trueface.config.loading import read_yaml_file


def test_paper_preset_is_the_papers_settings():
    cfg = load_config("paper")
    assert (cfg.stage1.image_size, cfg.stage2.image_size) == (224, 1024)
    assert (cfg.stage1.batch_size, cfg.stage2.batch_size) == (200, 12)
    assert (cfg.stage1.epochs, cfg.stage1.patience, cfg.stage2.epochs, cfg.stage2.patience) == (50, 4, 20, 2)
    assert cfg.stage1.ema_decay == cfg.stage2.ema_decay == 0.9999
    assert (cfg.stage1.mixup_alpha, cfg.stage2.mixup_alpha) == (0.0, 0.2)
    assert cfg.stage1.warmup_epochs == 5 and cfg.stage1.light_epochs == 5 and cfg.stage2.light_epochs == 0
    assert (cfg.stage1.augment.blur_kernel, cfg.stage2.augment.blur_kernel) == (3, 7)
    assert cfg.model.weights == "imagenet" and cfg.model.dropout == 0.7


def test_override_of_one_stage2_key_keeps_stage2_defaults():
    cfg = load_config("paper", ["stage2.augment.strength=0.5", "stage2.mixup_alpha=0.3"])
    assert cfg.stage2.augment.strength == 0.5 and cfg.stage2.augment.blur_kernel == 7
    assert cfg.stage2.mixup_alpha == 0.3 and cfg.stage2.image_size == 1024
    assert cfg.stage1.augment.strength == 1.0


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"stage2\.mixup_alfa.*did you mean 'stage2\.mixup_alpha'"):
        load_config("demo", ["stage2.mixup_alfa=0.3"])


@pytest.mark.parametrize("override, message", [
    ("stage2.mixup_alpha=abc", r"stage2\.mixup_alpha: expected a number"),
    ("stage1.epochs=2.5", r"stage1\.epochs: expected an integer"),
    ("model.channels_last=1", r"model\.channels_last: expected true/false"),
    ("stage1.domains=tpdne", r"stage1\.domains: expected a list"),
    ("stage1.augment.strength=1.5", r"stage1\.augment\.strength: must be in \[0, 1\]"),
    ("stage2.ema_decay=1.0", r"stage2\.ema_decay: must be in \[0, 1\)"),
    ("eval.threshold_policy=median", r"eval\.threshold_policy"),
    ("stage1.augment.blur_kernel=4", r"blur_kernel: must be an odd"),
    ("run_name=a/b", r"run_name"),
    ("scaling.sync_batchnorm=true runtime.compile=true",
     r"scaling\.sync_batchnorm: cannot be combined with runtime\.compile=true: torch\.compile breaks its graph"),
    # inf and nan passed every range check and failed in a worker; 1_0e-4 is Python's spelling, not a config's
    ("stage1.warmup_epochs=.inf", r"stage1\.warmup_epochs: must be a finite number"),
    ("stage1.mixup_alpha=inf", r"stage1\.mixup_alpha: must be a finite number"),
    ("stage1.lr=nan", r"stage1\.lr: must be a finite number"),
    ("stage1.weight_decay=1_0e-4", r"stage1\.weight_decay: expected a number"),
    # numpy's SeedSequence refuses negative seeds, inside a worker
    ("seed=-1", r"seed: must be >= 0"),
    ("data.synthetic.seed=-5", r"data\.synthetic\.seed: must be >= 0"),
    # YAML reads an unquoted on as true; run_name became 'true' without a word
    ("run_name=on", r"run_name: expected text, got a yes/no value \(true\).*quote the text"),
    # an unset variable: the files went to the current folder (an empty override is refused first,
    # see test_an_empty_override_is_refused; a quoted one, or one from a file, reaches this check)
    ('output.runs_dir=""', r"output\.runs_dir: must be a folder or URI, not empty"),
    ("data.cache_dir=''", r"data\.cache_dir: must be a folder or URI, not empty"),
])
def test_wrong_type_or_range_is_an_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", override.split(" "))


def test_gpu_settings_every_ray_worker_would_refuse_are_errors():
    with pytest.raises(ConfigError, match=r"runtime\.device: is cuda, but scaling\.use_gpu=false gives the workers no GPU"):
        load_config("paper", ["runtime.device=cuda", "scaling.use_gpu=false"])
    for cpu in ("scaling.use_gpu=false", "runtime.device=cpu"):
        with pytest.raises(ConfigError, match=r"scaling\.sync_batchnorm: needs GPUs: torch's SyncBatchNorm runs on CUDA only"):
            load_config("paper", ["scaling.sync_batchnorm=true", "scaling.num_workers=2", cpu])
    # use_gpu=auto gives GPUs where the cluster has them: only the workers can tell
    assert load_config("paper", ["runtime.device=cuda"]).scaling.use_gpu == "auto"
    assert load_config("paper", ["scaling.sync_batchnorm=true", "scaling.num_workers=2"]).scaling.sync_batchnorm
    assert load_config("demo", ["scaling.sync_batchnorm=true", "scaling.use_gpu=false"])  # one worker: nothing to sync


def test_gpus_per_worker_is_one_gpu_at_most_and_a_fraction_only_for_one_worker():
    with pytest.raises(ConfigError, match=r"scaling\.gpus_per_worker: must be > 0 and at most 1: a worker trains on one GPU"):
        load_config("paper", ["scaling.gpus_per_worker=2"])
    with pytest.raises(ConfigError, match=r"scaling\.gpus_per_worker: must be 1 with scaling\.num_workers=2: .*NCCL"):
        load_config("paper", ["scaling.num_workers=2", "scaling.gpus_per_worker=0.5"])
    # what stays allowed: one worker sharing a GPU (tune's trials), a whole GPU per rank, CPU workers
    assert load_config("paper", ["scaling.gpus_per_worker=0.25"]).scaling.gpus_per_worker == 0.25
    assert load_config("paper", ["scaling.num_workers=4"]).scaling.gpus_per_worker == 1
    assert load_config("demo", ["scaling.num_workers=2", "scaling.gpus_per_worker=0.5", "scaling.use_gpu=false"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["stage1.epochs"])
    assert parse_overrides(["a.b=1", "a.c=[x, y]"]) == {"a": {"b": 1, "c": ["x", "y"]}}


def test_yaml_1_1_float_strings_are_numbers():
    assert load_config("demo", ["stage1.lr=1e-4"]).stage1.lr == 1e-4


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: demo, paper"):
        load_config("nope")


def test_file_with_base_and_round_trip(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: demo\nstage1:\n  epochs: 7\n")
    cfg = load_config(str(f))
    assert cfg.stage1.epochs == 7 and cfg.run_name == "demo"
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(str(dumped)) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_bad_yaml_file_names_the_file(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(f))
    f.write_text("stage1:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="stage1.epochz"):
        load_config(str(f))


def test_flatten_gives_dotted_keys():
    flat = flatten(to_dict(Config()))
    assert flat["stage2.augment.strength"] == 1.0 and "stage1.ema_decay" in flat


def test_true_false_given_to_a_text_key_is_read_as_that_text():
    """`scaling.use_gpu=true` on a command line is YAML's bool; the key holds "auto"/"true"/"false"."""
    assert load_config("demo", ["scaling.use_gpu=true"]).scaling.use_gpu == "true"
    assert load_config("demo", ["scaling.use_gpu=false"]).scaling.use_gpu == "false"
    with pytest.raises(ConfigError, match="scaling.use_gpu: must be auto, true or false"):
        load_config("demo", ["scaling.use_gpu=yes please"])


def test_key_given_twice_in_a_file_is_an_error(tmp_path: Path):
    f = tmp_path / "dup.yaml"
    f.write_text("base: demo\nstage1:\n  epochs: 3\nstage1:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: .*key 'stage1' given twice \(lines 2 and 4\)"):
        load_config(str(f))
    f.write_text("stage1:\n  augment:\n    strength: 0.3\n    strength: 0.4\n")
    with pytest.raises(ConfigError, match=r"key 'strength' given twice \(lines 3 and 4\)"):
        load_config(str(f))
    with pytest.raises(ConfigError, match=r"dup\.yaml: .*key 'strength' given twice"):
        read_yaml_file(f, ConfigError, "search space")
    # a merge key's values are meant to be overridden
    f.write_text("stage1: &s1\n  epochs: 6\nstage2:\n  <<: *s1\n  epochs: 2\n")
    assert load_config(str(f)).stage2.epochs == 2


def test_base_is_found_next_to_the_file_that_names_it(tmp_path: Path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parent.yaml").write_text("base: demo\nstage1:\n  epochs: 7\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: parent.yaml\nstage1:\n  lr: 0.5\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("sub/child.yaml")
    assert (cfg.stage1.epochs, cfg.stage1.lr, cfg.run_name) == (7, 0.5, "demo")
    (tmp_path / "paper").mkdir()  # a folder is not a config file: the preset of that name is meant
    assert load_config("paper") == load_config()
    (tmp_path / "sub" / "child.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: base: config file nowhere\.yaml does not exist"):
        load_config("sub/child.yaml")


def test_a_file_that_is_not_a_config_is_an_error_naming_it(tmp_path: Path):
    f = tmp_path / "best.pt"
    f.write_bytes(b"PK\x03\x04\x80\x02\xff\xfe binary")
    with pytest.raises(ConfigError, match=r"best\.pt is not a YAML text file \(a checkpoint"):
        load_config(str(f))
    f = tmp_path / "mine.yaml"
    for base in ("[demo]", "5"):
        f.write_text(f"base: {base}\n")
        with pytest.raises(ConfigError, match=r"mine\.yaml: base must be one config name or path, got"):
            load_config(str(f))


def test_a_saved_config_with_an_empty_folder_is_still_applied():
    """Empty output folders are refused where a job loads its config, not when a checkpoint saved
    by an older version with one is scored (evaluation applies values to its saved config)."""
    from trueface.config import apply_values, from_dict

    saved = from_dict({"output": {"runs_dir": ""}})
    assert apply_values(saved, {"eval.batch_size": 4}).eval.batch_size == 4


def test_an_empty_override_is_refused_not_read_as_the_default():
    """`data.root=$DATA` with $DATA unset trained the paper preset on the embedded synthetic set."""
    with pytest.raises(ConfigError, match=r"override data\.root: the value is empty \(an unset variable\?\)"):
        load_config("paper", ["data.root="])
    with pytest.raises(ConfigError, match=r"override stage1\.lr: the value is empty"):
        parse_overrides(["stage1.lr=  "])
    assert load_config("paper", ['data.root=""']).data.root == ""  # the embedded set, asked for on purpose


def test_final_lr_above_lr_names_both_keys_and_values():
    # the user lowered stage1.lr; final_lr, a key they did not touch, is only half of the story
    with pytest.raises(ConfigError, match=r"stage1\.final_lr: 1e-06 must be in \[0, stage1\.lr\] = \[0, 5e-07\].*"
                                          r"lower stage1\.final_lr or raise stage1\.lr"):
        load_config("paper", ["stage1.lr=5e-7"])


def test_the_yes_no_hint_quotes_what_was_written(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model\.weights: expected text, got a yes/no value \(false\).*"
                                          r"weights: 'no' in a file or \"model\.weights='no'\""):
        load_config("demo", ["model.weights=no"])
    f = tmp_path / "mine.yaml"
    f.write_text("base: demo\nmodel:\n  weights: Yes\nstage1:\n  domains: [dalle, off]\n")
    with pytest.raises(ConfigError, match=r"weights: 'Yes' in a file"):
        load_config(str(f))
    with pytest.raises(ConfigError, match=r"stage1\.domains\[1\]: expected text.*quote the text, e\.g\. 'off'$"):
        load_config(str(f), ["model.weights=none"])


def test_a_warmup_longer_than_the_stage_is_an_error():
    with pytest.raises(ConfigError, match=r"stage1\.warmup_epochs: 5 is longer than stage1\.epochs=3: the LR would "
                                          r"still be climbing when the stage ends"):
        load_config("paper", ["stage1.epochs=3"])
    # a one-epoch look at the demo is all warm-up, on purpose (the plan says so)
    assert load_config("demo", ["stage1.epochs=1"]).stage1.warmup_epochs == 1


@pytest.mark.parametrize("override, key", [("stage2.domains=[tpdne, tpdne, dalle]", "stage2.domains"),
                                           ("stage1.domains=[a, b, a]", "stage1.domains"),
                                           ("data.test_domains=[dalle, dalle]", "data.test_domains")])
def test_a_domain_listed_twice_is_an_error(override, key):
    name = override.split("[")[1].split(",")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: lists {name} more than once"):
        load_config("demo", [override])

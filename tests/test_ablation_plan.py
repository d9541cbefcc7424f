"""Ablation specs and plans (trueface.ablation): what is trained and scored for each row, and why
a row is dropped. No training: plans are pure functions of the spec and the config."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jobs.ablate import trial_config
from jobs.ablate_report import ablation_manifest, held_out_markdown
from trueface.ablation import (AblationSpecError, load_ablation_spec, parse_ablation_spec, plan_ablation,
                               plan_leave_one_domain_out)
from trueface.config import load_config
from tests.conftest import REPO, tiny_overrides

SHIPPED = REPO / "search_spaces" / "ablation.yaml"
DOMAINS = ["140k-real-vs-fake", "tpdne", "dalle"]


def demo(*overrides: str):
    cfg = load_config("demo", list(overrides))
    return replace(cfg, stage1=replace(cfg.stage1, domains=("140k-real-vs-fake",)),
                   stage2=replace(cfg.stage2, domains=tuple(DOMAINS)))


def spec(components: dict, **extra):
    return parse_ablation_spec({"components": components, **extra}, "test.yaml")


def evaluation_of(plan, row: str):
    variant = next(v for v in plan.variants if v.name == row)
    group, ev = plan.evaluation(variant.evaluation)
    return group, ev, variant.weights


def test_shipped_spec_on_both_stages_trains_only_what_changes_training():
    plan = plan_ablation(load_ablation_spec(SHIPPED), demo("eval.hflip_tta=true"), (1, 2))
    assert [v.name for v in plan.variants] == ["full", "no-ema", "no-strong-augmentation", "no-light-warmup", "no-mixup",
                                               "no-domain-balance", "no-stage2", "no-flip-tta", "plain"]
    assert plan.dropped == []
    stage1 = {g.name: g for g in plan.phase(1)}
    stage2 = {g.name: g for g in plan.phase(2)}
    # Stage I is trained once per distinct Stage I config: MixUp and balancing act in Stage II only,
    # and plain's Stage I is no-strong-augmentation's (at strength 0 the light warm-up changes nothing).
    assert set(stage1) == {"full", "no-strong-augmentation", "no-light-warmup"}
    assert set(stage2) == {"full", "no-strong-augmentation", "no-light-warmup", "no-mixup", "no-domain-balance"}
    assert stage2["no-mixup"].init_group == "full" and stage2["no-domain-balance"].init_group == "full"
    assert stage2["no-light-warmup"].init_group == "no-light-warmup"
    assert stage2["no-mixup"].values == {"stage2.mixup_alpha": 0}
    # Rows that only change the scoring are evaluations of the full recipe's trials.
    group, ev, weights = evaluation_of(plan, "no-ema")
    assert (group.name, group.stage, ev.variant, weights) == ("full", 2, "full", "raw")
    group, ev, weights = evaluation_of(plan, "no-stage2")
    assert (group.name, group.stage, ev.stage, weights) == ("full", 1, 1, "ema")
    group, ev, weights = evaluation_of(plan, "no-flip-tta")
    assert (group.name, group.stage, ev.eval_values, weights) == ("full", 2, {"eval.hflip_tta": False}, "ema")
    # plain: every component off at once; Stage II off, so it is a Stage I checkpoint scored raw,
    # without flip: the Stage I trials of no-strong-augmentation (the idle light_epochs 0 left out)
    group, ev, weights = evaluation_of(plan, "plain")
    assert (group.name, group.stage, ev.stage, weights) == ("no-strong-augmentation", 1, 1, "raw")
    assert group.values == {"stage1.augment.strength": 0}
    assert ev.eval_values == {"eval.hflip_tta": False} and ev.folder == "evals/plain"
    assert {k: v for k, v in group.config(demo(), 1).stage1.augment.__dict__.items() if k == "strength"} == {"strength": 0}


def test_components_that_change_nothing_here_are_dropped_with_the_reason():
    plan = plan_ablation(load_ablation_spec(SHIPPED), demo(), (1,))
    dropped = dict(plan.dropped)
    assert set(dropped) == {"no-mixup", "no-domain-balance", "no-stage2", "no-flip-tta"}
    assert "stage2.balance (Stage II is not trained)" in dropped["no-domain-balance"]
    assert "stage1.mixup_alpha (already 0.0)" in dropped["no-mixup"]
    assert "eval.hflip_tta (already False)" in dropped["no-flip-tta"]
    assert [g.name for g in plan.groups] == ["full", "no-strong-augmentation", "no-light-warmup"]
    # plain = no-strong-augmentation's trials, raw weights: one evaluation serves both rows
    assert evaluation_of(plan, "plain")[1] == evaluation_of(plan, "no-strong-augmentation")[1]
    assert all(g.stage == 1 and g.init_group is None for g in plan.groups)
    # with a single component acting, "plain" would repeat it
    one = plan_ablation(spec({"mixup": {"when_off": {"set": {"stage1.mixup_alpha": 0}}},
                              "ema": {"when_off": {"weights": "raw"}}}), demo(), (1,))
    assert [v.name for v in one.variants] == ["full", "no-ema"] and dict(one.dropped)["plain"].startswith("fewer than two")


def test_knobs_that_could_never_act_on_this_config_are_dropped():
    """A single Stage II domain (the mini 140K set): balancing by domain is balancing by class.
    No strong epochs (light_epochs >= epochs): strength 0 trains the same. Strength 0 already:
    the light warm-up is the strong phase. Each would train a copy of the full recipe."""
    single = replace(demo(), stage2=replace(demo().stage2, domains=("140k-real-vs-fake",)))
    dropped = dict(plan_ablation(load_ablation_spec(SHIPPED), single, (1, 2)).dropped)
    assert "one Stage II domain" in dropped["no-domain-balance"]
    never_strong = plan_ablation(load_ablation_spec(SHIPPED), demo("stage1.light_epochs=4", "stage1.epochs=4"), (1,))
    assert "strong augmentation never starts: light_epochs 4 >= epochs 4" in dict(never_strong.dropped)["no-strong-augmentation"]
    flat = plan_ablation(load_ablation_spec(SHIPPED), demo("stage1.augment.strength=0"), (1,))
    assert "light and strong augmentation are the same" in dict(flat.dropped)["no-light-warmup"]
    # With two Stage II domains and strong epochs, the same components are kept.
    kept = {v.name for v in plan_ablation(load_ablation_spec(SHIPPED), demo(), (1, 2)).variants}
    assert {"no-domain-balance", "no-strong-augmentation", "no-light-warmup"} <= kept


def test_stage2_only_plans_start_every_trial_from_the_given_checkpoint():
    plan = plan_ablation(load_ablation_spec(SHIPPED), demo(), (2,))
    assert all(g.stage == 2 and g.init_group is None for g in plan.groups)
    assert "no-light-warmup" in dict(plan.dropped) and "no-stage2" in dict(plan.dropped)


@pytest.mark.parametrize("components, words", [
    ({"ema": {"when_off": {"set": {"stage1.ema_decai": 0.5}}}}, "stage1.ema_decai is not a config key (did you mean 'stage1.ema_decay'?)"),
    ({"aug": {"when_off": {"set": {"stage1.augment.strength": 2}}}}, "stage1.augment.strength=2 is rejected by the config"),
    ({"ema": {"off": {"weights": "raw"}}}, "write 'when_off:' where it says 'off:'"),
    ({"ema": {"when_off": {"weights": "swa"}}}, "when_off.weights: 'swa' is not one of ema, raw"),
    ({"ema": {"when_off": {"stages": [3]}}}, "when_off.stages: expected a list of stages"),
    ({"ema": {"when_off": {"set": {}}, "wat": 1}}, "components.ema: unknown key 'wat' (did you mean 'what'?)"),
    ({}, "'components' must map names"),
    # Stage II starts from Stage I's weights: "no Stage I" would score the reference's run again
    ({"stage1": {"when_off": {"stages": [2]}}}, "stages [2] trains Stage II without Stage I"),
])
def test_bad_specs_are_refused_naming_the_file_component_and_key(components, words):
    with pytest.raises(AblationSpecError) as err:
        plan_ablation(spec(components), demo(), (1, 2))
    assert words in str(err.value) and "test.yaml" in str(err.value)


def test_checkpoint_selection_is_trained_for_and_thresholds_alone_are_dropped():
    plan = plan_ablation(spec({
        "selection": {"what": "mean-domain selection", "when_off": {"set": {"eval.select_on": "pooled"}}},
        "youden": {"what": "Youden's J", "when_off": {"set": {"eval.threshold_policy": "max_f1"}}},
        "tta": {"what": "flip TTA", "when_off": {"set": {"eval.hflip_tta": False}}},
    }), demo("eval.hflip_tta=true"), (1, 2))
    # select_on picks best.pt and stops early: trials of its own, in both stages, scored as trained
    group, ev, _ = evaluation_of(plan, "no-selection")
    assert group.name == "no-selection" and group.values == {"eval.select_on": "pooled"} and ev.eval_values == {}
    assert {(g.name, g.stage) for g in plan.groups} == {("full", 1), ("full", 2), ("no-selection", 1), ("no-selection", 2)}
    # the flip is a scoring protocol: the reference's checkpoint, scored without it
    group, ev, _ = evaluation_of(plan, "no-tta")
    assert group.name == "full" and ev.eval_values == {"eval.hflip_tta": False}
    assert dict(plan.dropped)["no-youden"] == ("changes nothing here: eval.threshold_policy (thresholds move no AUC, "
                                               "the number an ablation compares)")


def test_leave_one_domain_out_plans_one_fine_tuning_per_domain_from_one_stage1():
    plan = plan_leave_one_domain_out(demo(), (1, 2))
    assert [v.name for v in plan.variants] == ["full"] + [f"without-{d}" for d in DOMAINS]
    assert [g.name for g in plan.phase(1)] == ["full"]
    stage2 = {g.name: g for g in plan.phase(2)}
    assert stage2["without-dalle"].values == {"stage2.domains": ["140k-real-vs-fake", "tpdne"]}
    assert {g.init_group for g in stage2.values()} == {"full"}
    with pytest.raises(AblationSpecError, match=r"needs at least 2 Stage II domains; this data has 1 \(mini\)"):
        plan_leave_one_domain_out(replace(demo(), stage2=replace(demo().stage2, domains=("mini",))), (1, 2))
    with pytest.raises(AblationSpecError, match="leaves a domain out of Stage II"):
        plan_leave_one_domain_out(demo(), (1,))


def _row(unit: str, domain: str, role: str, auc: tuple, diff: tuple | None, words: str = "") -> dict:
    row = {"unit": unit, "domain": domain, "role": role, "auc_mean": auc[0], "auc_low": auc[1], "auc_high": auc[2],
           "auc_method": "t over seeds", "auc_n": 3}
    d = diff or (float("nan"),) * 3
    return {**row, "diff_mean": d[0], "diff_low": d[1], "diff_high": d[2], "diff_method": "paired t over seeds" if diff else "",
            "diff_n": 3 if diff else 0, "diff_words": words or "the reference"}


def test_leave_one_domain_out_table_puts_each_held_out_domain_beside_the_same_runs_trained_domains():
    held, trained = "held out (never trained on)", "trained (Stage I + Stage II), held-out test split"
    rows = [_row("full", "tpdne", trained, (0.9, 0.85, 0.95), None),
            _row("full", "dalle", trained, (0.8, 0.7, 0.9), None),
            _row("full", "combined", "", (0.85, 0.8, 0.9), None),
            _row("without-dalle", "tpdne", trained, (0.91, 0.86, 0.96), (0.01, -0.02, 0.04), "no evidence"),
            _row("without-dalle", "dalle", held, (0.55, 0.45, 0.65), (-0.25, -0.35, -0.15), "lower than full"),
            _row("without-dalle", "combined", "", (0.7, 0.6, 0.8), (-0.15, -0.2, -0.1), "lower than full")]
    text = held_out_markdown(rows, "full")
    line = next(x for x in text.splitlines() if x.startswith("| dalle"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["dalle", held, "0.550 [0.450, 0.650]", f"tpdne ({trained}) 0.910 [0.860, 0.960]",
                     "0.800 [0.700, 0.900]", "-0.250 [-0.350, -0.150]", "lower than full"]
    assert not any(x.startswith("| tpdne") for x in text.splitlines())  # no row held tpdne out
    # the column says what was left out: Stage II; a domain Stage I trained on says so in its role
    assert "| AUC on it (left out of Stage II) |" in text and "a domain Stage I trained on is not held out" in text


def test_trials_get_their_seed_values_and_folder_and_the_manifest_lists_every_seed():
    base = demo("seed=5")
    plan = plan_ablation(load_ablation_spec(SHIPPED), base, (1,))
    job = {"config": __import__("trueface.config", fromlist=["to_dict"]).to_dict(base), "storage": "/tmp/abl",
           "name": "abl-x", "seeds": 3, "kind": "ablation", "command": "python -m jobs.ablate"}
    group = next(g for g in plan.groups if g.name == "no-light-warmup")
    cfg = trial_config(job, group, 2)
    assert cfg.seed == 7 and cfg.run_name == "no-light-warmup-seed2" and cfg.stage1.light_epochs == 0
    assert cfg.output.runs_dir == "/tmp/abl/abl-x/trials"
    manifest = ablation_manifest(job, plan)
    rows = {r["name"]: r for r in manifest["variants"]}
    assert manifest["reference"] == "full"
    assert rows["no-ema"]["evaluations"] == [{"seed": 5 + k, "dir": f"evals/full/seed{k}", "weights": "raw"} for k in range(3)]
    assert rows["plain"]["evaluations"][1] == {"seed": 6, "dir": "evals/no-strong-augmentation/seed1", "weights": "raw"}


def test_a_components_values_are_checked_together():
    jpeg = "stage1.augment.jpeg_quality_"
    # valid only together: 96 is above demo's max of 95, but the component raises the max too
    ok = plan_ablation(spec({"jpeg-high": {"when_off": {"set": {f"{jpeg}min": 96, f"{jpeg}max": 100}}}}, plain=False),
                       demo(), (1,))
    assert next(g for g in ok.groups if g.name == "no-jpeg-high").values == {f"{jpeg}min": 96, f"{jpeg}max": 100}
    # each valid alone, refused together: a message naming the component and both values
    with pytest.raises(AblationSpecError) as err:
        plan_ablation(spec({"jpeg-narrow": {"when_off": {"set": {f"{jpeg}min": 90, f"{jpeg}max": 50}}}}, plain=False),
                      demo(), (1,))
    assert (f"test.yaml: components.jpeg-narrow.when_off.set {jpeg}min=90, {jpeg}max=50 are rejected together by "
            f"the config: invalid config: {jpeg}min: need 1 <= ") in str(err.value)
    assert "change these values in test.yaml" in str(err.value)


def test_the_plain_row_refuses_components_whose_values_clash_together():
    jpeg = "stage1.augment.jpeg_quality_"
    components = {"jpeg-floor": {"when_off": {"set": {f"{jpeg}min": 90}}},
                  "jpeg-ceiling": {"when_off": {"set": {f"{jpeg}max": 50}}}}
    with pytest.raises(AblationSpecError, match=r"test.yaml: the plain row .* \(components jpeg-floor, jpeg-ceiling\).*"
                                                r"set plain: false"):
        plan_ablation(spec(components), demo(), (1,))


@pytest.mark.parametrize("second, refused", [(0.1, True), (0, False), (0.0, False)])
def test_the_plain_row_refuses_two_components_setting_one_key_to_different_values(second, refused):
    components = {"mixup": {"when_off": {"set": {"stage2.mixup_alpha": 0}}},  # demo's is 0.2
                  "regularisation": {"when_off": {"set": {"stage2.mixup_alpha": second, "model.dropout": 0.0}}}}
    if not refused:  # the same value (0 or 0.0) in both: plain sets it once
        plan = plan_ablation(spec(components), demo(), (1, 2))
        assert evaluation_of(plan, "plain")[0].values == {"stage2.mixup_alpha": second, "model.dropout": 0.0}
        return
    with pytest.raises(AblationSpecError) as err:
        plan_ablation(spec(components), demo(), (1, 2))
    assert ("test.yaml: components mixup and regularisation both set stage2.mixup_alpha (mixup: 0, regularisation: 0.1)"
            in str(err.value) and "set plain: false" in str(err.value))
    # without the plain row each component's row sets its own value
    rows = plan_ablation(spec(components, plain=False), demo(), (1, 2))
    assert [g.values.get("stage2.mixup_alpha") for g in rows.phase(2)] == [None, 0, 0.1]


def test_a_rows_missing_weights_file_is_named_with_its_rows_and_component(tiny_root, tmp_path, monkeypatch):
    from jobs import ablate

    monkeypatch.setattr(ablate, "_run", lambda *a: pytest.fail("Ray's trials started with a missing weights file"))
    missing = tmp_path / "missing.pt"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"components:\n  pretrained:\n    when_off: {{set: {{model.weights: {missing}}}}}\n"
                         "  dropout:\n    when_off: {set: {model.dropout: 0.0}}\n")
    with pytest.raises(SystemExit) as exc:
        ablate.main(["--spec", str(spec_file), "--storage", str(tmp_path / "abl"), "--name", "w",
                     *tiny_overrides(tiny_root, tmp_path), "model.weights=none"])
    assert str(exc.value).startswith(f"error: {spec_file}: model.weights '{missing}' of row(s) no-pretrained, plain "
                                     f"(components.pretrained.when_off.set): file {missing} does not")
    assert "leave pretrained out (--components lists the components to run)" in str(exc.value)


def test_components_that_name_none_are_refused_not_read_as_all():
    from jobs.ablate import _spec_data

    with pytest.raises(AblationSpecError, match=r"--components ' , ' names no component; give names of .*ablation.yaml "
                                                r"\(ema, strong-augmentation,"):
        _spec_data(str(SHIPPED), " , ")
    assert list(_spec_data(str(SHIPPED), "mixup, ema")["components"]) == ["ema", "mixup"]

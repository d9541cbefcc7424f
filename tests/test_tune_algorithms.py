"""The search's searcher and scheduler as jobs.ray_tune builds them (jobs.tune_algorithms), without
starting Ray: what Optuna is told of each trial, and what ASHA remembers across a resume.

The searcher gets the calls Tune makes: ``on_trial_result`` for each report a trial goes on after,
then ``on_trial_complete`` with the last report (the one ASHA stopped it at, or its last), or with
``error=True`` and no result for a trial that failed. A trial ASHA stopped before its final stage
ended must reach Optuna as PRUNED (TPE ranks those below complete ones), not as COMPLETE with the
score of the epoch it was stopped at.
"""

from __future__ import annotations

import pickle

import pytest

from jobs import ray_tune
from tests.test_tune_objective import search_spec


def report(stage: int, epoch: int, score: float, done: bool = False) -> dict:
    """One epoch's report as Tune passes it on (stage 2 is the search's final stage), with Tune's
    own count of a trial's reports, which is the trial's epoch in a trial never resumed."""
    metrics = {"stage": stage, "epoch": epoch, "best/select_auc_ema": score, "stage_done": float(done)}
    result = ray_tune.trial_result(metrics, epoch_offset=2 if stage == 2 else 0, final_stage=stage == 2)
    return {**result, "training_iteration": result[ray_tune.TRIAL_EPOCH]}


def run(searcher, trial_id: str, scores: list[float], done: bool, ended_by_scheduler: bool) -> None:
    """Stage I's two epochs, then Stage II's ``scores``; the last report ``done`` (stage_done).
    ``ended_by_scheduler``: ASHA stopped the trial at its last report (max_t, or a rung), which
    Tune then passes to on_trial_complete only; else the trial function returned, and Tune passes
    its last report once more to on_trial_result (a duplicate) before on_trial_complete."""
    reports = [report(1, 1, 0.9), report(1, 2, 0.95, done=True)]
    reports += [report(2, e, s, done=done and e == len(scores)) for e, s in enumerate(scores, 1)]
    for r in reports[:-1] if ended_by_scheduler else reports + reports[-1:]:
        searcher.on_trial_result(trial_id, r)
    searcher.on_trial_complete(trial_id, result=reports[-1])


@pytest.fixture
def searcher(tmp_path):
    searcher, _ = ray_tune.make_search(search_spec(tmp_path))  # Stage I then II, 4 Stage II epochs
    for trial_id in ("stopped", "stopped2", "complete", "patience", "error", "error_with_result"):
        searcher.suggest(trial_id)
    return searcher


def told(searcher, trial_id: str):
    return searcher._ot_study.trials[searcher._ot_trials[trial_id].number]


def test_a_trial_asha_stopped_is_pruned_with_its_final_stage_scores(searcher):
    run(searcher, "stopped", [0.6], done=False, ended_by_scheduler=True)
    run(searcher, "stopped2", [0.5, 0.55], done=False, ended_by_scheduler=True)
    for trial_id, scores in (("stopped", [0.6]), ("stopped2", [0.5, 0.55])):
        trial = told(searcher, trial_id)
        assert trial.state.name == "PRUNED", trial_id
        # keyed by the Stage II epoch (ASHA's clock); Stage I's NaN objectives are not there
        assert trial.intermediate_values == dict(enumerate(scores, 1)), trial_id
        assert trial.value == scores[-1]  # Optuna's: a pruned trial's value is its last intermediate one


def test_finished_trials_are_complete_with_their_score(searcher):
    run(searcher, "complete", [0.7, 0.8, 0.85, 0.86], done=True, ended_by_scheduler=True)  # ASHA's STOP at max_t
    # patience ended Stage II after 2 of its 4 epochs: the stage finished, the trial function returned
    run(searcher, "patience", [0.75, 0.75], done=True, ended_by_scheduler=False)
    complete, patience = told(searcher, "complete"), told(searcher, "patience")
    assert (complete.state.name, complete.value) == ("COMPLETE", 0.86)
    assert complete.intermediate_values == {1: 0.7, 2: 0.8, 3: 0.85, 4: 0.86}
    assert (patience.state.name, patience.value) == ("COMPLETE", 0.75)
    assert patience.intermediate_values == {1: 0.75, 2: 0.75}


def test_a_failed_trial_is_failed_with_or_without_a_result(searcher):
    searcher.on_trial_result("error", report(2, 1, 0.7))
    searcher.on_trial_complete("error", error=True)  # what Tune passes for a failed trial
    searcher.on_trial_complete("error_with_result", result=report(2, 1, 0.7), error=True)
    assert told(searcher, "error").state.name == told(searcher, "error_with_result").state.name == "FAIL"


def test_the_searcher_survives_save_restore_and_tuner_pickle(searcher, tmp_path):
    """jobs.tune --resume: Tuner.restore unpickles the searcher from tuner.pkl (Ray's cloudpickle,
    by class name), then OptunaSearch.restore loads its state from the searcher checkpoint."""
    from ray import cloudpickle

    run(searcher, "stopped", [0.6], done=False, ended_by_scheduler=True)
    searcher.on_trial_result("complete", report(2, 1, 0.7))
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = pickle.loads(cloudpickle.dumps(searcher))
    assert type(restored) is type(searcher) and type(searcher).__name__ == "FinalStageOptunaSearch"
    fresh, _ = ray_tune.make_search(search_spec(tmp_path))
    fresh.restore(str(tmp_path / "searcher.pkl"))
    for again in (restored, fresh):
        assert told(again, "stopped").state.name == "PRUNED"
        # the resumed trial sends its last epoch again, then goes on to finish its final stage
        for epoch, score in ((1, 0.7), (2, 0.8), (3, 0.85)):
            again.on_trial_result("complete", report(2, epoch, score))
        again.on_trial_complete("complete", result=report(2, 4, 0.86, done=True))
        assert (told(again, "complete").state.name, told(again, "complete").value) == ("COMPLETE", 0.86)
        assert told(again, "complete").intermediate_values == {1: 0.7, 2: 0.8, 3: 0.85, 4: 0.86}


def rung_result(epoch: int, score: float) -> dict:
    return {ray_tune.OBJECTIVE_EPOCH: epoch, ray_tune.OBJECTIVE: score}


def asha_decision(scheduler, trial_id: str, epoch: int, score: float) -> str:
    """ASHA's answer to a trial's report (``trial_id`` added first, as Tune adds each trial)."""
    from types import SimpleNamespace

    trial = SimpleNamespace(trial_id=trial_id)
    scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, rung_result(epoch, score))


def test_asha_judges_a_trial_after_a_resume_against_the_rungs_before_it(tmp_path):
    """Tune does not checkpoint its scheduler: without RungKeeper a resumed search's ASHA starts with
    empty rungs and lets through a trial the uninterrupted search would stop."""
    from jobs.tune_algorithms import RungKeeper

    spec = search_spec(tmp_path)  # ASHA at Stage II epochs 1 and 2, keeping 1/2 per rung
    _, before = ray_tune.make_search(spec)
    keeper = RungKeeper(before)
    assert keeper.get_state() is None  # nothing to save yet (Tune then writes no callback file)
    for trial_id, score in (("a", 0.7), ("b", 0.8), ("c", 0.9)):  # each at or above the median before it
        assert asha_decision(before, trial_id, 1, score) == "CONTINUE"
    assert asha_decision(before, "b", 2, 0.85) == "CONTINUE"
    state = pickle.loads(pickle.dumps(keeper.get_state()))  # as Tune saves it with the experiment checkpoint

    _, resumed = ray_tune.make_search(spec)  # tuner.pkl's scheduler: as built, its rungs empty
    _, forgetful = ray_tune.make_search(spec)
    RungKeeper(resumed).set_state(state)
    # a weak trial after the resume: stopped (the rung's median is 0.8), as it would have been
    assert asha_decision(before, "d", 1, 0.6) == asha_decision(resumed, "d", 1, 0.6) == "STOP"
    assert asha_decision(forgetful, "d", 1, 0.6) == "CONTINUE"  # what a resume did before
    assert RungKeeper(resumed).get_state() == RungKeeper(before).get_state()
    # the second rung came back too; a trial already recorded at a rung is not judged there again
    assert asha_decision(resumed, "e", 2, 0.8) == "STOP" and asha_decision(resumed, "b", 2, 0.85) == "CONTINUE"


def test_the_tuner_restores_the_keeper_with_the_scheduler_it_runs(tmp_path, monkeypatch):
    """jobs.tune --resume: Tuner.restore unpickles tuner.pkl, and RungKeeper.set_state must fill the
    scheduler Tune then runs, not a copy of it."""
    from ray import tune

    from jobs.tune_algorithms import RungKeeper

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    spec = search_spec(tmp_path)

    def trainable(config):  # never runs: building and restoring a Tuner starts no Ray
        pass

    ray_tune.make_tuner(spec, trainable, max_concurrent=1)
    restored = tune.Tuner.restore(str(tmp_path / "tune" / spec["name"]), trainable=trainable)._local_tuner
    keepers = [c for c in restored.get_run_config().callbacks if isinstance(c, RungKeeper)]
    assert len(keepers) == 1 and keepers[0].scheduler is restored._tune_config.scheduler

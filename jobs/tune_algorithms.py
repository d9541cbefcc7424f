"""Ray Tune's searcher and scheduler as a TrueFace search needs them (jobs.ray_tune.make_search and
make_tuner build them; imported there, when a search runs, as Ray Tune and Optuna take seconds to
import that a dry run need not spend).

- ``FinalStageOptunaSearch``: Optuna is told a trial ASHA stopped as pruned, not as complete with
  the score of the epoch it stopped at.
- ``RungKeeper``: ASHA's rungs survive ``jobs.tune --resume``. Tune saves its searcher's state and
  its callbacks' with each experiment checkpoint, but not its scheduler's.
"""

from __future__ import annotations

import math
import warnings

import optuna
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler
from ray.tune.search.optuna import OptunaSearch

from jobs.ray_tune import OBJECTIVE_EPOCH, trial_finished


class FinalStageOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, but Optuna compares like with like. Ray tells a trial that ASHA stopped
    COMPLETE, its value the score of the epoch it was stopped at, which TPE then ranks against
    whole trials' final scores. Here it is PRUNED, its final-stage scores kept as intermediate
    values: TPE ranks pruned trials below every complete one, by the last step each reached, then
    by its value there (optuna.samplers._tpe.sampler._split_trials, _get_pruned_trial_score). A
    trial early-stopped by patience finished its stage: COMPLETE. An errored one: FAIL (Ray's).

    Steps are OBJECTIVE_EPOCH, ASHA's clock, not Tune's training_iteration (Ray's choice), which
    counts earlier stages' epochs too and restarts at 1 in a resumed trial, whose later epochs
    Optuna would then drop as steps already reported. Earlier stages (objective NaN) report none."""

    def __init__(self, final_stage: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._final_stage = final_stage  # saved and restored with the rest of __dict__ (OptunaSearch.save)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or trial_id in self._completed_trials:  # an error is FAIL, whatever its last result
            super().on_trial_complete(trial_id, None if error else result, error)
            return
        if result:  # the report that ended the trial: Tune passes on_trial_result only those it goes on after
            self._report(trial_id, result)
        if trial_finished(result, self._final_stage):
            super().on_trial_complete(trial_id, result)
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def _report(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if value is None or math.isnan(float(value)):
            return
        with warnings.catch_warnings():
            # Tune repeats a trial's last report when it ends, and a resumed trial its last epoch
            # (trueface.train._resumed_report): Optuna keeps the first value of a step, as it should.
            warnings.filterwarnings("ignore", message=".*is already reported")
            self._ot_trials[trial_id].report(float(value), int(result[OBJECTIVE_EPOCH]))


class RungKeeper(Callback):
    """Keeps ASHA's rung records (each rung's trial -> score) across a resume.

    Tune checkpoints the searcher and the callbacks, not the scheduler: a resumed search's ASHA
    would start with empty rungs, so the first trial to reach a rung after the resume would go on
    whatever it scored, and later ones would be judged against only the trials that reached it
    since. Tune saves this callback's state with every experiment checkpoint (Ctrl-C included) and
    hands it back (``set_state``) before it adds the restored trials. ``scheduler`` is the very
    object the Tuner runs: tuner.pkl holds both in one pickle, so they stay one after a restore.
    """

    def __init__(self, scheduler: AsyncHyperBandScheduler) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        brackets = [[(milestone, dict(recorded)) for milestone, recorded in b._rungs] for b in self.scheduler._brackets]
        return {"brackets": brackets} if any(r for b in brackets for _, r in b) else None

    def set_state(self, state: dict) -> None:
        for bracket, saved in zip(self.scheduler._brackets, state["brackets"]):
            by_milestone = dict(saved)
            for milestone, recorded in bracket._rungs:
                recorded.clear()
                recorded.update(by_milestone.get(milestone, {}))

"""Optuna as Tune's searcher, told which trials finished, which were stopped early and which failed.

Ray's `OptunaSearch` reports a trial's values at Tune's `training_iteration`, which restarts at 1 when a
sweep is resumed, and tells Optuna COMPLETE, with the last value, for a trial the scheduler stopped:
TPE would then learn from one-epoch scores as if they were final (docs/operations.md, "Optuna and stopped
trials"). `FidelitySearch` reports each value at the trainer's epoch and ends a trial as

    COMPLETE  it ran the epochs it planned; its value is the last one reported
    PRUNED    it reported fewer epochs than it planned (Optuna keeps its values per epoch, and TPE ranks
              a pruned trial below the complete ones, by how far it got)
    FAIL      an error, or the loss diverged (`DIVERGED_AT_STEP` in its last result)

The study lives in a journal file in the experiment directory, so it can be read after the sweep.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from bagssl_core.metrics import EPOCH
from sweeps.report import trial_status

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna_journal.log"

_STATE = {"FINISHED": TrialState.COMPLETE, "KILLED": TrialState.PRUNED, "FAILED": TrialState.FAIL}


def journal_storage(exp_dir: str) -> JournalStorage | None:
    """The Optuna storage of the sweep at exp_dir: a journal file there; None for remote storage
    (`s3://...`), where the study stays in memory and is kept only in Tune's pickled searcher."""
    if "://" in exp_dir:
        return None
    path = Path(exp_dir)
    path.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path / JOURNAL_FILE)))


class FidelitySearch(OptunaSearch):
    """`OptunaSearch` that reports at the trainer's epoch and tells COMPLETE, PRUNED or FAIL (see above).

    Args:
        sampler: Optuna's sampler, seeded.
        storage: where the study lives (`journal_storage`); None keeps it in memory.
        study_name: the study's name in that storage.
        base_epochs: the base config's schedule.epochs, for a trial whose results do not say how many
            epochs it planned and which does not search schedule.epochs itself.
    """

    def __init__(
        self,
        sampler: optuna.samplers.BaseSampler,
        storage: optuna.storages.BaseStorage | None,
        study_name: str,
        base_epochs: int,
    ):
        super().__init__(sampler=sampler, storage=storage, study_name=study_name)
        self.base_epochs = base_epochs
        self._last_epoch: dict[str, int] = {}  # trial id -> the last epoch reported to Optuna

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials:
            return
        value, epoch = _finite(result.get(self.metric)), result.get(EPOCH)
        # A diverged run's last report carries no epoch and no finite value: nothing to learn from it.
        # An epoch reported already (re-reported after a resume from an older checkpoint) keeps its
        # first value, as Optuna would, without Optuna's warning.
        if value is None or epoch is None or int(epoch) <= self._last_epoch.get(trial_id, 0):
            return
        self._last_epoch[trial_id] = int(epoch)
        try:
            self._ot_trials[trial_id].report(value, int(epoch))
        except UpdateFinishedTrialError:
            # The journal is ahead of Tune's pickled searcher: the trial ended before a sweep that was
            # killed outright was resumed (docs/operations.md, "Optuna and stopped trials").
            log.warning("optuna: trial %s already ended; epoch %s not recorded", trial_id, epoch)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        assert self._ot_study is not None  # set up by Tune's set_search_properties before any trial
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        # Tune passes the searcher no result on which the scheduler stops a trial: the epoch that got
        # it stopped arrives here, and a pruned trial needs it among its values.
        self.on_trial_result(trial_id, result)
        state = _STATE[trial_status(result, ot_trial.params, error, self.base_epochs)]
        value: float | None = None
        if state == TrialState.COMPLETE:
            value = _finite(result.get(self.metric))
            if value is None:
                state = TrialState.FAIL  # ran every epoch but has no objective to learn from
        # skip_if_finished: as above, the journal may already hold this trial's end.
        self._ot_study.tell(ot_trial, value, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)


def _finite(value: Any) -> float | None:
    """A reported value as a float, or None when it is missing or not finite (a diverged run's NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None

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

Warm start (`search.warm_start: true`): the study starts with the FINISHED trials of earlier sweeps in
the same MLflow experiment that ran the same space over the same base (`sweeps.lifecycle.space_hash`,
`base_hash`), each added as a COMPLETE trial with its validation objective. Ray's `OptunaSearch` does
the adding itself from `points_to_evaluate` + `evaluated_rewards` (`add_evaluated_point`:
`optuna.trial.create_trial` over the distributions it converted from Tune's param space, then
`study.add_trial`), so the trials carry exactly the distributions the sampler searches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from bagssl_core.metrics import EPOCH
from sweeps.report import score, trial_status
from sweeps.spec import Distribution, SweepSpec
from sweeps.tracking import param_text

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
        warm_start: earlier trials to add to the new study before it samples: (params, validation
            objective) each (`warm_start_trials`).
    """

    def __init__(
        self,
        sampler: optuna.samplers.BaseSampler,
        storage: optuna.storages.BaseStorage | None,
        study_name: str,
        base_epochs: int,
        warm_start: list[tuple[dict[str, Any], float]] | None = None,
    ):
        super().__init__(
            sampler=sampler,
            storage=storage,
            study_name=study_name,
            points_to_evaluate=[p for p, _ in warm_start or []] or None,
            evaluated_rewards=[v for _, v in warm_start or []] or None,
        )
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
        # Set up by Tune's set_search_properties before any trial; OptunaSearch declares it None-only, so
        # read it as Any (an `is not None` check would make the rest unreachable to mypy).
        study: Any = self._ot_study
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
        study.tell(ot_trial, value, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)


def _finite(value: Any) -> float | None:
    """A reported value as a float, or None when it is missing or not finite (a diverged run's NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None


def warm_start_trials(
    spec: SweepSpec, earlier: Iterable[tuple[str, Mapping[str, str], Mapping[str, float]]]
) -> list[tuple[dict[str, Any], float]]:
    """Earlier finished trials (sweep key, MLflow params, last metrics) as (Tune params, validation
    objective) for `FidelitySearch(warm_start=...)`.

    A trial's sampled values are its `trial.<axis>` params, strings in MLflow: each is read back to the
    value of its axis (a choice is matched to the listed value it was written from). The objective is
    the spec's, read from the trial's validation metrics only (`report.score`). A trial missing either,
    or with a value outside the axis, is left out.
    """
    axes = spec.train_axes()
    objective = spec.objective()
    out = []
    for _, params, metrics in earlier:
        s = score(metrics, objective)
        point = {k: _read_value(d, params.get(f"trial.{k}")) for k, d in axes.items()}
        if s is None or not math.isfinite(s.val) or any(v is None for v in point.values()):
            continue
        out.append((point, s.val))
    return out


def _read_value(d: Distribution, text: str | None) -> Any:
    """The axis value an MLflow param string was written from (`tracking.param_text`), or None."""
    if text is None:
        return None
    if d.discrete:
        for v in d.args:
            if param_text(v) == text:
                return v
        return None
    try:
        v = int(text) if d.kind == "randint" else float(text)
    except ValueError:
        return None
    lo, hi = d.args[0], d.args[1]
    inside = lo <= v < hi if d.kind == "randint" else lo <= v <= hi  # randint's high is exclusive, as in Tune
    return v if inside else None

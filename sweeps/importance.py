"""Which swept parameters mattered: Optuna's own fANOVA evaluator over the sweep's trials.

The trials are turned back into an Optuna study (`optuna.trial.create_trial`, with the distribution each
axis of the spec was drawn from), so the importance is Optuna's computation on the same space the
searcher saw, whichever searcher ran the sweep (Optuna, grid, random, or `--local`).

fANOVA fits a random forest to (parameters -> objective) of the completed trials and splits the variance
of its prediction among the parameters. With a handful of trials that forest fits noise and the shares
mean nothing, so below `MIN_COMPLETED` completed trials the report gives the reason instead of numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sweeps.report import TrialOutcome, score
from sweeps.spec import Distribution, SweepSpec

if TYPE_CHECKING:
    import optuna

MIN_COMPLETED = 8  # completed trials below which an importance is not computed (see the module doc)
EVALUATOR = "fANOVA (optuna.importance.FanovaImportanceEvaluator, seed 0)"


@dataclass(frozen=True)
class Importance:
    """Parameter importances, or why there are none.

    Attributes:
        values: axis -> share of the objective's variance (they sum to 1), most important first; None when
            not computed.
        reason: why not (too few trials, a single axis...); None when computed.
        completed: the completed trials the evaluator saw.
        evaluator: which Optuna evaluator computed it.
    """

    values: dict[str, float] | None
    reason: str | None
    completed: int
    evaluator: str = EVALUATOR

    def ranked_axes(self) -> list[str]:
        return list(self.values) if self.values else []

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"evaluator": self.evaluator, "completed_trials": self.completed}
        if self.values is not None:
            out["values"] = self.values
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def optuna_distribution(d: Distribution) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution one spec axis draws from (Tune's randint excludes its upper bound; a
    quniform axis is a float range, since Tune rounds to multiples of q that need not start at low)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    a = d.args
    match d.kind:
        case "choice" | "grid":
            return CategoricalDistribution([_categorical(v) for v in a])
        case "uniform" | "quniform":
            return FloatDistribution(float(a[0]), float(a[1]))
        case "loguniform":
            return FloatDistribution(float(a[0]), float(a[1]), log=True)
        case "randint":
            return IntDistribution(int(a[0]), int(a[1]) - 1)
    raise ValueError(f"unknown distribution {d.kind!r}")


def _categorical(v: Any) -> Any:
    """Optuna's choices are None, bool, int, float or str: a list value (a set of schemes) becomes JSON."""
    return v if v is None or isinstance(v, bool | int | float | str) else json.dumps(v)


def _fits(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def build_study(spec: SweepSpec, trials: Iterable[TrialOutcome]) -> optuna.Study:
    """An in-memory Optuna study holding the trials over the spec's training axes: FINISHED trials with the
    objective are COMPLETE (value: the validation objective), KILLED ones PRUNED, FAILED ones FAIL.

    A trial whose value of some axis lies outside that axis's distribution (a spec edited after the run)
    is left out rather than mis-placed.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = spec.objective()
    dists = {k: optuna_distribution(d) for k, d in spec.train_axes().items()}
    direction: Literal["maximize", "minimize"] = "maximize" if objective.mode == "max" else "minimize"
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=0))
    for t in trials:
        params = {k: _categorical(t.params[k]) for k in dists if k in t.params}
        if len(params) != len(dists) or not all(_fits(dists[k], v) for k, v in params.items()):
            continue
        s = score(t.metrics, objective)
        if t.status == "FINISHED" and s is not None and math.isfinite(s.val):
            state, value = optuna.trial.TrialState.COMPLETE, s.val
        elif t.status == "FAILED":
            state, value = optuna.trial.TrialState.FAIL, None
        else:
            state, value = optuna.trial.TrialState.PRUNED, None
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=value, state=state)
        )
    return study


def param_importance(
    spec: SweepSpec, trials: Iterable[TrialOutcome], min_completed: int = MIN_COMPLETED
) -> Importance:
    """The importance of each training axis for the validation objective, by Optuna's fANOVA evaluator."""
    import optuna

    study = build_study(spec, trials)
    completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    axes = list(spec.train_axes())
    if len(axes) < 2:
        why = f"one training axis ({axes[0]})" if axes else "no training axis"
        return Importance(None, f"{why}: importance compares axes, so it needs at least two", completed)
    if completed < min_completed:
        return Importance(
            None,
            f"too few trials: {completed} completed, fANOVA needs at least {min_completed} to say more than "
            "the noise of its random forest",
            completed,
        )
    # Only now: optuna.importance imports scikit-learn for fANOVA's random forest, about 2-3 s of CPU that
    # the report of a sweep too small to rank its axes (every test sweep, a smoke sweep) need not pay.
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    values = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), normalize=True)
    return Importance({k: float(v) for k, v in values.items()}, None, completed)


def top_axes(importance: Importance, spec: SweepSpec, n: int = 2) -> list[str]:
    """The n most important training axes; in spec order when the importance was not computed."""
    ranked = importance.ranked_axes() or list(spec.train_axes())
    return ranked[:n]

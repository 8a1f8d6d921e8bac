"""The Tune experiment of a sweep: its trainable, searcher, scheduler and live table; run or restored.

Needs Ray started (`sweeps.cluster.ray_cluster`). docs/operations.md explains the choices here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher

from bagssl_core.metrics import EPOCH
from sweeps.cluster import Placement
from sweeps.report import TrialOutcome, trial_status
from sweeps.searcher import FidelitySearch, journal_storage
from sweeps.space import param_space
from sweeps.spec import SweepSpec, asha_max_t, trial_count
from sweeps.tracking import MlflowTuneCallback, trainer_metrics
from sweeps.trainable import TrialPlan, make_trial_fn

log = logging.getLogger(__name__)


def run_with_ray(
    spec: SweepSpec,
    plan: TrialPlan,
    exp_dir: str,
    placement: Placement,
    callback: MlflowTuneCallback,
    resume: bool,
    warm_start: list[tuple[dict[str, Any], float]] | None = None,
) -> list[TrialOutcome] | None:
    """Run (or restore) the Tune experiment at exp_dir; the trials' outcomes, or None when it was interrupted.
    `warm_start`: earlier trials for a fresh Optuna study (a restored one has them already)."""
    epochs = plan.config({}).schedule.epochs
    if plan.probe_epochs:
        # Trials probing at ASHA's rungs only report their other epochs (the loss, a checkpoint) without
        # the objective, which Tune refuses unless told; ASHA and our searcher skip such results, and the
        # spec's own checks have made sure the objective is reported (docs/operations.md, "Probing at
        # ASHA's rungs").
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trial_fn = make_trial_fn(plan, exp_dir + "/train_runs", spec.resources, spec.failure)
    trainable = tune.with_resources(trial_fn, placement.trial_bundle)
    if resume:
        # A restored experiment runs the callbacks it pickled when it started; `callback` serves a fresh
        # one only (docs/operations.md, "The MLflow callback").
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    else:
        tuner = build_tuner(spec, trainable, exp_dir, placement.trials_at_once, epochs, callback, warm_start)
    log.info("running up to %d trial(s) at once", placement.trials_at_once)
    grid = tuner.fit()
    if grid.num_terminated + grid.num_errors < trial_count(spec):
        return None
    out = []
    for res in (grid[i] for i in range(len(grid))):  # ResultGrid indexes but does not declare __iter__
        metrics = trainer_metrics(res.metrics or {})
        tid = (res.metrics or {}).get("trial_id") or Path(res.path).name
        params = dict(res.config or {})
        out.append(
            TrialOutcome(tid, params, trial_status(metrics, params, res.error is not None, epochs), metrics)
        )
    # Without a scheduler nothing stops a trial early, so a stopped one was stopped by the interrupt: Tune
    # counts a trial whose actor it stopped on SIGINT as terminated, and the count above cannot tell.
    if spec.scheduler.name == "none" and any(o.status == "KILLED" for o in out):
        return None
    return out


def build_tuner(
    spec: SweepSpec,
    trainable: Callable[[dict[str, Any]], None],
    exp_dir: str,
    trials_at_once: int,
    epochs: int,
    callback: MlflowTuneCallback,
    warm_start: list[tuple[dict[str, Any], float]] | None = None,
) -> tune.Tuner:
    """A fresh Tune experiment at exp_dir (its storage path / its name); `epochs` is the base's."""
    storage, name = exp_dir.rsplit("/", 1)
    tune_config = tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=search_algorithm(spec, trials_at_once, exp_dir, epochs, warm_start),
        scheduler=_scheduler(spec, epochs),
        num_samples=spec.num_samples,
        reuse_actors=reuse_trial_actors(spec),
    )
    # The live table: the objective and the searched parameters of every trial, best first.
    reporter = tune.CLIReporter(
        metric_columns={
            EPOCH: "epoch",
            spec.metric: spec.metric,
            "train/loss": "loss",
            "patches_per_s": "patches/s",
        },
        parameter_columns=list(spec.train_axes()),
        sort_by_metric=True,
        max_report_frequency=30,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=[callback],
        progress_reporter=reporter,
        failure_config=tune.FailureConfig(max_failures=0),
    )
    return tune.Tuner(
        trainable, param_space=param_space(spec), tune_config=tune_config, run_config=run_config
    )


def reuse_trial_actors(spec: SweepSpec) -> bool:
    """Whether a finished trial's Tune actor runs the next trial, instead of a new actor (a new process
    that imports Ray and torch again): only when no scheduler stops trials early. A trial stopped early
    is still inside `TorchTrainer.fit`, Tune's reset of its actor waits 2 s for that thread and then
    fails the next trial ("Could not re-use actor"); docs/operations.md, "Reusing trial actors"."""
    return spec.scheduler.name == "none"


def search_algorithm(
    spec: SweepSpec,
    trials_at_once: int,
    exp_dir: str,
    epochs: int,
    warm_start: list[tuple[dict[str, Any], float]] | None = None,
) -> SearchAlgorithm | Searcher:
    """The spec's searcher, limited to `trials_at_once` live trials.

    The limit lives here and not in `TuneConfig.max_concurrent_trials`: Tune applies that one by wrapping a
    `Searcher` (Optuna) in a `ConcurrencyLimiter`, but ignores it, with a warning, for a `SearchAlgorithm`
    such as the `BasicVariantGenerator` we build ourselves to seed it (ray/tune/tune.py, `run`). Limiting
    both searchers here is the one way that covers both.
    """
    if spec.search.algo == "optuna":
        return ConcurrencyLimiter(_optuna(spec, exp_dir, epochs, warm_start), max_concurrent=trials_at_once)
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=trials_at_once)


def _optuna(
    spec: SweepSpec, exp_dir: str, epochs: int, warm_start: list[tuple[dict[str, Any], float]] | None
) -> FidelitySearch:
    """Optuna with the spec's seeded sampler; its study, named after the spec, in the sweep's directory;
    seeded with `warm_start`'s earlier trials."""
    s = spec.search
    samplers: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=s.seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=s.seed),
    }
    return FidelitySearch(samplers[s.sampler](), journal_storage(exp_dir), spec.name, epochs, warm_start)


def _scheduler(spec: SweepSpec, epochs: int) -> TrialScheduler:
    # The trainer's epoch, not Tune's training_iteration: that one counts from 1 again after a resume
    # (docs/operations.md, "ASHA").
    if spec.scheduler.name == "asha":
        return ASHAScheduler(
            time_attr=EPOCH,
            max_t=asha_max_t(spec, epochs),
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    if spec.scheduler.name == "median":
        return MedianStoppingRule(time_attr=EPOCH, grace_period=spec.scheduler.grace_period)
    return FIFOScheduler()

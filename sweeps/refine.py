"""Refine: re-train the search's best configs with new seeds, to tell a real difference from luck.

A search trial is one draw of the training noise (initialisation, data order, patches, augmentation,
probes), and the best of many draws is biased upward. With `refine: {top_k, seeds}` in the spec, the
`top_k` best distinct configs of the search (by their validation objective; failed trials excluded) are
each trained again `seeds` times, every epoch, without pruning, and the best config is the one with the
best validation MEAN over its seeds; the test values at the same key are reported beside it, never used.

Seed rule: run j = 1..seeds of a config uses `run.seed = s + 1000·j`, where s is that config's own
run.seed (the base's, unless the space searches run.seed). Every config gets the same offsets, so the
comparison is paired, and no run repeats the seed of a search trial with the same base seed.

Each config is re-trained by the sweep's own trial code: a grid over run.seed of a TrialPlan whose base is
that config, run by the same Tune machinery as the search (one experiment per config, its seeds in
parallel) or, with `--local`, by the same in-process loop.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bagssl_core.config import TrainConfig, merge_overrides
from bagssl_core.metrics import ProbeKey, best_key
from sweeps.report import Refined, TrialOutcome, ranked
from sweeps.space import trial_overrides
from sweeps.spec import Distribution, Objective, SchedulerSpec, SearchSpec, SweepSpec

if TYPE_CHECKING:  # sweeps.trainable imports torch and Ray; --dry-run uses this module without them
    from sweeps.trainable import TrialPlan

SEED_STRIDE = 1000

# Runs one config's refine experiment: (its spec, its plan, the trial it refines) -> each seed's outcome,
# or None when the sweep was interrupted.
RunExperiment = Callable[[SweepSpec, "TrialPlan", TrialOutcome], "list[TrialOutcome] | None"]


def refine_seeds(config_seed: int, n: int) -> list[int]:
    """The seeds of a config's refine runs: config_seed + 1000·j for j = 1..n."""
    return [config_seed + SEED_STRIDE * j for j in range(1, n + 1)]


def top_configs(trials: Iterable[TrialOutcome], objective: Objective, k: int) -> list[TrialOutcome]:
    """The k best trials by the validation objective, failed ones excluded, one per distinct parameter set
    (a searcher may propose the same parameters twice)."""
    out: list[TrialOutcome] = []
    for t, s in ranked(trials, objective):
        if s is not None and t.status != "FAILED" and all(t.params != o.params for o in out):
            out.append(t)
    return out[:k]


def refine_experiment(
    spec: SweepSpec, plan: TrialPlan, params: Mapping[str, Any], seeds: list[int]
) -> tuple[SweepSpec, TrialPlan]:
    """One config's refine runs as a sweep of their own: the config fixed in the plan's base, a grid over
    run.seed, every epoch (no scheduler), and no refine step of its own."""
    rplan = replace(plan, base=merge_overrides(plan.base, trial_overrides(params)))
    rspec = spec.model_copy(
        update={
            "space": {"run.seed": Distribution(grid=seeds)},
            "search": SearchSpec(algo="grid", seed=spec.search.seed),
            "scheduler": SchedulerSpec(name="none"),
            "num_samples": 1,
            "refine": None,
        }
    )
    return rspec, rplan


def run_refine(
    spec: SweepSpec, plan: TrialPlan, trials: list[TrialOutcome], run: RunExperiment
) -> list[Refined] | None:
    """Re-train the spec's top_k configs with new seeds, one config after another; None if interrupted."""
    assert spec.refine is not None
    objective = spec.objective()
    out = []
    for t in top_configs(trials, objective, spec.refine.top_k):
        seeds = refine_seeds(plan.config(t.params).run.seed, spec.refine.seeds)
        print(f"refine {t.trial_id}: run.seed {', '.join(map(str, seeds))}", flush=True)
        runs = run(*refine_experiment(spec, plan, t.params, seeds), t)
        if runs is None:
            return None
        out.append(summarize(t, seeds, runs, objective))
    return out


def summarize(
    trial: TrialOutcome, seeds: list[int], runs: list[TrialOutcome], objective: Objective
) -> Refined:
    """Mean and sample standard deviation over the seeds that finished.

    The key is chosen by the best validation mean among the keys every finished seed reports (each
    scheme and variant is one candidate, as in the search); the test statistics are taken at that key.
    Choosing per seed and then averaging would carry each seed's luck into the mean.
    """
    done = [r for r in runs if r.status == "FINISHED"]
    if not done:
        return Refined(trial, seeds, runs, None, None, None, 0)
    if objective.query is None:
        values = [r.metrics[objective.name] for r in done if objective.name in r.metrics]
        return Refined(trial, seeds, runs, None, _stats(values), None, len(values))
    common = set.intersection(*(set(objective.keys(r.metrics)) for r in done))
    if not common:
        return Refined(trial, seeds, runs, None, None, None, 0)
    means = {k: statistics.fmean(r.metrics[str(k)] for r in done) for k in common}
    key = best_key(means, objective.mode)
    return Refined(
        trial,
        seeds,
        runs,
        key,
        _stats(_values(done, key)),
        _stats(_values(done, key.in_split("test"))),
        len(done),
    )


def _values(runs: Iterable[TrialOutcome], key: ProbeKey) -> list[float]:
    return [r.metrics[str(key)] for r in runs if str(key) in r.metrics]


def _stats(values: list[float]) -> tuple[float, float | None] | None:
    """(mean, sample standard deviation); the deviation is None below two values."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def describe_refine(spec: SweepSpec, base_cfg: TrainConfig) -> list[str]:
    """`--dry-run`'s lines on the refine step: how many extra runs, with which seeds."""
    if spec.refine is None:
        return []
    r = spec.refine
    seeds = ", ".join(map(str, refine_seeds(base_cfg.run.seed, r.seeds)))
    own = " (run.seed is searched: each config's own)" if "run.seed" in spec.space else ""
    return [
        f"# refine: after the search, the top {r.top_k} config(s) by {spec.metric} are re-trained with "
        f"{r.seeds} new seeds each, every epoch ({base_cfg.schedule.epochs}), no pruning: "
        f"{r.top_k * r.seeds} extra runs",
        f"#   run.seed = the config's seed + {SEED_STRIDE}·j, j = 1..{r.seeds}: {seeds}{own}",
        f"#   the best config is the one with the best mean {spec.metric} over its seeds",
    ]

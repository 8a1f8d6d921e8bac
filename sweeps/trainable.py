"""One trial = one Ray Train `TorchTrainer` whose workers run bagssl_core's loop under DDP.

`run_trial` is the trial code itself (build the TrainConfig from base + overrides, train, report); the
Ray worker loop and `--local` mode both call it, so a trial debugged locally is the trial Ray runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray.train
import torch.distributed
from ray import tune

# Train v2's trainer and configs (Ray 2.60's default Train, and the one `controller_failure_limit` belongs
# to), from their own modules: `ray.train` and `ray.train.torch` export these same classes at runtime but
# v1's to a type checker.
from ray.train.torch import TorchConfig
from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.torch.torch_trainer import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from bagssl_core import dist
from bagssl_core.config import EvalConfig, TrainConfig, config_to_yaml, flatten, merge_overrides
from bagssl_core.metrics import ANALYSES_DIR, DIVERGED_AT_STEP
from sweeps.resources import PLACEMENT_STRATEGY, WORKER_TAG_PREFIX, ddp_backend, worker_resources
from sweeps.space import apply_variants, trial_overrides
from sweeps.spec import START_FAILURES_TOLERATED, FailureSpec, Objective, ResourcesSpec

if TYPE_CHECKING:
    from bagssl_core.train import RunResult

# Ray Train's own names for the worker-group start timeout and the controller's polling interval
# (ray/train/v2/_internal/constants.py).
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

# metrics, checkpoint directory (rank 0, when one was written this epoch)
TrialReporter = Callable[[dict[str, float], "Path | None"], None]


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its sampled parameters; plain data, so Ray can ship it."""

    base: dict[str, Any]
    eval_variants: dict[str, dict[str, Any]]  # name -> dotted eval overrides (`space.variant_overrides`)
    metric: str
    mode: Literal["max", "min"]
    # `scheduler.probe_epochs: rungs`: ASHA's rung epochs (`spec.asha_probe_epochs`), the only ones a trial
    # probes besides its last; empty: the base's own eval.every.
    probe_epochs: tuple[int, ...] = ()

    def objective(self) -> Objective:
        return Objective.of(self.metric, self.mode)

    def config(self, params: Mapping[str, Any]) -> TrainConfig:
        tree = merge_overrides(self.base, trial_overrides(params))
        if self.probe_epochs:
            # Each trial's own epoch count: a schedule.epochs axis gives trials different ones.
            epochs = TrainConfig.model_validate(tree).schedule.epochs
            at = [e for e in self.probe_epochs if e < epochs]
            tree = merge_overrides(tree, {"eval": {"every": 0, "epochs": at}})
        return TrainConfig.model_validate(tree)

    def describe(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """MLflow params (the full resolved config, the sampled values, derived values) and artifacts."""
        cfg = self.config(params)
        flat = flatten(cfg.model_dump(mode="json"))
        flat.update({f"trial.{k}": v for k, v in params.items()})
        flat["derived.effective_lr"] = cfg.effective_lr()
        flat["derived.patch_px"] = cfg.patch_px
        return flat, {"config.yaml": config_to_yaml(cfg)}

    def variants(self, cfg: TrainConfig) -> dict[str, EvalConfig]:
        """The evaluation variants of the trial whose config is cfg: built on its own eval settings."""
        return apply_variants(cfg, self.eval_variants)


def with_objective(metrics: dict[str, float], objective: Objective) -> dict[str, float]:
    """Add the objective under the spec's own name, the key Tune's searcher and scheduler read, when it
    is the best of several schemes or variants. It is read from validation keys only (an `Objective`
    never names another split), so a test number that would rank differently never reaches them."""
    found = objective.best(metrics)
    if found is not None and objective.name not in metrics:
        metrics = {**metrics, objective.name: found[1]}
    return metrics


def run_trial(
    plan: TrialPlan,
    params: Mapping[str, Any],
    out_dir: Path,
    report: TrialReporter,
    resume_from: Path | None = None,
) -> RunResult:
    """Train one trial's config, probing every evaluation variant, and pass each epoch to `report`.

    A run whose loss diverged is a result, not an error: it ends with one more report,
    `{DIVERGED_AT_STEP: the step, plan.metric: NaN}`. That report has no epoch, so the schedulers and the
    searcher learn nothing from it; it has the objective because Tune requires the objective in every
    result; and no exception means Ray Train does not retry a run whose exact resume would diverge again.
    """
    # Here, not at the top: the trial's own actor and its Train controller import this module too, and
    # only the workers train (torchvision's import alone costs them seconds of CPU per trial).
    from bagssl_core.train import train

    cfg = plan.config(params)
    objective = plan.objective()

    def reporter(metrics: dict[str, float], ckpt: Path | None) -> None:
        report(with_objective(metrics, objective), ckpt)

    result = train(cfg, out_dir, reporter=reporter, resume_from=resume_from, eval_variants=plan.variants(cfg))
    if result.status == "diverged":
        report({DIVERGED_AT_STEP: result.metrics[DIVERGED_AT_STEP], plan.metric: math.nan}, None)
    return result


# --- Ray -------------------------------------------------------------------------------------------


# Where a trial's worker group runs, in every report of a trial: one comma-separated entry per rank
# (Ray node id, process id) and the process group's backend. A restarted group reports its new places.
# Strings: Tune keeps them in result.json, and MLflow gets them as tags of the run (`tracking.TrialLogger`).
WORKER_NODES, WORKER_PIDS, WORKER_BACKEND = (
    f"{WORKER_TAG_PREFIX}{k}" for k in ("node_ids", "pids", "backend")
)


def worker_places() -> dict[str, str]:
    """The node id and pid of every rank of the trial, gathered over the process group (a collective:
    every rank calls it), and the group's backend."""
    me = (ray.get_runtime_context().get_node_id(), os.getpid())
    ranks: list[Any] = [me]
    backend = "none"
    if dist.is_distributed():
        ranks = [None] * dist.world_size()
        torch.distributed.all_gather_object(ranks, me)
        backend = str(torch.distributed.get_backend())
    return {
        WORKER_NODES: ",".join(node for node, _ in ranks),
        WORKER_PIDS: ",".join(str(pid) for _, pid in ranks),
        WORKER_BACKEND: backend,
    }


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the process group is already initialised by TorchTrainer.

    It returns normally when the loss diverged too (see `run_trial`): only an exception, an
    infrastructure fault, makes Train restart the workers.
    """
    plan: TrialPlan = config["plan"]
    params: dict[str, Any] = config["params"]
    places = worker_places()

    with (
        _restored_checkpoint(ray.train.get_checkpoint()) as resume,
        tempfile.TemporaryDirectory(prefix="bagssl_") as d,
    ):
        figures = Path(d) / ANALYSES_DIR

        def report(metrics: dict[str, float], ckpt: Path | None) -> None:
            if ckpt is not None and figures.is_dir():
                # The run directory is a temporary one, gone with the trial: the analyses' figures travel
                # to the storage path with the last checkpoint, where the driver finds them
                # (`tracking.checkpoint_figures`).
                shutil.copytree(figures, ckpt / ANALYSES_DIR, dirs_exist_ok=True)
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
            # Every rank reports (it is a barrier); rank 0 alone carries the checkpoint.
            ray.train.report({**metrics, **places}, checkpoint=checkpoint)

        run_trial(plan, params, Path(d), report, resume)


@contextlib.contextmanager
def _restored_checkpoint(checkpoint: ray.train.Checkpoint | None) -> Iterator[Path | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


def train_environment(failure: FailureSpec) -> dict[str, str]:
    """The Train settings of `failure` that Train reads from the environment only.

    Its controller takes them from the process that fits the trainer, the trial's actor (Train's
    `ENV_VARS_TO_PROPAGATE`), whatever the cluster's own environment: set there, the spec decides them on a
    joined cluster too. The controller polls its workers every `health_check_interval_s`, and a report
    waits for the next poll to reach Tune, as does the end of a finished run: at Ray's default of 2 s a
    smoke trial ended about 1.4 s later than at 0.5 s (docs/operations.md, "Costs"). A poll is a call to
    each worker that returns at once, and one still unanswered counts as running, not as lost."""
    return {
        WORKER_GROUP_START_TIMEOUT: str(failure.worker_start_timeout_s),
        HEALTH_CHECK_INTERVAL: str(failure.health_check_interval_s),
    }


def make_trial_fn(
    plan: TrialPlan, storage_path: str, resources: ResourcesSpec, failure: FailureSpec
) -> Callable[[dict[str, Any]], None]:
    """The Tune trainable: builds and fits a TorchTrainer of `resources.workers_per_trial` workers.

    Args:
        plan: what every trial of the sweep shares.
        storage_path: where the trials' Train runs live.
        resources: each trial's workers and what each one holds.
        failure: `max_retries`, the times a Train run restarts from its last checkpoint after an error (a
            worker or node lost...; a diverged run is not an error and never restarts), and
            `worker_start_timeout_s`, how long each start of its worker group waits for room, and
            `health_check_interval_s`, how often its controller polls the workers (`train_environment`).
    """

    def trial_fn(params: dict[str, Any]) -> None:
        os.environ.update(train_environment(failure))
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"plan": plan, "params": params},
            scaling_config=ScalingConfig(
                num_workers=resources.workers_per_trial,
                use_gpu=resources.gpus_per_worker > 0,
                resources_per_worker=worker_resources(resources),
                placement_strategy=PLACEMENT_STRATEGY[resources.placement],
            ),
            # Named, not left to Train's own pick from use_gpu: the backend is ours to state and test.
            torch_config=TorchConfig(backend=ddp_backend(resources)),
            run_config=RunConfig(
                # The trial id and no timestamp: a restored trial finds its Train run, and its
                # checkpoints, by this name (docs/operations.md, "Resuming").
                name=f"train_{tune.get_context().get_trial_id()}",
                storage_path=storage_path,
                callbacks=[TuneReportCallback()],
                # A finite controller_failure_limit: Ray's default retries a worker group that never
                # starts forever (docs/operations.md, "Resources").
                failure_config=FailureConfig(
                    max_failures=failure.max_retries, controller_failure_limit=START_FAILURES_TOLERATED
                ),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        trainer.fit()

    return trial_fn

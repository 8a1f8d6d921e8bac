"""`python -m sweeps.run SPEC.yaml [--address ADDR] [--local] [--dry-run] [--resume] [--set key=value ...]`

Runs a sweep: Ray Tune + Optuna over Ray Train trials of the BagSSL trainer, every probe in MLflow.
Joins the cluster at --address / RAY_ADDRESS, else starts a local Ray. Exit 0: all trials done;
1: some trials failed; 2: bad input (one message, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bagssl_core.config import ConfigError
from sweeps.spec import SpecError, SweepSpec, load_spec, spec_to_dict, trial_count

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
log = logging.getLogger("sweeps")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[1])
    p.add_argument("spec", help="sweep spec YAML (see search_spaces/)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--local", action="store_true", help="run the trials one after another in this process, no Ray")
    p.add_argument("--dry-run", action="store_true", help="print the plan (spec, space, trials, resources) and exit")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep from its storage path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="override a spec key, e.g. num_samples=2, base.schedule.epochs=1")
    return p


# --- the plan --------------------------------------------------------------------------------------


def experiment_dir(spec: SweepSpec, local: bool = False) -> str:
    """Where the sweep lives: storage_path/name (an absolute local path, or a URI as given); `--local`
    runs use name_local, so they never collide with a Ray sweep's Tune state."""
    name = spec.name + ("_local" if local else "")
    if "://" in spec.storage_path:
        return spec.storage_path.rstrip("/") + "/" + name
    return str(Path(spec.storage_path).expanduser().resolve() / name)


def check_probe_every_epoch(spec: SweepSpec, epochs_every: int, source: str) -> None:
    if spec.metric.startswith(("knn_", "linear_")) and epochs_every != 1:
        raise SpecError(
            f"{source}: base.eval.every: the metric {spec.metric!r} must be reported every epoch for the "
            f"searcher and scheduler to compare trials; expected base.eval.every: 1 (got {epochs_every})"
        )


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What all workers of one trial hold together."""
    r = spec.resources
    out = {"CPU": r.workers_per_trial * r.cpus_per_worker}
    if r.gpus_per_worker:
        out["GPU"] = r.workers_per_trial * r.gpus_per_worker
    return out


def print_plan(spec: SweepSpec, base_cfg: Any, source: str) -> None:
    from sweeps.space import describe_space

    r = spec.resources
    print(f"# sweep {spec.name!r} from {source}")
    print(yaml.safe_dump(spec_to_dict(spec), sort_keys=False).rstrip())
    print("# space")
    print("\n".join(describe_space(spec, base_cfg)))
    print(f"# trials: {trial_count(spec)} ({spec.search.algo}, scheduler {spec.scheduler.name}, objective {spec.mode} {spec.metric})")
    gpu = f", {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
    print(
        f"# each trial: {r.workers_per_trial} Ray Train worker(s) x ({r.cpus_per_worker:g} CPU{gpu}) = "
        f"{', '.join(f'{v:g} {k}' for k, v in trial_resources(spec).items())}"
        f"; {base_cfg.schedule.epochs} epochs; max concurrent: {spec.max_concurrent or 'from the cluster'}"
    )
    evals = math.prod(len(d.args) for d in spec.eval_axes().values())
    if evals > 1:
        print(f"# evaluation-only axes: {evals} evaluation settings per trained model; searching them as training "
              f"axes would train {evals * trial_count(spec)} models instead of {trial_count(spec)}")
    print(f"# storage: {experiment_dir(spec)}")


# --- MLflow ---------------------------------------------------------------------------------------------


def parent_params(spec: SweepSpec) -> dict[str, Any]:
    from bagssl_core.provenance import provenance

    info = provenance(extra_packages=("ray", "optuna", "mlflow"))
    params: dict[str, Any] = {f"space.{k}": {d.kind: list(d.args)} for k, d in spec.space.items()}
    params.update({"metric": spec.metric, "mode": spec.mode, "num_samples": spec.num_samples, "search": spec.search.algo,
                   "scheduler": spec.scheduler.name, "workers_per_trial": spec.resources.workers_per_trial})
    params.update({k: v for k, v in info.items() if v is not None})
    return params


# --- Ray ---------------------------------------------------------------------------------------------


def init_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS); else start a local Ray sized to this machine's cores."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SpecError(f"--address: cannot join the Ray cluster at {address}: {err}") from None
    else:
        # The dashboard serves the State API that Train's placement-group cleaner needs (NOTES.md). The
        # cleaner finds it by auto-detection, which fails when another Ray runs on this machine: pin its
        # address in every worker's environment.
        port = _free_port()
        ray.init(
            num_cpus=os.cpu_count(),
            resources={"trial_slot": os.cpu_count() or 1},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        )


def prepare_ray_environment(address: str | None) -> None:
    """Environment Ray reads when it is imported or started; call before anything imports ray."""
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    # Tune's newer console output ignores a ProgressReporter; the classic one shows our columns.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto" and "RAY_AUTH_MODE" not in os.environ and _has_auth_token():
        # Ray 2.60 turns token auth on for address="auto" when a token exists, but not for an explicit
        # address (and reads the mode at import): the cluster would reject us with InvalidAuthToken.
        os.environ["RAY_AUTH_MODE"] = "token"


def _has_auth_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")) or (
        Path.home() / ".ray" / "auth_token"
    ).is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_group_fits(nodes: list[dict[str, float]], workers: int, per_worker: dict[str, float]) -> bool:
    """Whether `workers` bundles of `per_worker` can be packed onto these nodes (a bundle never spans two)."""
    free = [dict(n) for n in nodes]
    for _ in range(workers):
        node = next((n for n in free if all(n.get(k, 0) >= v for k, v in per_worker.items())), None)
        if node is None:
            return False
        for key, v in per_worker.items():
            node[key] -= v
    return True


def concurrency(spec: SweepSpec) -> tuple[int, dict[str, float]]:
    """How many trials fit at once, and the trainable's own bundle; SpecError if a trial can never be placed."""
    import ray

    r = spec.resources
    need = trial_resources(spec)
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    if not worker_group_fits(nodes, r.workers_per_trial, per_worker):
        raise SpecError(
            f"resources: a trial needs {r.workers_per_trial} worker(s) x ({r.cpus_per_worker:g} CPU, "
            f"{r.gpus_per_worker:g} GPU) and can never be placed on this cluster "
            f"({total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU over {len(nodes)} node(s)); "
            "expected fewer workers_per_trial or smaller cpus_per_worker/gpus_per_worker"
        )
    fit = int(total["CPU"] // need["CPU"])
    if need.get("GPU"):
        fit = min(fit, int(total.get("GPU", 0) // need["GPU"]))
    k = max(1, min(fit, spec.max_concurrent or fit))
    # A trial's own actor holds a 'trial_slot' (local Ray) so it takes no CPU from its workers; on a
    # cluster without that resource it holds a little memory instead (a bundle must not be empty).
    bundle = {"CPU": 0, "trial_slot": 1} if total.get("trial_slot") else {"CPU": 0, "memory": 64 * 2**20}
    return k, bundle


def build_trainable(spec: SweepSpec, plan: Any, exp_dir: str, bundle: dict[str, float]) -> Any:
    from ray import tune

    from sweeps.trainable import make_trial_fn

    r = spec.resources
    fn = make_trial_fn(plan, exp_dir + "/train_runs", r.workers_per_trial, r.cpus_per_worker, r.gpus_per_worker,
                       spec.failure.max_retries)
    return tune.with_resources(fn, bundle)


def build_tuner(spec: SweepSpec, trainable: Any, exp_dir: str, k: int, epochs: int, callbacks: list) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from sweeps.space import param_space

    storage, name = exp_dir.rsplit("/", 1)
    if spec.scheduler.name == "asha":
        # max_t above the epoch count: trials that run all epochs end by themselves (NOTES.md).
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    elif spec.scheduler.name == "median":
        scheduler = MedianStoppingRule(time_attr="epoch", grace_period=spec.scheduler.grace_period)
    else:
        scheduler = FIFOScheduler()
    if spec.search.algo == "optuna":
        searcher = ConcurrencyLimiter(_optuna(spec), max_concurrent=k)
    else:
        searcher = BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=k)
    tune_config = tune.TuneConfig(
        metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
        num_samples=spec.num_samples, max_concurrent_trials=k,
    )
    # The live table: the objective and the searched parameters of every trial, best first.
    reporter = tune.CLIReporter(
        metric_columns={"epoch": "epoch", spec.metric: spec.metric, "train/loss": "loss", "patches_per_s": "patches/s"},
        parameter_columns=list(spec.train_axes()),
        sort_by_metric=True, max_report_frequency=30,
    )
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, progress_reporter=reporter,
                                failure_config=tune.FailureConfig(max_failures=0))
    return tune.Tuner(trainable, param_space=param_space(spec), tune_config=tune_config, run_config=run_config)


def _optuna(spec: SweepSpec) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = spec.search
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=s.seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=s.seed),
    }
    return OptunaSearch(sampler=samplers[s.sampler](), seed=s.seed)


@contextlib.contextmanager
def ray_cluster(spec: SweepSpec, address: str | None) -> Iterator[tuple[int, dict[str, float]]]:
    """Ray joined or started for this sweep; yields (trials at once, the trainable's bundle), after checking
    that a trial can be placed at all. Shut down (or disconnected) on exit."""
    import signal

    import ray

    init_ray(address)
    # Tune saves its state on SIGINT but Ray aborts on SIGTERM: route SIGTERM (after ray.init, which
    # installs its own handler) through the graceful path so that --resume loses nothing.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        yield concurrency(spec)
    finally:
        ray.shutdown()


def run_with_ray(
    spec: SweepSpec, plan: Any, callback: Any, resume: bool, placement: tuple[int, dict[str, float]]
) -> list[Any] | None:
    """Run (or restore) the Tune experiment; the trials' outcomes, or None when it was interrupted."""
    from ray import tune

    from sweeps.report import TrialOutcome, trial_status
    from sweeps.tracking import trainer_metrics

    exp_dir = experiment_dir(spec)
    epochs = plan.config({}).schedule.epochs
    k, bundle = placement
    trainable = build_trainable(spec, plan, exp_dir, bundle)
    if resume:
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    else:
        tuner = build_tuner(spec, trainable, exp_dir, k, epochs, [callback])
    log.info("running up to %d trial(s) at once", k)
    grid = tuner.fit()
    if grid.num_terminated + grid.num_errors < trial_count(spec):
        return None
    out = []
    for res in grid:
        metrics = trainer_metrics(res.metrics or {})
        tid = (res.metrics or {}).get("trial_id") or Path(res.path).name
        out.append(TrialOutcome(tid, dict(res.config or {}), trial_status(metrics, res.error is not None, epochs), metrics))
    return out


def run_local(spec: SweepSpec, plan: Any, logger: Any) -> list[Any]:
    """Every trial of the spec, one after another in this process: the same trial code, no Ray, no pruning.

    Parameters are drawn at random from the space (grid axes enumerated), seeded by search.seed.
    """
    import tempfile

    from sweeps.report import TrialOutcome
    from sweeps.trainable import run_trial

    rng = random.Random(spec.search.seed)
    for i, params in enumerate(local_trials(spec, rng)):
        trial_id = f"local_{i:05d}"
        logger.start(trial_id, f"{spec.name}_{trial_id}", params)

        def report(metrics: dict[str, float], ckpt: Path | None, tid: str = trial_id) -> None:
            logger.result(tid, metrics)

        print(f"trial {trial_id}: {json.dumps(params)}", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="bagssl_local_") as d:
                result = run_trial(plan, params, Path(d), report)
        except ConfigError:
            raise
        except Exception as err:  # a trial's failure is recorded; the sweep goes on
            log.exception("trial %s failed", trial_id)
            logger.error(trial_id, f"{type(err).__name__}: {err}")
            continue
        if result.status == "finished":
            logger.complete(trial_id)
        else:
            logger.error(trial_id, f"status {result.status}")
    return [TrialOutcome(t, logger.params[t], st, logger.last_result.get(t, {})) for t, st in logger.statuses.items()]


def local_trials(spec: SweepSpec, rng: random.Random) -> list[dict[str, Any]]:
    import itertools

    import numpy as np

    from sweeps.space import tune_domain

    axes = spec.train_axes()
    grid = {k: list(d.args) for k, d in axes.items() if d.kind == "grid"}
    sampled = {k: tune_domain(d) for k, d in axes.items() if d.kind != "grid"}
    state = np.random.RandomState(rng.randrange(2**31))
    out = []
    for _ in range(spec.num_samples):
        for combo in itertools.product(*grid.values()) if grid else [()]:
            params = dict(zip(grid, combo, strict=True))
            for k, dom in sampled.items():
                v = dom.sample(random_state=state)
                params[k] = v.item() if hasattr(v, "item") else v
            out.append(params)
    return out


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.local and not args.dry_run:
        prepare_ray_environment(args.address)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _main(args)
    except (SpecError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace) -> int:
    spec, base_cfg = load_spec(args.spec, args.overrides)
    check_probe_every_epoch(spec, base_cfg.eval.every, args.spec)
    if args.dry_run:
        print_plan(spec, base_cfg, args.spec)
        return EXIT_OK

    from sweeps.report import write_report
    from sweeps.space import eval_variants
    from sweeps.tracking import (
        MlflowTracker,
        MlflowTuneCallback,
        TrackingError,
        TrialLogger,
        check_reachable,
        resolve_uri,
    )
    from sweeps.trainable import TrialPlan

    exp_dir = experiment_dir(spec, local=args.local)
    local_exp = "://" not in exp_dir
    if local_exp and not args.local:
        exists = Path(exp_dir).exists()
        if args.resume and not exists:
            raise SpecError(f"{args.spec}: --resume: nothing to resume at {exp_dir}; run without --resume to "
                            "start the sweep")
        if exists and not args.resume:
            raise SpecError(f"{args.spec}: storage_path: {exp_dir} already holds a sweep named "
                            f"{spec.name!r}; pass --resume to continue it, or change name/storage_path")
    uri = resolve_uri(spec.tracking.uri)
    try:
        check_reachable(uri)
    except TrackingError as err:
        raise SpecError(f"{args.spec}: {err}") from None
    # Fail on a missing dataset here, with the core's one-line message, not inside a Ray worker. Imported
    # only now: torch takes seconds to import, and a bad spec must fail at once.
    from bagssl_core.data import DataError, load_split

    try:
        load_split(base_cfg.data, "test", base_cfg.run.seed)
    except DataError as err:
        raise SpecError(f"{args.spec}: base.data: {err}") from None

    base_tree = _base_tree(spec, args.spec)
    plan = TrialPlan(
        base=base_tree,
        eval_variants={k: v.model_dump() for k, v in eval_variants(spec, base_cfg).items()},
        metric=spec.metric,
        mode=spec.mode,
    )
    with contextlib.ExitStack() as stack:
        # Ray first: a trial that can never be placed is an error before anything is written to MLflow.
        placement = None if args.local else stack.enter_context(ray_cluster(spec, args.address))
        tracker = MlflowTracker(uri, spec.tracking.experiment, sweep_key=exp_dir)
        spec_yaml = yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
        parent = tracker.start_parent(spec.name, parent_params(spec), {"spec.yaml": spec_yaml}, resume=args.resume)
        epochs = base_cfg.schedule.epochs
        try:
            if placement is None:
                trials = run_local(spec, plan, TrialLogger(tracker, epochs, plan.describe))
            else:
                callback = MlflowTuneCallback(uri, spec.tracking.experiment, exp_dir, parent, epochs, plan.describe)
                trials = run_with_ray(spec, plan, callback, args.resume, placement)
        except BaseException:
            tracker.client.set_terminated(parent, status="KILLED")
            raise
    if trials is None:
        tracker.client.set_terminated(parent, status="KILLED")
        print(f"interrupted; continue with: python -m sweeps.run {args.spec} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    report = write_report(spec, base_tree, trials, Path(exp_dir) if local_exp else None, uri, parent)
    tracker.finish_parent("FINISHED", report.summary, report.artifacts)
    print(report.text)
    failed = [t for t in trials if t.status == "FAILED"]
    return EXIT_TRIALS_FAILED if failed or not trials else EXIT_OK


def _base_tree(spec: SweepSpec, source: str) -> dict[str, Any]:
    from sweeps.spec import resolve_base

    return resolve_base(spec, Path(source).parent, source)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m sweeps.run SPEC.yaml [--address ADDR] [--local] [--dry-run] [--resume] [--set key=value ...]`

Runs a sweep: Ray Tune + Optuna over Ray Train trials of the BagSSL trainer, every probe in MLflow.
Joins the cluster at --address / RAY_ADDRESS, else starts a local Ray. Exit 0: all trials done;
1: some trials failed; 2: bad input (one message, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from bagssl_core.config import ConfigError, TrainConfig, flatten
from sweeps.ray_env import prepare_ray_environment
from sweeps.refine import describe_refine, run_refine
from sweeps.report import Refined, TrialOutcome, write_report
from sweeps.resources import trial_resources
from sweeps.space import describe_space, variant_overrides
from sweeps.spec import (
    SpecError,
    SweepSpec,
    asha_max_t,
    epoch_range,
    load_spec,
    resolve_base,
    spec_to_dict,
    trial_count,
)

if TYPE_CHECKING:  # imported where they run (see _main): torch, Ray and MLflow take seconds to import
    from sweeps.tracking import MlflowTracker
    from sweeps.trainable import TrialPlan

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[1])
    p.add_argument("spec", help="sweep spec YAML (see search_spaces/)")
    p.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--local", action="store_true", help="run the trials one after another in this process, no Ray"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (spec, space, trials, resources) and exit"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep from its storage path"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key=value",
        help="override a spec key, e.g. num_samples=2, base.schedule.epochs=1",
    )
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
    """A probe objective must be measured every epoch, or the searcher and scheduler cannot compare trials."""
    if spec.objective().query is not None and epochs_every != 1:
        raise SpecError(
            f"{source}: base.eval.every: the metric {spec.metric!r} must be reported every epoch for the "
            f"searcher and scheduler to compare trials; expected base.eval.every: 1 (got {epochs_every})"
        )


def print_plan(spec: SweepSpec, base_cfg: TrainConfig, source: str) -> None:
    """`--dry-run`: the spec, the space, the trials, what each trial holds, and where the sweep lives."""
    r = spec.resources
    print(f"# sweep {spec.name!r} from {source}")
    print(yaml.safe_dump(spec_to_dict(spec), sort_keys=False).rstrip())
    print("# space")
    print("\n".join(describe_space(spec, base_cfg)))
    lo, hi = epoch_range(spec, base_cfg.schedule.epochs)
    epochs = str(lo) if lo == hi else f"{lo}-{hi}"  # a schedule.epochs axis gives a range
    print(
        f"# trials: {trial_count(spec)} ({spec.search.algo}, scheduler {spec.scheduler.name}, objective {spec.mode} {spec.metric})"
    )
    gpu = f", {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
    print(
        f"# each trial: {r.workers_per_trial} Ray Train worker(s) x ({r.cpus_per_worker:g} CPU{gpu}) = "
        f"{', '.join(f'{v:g} {k}' for k, v in trial_resources(r).items())}"
        f"; {epochs} epochs; max concurrent: {spec.max_concurrent or 'from the cluster'}"
    )
    if spec.scheduler.name == "asha":
        print(f"# asha: max_t {asha_max_t(spec, base_cfg.schedule.epochs)} (one more than the most epochs)")
    # Distinct variants (a variant leaves out the knobs its options ignore), times the aggregation values.
    aggregation = spec.eval_axes().get("eval.aggregation")
    evals = len(variant_overrides(spec, base_cfg)) * (len(aggregation.args) if aggregation else 1)
    if evals > 1:
        print(
            f"# evaluation-only axes: {evals} evaluation settings per trained model; searching them as training "
            f"axes would train {evals * trial_count(spec)} models instead of {trial_count(spec)}"
        )
    for line in describe_refine(spec, base_cfg):
        print(line)
    print(f"# storage: {experiment_dir(spec)}")


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

    # Imported only now, in this one place: ray, torch and mlflow take seconds to import, and --help, a bad
    # spec and --dry-run must answer at once. Ray must be imported after prepare_ray_environment (main).
    from bagssl_core.data import DataError, load_split
    from sweeps.tracking import TrackingError, check_reachable, resolve_uri
    from sweeps.trainable import TrialPlan

    exp_dir = experiment_dir(spec, local=args.local)
    local_exp = "://" not in exp_dir
    if local_exp and not args.local:
        exists = Path(exp_dir).exists()
        if args.resume and not exists:
            raise SpecError(
                f"{args.spec}: --resume: nothing to resume at {exp_dir}; run without --resume to "
                "start the sweep"
            )
        if exists and not args.resume:
            raise SpecError(
                f"{args.spec}: storage_path: {exp_dir} already holds a sweep named "
                f"{spec.name!r}; pass --resume to continue it, or change name/storage_path"
            )
    uri = resolve_uri(spec.tracking.uri)
    try:
        check_reachable(uri)
    except TrackingError as err:
        raise SpecError(f"{args.spec}: {err}") from None
    # Fail on a missing dataset here, with the core's one-line message, not inside a Ray worker.
    try:
        load_split(base_cfg.data, "test", base_cfg.run.seed)
    except DataError as err:
        raise SpecError(f"{args.spec}: base.data: {err}") from None

    base_tree = resolve_base(spec, Path(args.spec).parent, args.spec)
    plan = TrialPlan(
        base=base_tree,
        eval_variants=variant_overrides(spec, base_cfg),
        metric=spec.metric,
        mode=spec.mode,
    )
    tracker, parent, trials, refined = _run(args, spec, plan, exp_dir, uri)
    if trials is None or (spec.refine is not None and refined is None):
        tracker.client.set_terminated(parent, status="KILLED")
        print(f"interrupted; continue with: python -m sweeps.run {args.spec} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    report = write_report(spec, base_tree, trials, Path(exp_dir) if local_exp else None, uri, parent, refined)
    tracker.finish_parent("FINISHED", flatten(report.summary), report.artifacts)
    print(report.text)
    runs = trials + [r for c in refined or [] for r in c.runs]
    failed = [t for t in runs if t.status == "FAILED"]
    return EXIT_TRIALS_FAILED if failed or not trials else EXIT_OK


def _run(
    args: argparse.Namespace, spec: SweepSpec, plan: TrialPlan, exp_dir: str, uri: str
) -> tuple[MlflowTracker, str, list[TrialOutcome] | None, list[Refined] | None]:
    """The search, then the refine step if the spec has one, each run on Ray (or `--local`) and logged to
    MLflow: the tracker, the parent run, the search's trials and the refined configs; trials (or, with a
    refine step, refined) None when the sweep was interrupted."""
    from ray import tune

    from sweeps.cluster import ray_cluster
    from sweeps.local import run_local
    from sweeps.tracking import MlflowTracker, MlflowTuneCallback, TrialLogger, refine_tags, sweep_params
    from sweeps.tuner import run_with_ray

    with contextlib.ExitStack() as stack:
        # Ray first: a trial that can never be placed is an error before anything is written to MLflow.
        placement = None if args.local else stack.enter_context(ray_cluster(spec, args.address))
        tracker = MlflowTracker(uri, spec.tracking.experiment, sweep_key=exp_dir)
        spec_yaml = yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
        parent = tracker.start_parent(
            spec.name, sweep_params(spec), {"spec.yaml": spec_yaml}, resume=args.resume
        )
        epochs = plan.config({}).schedule.epochs

        def experiment(
            xspec: SweepSpec, xplan: TrialPlan, xdir: str, resume: bool, tags: dict[str, str], prefix: str
        ) -> list[TrialOutcome] | None:
            """One Tune experiment (the search, or one config's refine runs) at xdir, or its --local loop."""
            if placement is None:
                return run_local(xspec, xplan, TrialLogger(tracker, epochs, xplan.describe, tags), prefix)
            callback = MlflowTuneCallback(
                uri, spec.tracking.experiment, exp_dir, parent, epochs, xplan.describe, tags
            )
            return run_with_ray(xspec, xplan, xdir, placement, callback, resume)

        def refine(rspec: SweepSpec, rplan: TrialPlan, t: TrialOutcome) -> list[TrialOutcome] | None:
            rdir = f"{exp_dir}/refine/{t.trial_id}"  # inside the sweep's own directory
            resume = args.resume and not args.local and tune.Tuner.can_restore(rdir)
            return experiment(rspec, rplan, rdir, resume, refine_tags(t.trial_id), f"refine_{t.trial_id}")

        refined = None
        try:
            trials = experiment(spec, plan, exp_dir, args.resume, {}, "local")
            if trials is not None and spec.refine is not None:
                refined = run_refine(spec, plan, trials, refine)
        except BaseException:
            tracker.client.set_terminated(parent, status="KILLED")
            raise
    return tracker, parent, trials, refined


if __name__ == "__main__":
    sys.exit(main())

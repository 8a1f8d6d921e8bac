"""`python -m sweeps.run SPEC.yaml [--address ADDR] [--local] [--dry-run] [--resume [NAME]] [--set key=value ...]`

Runs a sweep: Ray Tune + Optuna over Ray Train trials of the BagSSL trainer, every probe in MLflow.
Joins the cluster at --address / RAY_ADDRESS, else starts a local Ray. Each run of a spec is a new sweep
(storage_path/NAME, NAME the spec's name, then NAME-2, NAME-3, ...); --resume continues the latest one,
--resume NAME a named one (`python -m sweeps.status` lists them). Exit 0: all trials done; 1: some
trials failed; 2: bad input (one message, no traceback); 130: interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bagssl_core.arguments import Parser
from bagssl_core.config import ConfigError, TrainConfig, flatten, is_under, validate_config
from bagssl_core.openmp import prefer_passive_wait
from bagssl_core.outputs import writable_dir
from sweeps import lifecycle
from sweeps.lifecycle import STATE_FILE, SweepNotFound, SweepState
from sweeps.ray_env import prepare_ray_environment
from sweeps.refine import describe_refine, run_refine
from sweeps.report import Refined, TrialOutcome, write_report
from sweeps.resources import baseline_resources, trial_resources
from sweeps.space import describe_space, variant_overrides
from sweeps.spec import (
    RESUME_MAY_CHANGE,
    ResourcesSpec,
    SpecError,
    SweepSpec,
    asha_max_t,
    asha_probe_epochs,
    check_space_at_image_size,
    epoch_range,
    load_spec,
    resolve_base,
    spec_changes,
    spec_to_dict,
    trial_count,
)

if TYPE_CHECKING:  # imported where they run (see _main): torch, Ray and MLflow take seconds to import
    from sweeps.tracking import MlflowTracker
    from sweeps.trainable import TrialPlan

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_BAD_INPUT, EXIT_TRACKING_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[1])
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
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="continue the spec's latest sweep, or the sweep NAME (python -m sweeps.status lists them), "
        "instead of starting a new one",
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


def storage_root(spec: SweepSpec) -> str:
    """Where the spec's sweeps live: storage_path as an absolute local path, or a URI as given.

    Raises SpecError for an empty storage_path, which would put the sweeps in whatever directory the
    driver runs in, and for a URI naming no bucket (`s3://`), which would become a local directory.
    """
    path = spec.storage_path
    if not path.strip():
        raise SpecError(
            f"storage_path: {path!r} is empty; expected a directory (default ./sweeps_storage) or a URI such "
            "as s3://bucket/path"
        )
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if not scheme.strip():
            raise SpecError(
                f"storage_path: {path}: no scheme before ://; expected a URI such as s3://bucket/path"
            )
        # file:///PATH names no bucket; every other filesystem (s3, gs, ...) keeps the bucket as the host.
        if scheme.lower() == "file" and not rest.strip("/").strip():
            raise SpecError(f"storage_path: {path}: no path after file://; expected file:///PATH")
        if scheme.lower() != "file" and not rest.split("/", 1)[0].strip():
            raise SpecError(
                f"storage_path: {path}: no bucket after {scheme}://; expected {scheme}://BUCKET[/PATH]"
            )
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def planned_sweep(spec: SweepSpec, local: bool) -> str:
    """`--dry-run`: where a new sweep of the spec would go (nothing is created)."""
    root = storage_root(spec)
    if "://" in root:
        return f"{root}/{lifecycle.sweep_base(spec.name, local)}[-N] (numbered after the sweeps MLflow lists)"
    taken = [p.name for p in Path(root).iterdir()] if Path(root).is_dir() else []
    return f"{root}/{lifecycle.next_sweep_name(taken, spec.name, local)}"


def print_plan(
    spec: SweepSpec, base_cfg: TrainConfig, source: str, local: bool = False, resumed: Path | None = None
) -> None:
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
    if rungs := rung_epochs(spec, base_cfg):
        print(
            f"# probes: after epochs {', '.join(map(str, rungs))} (ASHA's rungs) and each trial's last; "
            "its other epochs report the loss alone"
        )
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
    if resumed is not None:
        print(f"# storage: {resumed} (the sweep --resume continues)")
    else:
        print(f"# storage: {planned_sweep(spec, local)} (a new sweep; --resume continues the latest)")


def rung_epochs(spec: SweepSpec, base_cfg: TrainConfig) -> list[int]:
    """The epochs a trial probes besides its last with `scheduler.probe_epochs: rungs`; [] otherwise."""
    if spec.scheduler.probe_epochs != "rungs":
        return []
    return asha_probe_epochs(spec, base_cfg.schedule.epochs)


# --- main --------------------------------------------------------------------------------------------


@dataclass
class Driver:
    """The sweep this process drives, once it has chosen one: `main` records in its `sweep.json` how the
    run ended, whichever way it ends (sweeps.lifecycle)."""

    sweep_dir: Path | None = None  # None: remote storage, which holds no state file
    state: SweepState | None = None
    created: bool = False  # a new sweep (not a resumed one)
    resume_hint: str = "--resume"

    def record(self, **changes: Any) -> None:
        if self.sweep_dir is not None and self.state is not None:
            self.state = lifecycle.write_state(self.sweep_dir, self.state, **changes)

    def end(self, state: lifecycle.State, exit_code: int | None, reason: str | None = None) -> None:
        self.record(state=state, exit_code=exit_code, reason=reason)

    def discard(self) -> None:
        """Bad input found after the sweep's directory was made: remove it if the sweep wrote nothing
        else, so a sweep that never started leaves nothing to list or resume."""
        d = self.sweep_dir
        if self.created and d is not None and {p.name for p in d.iterdir()} <= {STATE_FILE}:
            shutil.rmtree(d)
        else:
            self.end("interrupted", EXIT_BAD_INPUT, "bad input")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Before torch is imported, and before a local Ray starts: its workers inherit the setting.
    prefer_passive_wait()
    if not args.local and not args.dry_run:
        prepare_ray_environment(args.address)
    # MLflow's HTTP client retries a server that does not answer for minutes (7 times, backing off), which
    # would stall Tune's loop at each trial event; the sweep holds such writes itself and sends them again
    # (tracking.TrialLogger), so a few seconds of retries are enough.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    driver = Driver()
    try:
        code = _main(args, driver)
    except (SpecError, ConfigError, SweepNotFound) as err:
        driver.discard()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        driver.end("interrupted", EXIT_INTERRUPTED, "Ctrl-C or SIGTERM")
        print(f"interrupted; continue with {driver.resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as err:  # a crash of the driver: the sweep can still be resumed
        driver.end("interrupted", None, f"the driver failed: {type(err).__name__}: {err}")
        raise
    driver.end("interrupted" if code in (EXIT_INTERRUPTED, EXIT_TRACKING_LOST) else "finished", code)
    return code


def _load(args: argparse.Namespace) -> tuple[SweepSpec, TrainConfig]:
    """The spec and its base config, once the flags fit together and fit the spec."""
    if args.local and args.address:
        raise SpecError(
            f"{args.spec}: --address: --local runs no Ray, so it joins no cluster; expected one of the two"
        )
    spec, base_cfg = load_spec(args.spec, args.overrides)
    if args.local and spec.search.warm_start:
        raise SpecError(
            f"{args.spec}: search.warm_start: --local samples at random without Optuna, so it cannot "
            "start from earlier trials; run on Ray, or set search.warm_start: false"
        )
    return spec, base_cfg


def _local_sweep_to_resume(args: argparse.Namespace, spec: SweepSpec, root: str) -> Path | None:
    """The directory of the sweep `--resume [NAME]` continues on local storage (SweepNotFound when there is
    none to continue); None without --resume, or on remote storage, where MLflow names the sweeps."""
    if args.resume is None or "://" in root:
        return None
    return lifecycle.sweep_to_resume(Path(root), spec.name, args.local, args.resume or None, args.spec)


def _main(args: argparse.Namespace, driver: Driver) -> int:
    spec, base_cfg = _load(args)
    if args.dry_run:
        # The sweep --resume would continue, found as a real run finds it, writing nothing.
        print_plan(
            spec, base_cfg, args.spec, args.local, _local_sweep_to_resume(args, spec, storage_root(spec))
        )
        return EXIT_OK

    # Imported only now, in this one place: ray, torch and mlflow take seconds to import, and --help, a bad
    # spec and --dry-run must answer at once. Ray must be imported after prepare_ray_environment (main).
    from sweeps.tracking import (
        TrackingError,
        TrackingUnavailable,
        check_reachable,
        resolve_uri,
        uri_source,
    )
    from sweeps.trainable import TrialPlan

    root = storage_root(spec)
    local_exp = "://" not in root
    if local_exp:  # where the sweep will write, before anything is started or read
        writable_dir(root, f"{args.spec}: storage_path")
    resume_dir = _local_sweep_to_resume(args, spec, root)
    uri = resolve_uri(spec.tracking.uri)
    try:
        check_reachable(uri, what=uri_source(spec.tracking.uri, "tracking.uri"))
    except TrackingError as err:
        raise SpecError(f"{args.spec}: {err}") from None
    if resume_dir is not None:  # remote storage: in _start_sweep, which finds the sweep's name in MLflow
        _refuse_another_spec(args.spec, resume_dir.name, spec, base_cfg, uri, str(resume_dir))
    _check_datasets(args.spec, args.overrides, spec, base_cfg)
    exp_dir = _start_sweep(args, spec, base_cfg, root, resume_dir, uri, driver)

    base_tree = resolve_base(spec, Path(args.spec).parent, args.spec)
    plan = TrialPlan(
        base=base_tree,
        eval_variants=variant_overrides(spec, base_cfg),
        metric=spec.metric,
        mode=spec.mode,
        probe_epochs=tuple(rung_epochs(spec, base_cfg)),
    )
    try:
        tracker, parent, trials, refined = _run(args, spec, plan, exp_dir, uri, base_cfg, driver)
    except TrackingUnavailable as err:
        print(f"error: {args.spec}: {err}; continue with: {driver.resume_hint}", file=sys.stderr)
        return EXIT_TRACKING_LOST
    if trials is None or (spec.refine is not None and refined is None):
        tracker.client.set_terminated(parent, status="KILLED")
        print(f"interrupted; continue with: {driver.resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    # Why each failed trial failed, as the tracker recorded it (what every trial's error went through).
    failures = tracker.failures()
    trials = [replace(t, failure=failures.get(t.trial_id, "")) for t in trials]
    report = write_report(spec, base_tree, trials, Path(exp_dir) if local_exp else None, uri, parent, refined)
    tracker.finish_parent("FINISHED", flatten(report.summary), report.artifacts)
    print(report.text)
    # The figures and importance, rebuilt from MLflow alone as `python -m sweeps.report` does.
    from sweeps.report import build_from_mlflow

    out = Path(exp_dir) / "report" if local_exp else None
    html = build_from_mlflow(uri, spec.tracking.experiment, parent, out)
    print(f"sweep report: {html}  (logged on the parent run under report/)")
    runs = trials + [r for c in refined or [] for r in c.runs]
    failed = [t for t in runs if t.status == "FAILED"]
    return EXIT_TRIALS_FAILED if failed or not trials else EXIT_OK


def _start_sweep(
    args: argparse.Namespace,
    spec: SweepSpec,
    base_cfg: TrainConfig,
    root: str,
    resume_dir: Path | None,
    uri: str,
    driver: Driver,
) -> str:
    """The sweep this run drives, as its directory (or URI): the one to resume, else a new one, whose
    `sweep.json` now says `running` with this process's pid (sweeps.lifecycle)."""
    from sweeps.tracking import absolute_uri

    resuming = args.resume is not None
    if "://" in root:
        name = _remote_sweep_name(args, spec, root, uri)
        exp_dir = f"{root}/{name}"
        if resuming:
            _refuse_another_spec(args.spec, name, spec, base_cfg, uri, exp_dir)
    else:
        d = resume_dir or lifecycle.new_sweep_dir(Path(root), spec.name, args.local)
        previous = lifecycle.read_state(d)
        state = SweepState(
            name=d.name,
            spec=spec.name,
            local=args.local,
            state="running",
            trials_total=trial_count(spec),
            metric=spec.metric,
            mode=spec.mode,
            tracking_uri=absolute_uri(uri),
            experiment=spec.tracking.experiment,
            parent_run_id=previous.parent_run_id if previous else None,
            ray_jobs=previous.ray_jobs if previous else [],
        )
        if previous is not None:
            state.started = previous.started
        driver.sweep_dir, driver.created = d, resume_dir is None
        driver.state = lifecycle.write_state(d, state)
        name, exp_dir = d.name, str(d)
    local = "--local " if args.local else ""
    # The same --set values: a resume that dropped them would be refused as another spec.
    sets = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
    driver.resume_hint = f"python -m sweeps.run {args.spec} {local}--resume {name}{sets}"
    print(f"sweep {name}: {'resuming' if resuming else 'new'}, at {exp_dir}", flush=True)
    return exp_dir


def _check_datasets(source: str, overrides: list[str], spec: SweepSpec, base_cfg: TrainConfig) -> None:
    """Fail on a missing dataset here, with the core's one-line message, not inside a Ray worker: the
    base's, and each one a discrete axis over data.* picks (a `data.name: {choice: [...]}` axis). Each is
    read as trials read it (training, validation and test split), so a subset or `data.val_size` that the
    dataset cannot give fails here too. An ImageFolder that keeps its images' own size has the space
    checked again at that size (`check_space_at_image_size`)."""
    from bagssl_core.data import DataError, load_split, resolve_image_size

    # These loads only check: their "loaded" lines would come before a bad one's error, as if it ran.
    data_log = logging.getLogger("bagssl_core.data")
    level = data_log.level
    data_log.setLevel(logging.WARNING)
    try:
        base_data, own_size = base_cfg.data, None
        if not base_cfg.image_size_known:  # each file's header read once, here, not by each load below
            try:
                sized = resolve_image_size(base_cfg)
            except (ConfigError, DataError) as err:
                raise SpecError(f"{source}: base.data: {err}") from None
            base_data, own_size = sized.data, sized.image_size
        datasets = {"base.data": base_data}
        base_tree = base_cfg.model_dump(mode="json")
        for key, d in spec.space.items():
            if is_under(key, ("data",)) and d.discrete:
                for v in d.args:
                    datasets[f"space.{key}={v}"] = validate_config({key: v}, defaults=base_tree).data
        for where, data in datasets.items():
            try:
                for split in ("val", "test"):  # "val" reads the training images and splits them
                    load_split(data, split, base_cfg.run.seed)
            except (ConfigError, DataError) as err:
                raise SpecError(f"{source}: {where}: {err}") from None
        if own_size is not None:
            check_space_at_image_size(source, overrides, own_size)
    finally:
        data_log.setLevel(level)


def _refuse_another_spec(
    source: str, name: str, spec: SweepSpec, base_cfg: TrainConfig, uri: str, sweep_key: str
) -> None:
    """SpecError when the sweep to resume ran another spec than `spec`, each differing key named (but for
    `RESUME_MAY_CHANGE`), or another resolved base config (a `base.config` file edited since). A sweep
    stopped before its MLflow parent run was made ran nothing to compare with."""
    from sweeps.results import ResultsError, sweep_parent
    from sweeps.tracking import TAG_BASE_HASH

    try:
        found = sweep_parent(uri, spec.tracking.experiment, sweep_key)
    except ResultsError as err:
        raise SpecError(f"{source}: --resume {name}: {err}") from None
    if found is None:
        return
    _, ran, tags = found
    changes = spec_changes(ran, spec)
    if not changes and tags.get(TAG_BASE_HASH, lifecycle.base_hash(base_cfg)) != lifecycle.base_hash(
        base_cfg
    ):
        changes.append("base: the resolved base config differs (was its base.config file edited?)")
    if changes:
        raise SpecError(
            f"{source}: --resume {name}: the sweep ran another spec: {'; '.join(changes)}; expected the sweep's "
            f"own spec, as it started (only {', '.join(RESUME_MAY_CHANGE)} may change)"
        )


def _remote_sweep_name(args: argparse.Namespace, spec: SweepSpec, root: str, uri: str) -> str:
    """On remote storage (s3://...) no directory can be listed or claimed here: the sweeps are those
    MLflow's parent runs name (their sweep keys), and a new one takes the number after them."""
    from sweeps.tracking import MlflowTracker

    base = lifecycle.sweep_base(spec.name, args.local)
    keys = MlflowTracker(uri, spec.tracking.experiment, sweep_key="").sweep_keys(f"{root}/{base}")
    taken = {k.removeprefix(root + "/") for k in keys}
    if args.resume is None:
        return lifecycle.next_sweep_name(taken, spec.name, args.local)
    name = args.resume or lifecycle.latest_sweep_name(taken, spec.name, args.local)
    if name is None or name not in taken:
        raise SweepNotFound(
            f"{args.spec}: --resume {args.resume}: no such sweep of {spec.name!r} at {root} in MLflow's "
            f"experiment {spec.tracking.experiment!r}; expected one of: {', '.join(sorted(taken)) or 'none'}"
        )
    return name


def _run(
    args: argparse.Namespace,
    spec: SweepSpec,
    plan: TrialPlan,
    exp_dir: str,
    uri: str,
    base_cfg: TrainConfig,
    driver: Driver,
) -> tuple[MlflowTracker, str, list[TrialOutcome] | None, list[Refined] | None]:
    """The search, then the refine step if the spec has one, each run on Ray (or `--local`) and logged to
    MLflow: the tracker, the parent run, the search's trials and the refined configs; trials (or, with a
    refine step, refined) None when the sweep was interrupted."""
    from ray import tune

    from sweeps.cluster import driver_job, ray_cluster, release_leftovers
    from sweeps.local import run_local
    from sweeps.searcher import warm_start_trials
    from sweeps.tracking import (
        TAG_BASE_HASH,
        TAG_SPACE_HASH,
        TAG_SPEC,
        MlflowTracker,
        MlflowTuneCallback,
        TrackingUnavailable,
        TrialLogger,
        refine_tags,
        sweep_params,
    )
    from sweeps.tuner import run_with_ray

    resuming = args.resume is not None
    with contextlib.ExitStack() as stack:
        # Ray first: a trial that can never be placed is an error before anything is written to MLflow.
        placement = None if args.local else stack.enter_context(ray_cluster(spec, args.address))
        if placement is not None and driver.state is not None:
            release_leftovers(driver.state.ray_jobs)
            driver.record(ray_jobs=[*driver.state.ray_jobs, driver_job()])
        tracker = MlflowTracker(uri, spec.tracking.experiment, sweep_key=exp_dir)
        spec_yaml = yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
        hashes = {TAG_SPACE_HASH: lifecycle.space_hash(spec), TAG_BASE_HASH: lifecycle.base_hash(base_cfg)}
        parent = tracker.start_parent(
            exp_dir.rsplit("/", 1)[1],
            sweep_params(spec),
            {"spec.yaml": spec_yaml},
            resume=resuming,
            tags={TAG_SPEC: spec.name, **hashes},
        )
        driver.record(parent_run_id=parent)
        view = spec.name
        tracker.set_runs_view(view, spec.metric, spec.train_axes())
        print(f"MLflow: {tracker.runs_url(_ui_address(uri), view)}", flush=True)
        warm = None
        if spec.search.warm_start and not (resuming and tune.Tuner.can_restore(exp_dir)):
            earlier = tracker.earlier_finished_trials(hashes[TAG_SPACE_HASH], hashes[TAG_BASE_HASH])
            warm = warm_start_trials(spec, earlier)
            sweeps_from = sorted({key.rsplit("/", 1)[1] for key, _, _ in earlier})
            print(
                f"warm start: {len(warm)} finished trial(s) of {len(sweeps_from)} earlier sweep(s) with this "
                f"space and base ({', '.join(sweeps_from) or 'none'})",
                flush=True,
            )
            tracker.client.set_tag(parent, "bagssl.warm_start.trials", str(len(warm)))
        if spec.baselines:
            log_baselines(tracker, plan.config({}), None if args.local else spec.resources)
        epochs = plan.config({}).schedule.epochs

        def experiment(
            xspec: SweepSpec, xplan: TrialPlan, xdir: str, resume: bool, tags: dict[str, str], prefix: str
        ) -> list[TrialOutcome] | None:
            """One Tune experiment (the search, or one config's refine runs) at xdir, or its --local loop."""
            wait_s = spec.tracking.outage_wait_s
            if placement is None:
                logger = TrialLogger(tracker, epochs, xplan.describe, tags)
                outcomes = run_local(xspec, xplan, logger, prefix)
                logger.drain(wait_s)
                return outcomes
            callback = MlflowTuneCallback(
                uri, spec.tracking.experiment, exp_dir, parent, epochs, xplan.describe, tags, wait_s
            )
            return run_with_ray(
                xspec, xplan, xdir, placement, callback, resume, warm if xdir == exp_dir else None
            )

        def refine(rspec: SweepSpec, rplan: TrialPlan, t: TrialOutcome) -> list[TrialOutcome] | None:
            rdir = f"{exp_dir}/refine/{t.trial_id}"  # inside the sweep's own directory
            resume = resuming and not args.local and tune.Tuner.can_restore(rdir)
            return experiment(rspec, rplan, rdir, resume, refine_tags(t.trial_id), f"refine_{t.trial_id}")

        refined = None
        try:
            # A sweep interrupted before Tune saved its state has none to restore: it starts afresh.
            restore = resuming and not args.local and tune.Tuner.can_restore(exp_dir)
            trials = experiment(spec, plan, exp_dir, restore, {}, "local")
            if trials is not None and spec.refine is not None:
                refined = run_refine(spec, plan, trials, refine)
        except TrackingUnavailable:
            raise  # the parent cannot be closed: it stays RUNNING, as after a crash
        except BaseException:
            tracker.client.set_terminated(parent, status="KILLED")
            raise
    return tracker, parent, trials, refined


def _ui_address(uri: str) -> str:
    """Where the MLflow UI of the store answers: the server itself, else `mlflow ui`'s default address."""
    return uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def log_baselines(tracker: MlflowTracker, base: TrainConfig, resources: ResourcesSpec | None) -> None:
    """The baselines of the base config (`bagssl_core.baselines`) on the parent run, scored once per sweep:
    a resumed sweep whose parent has them already does not score them again.

    Under Ray (`resources` given) they are scored in a Ray task holding one worker's GPUs and the trial's
    CPUs (`score_on_ray`), not in this process: a driver submitted with `ray job submit` runs on the head node,
    which may have no GPU and few CPUs, and the random-init backbone's probe extracts features of every
    image of the splits. `--local` scores them here, where its trials run. The parent's
    `bagssl.baselines.scored_on` tag says where."""
    from bagssl_core.baselines import score_baselines
    from bagssl_core.metrics import BASELINE_PREFIX
    from sweeps.tracking import TAG_BASELINES_SCORED_ON

    assert tracker.parent_id is not None
    if any(k.startswith(BASELINE_PREFIX) for k in tracker.client.get_run(tracker.parent_id).data.metrics):
        return
    if resources is None:
        print("scoring the baselines (raw pixels, a randomly initialised backbone) ...", flush=True)
        metrics, scored_on = score_baselines(base), "driver"
    else:
        metrics, node = score_on_ray(base, resources)
        scored_on = f"ray node {node}"
    tracker.client.set_tag(tracker.parent_id, TAG_BASELINES_SCORED_ON, scored_on)
    tracker.log_parent_metrics(metrics)


def score_on_ray(base: TrainConfig, resources: ResourcesSpec) -> tuple[dict[str, float], str]:
    """`score_baselines(base)` in a Ray task holding `baseline_resources`: the metrics, and the id of the
    node that scored them. Not retried: a failure is the driver's to report."""
    import ray

    from bagssl_core.baselines import score_baselines

    def score(cfg: TrainConfig) -> tuple[dict[str, float], str]:
        return score_baselines(cfg), ray.get_runtime_context().get_node_id()

    r = baseline_resources(resources, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    held = ", ".join(f"{v:g} {k}" for k, v in r.items())
    print(
        f"scoring the baselines (raw pixels, a randomly initialised backbone) in a Ray task ({held}) ...",
        flush=True,
    )
    task = ray.remote(score).options(num_cpus=r["CPU"], num_gpus=r.get("GPU", 0), max_retries=0)
    return ray.get(task.remote(base))


if __name__ == "__main__":
    sys.exit(main())

"""A sweep read back from MLflow alone: the parent run, its spec, its baselines and every child run with its
parameters, last report, per-epoch history and BagSSL analyses.

This is what lets a sweep that ran on a cluster be reported from a laptop: nothing here reads Tune's
storage or the trainer's files, only the tracking store (`sweeps.tracking` wrote it from the driver).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from bagssl_core.metrics import (
    ANALYSES_DIR,
    ANALYSIS_PREFIX,
    EPOCH,
    EPOCH_SECONDS,
    PATCHES_PER_S,
    ProbeKey,
    parse_baseline,
)
from sweeps.report import TrialOutcome, trial_status
from sweeps.spec import Objective, SweepSpec
from sweeps.tracking import (
    MLFLOW_TABLES,
    PARENT_TAG,
    TAG_FAILURE,
    TAG_REFINES,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL,
    TrackingError,
    check_reachable,
    sqlite_tables,
)

TRIAL_PARAM_PREFIX = "trial."  # a child's sampled values (TrialPlan.describe); the rest is its config


class ResultsError(ValueError):
    """The sweep cannot be read: phrased for the user, one line naming what was expected."""


@dataclass
class TrialRecord:
    """One child run of a sweep.

    Attributes:
        outcome: id, sampled parameters, status and last report, as the sweep itself saw them.
        run_id: the MLflow run.
        role: "trial" (a search trial) or "refine" (a re-training of a search trial's config, new seed).
        refines: for a refine run, the search trial whose config it re-trains.
        config: the run's full resolved config, flat (dotted paths), values parsed back from MLflow params.
        history: epoch -> that epoch's report (the metrics the reports need: objective keys and bounds,
            cost); the last epoch also carries the test values.
        wall_s: from the run's start to its end (None while it runs).
        analyses: `analysis/...` metrics of the run.
        analysis_pngs: names of the PNG artifacts under `analyses/`.
    """

    outcome: TrialOutcome
    run_id: str
    role: str
    refines: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    wall_s: float | None = None
    analyses: dict[str, float] = field(default_factory=dict)
    analysis_pngs: list[str] = field(default_factory=list)


@dataclass
class SweepResults:
    """A sweep as MLflow holds it.

    Attributes:
        experiment: the MLflow experiment's name.
        parent_id: the sweep's parent run.
        name: the parent run's name (the spec's name).
        spec: the spec the sweep ran, read from the parent's `spec.yaml` artifact.
        status: the parent run's status (RUNNING while the sweep goes on, FINISHED, KILLED).
        trials: the search trials, then the refine runs, each in creation order.
        baselines: baseline name -> {probe key: value} (bounds included), from the parent's metrics.
        tracking_uri: the store.
    """

    experiment: str
    parent_id: str
    name: str
    spec: SweepSpec
    status: str
    trials: list[TrialRecord]
    baselines: dict[str, dict[ProbeKey, float]]
    tracking_uri: str

    def search(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.role != "refine"]

    def refine_runs(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.role == "refine"]


def parse_param(text: str) -> Any:
    """A param value as MLflow stores it (`str(value)`, JSON for lists) back to the value the sweep set.

    JSON first: PyYAML reads `1e-05` (how Python writes a small float) as a string. Then YAML, for
    Python's `True`/`False`/`None`; anything neither reads stays the string.
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return None if text == "None" else value


def open_store(uri: str, what: str = "--tracking-uri") -> MlflowClient:
    """A client of an existing store: an unreachable server or a missing sqlite file is an error (MLflow
    would create an empty database and report 'no experiment' instead). Messages name the URI as `what`."""
    try:
        check_reachable(uri, what=what)
    except TrackingError as err:
        raise ResultsError(str(err)) from None
    if uri.startswith("sqlite:///"):
        problem = sqlite_store_problem(Path(uri.removeprefix("sqlite:///")))
        if problem is not None:
            raise ResultsError(f"{what}: {uri}: {problem}; expected the sqlite store a sweep wrote")
    return MlflowClient(tracking_uri=uri)


def sqlite_store_problem(db: Path) -> str | None:
    """Why the file `db` is not an existing MLflow sqlite store to read, or None. MLflow would create the
    file, or its tables in an empty file or database, and then report 'no experiment': a reader must leave
    what it was given as it was."""
    if not db.exists():
        return "no such file"
    if not db.is_file():
        return "not a file"
    if db.stat().st_size == 0:
        return "an empty file, not an MLflow store"
    try:
        tables = sqlite_tables(db)
    except TrackingError as err:
        return str(err)
    if not tables >= MLFLOW_TABLES:
        return "an SQLite database without MLflow's tables, not an MLflow store"
    return None


def load_sweep(
    uri: str, experiment: str, parent_id: str | None = None, what: str = "--tracking-uri"
) -> SweepResults:
    """Read a sweep from the store at `uri` (named `what` in messages): the parent `parent_id`, else the
    newest sweep parent run of `experiment`. Raises ResultsError naming what was expected."""
    client = open_store(uri, what)
    try:
        return _load(client, uri, experiment, parent_id)
    except MlflowException as err:
        raise ResultsError(f"MLflow at {uri}: {err.message.splitlines()[0]}") from None


def _load(client: MlflowClient, uri: str, experiment: str, parent_id: str | None) -> SweepResults:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ResultsError(
            f"--experiment: no experiment {experiment!r} at {uri}; expected one of: {', '.join(names) or 'none'}"
        )
    if parent_id is None:
        parents = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
            max_results=1,
            order_by=["start_time DESC"],
        )
        if not parents:
            raise ResultsError(
                f"--experiment: {experiment!r} holds no sweep; expected a parent run tagged {TAG_ROLE}=sweep "
                "(written by python -m sweeps.run)"
            )
        parent = parents[0]
    else:
        try:
            parent = client.get_run(parent_id)
        except MlflowException:
            raise ResultsError(f"--parent: no run {parent_id!r} at {uri}") from None
        if parent.data.tags.get(TAG_ROLE) != "sweep" or parent.info.experiment_id != exp.experiment_id:
            raise ResultsError(
                f"--parent: run {parent_id} is not a sweep of experiment {experiment!r}; expected a parent run "
                f"tagged {TAG_ROLE}=sweep"
            )
    spec = _parent_spec(client, parent.info.run_id)
    children = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        max_results=10000,
        order_by=["start_time ASC"],
    )
    objective = spec.objective()
    trials = [
        _record(client, run, objective, spec.train_axes()) for run in children if TAG_TRIAL in run.data.tags
    ]
    trials.sort(key=lambda t: (t.role == "refine", _start(children, t.run_id)))
    return SweepResults(
        experiment=experiment,
        parent_id=parent.info.run_id,
        name=parent.info.run_name or spec.name,
        spec=spec,
        status=parent.info.status,
        trials=trials,
        baselines=baselines(parent.data.metrics),
        tracking_uri=uri,
    )


def _start(runs: Iterable[Any], run_id: str) -> int:
    return next(r.info.start_time or 0 for r in runs if r.info.run_id == run_id)


def sweep_parent(uri: str, experiment: str, sweep_key: str) -> tuple[str, SweepSpec, dict[str, str]] | None:
    """The newest parent run of the sweep stored at `sweep_key`: its id, the spec it ran and its tags; None
    when MLflow holds none (a sweep stopped before its parent run was made). Reads only."""
    client = open_store(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP}` = '{sweep_key}'",
            max_results=1,
            order_by=["start_time DESC"],
        )
    except MlflowException as err:
        raise ResultsError(f"MLflow at {uri}: {err.message.splitlines()[0]}") from None
    if not found:
        return None
    run = found[0]
    return run.info.run_id, _parent_spec(client, run.info.run_id), dict(run.data.tags)


def _parent_spec(client: MlflowClient, run_id: str) -> SweepSpec:
    """The spec the sweep ran (`spec.yaml`, logged on the parent when it started)."""
    with tempfile.TemporaryDirectory(prefix="bagssl_report_") as d:
        try:
            path = download_artifact(client, run_id, "spec.yaml", Path(d))
        except (MlflowException, OSError) as err:
            raise ResultsError(
                f"--parent: run {run_id} has no readable spec.yaml artifact ({err}); expected the artifact a "
                "sweep logs on its parent run"
            ) from None
        text = Path(path).read_text()
    try:
        return SweepSpec.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise ResultsError(f"--parent: run {run_id}: spec.yaml is not a sweep spec ({first})") from None


def baselines(metrics: Mapping[str, float]) -> dict[str, dict[ProbeKey, float]]:
    """Baseline name -> its probe results (bounds included), from a parent run's metrics."""
    out: dict[str, dict[ProbeKey, float]] = {}
    for name, value in metrics.items():
        parsed = parse_baseline(name)
        if parsed is not None:
            out.setdefault(parsed[0], {})[parsed[1]] = float(value)
    return out


def history_keys(metrics: Mapping[str, float], objective: Objective) -> set[str]:
    """The metrics whose per-epoch history a report draws: the objective (its own name and the validation
    keys it is taken from, with their interval bounds), the epoch and the cost of each epoch. One MLflow
    call per key, so not every metric."""
    keys = {objective.name, EPOCH, PATCHES_PER_S, EPOCH_SECONDS}
    for k in objective.keys(metrics):
        keys |= {str(k), str(k.with_bound("lo")), str(k.with_bound("hi"))}
    return keys & set(metrics)


def _record(client: MlflowClient, run: Any, objective: Objective, axes: Iterable[str]) -> TrialRecord:
    tags = run.data.tags
    params = {k: parse_param(v) for k, v in run.data.params.items()}
    sampled = {
        k.removeprefix(TRIAL_PARAM_PREFIX): v for k, v in params.items() if k.startswith(TRIAL_PARAM_PREFIX)
    }
    config = {k: v for k, v in params.items() if not k.startswith(TRIAL_PARAM_PREFIX)}
    if tags.get(TAG_ROLE) == "refine":
        # A refine run samples only run.seed; the config it re-trains carries the search's values.
        sampled = {**{k: config[k] for k in axes if k in config}, **sampled}
    metrics = {k: float(v) for k, v in run.data.metrics.items()}
    history: dict[int, dict[str, float]] = {}
    for key in sorted(history_keys(metrics, objective)):
        for m in client.get_metric_history(run.info.run_id, key):
            history.setdefault(int(m.step), {})[key] = float(m.value)
    status = run.info.status
    if status not in ("FINISHED", "KILLED", "FAILED"):
        # A run the tracker never closed (the sweep still runs, or died): its epochs tell how far it got.
        status = trial_status(metrics, sampled, False, int(config.get("schedule.epochs", 0)))
    end = run.info.end_time
    wall = (end - run.info.start_time) / 1000.0 if end and run.info.start_time else None
    pngs = _analysis_pngs(client, run.info.run_id)
    return TrialRecord(
        outcome=TrialOutcome(tags[TAG_TRIAL], sampled, status, metrics, tags.get(TAG_FAILURE, "")),
        run_id=run.info.run_id,
        role=tags.get(TAG_ROLE, "trial"),
        refines=tags.get(TAG_REFINES),
        config=config,
        history=history,
        wall_s=wall,
        analyses={k: v for k, v in metrics.items() if k.startswith(ANALYSIS_PREFIX)},
        analysis_pngs=pngs,
    )


def _analysis_pngs(client: MlflowClient, run_id: str) -> list[str]:
    """Artifact paths of the run's analysis figures (`analyses/**.png`)."""
    out: list[str] = []
    todo = [ANALYSES_DIR]
    while todo:
        try:
            entries = client.list_artifacts(run_id, todo.pop())
        except (MlflowException, OSError):
            continue
        for e in entries:
            if e.is_dir:
                todo.append(e.path)
            elif e.path.lower().endswith(".png"):
                out.append(e.path)
    return sorted(out)


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    """One artifact of a run, downloaded under dst.

    Without MLflow's progress bar (unless MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is set): for each small file
    it drew a tqdm bar of 3 redraws into the sweep's closing summary, between the MLflow line and the report's.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst)))

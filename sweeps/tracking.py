"""MLflow: one parent run per sweep, one child run per trial, written from the driver only.

Runs opened inside Ray workers stay RUNNING when Tune kills a trial, so workers never talk to MLflow:
`MlflowTracker` is fed by a Tune callback in the driver (docs/operations.md, "MLflow from the driver").
Each child run carries the trial id as a tag and is looked up before it is created, so a resumed sweep
or a retried trial never duplicates one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow.fs
import requests
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.stopper import Stopper

from bagssl_core.config import ConfigError, flatten
from bagssl_core.metrics import ANALYSES_DIR, DIVERGED_AT_STEP, EPOCH, format_probe_table
from bagssl_core.outputs import writable_dir
from bagssl_core.provenance import provenance
from sweeps.report import trial_status
from sweeps.resources import WORKER_TAG_PREFIX
from sweeps.spec import START_FAILURES_TOLERATED, SweepSpec

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
TAG_SWEEP = "bagssl.sweep"  # sweep storage key, on the parent and every child
TAG_TRIAL = "bagssl.trial_id"
TAG_ROLE = "bagssl.role"  # "sweep" | "trial" | "refine"
TAG_FAILURE = "bagssl.failure"  # on a FAILED trial: why, in one line ("diverged at step 12: ...")
TAG_REFINES = "bagssl.refines"  # on a refine run: the id of the search trial whose config it re-trains
TAG_SPEC = "bagssl.spec"  # on the parent: the spec's name (its sweeps are <name>, <name>-2, ...)
TAG_SPACE_HASH = "bagssl.space_hash"  # on the parent: lifecycle.space_hash, matched by a warm start
TAG_BASE_HASH = "bagssl.base_hash"  # on the parent: lifecycle.base_hash, matched by a warm start
TAG_BASELINES_SCORED_ON = "bagssl.baselines.scored_on"  # on the parent: "driver" or "ray node <id>"
PARENT_TAG = "mlflow.parentRunId"

# What MLflow 3.17's UI reads to open an experiment on its runs (docs/operations.md, "What the MLflow UI
# opens on"). The kind tag is what the UI's experiment-kind selector writes for "Machine learning"; the
# 3.17 UI decides the view by its workflow type instead (the `workflowType=machine_learning` query of
# `runs_url`), and earlier 3.x UIs by this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"  # the runs page's charts start from it
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a runs-table view that a URL can open
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000


class TrackingError(RuntimeError):
    """The tracking server cannot be used; phrased for the user."""


def resolve_uri(uri: str | None) -> str:
    """The spec's URI, else MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """The URI with a relative sqlite path made absolute: `sqlite:///mlflow.db` means the working
    directory of the process that opens it, and `sweep.json` is read from anywhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


# What check_reachable accepts, for its messages.
EXPECTED_URIS = (
    "sqlite:///path.db, http(s)://host[:port] (an MLflow server), or postgresql://, mysql:// or mssql:// "
    "with its driver installed"
)
# The SQLAlchemy databases MLflow keeps runs in besides sqlite (mlflow.store.db.db_types).
SERVER_DATABASES = ("postgresql", "mysql", "mssql")
SQLITE_HEADER = b"SQLite format 3\x00"
DATABRICKS = ("databricks", "databricks-uc", "uc")  # MLflow's names of a Databricks workspace


def uri_source(given: str | None, key: str) -> str:
    """What to call a store's URI in messages (`resolve_uri` picks it): `key` (a spec key, a flag) when it
    was given there, else the environment variable that gave it, else `key` at its default."""
    if given:
        return key
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return f"{key} (default)"


def check_reachable(uri: str, timeout_s: float = 5.0, what: str = "tracking.uri") -> None:
    """Fail fast, with one line, when the tracking store cannot be reached or written.

    A server that takes the connection but never answers is given `timeout_s` per socket operation (connect,
    each read): the check ends within a few times that, saying so. Every URI MLflow would refuse, or accept
    and then fail on (or lose the runs of) once trials have trained, is refused here. The message starts
    with `what`: where the URI came from (`uri_source`).
    """
    try:
        _check_reachable(uri, timeout_s)
    except TrackingError as err:
        raise TrackingError(f"{what}: {err}") from None


# The checks below phrase what is wrong with the URI; `check_reachable` puts the key that gave it first.


def _check_reachable(uri: str, timeout_s: float) -> None:
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    scheme = m.group(1).lower() if m else ""
    if uri.lower() in DATABRICKS or scheme in DATABRICKS:
        # MLflow can write to a Databricks workspace, but not with a sweep's experiment names (there they
        # are workspace paths) nor before credentials are checked: the first write would fail after Ray
        # and the baselines started.
        raise TrackingError(
            f"{uri}: a Databricks store, which sweeps do not write to; expected {EXPECTED_URIS}"
        )
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
    elif scheme.split("+")[0] == "sqlite":
        _check_sqlite(uri, scheme)
    elif scheme in ("", "file"):  # a path, or file:, is MLflow's file store (docs/operations.md, "The store")
        raise TrackingError(
            f"{uri}: MLflow 3's file store is in maintenance mode; expected sqlite:///path.db or http(s)://"
        )
    elif scheme.split("+")[0] in SERVER_DATABASES:
        _check_database_driver(uri)
    else:
        raise TrackingError(f"{uri}: unsupported scheme {scheme!r}; expected {EXPECTED_URIS}")


def _check_server(uri: str, timeout_s: float) -> None:
    """An MLflow server: a URL with a host, answering at /health."""
    try:
        host = urllib.parse.urlsplit(uri).hostname
        urllib.parse.urlsplit(uri).port  # noqa: B018 -- raises ValueError on a port that is no number
    except ValueError as err:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        raise TrackingError(f"{uri}: not a valid URL ({err}); expected http(s)://host[:port]") from None
    if not host:
        raise TrackingError(f"{uri}: no host; expected http(s)://host[:port]")
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status >= 400:
                raise TrackingError(f"{uri} answered HTTP {resp.status} at /health")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as err:
        # ValueError: what urlsplit let through and http.client refuses (http.client.InvalidURL).
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):  # a timed-out connect comes wrapped in a URLError
            reason = f"no answer within {timeout_s:g} s"
        raise TrackingError(
            f"cannot reach the MLflow server at {uri} ({reason}); expected a running "
            "server (mlflow server ...) or a sqlite:///file.db URI"
        ) from None


def _check_sqlite(uri: str, scheme: str) -> None:
    """A sqlite store: a database file (never in memory) that sqlite can create or open and write, in
    an existing directory this user can write (sqlite keeps its journal beside the file)."""
    if scheme != "sqlite":
        _check_database_driver(uri)
    db = _sqlite_path(uri, scheme)
    parent = db.parent if str(db.parent) else Path(".")
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise TrackingError(
            f"{uri}: {parent} {what}; expected the database file in an existing directory "
            "(sqlite creates the file, not its directory)"
        )
    try:
        writable_dir(parent, uri)
    except ConfigError as err:
        raise TrackingError(str(err)) from None
    if db.is_dir():
        raise TrackingError(
            f"{uri}: {db} is a directory; expected the database file ({scheme}:///{db}/mlflow.db)"
        )
    if db.exists():
        _check_sqlite_file(uri, db)


def _sqlite_path(uri: str, scheme: str) -> Path:
    """The database file a sqlite URI names; TrackingError for one that names none."""
    rest = uri[len(scheme) + 1 :]
    if rest in ("", "//"):
        raise TrackingError(
            f"{uri}: an in-memory database, whose runs are lost when the sweep ends; expected "
            f"{scheme}:///path.db, a file"
        )
    if not rest.startswith("///"):
        raise TrackingError(f"{uri}: not a database path; expected {scheme}:///path.db")
    if "?" in rest:
        # sqlite's URI options (mode=ro, ...) would open a store a sweep cannot write, found out only
        # when the first trial is logged.
        raise TrackingError(
            f"{uri}: a query ({rest[rest.index('?') :]}); expected {scheme}:///path.db without one"
        )
    path = rest.removeprefix("///")
    if not path:
        raise TrackingError(f"{uri}: no database path; expected {scheme}:///path.db")
    return Path(path)


def _check_sqlite_file(uri: str, db: Path) -> None:
    """An existing file at a sqlite store's path: a database (or an empty file, which sqlite makes one
    of) this user can write. Any other file sqlite refuses at the first write, after trials trained."""
    if not db.is_file():
        raise TrackingError(f"{uri}: {db} is not a regular file; expected an sqlite database file")
    try:
        with db.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise TrackingError(
            f"{uri}: {db} cannot be read ({err.strerror or err}); expected a database file this "
            "user can read and write"
        ) from None
    if header and header != SQLITE_HEADER:
        raise TrackingError(
            f"{uri}: {db} is not an SQLite database; expected an MLflow sqlite store, or a path "
            "where sqlite can create one"
        )
    if not os.access(db, os.W_OK):
        raise TrackingError(
            f"{uri}: {db} cannot be written; expected a database file this user can read and write"
        )
    try:
        tables = sqlite_tables(db) if header else set()
    except TrackingError as err:
        raise TrackingError(
            f"{uri}: {err}; expected an MLflow sqlite store, or a path where sqlite can create one"
        ) from None
    if tables and not tables >= MLFLOW_TABLES:
        # MLflow would add its tables beside another application's.
        raise TrackingError(
            f"{uri}: {db} is another application's SQLite database (tables: "
            f"{', '.join(sorted(tables)[:5])}); expected an MLflow sqlite store, or a path where sqlite can create one"
        )


# Tables every MLflow sqlite store has: a database that lacks them is not one (MLflow would create them).
MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs"})


def sqlite_tables(db: Path) -> set[str]:
    """The tables of the sqlite database `db`, read without writing anything (a read-only connection)."""
    import sqlite3

    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise TrackingError(f"{db} cannot be read as an SQLite database ({err})") from None


def _check_database_driver(uri: str) -> None:
    """A database server's URI whose SQLAlchemy driver imports: MLflow imports it only at the first
    write. The server itself is not contacted (each driver takes its own timeout options)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        shown = url.render_as_string(hide_password=True)
    except (ArgumentError, ValueError) as err:
        raise TrackingError(f"{uri}: not a database URL ({err}); expected {EXPECTED_URIS}") from None
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise TrackingError(
            f"{shown}: SQLAlchemy has no driver {url.drivername!r}; expected {EXPECTED_URIS}"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        raise TrackingError(
            f"{shown}: its database driver, the Python module {missing!r}, is not installed; "
            f"expected it installed (or {url.get_backend_name()}+DRIVER:// naming an installed driver), or "
            "a sqlite:///path.db or http(s):// URI"
        ) from None


def param_text(v: Any) -> str:
    """A param's value as MLflow stores it: lists and mappings as JSON, anything else as str()."""
    s = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return s[:MAX_PARAM_LEN]


def sweep_params(spec: SweepSpec) -> dict[str, Any]:
    """The parent run's params: the space, objective, search, and the code and package versions."""
    info = provenance(extra_packages=("ray", "optuna", "mlflow"))
    params: dict[str, Any] = {f"space.{k}": {d.kind: list(d.args)} for k, d in spec.space.items()}
    params.update(
        {
            "metric": spec.metric,
            "mode": spec.mode,
            "num_samples": spec.num_samples,
            "search": spec.search.algo,
            "scheduler": spec.scheduler.name,
            "workers_per_trial": spec.resources.workers_per_trial,
        }
    )
    params.update({k: v for k, v in info.items() if v is not None})
    return params


class MlflowTracker:
    """Parent run of a sweep and a child per trial, in one experiment."""

    def __init__(self, uri: str, experiment: str, sweep_key: str):
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # created by an older version of this code
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.sweep_key = sweep_key
        self.parent_id: str | None = None
        self._children: dict[str, str] = {}

    # --- parent -------------------------------------------------------------------------------
    def start_parent(
        self,
        name: str,
        params: Mapping[str, Any],
        artifacts: Mapping[str, str],
        resume: bool = False,
        tags: Mapping[str, str] = {},
    ) -> str:
        """Open the sweep's parent run; on resume, reopen the newest one of this sweep with its children.
        `tags` go on a new parent besides the role and the sweep key (e.g. `TAG_SPACE_HASH`)."""
        found = (
            self._search(f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP}` = '{self.sweep_key}'")
            if resume
            else []
        )
        if found:
            self.attach_parent(found[0].info.run_id)
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={TAG_ROLE: "sweep", TAG_SWEEP: self.sweep_key, **tags}
        )
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        for file_name, text in artifacts.items():
            self.client.log_text(self.parent_id, text, file_name)
        return self.parent_id

    def finish_parent(self, status: str, summary: Mapping[str, Any], artifacts: Mapping[str, str]) -> None:
        assert self.parent_id is not None
        metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self._log_metrics(self.parent_id, metrics, step=0)
        tags = {f"best.{k}": str(v) for k, v in summary.items() if k not in metrics}
        for k, v in tags.items():
            self.client.set_tag(self.parent_id, k, v[:MAX_TAG_LEN])
        for file_name, text in artifacts.items():
            self.client.log_text(self.parent_id, text, file_name)
        self.client.set_terminated(self.parent_id, status=status)

    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics of the sweep as a whole (the baselines), on the parent run."""
        assert self.parent_id is not None
        self._log_metrics(self.parent_id, metrics, step=0)

    def attach_parent(self, parent_id: str) -> None:
        """Use an existing parent run and know its children (a restored sweep's callback)."""
        self.parent_id = parent_id
        for child in self._search(f"tags.`{PARENT_TAG}` = '{parent_id}'"):
            self._children[child.data.tags.get(TAG_TRIAL, "")] = child.info.run_id

    # --- what the UI opens on, and the experiment's other sweeps -----------------------------------
    def set_runs_view(self, key: str, metric: str, axes: Iterable[str]) -> None:
        """A saved runs-table view that `runs_url(key)` opens: the objective, the epoch it came from, the
        loss and the throughput as columns beside the searched parameters; and the objective as the
        experiment's primary metric, the first of the UI's charts. The view keeps the UI's default order
        (newest first), the one order in which the UI nests each trial under its sweep's parent run.

        MLflow's default view shows no metric column at all (docs/operations.md, "What the MLflow UI opens
        on"); the view is the UI's own shared-view format, an experiment tag read when the URL names it.
        """

        def column(kind: str, name: str) -> str:
            return f"{kind}.`{name}`"

        view = {
            "selectedColumns": [column("attributes", "Duration")]
            + [column("metrics", m) for m in (metric, "best_val", EPOCH, "train/loss", "patches_per_s")]
            + [column("params", a) for a in axes],
        }
        self.client.set_experiment_tag(self.experiment_id, PRIMARY_METRIC_TAG, metric)
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + key, json.dumps(view))

    def runs_url(self, server: str, key: str | None = None) -> str:
        """The experiment's runs table in the UI at `server`, as a model-training experiment, in the view
        `set_runs_view(key)` saved."""
        query = "workflowType=machine_learning" + (f"&viewStateShareKey={key}" if key else "")
        return f"{server.rstrip('/')}/#/experiments/{self.experiment_id}/runs?{query}"

    def sweep_keys(self, prefix: str) -> list[str]:
        """The sweep keys starting with `prefix` of the parent runs in this experiment (newest first)."""
        found = self._search(f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP}` LIKE '{prefix}%'")
        return [r.data.tags[TAG_SWEEP] for r in found]

    def earlier_finished_trials(
        self, space: str, base: str
    ) -> list[tuple[str, dict[str, str], dict[str, float]]]:
        """The FINISHED search trials of the other sweeps in this experiment whose parent has space hash
        `space` and base hash `base`: (sweep key, params, last metrics) each, for a warm start."""
        parents = self._search(
            f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SPACE_HASH}` = '{space}' "
            f"and tags.`{TAG_BASE_HASH}` = '{base}'"
        )
        out = []
        for p in parents:
            if p.data.tags.get(TAG_SWEEP) == self.sweep_key:
                continue
            children = self._search(
                f"tags.`{PARENT_TAG}` = '{p.info.run_id}' and tags.`{TAG_ROLE}` = 'trial' "
                "and attributes.status = 'FINISHED'"
            )
            out += [(p.data.tags[TAG_SWEEP], dict(c.data.params), dict(c.data.metrics)) for c in children]
        return out

    # --- children -----------------------------------------------------------------------------
    def child(
        self,
        trial_id: str,
        name: str,
        params: Mapping[str, Any],
        artifacts: Mapping[str, str],
        tags: Mapping[str, str] = {},
    ) -> str:
        """The trial's child run, created once; later calls (retries, resumes) return the same run.
        `tags` add to (or replace) the defaults, e.g. `refine_tags`."""
        if trial_id in self._children:
            return self._children[trial_id]
        assert self.parent_id is not None
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                PARENT_TAG: self.parent_id,
                TAG_ROLE: "trial",
                TAG_TRIAL: trial_id,
                TAG_SWEEP: self.sweep_key,
                **tags,
            },
        )
        run_id = run.info.run_id
        self._children[trial_id] = run_id
        self._log_params(run_id, params)
        for file_name, text in artifacts.items():
            self.client.log_text(run_id, text, file_name)
        return run_id

    def has_child(self, trial_id: str) -> bool:
        return trial_id in self._children

    def tag_child(self, trial_id: str, tags: Mapping[str, str]) -> None:
        run_id = self._children.get(trial_id)
        if run_id is not None:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value[:MAX_TAG_LEN])

    def log_epoch(
        self, trial_id: str, metrics: Mapping[str, float], epoch: int, timestamp_ms: int | None = None
    ) -> None:
        """One epoch's metrics, stamped `timestamp_ms` (default now): a write sent again with the same stamp
        after a lost answer is the same record, which the store keeps once."""
        self._log_metrics(self._children[trial_id], metrics, step=epoch, timestamp_ms=timestamp_ms)

    def adopt_child(self, trial_id: str) -> None:
        """Know the trial's child run if the store has one under this parent: a creation whose answer was
        lost may have been made."""
        assert self.parent_id is not None
        found = self._search(
            f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'"
        )
        if found:
            self._children[trial_id] = found[0].info.run_id

    def finish_child(
        self,
        trial_id: str,
        status: str,
        artifacts: Mapping[str, str] = {},
        tags: Mapping[str, str] = {},
        artifact_dirs: Mapping[str, Path] = {},
    ) -> None:
        """End a child run: its text artifacts, its tags, and whole folders (artifact path -> local dir)."""
        run_id = self._children.get(trial_id)
        if run_id is None:
            return
        for file_name, text in artifacts.items():
            self.client.log_text(run_id, text, file_name)
        for artifact_path, local_dir in artifact_dirs.items():
            self.client.log_artifacts(run_id, str(local_dir), artifact_path)
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status=status)

    def failures(self) -> dict[str, str]:
        """Trial id -> the reason of each FAILED child of the current parent (its `bagssl.failure` tag)."""
        runs = self._search(f"tags.`{PARENT_TAG}` = '{self.parent_id}' and attributes.status = 'FAILED'")
        return {
            r.data.tags[TAG_TRIAL]: r.data.tags.get(TAG_FAILURE, "") for r in runs if TAG_TRIAL in r.data.tags
        }

    # --- helpers --------------------------------------------------------------------------------
    def _search(self, filter_string: str) -> list[Any]:
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                max_results=10000,
                order_by=["start_time DESC"],
            )
        )

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
        items = [Param(k, param_text(v)) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None
    ) -> None:
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])


# --- the Tune callback: the only place trials reach MLflow ----------------------------------------

# Keys Tune adds to every result; everything else numeric in a result came from the trainer.
TUNE_KEYS = frozenset(
    {
        "timestamp",
        "time_this_iter_s",
        "time_total_s",
        "pid",
        "training_iteration",
        "iterations_since_restore",
        "time_since_restore",
        "done",
        "node_ip",
        "hostname",
        "date",
        "trial_id",
        "experiment_tag",
        "checkpoint_dir_name",
        "config",
        "should_checkpoint",
    }
)


def trainer_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in result.items()
        if k not in TUNE_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def refine_tags(trial_id: str) -> dict[str, str]:
    """The tags of a run that re-trains search trial `trial_id`'s config with a new seed (sweeps.refine)."""
    return {TAG_ROLE: "refine", TAG_REFINES: trial_id}


# A server that died mid-answer breaks the connection (ChunkedEncodingError); MLflow's client wraps these
# in an MlflowException that keeps only their text.
_NO_ANSWER = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    ConnectionError,
)
_NO_ANSWER_SIGNS = ("Max retries exceeded", "Connection refused", "Connection broken", "Read timed out")


def is_unreachable(err: BaseException) -> bool:
    """Whether an MLflow call failed because its server did not answer (refused, reset, timed out), rather
    than because it refused the request: only then is the write held and sent again."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, _NO_ANSWER) or any(sign in str(seen) for sign in _NO_ANSWER_SIGNS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class TrackingUnavailable(TrackingError):
    """MLflow stopped answering mid-sweep and did not answer again in time: some writes were not made."""


class TrialLogger:
    """Feeds an MlflowTracker from trial events; shared by the Tune callback and `--local` mode.

    Each event updates what the driver knows at once (statuses, last results) and queues its MLflow
    writes, which are sent in order. While the server does not answer (`is_unreachable`) the writes are
    held, training goes on, and they are sent at the next event once it answers again, or by `drain` at
    the end of the experiment (docs/operations.md, "MLflow stopped mid-sweep").
    """

    def __init__(
        self,
        tracker: MlflowTracker,
        epochs: int,
        describe: Callable[[Mapping[str, Any]], tuple[dict, dict]],
        child_tags: Mapping[str, str] = {},
    ):
        self.tracker = tracker
        self.epochs = epochs
        self.describe = describe  # params -> (flat params, {artifact name: text})
        self.child_tags = dict(child_tags)  # on every child run it creates, besides the defaults
        self.last_epoch: dict[str, int] = {}
        self.last_result: dict[str, dict[str, float]] = {}
        self.params: dict[str, dict[str, Any]] = {}
        self.statuses: dict[str, str] = {}
        self.places: dict[str, dict[str, str]] = {}
        self.held: deque[tuple[str, Callable[[], None]]] = deque()  # (what, the write), oldest first
        self.down_since: float | None = None

    # --- events ---------------------------------------------------------------------------------
    def start(self, trial_id: str, name: str, params: Mapping[str, Any]) -> None:
        self.params[trial_id] = dict(params)
        flat, artifacts = self.describe(params)

        tries = 0

        def write() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and not self.tracker.has_child(trial_id):
                self.tracker.adopt_child(trial_id)
            existed = self.tracker.has_child(trial_id)
            run_id = self.tracker.child(trial_id, name, flat, artifacts, self.child_tags)
            if existed and trial_id not in self.last_epoch:
                history = self.tracker.client.get_metric_history(run_id, "epoch")
                self.last_epoch[trial_id] = max((int(m.value) for m in history), default=0)

        self._send(f"trial {trial_id}: its run", write)

    def result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        metrics = trainer_metrics(result)
        self.last_result[trial_id] = metrics
        # Where the trial's workers run (node id and pid per rank, the DDP backend): tags, since they are
        # not numbers, set again when a restarted worker group reports new places.
        places = {k: str(v) for k, v in result.items() if k.startswith(WORKER_TAG_PREFIX)}
        epoch = int(metrics.get("epoch", 0))
        at_ms = int(time.time() * 1000)  # when it happened, also if sent later

        def write() -> None:
            if places and places != self.places.get(trial_id):
                self.tracker.tag_child(trial_id, places)
                self.places[trial_id] = places
            # A resumed trial re-reports nothing MLflow already has: one value per epoch.
            if epoch <= self.last_epoch.get(trial_id, 0):
                return
            self.tracker.log_epoch(trial_id, metrics, epoch, at_ms)
            self.last_epoch[trial_id] = epoch

        self._send(f"trial {trial_id}: epoch {epoch}", write)

    def complete(self, trial_id: str, figures: Path | None = None) -> None:
        """A trial that ended without an error: FINISHED when it ran the epochs it planned, KILLED when
        the scheduler stopped it early, FAILED when its loss diverged (`report.trial_status`).

        Args:
            figures: a local folder holding the trial's analysis figures (`eval.analyses`), logged as the
                child's `analyses/` artifacts; copied first, since the caller's folder may be gone by the
                time a held write is sent.
        """
        last = self.last_result.get(trial_id, {})
        status = trial_status(last, self.params.get(trial_id, {}), False, self.epochs)
        if status == "FAILED":
            self.error(trial_id, f"diverged at step {int(last[DIVERGED_AT_STEP])}: the loss was not finite")
            return
        self.statuses[trial_id] = status
        table = format_probe_table(last)
        kept = None
        if figures is not None and any(figures.glob("*.png")):
            kept = Path(tempfile.mkdtemp(prefix="bagssl_figures_"))
            shutil.copytree(figures, kept, dirs_exist_ok=True)

        def write() -> None:
            dirs = {ANALYSES_DIR: kept} if kept is not None else {}
            self.tracker.finish_child(
                trial_id, status, {"probes.txt": table} if table else {}, artifact_dirs=dirs
            )
            if kept is not None:
                shutil.rmtree(kept, ignore_errors=True)

        self._send(f"trial {trial_id}: {status}", write)

    def error(self, trial_id: str, message: str) -> None:
        """FAILED, with the reason as the `bagssl.failure` tag (its last line) and `error.txt` (all of it)."""
        self.statuses[trial_id] = "FAILED"
        lines = [line for line in message.strip().splitlines() if line.strip()] or ["failed"]
        tags = {TAG_FAILURE: lines[-1].strip()[:MAX_TAG_LEN]}
        self._send(
            f"trial {trial_id}: FAILED",
            lambda: self.tracker.finish_child(trial_id, "FAILED", {"error.txt": message}, tags),
        )

    # --- writes ---------------------------------------------------------------------------------
    def _send(self, what: str, write: Callable[[], None]) -> None:
        self.held.append((what, write))
        self.flush()

    def flush(self) -> bool:
        """Send the held writes in order; False, holding the rest, while the server does not answer."""
        while self.held:
            what, write = self.held[0]
            try:
                write()
            except Exception as err:
                if not is_unreachable(err):
                    raise
                if self.down_since is None:
                    self.down_since = time.time()
                    log.warning(
                        "MLflow at %s does not answer; training goes on and its writes are held (%s ...), "
                        "to be sent when it answers",
                        self.tracker.client.tracking_uri,
                        what,
                    )
                return False
            self.held.popleft()
        if self.down_since is not None:
            log.warning("MLflow answers again: every held write was sent")
            self.down_since = None
        return True

    def drain(self, wait_s: float, every_s: float = 5.0) -> None:
        """Send every held write, trying again every `every_s` for up to `wait_s` seconds.

        Raises:
            TrackingUnavailable: the server still does not answer; the message lists what was not written.
        """
        deadline = time.monotonic() + wait_s
        while not self.flush():
            if time.monotonic() >= deadline:
                held = [what for what, _ in self.held]
                raise TrackingUnavailable(
                    f"tracking.uri: the MLflow server at {self.tracker.client.tracking_uri} stopped answering "
                    f"mid-sweep and did not answer again within tracking.outage_wait_s={wait_s:g} s; "
                    f"{len(held)} write(s) not made ({'; '.join(held[:6])}{' ...' if len(held) > 6 else ''}). "
                    "What it holds is intact; the trials' results and checkpoints are in the storage path"
                )
            time.sleep(min(every_s, max(0.0, deadline - time.monotonic())))


class MlflowTuneCallback(Callback):
    """Forwards Tune's trial events to MLflow from the driver.

    Tune pickles its callbacks into the experiment state and a restored sweep uses those copies, so this
    holds only plain settings and builds its MLflow client in `setup` (docs/operations.md, "The MLflow
    callback").
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        sweep_key: str,
        parent_id: str,
        epochs: int,
        describe: Callable[[Mapping[str, Any]], tuple[dict, dict]],
        child_tags: Mapping[str, str] = {},
        outage_wait_s: float = 600.0,
    ):
        self.settings = (uri, experiment, sweep_key, parent_id)
        self.epochs = epochs
        self.describe = describe
        self.child_tags = dict(child_tags)
        self.outage_wait_s = outage_wait_s
        self.logger: TrialLogger | None = None

    def setup(
        self,
        stop: Stopper | None = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        uri, experiment, sweep_key, parent_id = self.settings
        tracker = MlflowTracker(uri, experiment, sweep_key)
        tracker.attach_parent(parent_id)
        self.logger = TrialLogger(tracker, self.epochs, self.describe, self.child_tags)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "logger": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        assert self.logger is not None
        self.logger.start(trial.trial_id, str(trial), trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        assert self.logger is not None
        self.logger.result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        assert self.logger is not None
        with tempfile.TemporaryDirectory(prefix="bagssl_figures_") as d:
            self.logger.complete(trial.trial_id, checkpoint_figures(trial.checkpoint, Path(d)))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        assert self.logger is not None
        self.logger.error(trial.trial_id, trial_error_text(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Every write held while MLflow did not answer is sent before the experiment counts as done."""
        if self.logger is not None:
            self.logger.drain(getattr(self, "outage_wait_s", 600.0))  # a callback pickled before the knob


# Train's message when a worker group found no room in time (ray/train/v2/_internal/exceptions.py).
_START_TIMED_OUT = re.compile(r"worker group startup timed out after ([0-9.]+) seconds")


def trial_error_text(trial: Any) -> str:
    """Why Tune ended a trial in error: `latest_failure` of the text Tune recorded in the trial's error
    file, or in the storage path when the driver's copy is gone."""
    if trial.storage is None:  # a trial Tune never gave a place to run: nothing was recorded
        return latest_failure("")
    path = trial.error_file
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    return latest_failure(text or trial.get_error() or "")


def latest_failure(text: str) -> str:
    """The last failure in the text of a Tune error file, which appends each failure after a "Failure # N
    (occurred at ...)" line.

    Where the cause is Train's worker-group start timeout, a last line says which spec key sets it: Train's
    own advice names its environment variable, which the trial sets from the spec (`trainable`).
    """
    text = text.strip()
    if not text:
        return "trial failed: Tune recorded no reason"
    if "Failure # " in text:
        text = "Failure # " + text.split("Failure # ")[-1]
    timed_out = _START_TIMED_OUT.search(text)
    if timed_out:
        text += (
            f"\nno room for the trial's workers within {float(timed_out[1]):g} s, "
            f"{START_FAILURES_TOLERATED + 1} starts that timed out in all (a node lost, or the cluster full); "
            "expected room within failure.worker_start_timeout_s"
        )
    return text


def checkpoint_figures(checkpoint: Any, into: Path) -> Path | None:
    """The analysis figures a trial's last checkpoint carries (`trainable.worker_loop` puts them there,
    since the worker's run directory is gone once the trial ends), copied from the storage path, local or
    remote, into `into`; None when it carries none."""
    if checkpoint is None:
        return None
    source = f"{checkpoint.path.rstrip('/')}/{ANALYSES_DIR}"
    if checkpoint.filesystem.get_file_info(source).type != pyarrow.fs.FileType.Directory:
        return None
    pyarrow.fs.copy_files(source, str(into), source_filesystem=checkpoint.filesystem)
    return into

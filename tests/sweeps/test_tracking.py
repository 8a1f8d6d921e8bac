"""MLflow tracking against a real sqlite store: parent and child runs, statuses, per-epoch metrics, resume."""

from __future__ import annotations

import json
import math
import pickle
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from bagssl_core.config import flatten
from bagssl_core.metrics import DIVERGED_AT_STEP, EPOCHS_PLANNED
from sweeps.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    TAG_FAILURE,
    TAG_REFINES,
    TAG_ROLE,
    TAG_TRIAL,
    MlflowTracker,
    MlflowTuneCallback,
    TrackingError,
    TrialLogger,
    check_reachable,
    latest_failure,
    refine_tags,
    resolve_uri,
)
from sweeps.trainable import TrialPlan

EPOCHS = 2
PLAN = TrialPlan(
    base={"data": {"name": "fashion_mnist"}, "schedule": {"epochs": EPOCHS}, "eval": {"every": 1}},
    eval_variants={"": {}},
    metric="val/knn_top1/mean_emb",
    mode="max",
)


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store for the module: creating MLflow's tables costs seconds. Each test has its own experiment.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracker(uri: str, request: pytest.FixtureRequest) -> MlflowTracker:
    t = MlflowTracker(uri, f"exp-{request.node.name}", sweep_key=f"/sweeps/{request.node.name}")
    t.start_parent(
        "sweep", {"metric": PLAN.metric, "space.patch.size": {"choice": [8, 12]}}, {"spec.yaml": "name: t\n"}
    )
    return t


def epoch_result(epoch: int, knn: float, **extra: float) -> dict:
    """A Tune result as the callback sees it: trainer metrics plus Tune's own keys."""
    return {
        "epoch": epoch,
        "train/loss": 10.0 - epoch,
        "val/knn_top1/mean_emb": knn,
        "training_iteration": epoch,
        "time_total_s": 1.5 * epoch,
        "trial_id": "ignored",
        "done": False,
        **extra,
    }


def run_of(tracker: MlflowTracker, trial_id: str) -> str:
    """The trial's existing child run (child() never creates a second one)."""
    assert tracker.has_child(trial_id)
    return tracker.child(trial_id, "", {}, {})


def status_of(tracker: MlflowTracker, trial_id: str) -> str:
    """The trial's child run status, as the store has it."""
    return tracker.client.get_run(run_of(tracker, trial_id)).info.status


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --- parent and children ----------------------------------------------------------------------------


def test_parent_and_child(tracker: MlflowTracker) -> None:
    client = tracker.client
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "RUNNING"
    assert parent.data.params["metric"] == "val/knn_top1/mean_emb"
    assert parent.data.params["space.patch.size.choice"] == "[8, 12]"  # flattened, lists as JSON
    child_id = tracker.child(
        "t1", "trial one", {"patch": {"size": 8}, "eval": {"aggregation": ["mean_emb"]}}, {}
    )
    child = client.get_run(child_id)
    assert child.data.tags[PARENT_TAG] == tracker.parent_id
    assert child.data.tags[TAG_TRIAL] == "t1"
    assert child.info.run_name == "trial one"
    # Nested params are flattened to dotted keys, the way the MLflow UI compares them.
    assert child.data.params == {"patch.size": "8", "eval.aggregation": '["mean_emb"]'}


def test_child_twice_is_one_run(tracker: MlflowTracker) -> None:
    first = tracker.child("t1", "trial", {"patch.size": 8}, {"config.yaml": "patch: {size: 8}\n"})
    again = tracker.child("t1", "trial", {"patch.size": 8}, {"config.yaml": "patch: {size: 8}\n"})
    assert first == again
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_TRIAL}` = 't1'")
    assert [r.info.run_id for r in runs] == [first]


def test_plan_params_are_flat_config(tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 12, "loss.inv_weight": 10.0})
    run = tracker.client.get_run(run_of(tracker, "t1"))
    params = run.data.params
    assert params["patch.size"] == "12"
    assert params["loss.inv_weight"] == "10.0"
    assert params["trial.patch.size"] == "12"  # the sampled values, apart
    assert params["data.name"] == "fashion_mnist"
    assert params["derived.patch_px"] == "12"
    artifacts = {f.path for f in tracker.client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts


# --- the trial logger: statuses and per-epoch metrics ------------------------------------------------


def test_all_epochs_finish(tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 8})
    trials.result("t1", epoch_result(1, 40.0))
    # The last report of a finished run carries the test split's scores (bagssl_core.metrics.expected_metrics).
    trials.result(
        "t1",
        epoch_result(
            2, 55.0, **{"val/knn_top1/mean_emb:grid_stride-4": 51.0, "test/knn_top1/mean_emb": 53.0}
        ),
    )
    trials.complete("t1")
    assert trials.statuses == {"t1": "FINISHED"}
    run_id = run_of(tracker, "t1")
    client = tracker.client
    assert client.get_run(run_id).info.status == "FINISHED"
    assert history(client, run_id, "val/knn_top1/mean_emb") == [(1, 40.0), (2, 55.0)]
    assert history(client, run_id, "train/loss") == [(1, 9.0), (2, 8.0)]
    # A variant's metric name is accepted by MLflow as it is.
    assert history(client, run_id, "val/knn_top1/mean_emb:grid_stride-4") == [(2, 51.0)]
    assert history(client, run_id, "test/knn_top1/mean_emb") == [(2, 53.0)]  # once, at the last epoch
    # Tune's bookkeeping is not a trainer metric.
    metrics = client.get_run(run_id).data.metrics
    assert "training_iteration" not in metrics and "time_total_s" not in metrics
    assert "probes.txt" in {f.path for f in client.list_artifacts(run_id)}


def test_stopped_early_is_killed(tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 8})
    trials.result("t1", epoch_result(1, 40.0))
    trials.complete("t1")
    assert status_of(tracker, "t1") == "KILLED"
    assert trials.statuses == {"t1": "KILLED"}


def test_error_is_failed(tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 8})
    trials.error("t1", "RuntimeError: boom")
    assert status_of(tracker, "t1") == "FAILED"
    run_id = run_of(tracker, "t1")
    assert "error.txt" in {f.path for f in tracker.client.list_artifacts(run_id)}


def test_error_tag_is_the_last_line_of_the_message(tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 8})
    trials.error("t1", "Failure # 1\nTraceback (most recent call last):\n  ...\nRuntimeError: boom\n")
    assert tracker.client.get_run(run_of(tracker, "t1")).data.tags[TAG_FAILURE] == "RuntimeError: boom"


def test_a_tune_error_file_gives_its_last_failure() -> None:
    """Tune appends each failure of a trial to its error file; the trial's reason is the last one."""
    text = (
        "Failure # 1 (occurred at 2026-11-28_10-40-01)\nTraceback ...\nRuntimeError: first\n"
        "Failure # 2 (occurred at 2026-11-28_10-47-13)\nTraceback ...\nRuntimeError: second\n"
    )
    assert (
        latest_failure(text)
        == "Failure # 2 (occurred at 2026-11-28_10-47-13)\nTraceback ...\nRuntimeError: second"
    )
    assert latest_failure("") == "trial failed: Tune recorded no reason"


def test_a_worker_group_start_timeout_names_the_spec_key_that_sets_it() -> None:
    """Train's own message advises its environment variable, which the trial overwrites from the spec."""
    text = (
        "Failure # 1 (occurred at 2026-11-28_10-47-13)\n...\nray.train.ControllerError: Training failed due to "
        "controller error:\nThe worker group startup timed out after 15.0 seconds waiting for 2 workers. "
        "... Set the RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S environment variable to increase the timeout."
    )
    reason = latest_failure(text)
    assert reason.startswith(text)
    assert reason.splitlines()[-1] == (
        "no room for the trial's workers within 15 s, 4 starts that timed out in all (a node lost, or the "
        "cluster full); expected room within failure.worker_start_timeout_s"
    )


def test_diverged_trial_is_failed_with_its_step(tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 8})
    trials.result("t1", epoch_result(1, 40.0))
    # What run_trial reports after the trainer's RunResult(status="diverged"): the step, no epoch.
    trials.result("t1", {DIVERGED_AT_STEP: 7, PLAN.metric: math.nan, "training_iteration": 2})
    trials.complete("t1")  # the trial ended normally: no Train retry, no Tune error
    run = tracker.client.get_run(run_of(tracker, "t1"))
    assert run.info.status == "FAILED" and trials.statuses == {"t1": "FAILED"}
    assert run.data.tags[TAG_FAILURE] == "diverged at step 7: the loss was not finite"
    # The NaN stands in for the objective only for Tune; MLflow keeps the epochs that were measured.
    assert history(tracker.client, run.info.run_id, "val/knn_top1/mean_emb") == [(1, 40.0)]


@pytest.mark.parametrize(
    ("params", "result", "status"),
    [
        ({"schedule.epochs": 1}, epoch_result(1, 40.0), "FINISHED"),  # its own epoch count, not the base's
        ({"schedule.epochs": 3}, epoch_result(2, 40.0), "KILLED"),
        ({}, epoch_result(1, 40.0, **{EPOCHS_PLANNED: 1}), "FINISHED"),  # what the trainer says it planned
        ({"schedule.epochs": 1}, epoch_result(1, 40.0, **{EPOCHS_PLANNED: 2}), "KILLED"),
    ],
)
def test_status_counts_the_trials_own_epochs(
    tracker: MlflowTracker, params: dict, result: dict, status: str
) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", params)
    trials.result("t1", result)
    trials.complete("t1")
    assert status_of(tracker, "t1") == status


def test_re_reported_epoch_is_logged_once(tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 8})
    trials.result("t1", epoch_result(1, 40.0))
    trials.result("t1", epoch_result(1, 41.0))  # a retried worker group reports epoch 1 again
    trials.result("t1", epoch_result(2, 50.0))
    assert history(tracker.client, run_of(tracker, "t1"), "val/knn_top1/mean_emb") == [(1, 40.0), (2, 50.0)]


def test_refine_runs_are_children_tagged_with_the_trial_they_refine(uri: str, tracker: MlflowTracker) -> None:
    search = TrialLogger(tracker, EPOCHS, PLAN.describe)
    search.start("t1", "trial", {"patch.size": 8})
    refine = TrialLogger(tracker, EPOCHS, PLAN.describe, refine_tags("t1"))
    refine.start("refine_t1_00000", "refine", {"run.seed": 1000})
    client = tracker.client
    trial, again = (client.get_run(run_of(tracker, t)) for t in ("t1", "refine_t1_00000"))
    assert trial.data.tags[TAG_ROLE] == "trial" and TAG_REFINES not in trial.data.tags
    assert (again.data.tags[TAG_ROLE], again.data.tags[TAG_REFINES]) == ("refine", "t1")
    assert again.data.tags[PARENT_TAG] == tracker.parent_id
    assert again.data.params["trial.run.seed"] == "1000"
    # A restored sweep's callback finds both kinds of children again.
    exp_name = client.get_experiment(tracker.experiment_id).name
    cb = MlflowTuneCallback(
        uri, exp_name, tracker.sweep_key, tracker.parent_id, EPOCHS, PLAN.describe, refine_tags("t1")
    )
    cb.setup()
    assert cb.logger.tracker.has_child("t1") and cb.logger.tracker.has_child("refine_t1_00000")
    assert pickle.loads(pickle.dumps(cb)).child_tags == refine_tags("t1")


def test_parent_gets_the_best_val_value_its_interval_and_test_beside_it(tracker: MlflowTracker) -> None:
    summary = {
        "trials_finished": 2,
        "best_trial": "t1",
        "best_val": 80.0,
        "best_val_lo": 77.4,
        "best_val_hi": 82.4,
        "best_test": 78.0,
        "best_key": "val/knn_top1/centre:grid_stride-7",
        "selected": {"trial": "t1", "scheme": "centre", "variant": "grid_stride-7"},
    }
    tracker.finish_parent("FINISHED", flatten(summary), {"report.json": "{}"})
    run = tracker.client.get_run(tracker.parent_id)
    m = run.data.metrics
    assert (m["best_val"], m["best_val_lo"], m["best_val_hi"], m["best_test"]) == (80.0, 77.4, 82.4, 78.0)
    assert run.data.tags["best.selected.scheme"] == "centre"
    assert run.data.tags["best.selected.variant"] == "grid_stride-7"
    assert run.info.status == "FINISHED"


# --- resume -------------------------------------------------------------------------------------------


def test_resume_reopens_parent_and_children(uri: str, tracker: MlflowTracker) -> None:
    trials = TrialLogger(tracker, EPOCHS, PLAN.describe)
    trials.start("t1", "trial", {"patch.size": 8})
    trials.result("t1", epoch_result(1, 40.0))
    child_id = run_of(tracker, "t1")
    tracker.client.set_terminated(tracker.parent_id, status="KILLED")  # the interrupted sweep

    again = MlflowTracker(uri, tracker.client.get_experiment(tracker.experiment_id).name, tracker.sweep_key)
    assert again.start_parent("sweep", {}, {}, resume=True) == tracker.parent_id
    assert again.client.get_run(tracker.parent_id).info.status == "RUNNING"
    assert again.has_child("t1")
    assert again.child("t1", "trial", {}, {}) == child_id
    # The resumed trial re-reports epoch 1 (from its checkpoint), then goes on.
    resumed = TrialLogger(again, EPOCHS, PLAN.describe)
    resumed.start("t1", "trial", {"patch.size": 8})
    resumed.result("t1", epoch_result(1, 99.0))
    resumed.result("t1", epoch_result(2, 50.0))
    resumed.complete("t1")
    assert status_of(again, "t1") == "FINISHED"
    assert history(again.client, child_id, "val/knn_top1/mean_emb") == [(1, 40.0), (2, 50.0)]
    runs = again.client.search_runs([again.experiment_id], "")
    assert len(runs) == 2  # one parent, one child


def test_resume_without_parent_starts_one(uri: str) -> None:
    t = MlflowTracker(uri, "exp-fresh-resume", sweep_key="/sweeps/never-run")
    parent = t.start_parent("sweep", {"metric": "x"}, {}, resume=True)
    assert t.client.get_run(parent).data.tags["bagssl.role"] == "sweep"
    assert not t.has_child("t1")


# --- what the MLflow UI opens on (docs/operations.md, "What the MLflow UI opens on") ------------------


def test_experiment_is_created_as_a_model_training_experiment(tracker: MlflowTracker) -> None:
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_experiment_made_by_older_code_gets_the_kind_tag(uri: str) -> None:
    client = MlflowClient(uri)
    old = client.create_experiment("exp-made-before-the-tag")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    MlflowTracker(uri, "exp-made-before-the-tag", sweep_key="/sweeps/later")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # A kind the user chose in the UI stays theirs.
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")
    MlflowTracker(uri, "exp-made-before-the-tag", sweep_key="/sweeps/later")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_runs_view_shows_the_objective_and_the_axes_and_the_url_opens_it(tracker: MlflowTracker) -> None:
    tracker.set_runs_view("smoke", "val/knn_top1/mean_emb", ["patch.size", "loss.inv_weight"])
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags["mlflow.experiment.primaryMetric.name"] == "val/knn_top1/mean_emb"
    view = json.loads(tags["mlflow.sharedViewState.smoke"])
    assert "metrics.`val/knn_top1/mean_emb`" in view["selectedColumns"]
    assert "params.`patch.size`" in view["selectedColumns"]
    assert "orderByKey" not in view  # the default order: the only one in which the UI nests children
    url = tracker.runs_url("http://127.0.0.1:5000", "smoke")
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=smoke"
    )


# --- the Tune callback -----------------------------------------------------------------------------------


def test_callback_pickles_and_reattaches(uri: str, tracker: MlflowTracker) -> None:
    exp_name = tracker.client.get_experiment(tracker.experiment_id).name
    cb = MlflowTuneCallback(uri, exp_name, tracker.sweep_key, tracker.parent_id, EPOCHS, PLAN.describe)
    cb.setup()
    trial = Trial("trial_fn", config={"patch.size": 8}, trial_id="abc", stub=True)
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_result(1, [trial], trial, epoch_result(1, 40.0))

    copy = pickle.loads(pickle.dumps(cb))  # what Tune stores in its experiment state
    assert copy.logger is None
    copy.setup()
    assert copy.logger.tracker.parent_id == tracker.parent_id
    assert copy.logger.tracker.has_child("abc")
    copy.on_trial_start(2, [trial], trial)
    copy.on_trial_result(3, [trial], trial, epoch_result(1, 41.0))
    copy.on_trial_result(4, [trial], trial, epoch_result(2, 50.0))
    copy.on_trial_complete(5, [trial], trial)

    child_id = run_of(copy.logger.tracker, "abc")
    client = copy.logger.tracker.client
    assert client.get_run(child_id).info.run_name == "trial_fn_abc"
    assert client.get_run(child_id).info.status == "FINISHED"
    assert history(client, child_id, "val/knn_top1/mean_emb") == [(1, 40.0), (2, 50.0)]
    assert len(client.search_runs([tracker.experiment_id], f"tags.`{TAG_TRIAL}` = 'abc'")) == 1


def test_callback_error_marks_failed(uri: str, tracker: MlflowTracker) -> None:
    exp_name = tracker.client.get_experiment(tracker.experiment_id).name
    cb = MlflowTuneCallback(uri, exp_name, tracker.sweep_key, tracker.parent_id, EPOCHS, PLAN.describe)
    cb.setup()
    trial = Trial("trial_fn", config={"patch.size": 12}, trial_id="bad", stub=True)
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_error(1, [trial], trial)
    assert status_of(cb.logger.tracker, "bad") == "FAILED"
    # A stub trial has no storage, so no error file: the tag says so (a real one: test_faults.py).
    run = cb.logger.tracker.client.get_run(run_of(cb.logger.tracker, "bad"))
    assert run.data.tags[TAG_FAILURE] == "trial failed: Tune recorded no reason"


# --- the store itself ----------------------------------------------------------------------------------


def test_unreachable_server_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(
        TrackingError, match=r"tracking\.uri: cannot reach the MLflow server at http://127\.0\.0\.1:9"
    ):
        check_reachable("http://127.0.0.1:9")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("store", ["file:///tmp/mlruns", "./mlruns"])
def test_file_store_is_refused(store: str) -> None:
    with pytest.raises(TrackingError, match=r"tracking\.uri: .*sqlite:///"):
        check_reachable(store)


def test_sqlite_store(tmp_path: Path) -> None:
    check_reachable(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(TrackingError) as missing:
        check_reachable(f"sqlite:///{tmp_path}/missing/mlflow.db")
    assert str(missing.value) == (
        f"tracking.uri: sqlite:///{tmp_path}/missing/mlflow.db: {tmp_path}/missing does not exist; expected the "
        "database file in an existing directory (sqlite creates the file, not its directory)"
    )
    (tmp_path / "a_file").write_text("kept\n")
    with pytest.raises(TrackingError, match=f"{tmp_path}/a_file is a file; expected the database file"):
        check_reachable(f"sqlite:///{tmp_path}/a_file/mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()  # checking creates nothing
    assert (tmp_path / "a_file").read_text() == "kept\n"


EXPECTED_URIS = (
    "expected sqlite:///path.db, http(s)://host[:port] (an MLflow server), or postgresql://, mysql:// or mssql:// "
    "with its driver installed"
)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("bogus://x", f"tracking.uri: bogus://x: unsupported scheme 'bogus'; {EXPECTED_URIS}"),
        ("postgres://h/db", f"tracking.uri: postgres://h/db: unsupported scheme 'postgres'; {EXPECTED_URIS}"),
        (
            "http://[::1",
            "tracking.uri: http://[::1: not a valid URL (Invalid IPv6 URL); expected http(s)://host[:port]",
        ),
        (
            "http://127.0.0.1:99999",
            "tracking.uri: http://127.0.0.1:99999: not a valid URL (Port out of range 0-65535); expected "
            "http(s)://host[:port]",
        ),
        ("https://", "tracking.uri: https://: no host; expected http(s)://host[:port]"),
        (
            "databricks",
            f"tracking.uri: databricks: a Databricks store, which sweeps do not write to; {EXPECTED_URIS}",
        ),
        (
            "databricks://profile",
            f"tracking.uri: databricks://profile: a Databricks store, which sweeps do not write to; {EXPECTED_URIS}",
        ),
        ("sqlite:///", "tracking.uri: sqlite:///: no database path; expected sqlite:///path.db"),
        (
            "sqlite://",
            "tracking.uri: sqlite://: an in-memory database, whose runs are lost when the sweep ends; expected "
            "sqlite:///path.db, a file",
        ),
        (
            "sqlite://host/m.db",
            "tracking.uri: sqlite://host/m.db: not a database path; expected sqlite:///path.db",
        ),
        (
            "postgresql+nosuchdriver://u@127.0.0.1:1/db",
            f"tracking.uri: postgresql+nosuchdriver://u@127.0.0.1:1/db: SQLAlchemy has no driver "
            f"'postgresql+nosuchdriver'; {EXPECTED_URIS}",
        ),
    ],
)
def test_a_uri_mlflow_cannot_use_is_refused_at_once(uri: str, message: str) -> None:
    """Each of these used to pass the check and then crash, or lose the runs, once trials had trained."""
    with pytest.raises(TrackingError) as info:
        check_reachable(uri)
    assert str(info.value) == message


def test_a_sqlite_store_that_cannot_hold_the_runs_is_refused_and_left_alone(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\n")
    (tmp_path / "a_dir").mkdir()
    cases = {
        f"sqlite:///{tmp_path}/m.db?mode=ro": "a query (?mode=ro); expected sqlite:///path.db without one",
        f"sqlite:///{spec}": (
            f"{spec} is not an SQLite database; expected an MLflow sqlite store, or a path where sqlite can "
            "create one"
        ),
        f"sqlite:///{tmp_path}/a_dir": (
            f"{tmp_path}/a_dir is a directory; expected the database file (sqlite:///{tmp_path}/a_dir/mlflow.db)"
        ),
        # an SQLite header over bytes that are no database
        f"sqlite:///{tmp_path}/torn.db": (
            f"{tmp_path}/torn.db cannot be read as an SQLite database (file is not a database); expected an "
            "MLflow sqlite store, or a path where sqlite can create one"
        ),
        # MLflow would create its tables beside the application's
        f"sqlite:///{tmp_path}/app.db": (
            f"{tmp_path}/app.db is another application's SQLite database (tables: notes); expected an MLflow "
            "sqlite store, or a path where sqlite can create one"
        ),
    }
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        conn.execute("CREATE TABLE notes (text)")
        conn.commit()
    app_db = (tmp_path / "app.db").read_bytes()
    (tmp_path / "torn.db").write_bytes(b"SQLite format 3\x00" + bytes(200))
    for uri, problem in cases.items():
        with pytest.raises(TrackingError) as info:
            check_reachable(uri)
        assert str(info.value) == f"tracking.uri: {uri}: {problem}"
    assert spec.read_text() == "name: t\n" and (tmp_path / "app.db").read_bytes() == app_db
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_dir",
        "app.db",
        "spec.yaml",
        "torn.db",
    ]  # nothing created
    assert list((tmp_path / "a_dir").iterdir()) == []


def test_a_sqlite_store_that_is_a_database_or_an_empty_file_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "empty.db").write_bytes(b"")  # sqlite makes a database of an empty file
    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()  # a real store, as MLflow creates it
    for db in ("empty.db", "mlflow.db", "new.db"):
        check_reachable(f"sqlite:///{tmp_path / db}")
    assert (tmp_path / "empty.db").read_bytes() == b""
    assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize(
    ("uri", "module"),
    [
        ("postgresql://u:secret@127.0.0.1:1/db", "psycopg"),
        ("postgresql+psycopg2://u@127.0.0.1:1/db", "psycopg2"),
        ("mysql://u@127.0.0.1:1/db", "MySQLdb"),
        ("mysql+pymysql://u@127.0.0.1:1/db", "pymysql"),
        ("mssql://u@127.0.0.1:1/db", "pyodbc"),
    ],
)
def test_a_database_uri_needs_its_driver(uri: str, module: str) -> None:
    """MLflow imports the driver only at the first write; the check names the one missing. The password
    is never echoed."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        check_reachable(uri)  # the driver is there: the URI is accepted (the server is not contacted)
        return
    with pytest.raises(TrackingError) as info:
        check_reachable(uri)
    message = str(info.value)
    backend = uri.split(":", 1)[0].split("+", 1)[0]
    assert message == (
        f"tracking.uri: {uri.replace(':secret@', ':***@')}: its database driver, the Python module {module!r}, "
        f"is not installed; expected it installed (or {backend}+DRIVER:// naming an installed driver), or a "
        "sqlite:///path.db or http(s):// URI"
    )
    assert "secret" not in message


def test_cli_refuses_an_in_memory_store_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sqlite://` used to run the whole sweep, exit 0 and keep none of its runs."""
    from sweeps.run import EXIT_BAD_INPUT, main
    from tests.sweeps.conftest import tiny_spec

    spec = tiny_spec(tmp_path, "m", tracking={"uri": "sqlite://", "experiment": "m"})
    capsys.readouterr()
    assert main([str(spec), "--local"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (
        f"error: {spec}: tracking.uri: sqlite://: an in-memory database, whose runs are lost when the sweep "
        "ends; expected sqlite:///path.db, a file\n"
    )
    assert not (tmp_path / "storage").exists()


def test_resolve_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_uri(None) == "sqlite:///env.db"
    assert resolve_uri("sqlite:///spec.db") == "sqlite:///spec.db"

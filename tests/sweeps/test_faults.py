"""Faults injected into sweeps on a real 2-node Ray cluster (`conftest.two_nodes`).

Each test states what its fault loses and checks exactly that: the MLflow store, the storage path and
the trials' own reports (node ids, pids) are read back after the fault.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps.trainable import WORKER_NODES, WORKER_PIDS
from tests.sweeps.conftest import (
    LocalCluster,
    SpreadSweep,
    checkpoint_mtimes,
    sweep_cmd,
    sweep_runs,
    tiny_spec,
    trial_rows,
    tune_results,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


def _saved_trial_states(exp_dir: Path) -> dict[str, str]:
    """Tune trial id -> status, as Tune's latest saved experiment state in the storage path holds them:
    what `--resume` will read."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        saved = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught in the middle of a write
        return {}
    trials = (json.loads(t[0]) for t in saved["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def _epochs(tmp_path: Path, run_id: str, key: str = "epoch") -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return sorted((int(m.step), m.value) for m in client.get_metric_history(run_id, key))


def _sweep(spec: Path, cluster: LocalCluster, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        sweep_cmd(spec, "--address", cluster.address, *args),
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_driver_killed_with_sigkill_resumes_without_rerunning_or_duplicating(
    tmp_path: Path, two_nodes: LocalCluster
) -> None:
    """SIGKILL of the driver (`python -m sweeps.run`), the one process that drives Tune and MLflow.

    Lost: what the driver had not written yet. Its trials' actors die with it (they belong to its Ray
    job), so the trial in progress loses its epoch in progress and restarts from its last Train
    checkpoint; Tune's experiment state is the one last copied to the storage path (at each of Tune's
    experiment checkpoints, 10 s or more apart: docs/operations.md, "A driver killed outright"); the
    MLflow parent run stays RUNNING. Not lost: `--resume` trains no finished
    trial again, opens no second MLflow child for any trial, logs each epoch once, and finishes the
    parent it reopens.
    """
    spec = tiny_spec(tmp_path, "driverkill", num_samples=2, scheduler={"name": "none"})
    one_epoch = ("--set", "base.schedule.epochs=1")
    db = tmp_path / "mlflow.db"
    proc = _sweep(spec, two_nodes, tmp_path / "first.log", *one_epoch)
    try:
        # One trial finished and the next one started: the cluster holds one 2-worker trial at a time.
        wait_for(
            "a finished trial and a running one",
            lambda: sorted(s for s, _ in trial_rows(db).values()) == ["FINISHED", "RUNNING"],
            proc,
        )
        # The finished trial in the state Tune saved: what a resume starts from.
        wait_for(
            "Tune's saved state to hold the finished trial",
            lambda: "TERMINATED" in _saved_trial_states(tmp_path / "storage" / "driverkill").values(),
            proc,
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    parents, children = sweep_runs(tmp_path, "driverkill")
    assert [p.info.status for p in parents] == ["RUNNING"]  # SIGKILL: the parent was never closed
    finished = {c.data.tags["bagssl.trial_id"] for c in children if c.info.status == "FINISHED"}
    assert len(finished) == 1
    train_runs = tmp_path / "storage" / "driverkill" / "train_runs"
    before = {tid: checkpoint_mtimes(train_runs / f"train_{tid}") for tid in finished}
    assert all(before.values())

    resumed = subprocess.run(
        sweep_cmd(spec, "--address", two_nodes.address, "--resume", *one_epoch),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The killed driver had recorded its Ray job, so that the resume could release what it left.
    jobs = json.loads((tmp_path / "storage" / "driverkill" / "sweep.json").read_text())["ray_jobs"]
    assert len(jobs) == len(set(jobs)) == 2
    for tid in finished:  # not trained again: its checkpoints are the ones it had
        assert checkpoint_mtimes(train_runs / f"train_{tid}") == before[tid]
    parents, children = sweep_runs(tmp_path, "driverkill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [c.data.tags["bagssl.trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:
        assert [step for step, _ in _epochs(tmp_path, c.info.run_id)] == [1]


def test_a_train_worker_killed_mid_trial_restarts_from_its_checkpoint_with_the_same_result(
    two_nodes: LocalCluster, spread_sweep: SpreadSweep
) -> None:
    """SIGKILL of the Train worker on the second node after its trial's first epoch (`spread_sweep`, whose
    sweep is the multi-node test's too).

    Lost: the worker's epoch in progress. Train restarts the trial's worker group from the last
    checkpoint (`failure.max_retries`), and the trial ends as an uninterrupted twin with the same
    config and seed does, metric for metric; MLflow holds one value per epoch.
    """
    sweep, victim_trial, victim = spread_sweep, spread_sweep.victim_trial, spread_sweep.victim_pid
    assert sweep.returncode == 0, sweep.output[-3000:]
    (reports,) = tune_results(sweep.root / "storage" / "spread", victim_trial).values()
    # The killed worker reported epoch 1; the restarted group, with a new worker there, epoch 2.
    assert [r["epoch"] for r in reports if "epoch" in r] == [1, 2]
    assert str(victim) in reports[0][WORKER_PIDS].split(",")
    assert str(victim) not in reports[-1][WORKER_PIDS].split(",")
    assert sorted(reports[-1][WORKER_NODES].split(",")) == sorted(sweep.node_ids.values())

    _, children = sweep_runs(sweep.root, "spread")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    by_trial = {c.data.tags["bagssl.trial_id"]: c for c in children}
    twin = next(t for t in by_trial if t != victim_trial)
    for key in ("epoch", "train/loss", "val/knn_top1/mean_emb", "val/linear_top1/mean_emb"):
        history = _epochs(sweep.root, by_trial[victim_trial].info.run_id, key)
        assert [step for step, _ in history] == [1, 2], key  # one value per epoch, none twice
        assert history == _epochs(sweep.root, by_trial[twin].info.run_id, key), key
    assert by_trial[victim_trial].data.metrics["test/knn_top1/mean_emb"] == pytest.approx(
        by_trial[twin].data.metrics["test/knn_top1/mean_emb"], abs=0
    )


def test_a_lost_node_resumes_the_trial_when_it_returns_and_fails_it_when_it_does_not(
    tmp_path: Path, two_nodes: LocalCluster
) -> None:
    """The second node dies (every process of it SIGKILLed) twice in one trial of 3 epochs, its 2 workers
    spread over both nodes.

    After epoch 1, a node joins again in the lost one's place 5 s later. Lost: that node's worker and the
    epoch in progress. Train restarts the worker group from the last checkpoint once the cluster has room
    again (`failure.max_retries`), and the trial trains on.

    After epoch 2, no node returns. Each start of a new worker group waits
    `failure.worker_start_timeout_s` (15 s here, set in the spec: this cluster's own environment does not
    name it) for a second node and fails; the trial ends FAILED at the last start Train tolerates, with
    Train's reason in MLflow and the sweep's summary. Lost: epoch 3, never trained; epochs 1 and 2 stay
    logged once each, with their checkpoints; the sweep ends as a sweep with a failed trial does (exit 1,
    its parent run finished, its report written).
    """
    spec = tiny_spec(
        tmp_path,
        "nodeloss",
        num_samples=1,
        search={"algo": "grid"},
        # 6 patches an image, not 2: epochs of a few seconds, so that each kill lands in the epoch after
        # the one the test saw logged.
        space={
            "loss.inv_weight": {"grid": [25.0]},
            "schedule.epochs": {"grid": [3]},
            "patch.num": {"grid": [6]},
        },
        scheduler={"name": "none"},
        resources={"workers_per_trial": 2, "cpus_per_worker": 1, "placement": "spread"},
        failure={"max_retries": 2, "worker_start_timeout_s": 15},
    )
    db = tmp_path / "mlflow.db"
    first_node2 = two_nodes.node_ids["node2"]
    proc = _sweep(spec, two_nodes, tmp_path / "sweep.log")
    try:
        (trial,) = wait_for(
            "the trial's first epoch",
            lambda: {t: r for t, r in trial_rows(db).items() if r == ("RUNNING", 1)},
            proc,
        )
        two_nodes.kill_node("node2")
        time.sleep(5)
        two_nodes.start_second_node()
        second_node2 = two_nodes.node_ids["node2"]
        wait_for("the trial's second epoch", lambda: trial_rows(db)[trial] == ("RUNNING", 2), proc)
        two_nodes.kill_node("node2")
        out_code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        if not two_nodes.node_pids("node2"):  # the next tests need the cluster whole
            two_nodes.start_second_node()
    log = (tmp_path / "sweep.log").read_text()
    assert out_code == 1, log[-3000:]  # a trial failed
    exp_dir = tmp_path / "storage" / "nodeloss"

    (reports,) = tune_results(exp_dir, trial).values()
    assert [r["epoch"] for r in reports if "epoch" in r] == [1, 2]
    assert first_node2 in reports[0][WORKER_NODES].split(",")
    # The restarted group ran on the head and the node that joined in the lost one's place.
    assert sorted(reports[1][WORKER_NODES].split(",")) == sorted([two_nodes.node_ids["head"], second_node2])
    assert first_node2 != second_node2

    parents, (run,) = sweep_runs(tmp_path, "nodeloss")
    assert run.info.status == "FAILED"
    reason = MlflowClient(f"sqlite:///{db}").download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
    assert "The worker group startup timed out after 15.0 seconds" in Path(reason).read_text()
    assert run.data.tags["bagssl.failure"].startswith("no room for the trial's workers within 15 s")
    assert f"trial {trial} failed: no room for the trial's workers within 15 s" in log  # the summary
    assert [step for step, _ in _epochs(tmp_path, run.info.run_id)] == [1, 2]  # once each
    assert "test/knn_top1/mean_emb" not in run.data.metrics  # never reached its end
    # Checkpoints of epochs 1 and 2, none of 3. An epoch whose report the loss cut short is trained again,
    # and the checkpoint it had written stays beside its successor, unknown to Train.
    checkpoints = (exp_dir / "train_runs" / f"train_{trial}").glob("checkpoint_*/metrics.json")
    assert {json.loads(p.read_text())["epoch"] for p in checkpoints} == {1.0, 2.0}
    assert _saved_trial_states(exp_dir) == {trial: "ERROR"}
    assert [p.info.status for p in parents] == ["FINISHED"]

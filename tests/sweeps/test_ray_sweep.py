"""End-to-end sweeps on a real local Ray cluster, real Fashion-MNIST images and a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bagssl_core.config import load_config
from sweeps.ray_env import free_port
from sweeps.searcher import journal_storage
from sweeps.tracking import TAG_BASELINES_SCORED_ON
from tests.sweeps.conftest import (
    LocalCluster,
    checkpoint_mtimes,
    ensure_ray_token,
    start_node,
    store_rows,
    sweep_cmd,
    sweep_runs,
    tiny_spec,
    tune_results,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_a_sweep_without_address_starts_its_own_ray_and_ends_with_parent_children_and_probes(
    tmp_path: Path, ray_address: str
) -> None:
    """The main job as the README runs it, with no --address: two 2-worker trials, no scheduler.

    With another Ray running on the machine (the suite's single-node cluster), the sweep starts a Ray of
    its own (sweeps.cluster: address="local") instead of joining the other one and refusing its num_cpus,
    and leaves the other cluster as it found it: the same node, alive, with the same resources.

    ASHA stopping a trial under Ray (KILLED in MLflow, PRUNED in Optuna, its workers freed for the next)
    is test_fidelity's sweep; the refine step under Ray is
    test_a_sweep_interrupted_in_its_refine_step_resumes_there.
    """
    before = _cluster_nodes(ray_address)
    assert len(before) == 1 and before[0][1:] == [True, 2.0, 2.0]
    spec = tiny_spec(tmp_path, "e2e", num_samples=2, scheduler={"name": "none"}, baselines=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = _run(sweep_cmd(spec), timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best trial" in proc.stdout and "best_config.yaml" in proc.stdout
    assert "Started a local Ray instance" in proc.stderr
    assert "Connecting to existing Ray cluster" not in proc.stderr
    assert _cluster_nodes(ray_address) == before

    parents, children = sweep_runs(tmp_path, "e2e")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # The baselines, scored once on the parent, on the same splits and probes as the trials.
    for name in ("raw_pixels/val/knn_top1/pixels", "random_init/val/knn_top1/mean_emb"):
        assert f"baseline/{name}" in parents[0].data.metrics, name
    # Scored in a Ray task, not in the driver (which a `ray job submit` puts on the head node).
    assert re.fullmatch("ray node [0-9a-f]{56}", parents[0].data.tags[TAG_BASELINES_SCORED_ON])
    assert "in a Ray task (2 CPU)" in proc.stdout
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.data.tags["bagssl.trial_id"] for c in children}) == 2
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for c in children:
        m = c.data.metrics
        for key in (
            "val/knn_top1/mean_emb",
            "val/knn_top1_lo/mean_emb",
            "val/knn_top1/centre",
            "val/linear_top1/mean_emb",
            "train/loss",
            "lr",
            "patches_per_s",
        ):
            assert key in m, key
        epochs = [int(p.step) for p in client.get_metric_history(c.info.run_id, "val/knn_top1/mean_emb")]
        assert epochs == [1, 2]
        # The test split is scored once, at the end of the run.
        assert [int(p.step) for p in client.get_metric_history(c.info.run_id, "test/knn_top1/mean_emb")] == [
            2
        ]
        assert c.data.params["patch.size"] in {"10", "14"}
        artifacts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert "config.yaml" in artifacts
    assert load_config(tmp_path / "storage" / "e2e" / "best_config.yaml").patch.size in (10, 14)
    # Optuna learnt what MLflow shows: each trial COMPLETE, with the objective of both epochs.
    study = optuna.load_study(study_name="e2e", storage=journal_storage(str(tmp_path / "storage" / "e2e")))
    assert [(t.state.name, sorted(t.intermediate_values)) for t in study.trials] == [("COMPLETE", [1, 2])] * 2
    # No scheduler stops a trial early, so the second trial ran in the first one's Tune actor (the `pid`
    # of Tune's results), without starting a new process (docs/operations.md, "Reusing trial actors").
    pids = {r["pid"] for rs in tune_results(tmp_path / "storage" / "e2e").values() for r in rs}
    assert len(pids) == 1, pids


def _assert_running(proc: subprocess.Popen) -> None:
    """Fail at once, with what the sweep printed, when a sweep that a test waits on has already ended."""
    if proc.poll() is not None:
        out = proc.stdout.read() if proc.stdout else ""
        raise AssertionError(
            f"the sweep ended (exit {proc.returncode}) while the test waited on it:\n{out[-3000:]}"
        )


def _trial_statuses(db: Path, role: str) -> list[str]:
    """The statuses of the sweep's runs of one role (trial, refine), read while the sweep runs."""
    query = (
        "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'bagssl.role' AND t.value = ?"
    )
    return [status for (status,) in store_rows(db, query, role)]


def test_local_mode_runs_the_same_trial_code_without_ray(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "local", num_samples=1, baselines=True)
    proc = _run(sweep_cmd(spec, "--local", "--set", "base.schedule.epochs=1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trial local_00000:" in proc.stdout
    assert (
        "Started a local Ray instance" not in proc.stderr and "Connecting to existing Ray" not in proc.stderr
    )
    # The closing summary is lines: no MLflow progress bar from the report's downloads.
    assert "Downloading artifacts" not in proc.stderr + proc.stdout
    parents, children = sweep_runs(tmp_path, "local")
    assert len(parents) == 1 and len(children) == 1
    assert children[0].info.status == "FINISHED"
    assert "val/knn_top1/mean_emb" in children[0].data.metrics
    # No Ray to hand the baselines to: the driver scores them, where the trials ran.
    assert parents[0].data.tags[TAG_BASELINES_SCORED_ON] == "driver"
    assert "baseline/raw_pixels/val/knn_top1/pixels" in parents[0].data.metrics
    assert (tmp_path / "storage" / "local_local" / "best_config.yaml").is_file()


def test_local_mode_fails_a_trial_whose_tensors_exceed_memory_and_goes_on(tmp_path: Path) -> None:
    """Values that fit the spec but not this machine (a batch of 32 x 10**8 patches) fail their own trial,
    as under Ray, instead of ending the sweep as bad input: another trial's values, or a bigger machine, may
    fit."""
    spec = tiny_spec(
        tmp_path,
        "memory",
        space={"patch.num": {"grid": [2, 100_000_000]}},
        search={"algo": "grid", "seed": 0},
        scheduler={"name": "none"},
        num_samples=1,
    )
    proc = _run(sweep_cmd(spec, "--local", "--set", "base.schedule.epochs=1"), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep ran to its end; a trial failed
    assert "Traceback" not in proc.stderr
    _, children = sweep_runs(tmp_path, "memory")
    status = {int(float(r.data.params["patch.num"])): r.info.status for r in children}
    assert status == {2: "FINISHED", 100_000_000: "FAILED"}
    (failed,) = [r for r in children if r.info.status == "FAILED"]
    assert failed.data.tags["bagssl.failure"].startswith(
        "MemoryExceeded: data.batch_size, patch.num, model.projector: this run needs at least"
    )


def test_a_trial_that_can_never_be_placed_is_an_error_at_start(tmp_path: Path, ray_address: str) -> None:
    spec = tiny_spec(tmp_path, "infeasible")
    t0 = time.time()
    proc = _run(
        sweep_cmd(spec, "--address", ray_address, "--set", "resources.workers_per_trial=3"), timeout=180
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "resources" in proc.stderr and "can never be placed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 120


def test_a_cluster_without_token_auth_joined_by_a_driver_with_it_is_refused_at_start(tmp_path: Path) -> None:
    """A head started with RAY_AUTH_MODE=disabled (as one started before this machine held a token runs),
    and a sweep joining it from this machine, which holds a token: the driver turns token auth on
    (docs/operations.md, "Token authentication"), so the head's processes could not call it back and every
    trial would fail at once. The sweep says so and what to do before anything is written; with the
    remedy it names, the same sweep gets as far as placing its trials."""
    ensure_ray_token()
    port, dash = free_port(), free_port()
    head = Path(tempfile.mkdtemp(prefix="bgr", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", {"head": head}, head, env)
    try:
        start_node(
            {**env, "RAY_AUTH_MODE": "disabled"},
            head,
            "head",
            {},
            23000,
            "--head",
            f"--port={port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
        )
        spec = tiny_spec(tmp_path, "nauth")
        proc = _run(sweep_cmd(spec, "--address", cluster.address), timeout=180, env=env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "--address" in proc.stderr and "RAY_AUTH_MODE=disabled" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not list((tmp_path / "storage").glob("*")), "a refused sweep leaves nothing behind"
        # The remedy: the head has 1 CPU, so the 2-worker trial is refused next, past the auth check.
        fixed = _run(
            sweep_cmd(spec, "--address", cluster.address),
            timeout=180,
            env={**env, "RAY_AUTH_MODE": "disabled"},
        )
        assert fixed.returncode == 2 and "can never be placed" in fixed.stderr, fixed.stderr[-3000:]
    finally:
        cluster.stop()


# A driver that joins the cluster at argv[1] and prints its nodes as JSON: [id, alive, CPU, trial_slot].
_NODES = """
import json, sys
from sweeps.ray_env import prepare_ray_environment
prepare_ray_environment(sys.argv[1])
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = [[n["NodeID"], n["Alive"], n["Resources"].get("CPU"), n["Resources"].get("trial_slot")] for n in ray.nodes()]
ray.shutdown()
print(json.dumps(sorted(nodes)))
"""


def _cluster_nodes(address: str) -> list[list[object]]:
    proc = _run([sys.executable, "-c", _NODES, address], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_sweep_interrupted_in_its_refine_step_resumes_there(tmp_path: Path, ray_address: str) -> None:
    """SIGTERM while the refine runs train, then --resume: the search is not run again (its trial's
    checkpoints stay as they were), the refine experiment goes on with one MLflow child per seed (none
    duplicated by the restore, each epoch logged once), and the sweep ends with its refined best config.

    This is also the suite's SIGTERM-and-resume test: Tune's graceful stop with trials running, exit 130 and
    the resume hint, and both drivers' Ray jobs recorded for a later resume to release. The same resume of
    an unfinished search trial after the harsher SIGKILL is
    test_faults.py::test_driver_killed_with_sigkill_resumes_without_rerunning_or_duplicating."""
    spec = tiny_spec(
        tmp_path,
        "refine_resume",
        num_samples=1,
        scheduler={"name": "none"},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
        refine={"top_k": 1, "seeds": 2},
    )
    proc = subprocess.Popen(
        sweep_cmd(spec, "--address", ray_address),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 600
    refining: list[str] = []
    try:
        while time.time() < deadline and not refining:
            time.sleep(2)
            _assert_running(proc)
            refining = [s for s in _trial_statuses(db, "refine") if s == "RUNNING"]
        assert refining, "no refine run started in time"
        time.sleep(5)  # into its training, past the Tune experiment's first saved state
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "refine" in out and "continue with: python -m sweeps.run" in out
    _, trials = sweep_runs(tmp_path, "refine_resume")
    assert [t.info.status for t in trials] == ["FINISHED"]
    (tid,) = [t.data.tags["bagssl.trial_id"] for t in trials]
    train_runs = tmp_path / "storage" / "refine_resume" / "train_runs"
    before = checkpoint_mtimes(train_runs / f"train_{tid}")
    assert before

    resumed = _run(sweep_cmd(spec, "--address", ray_address, "--resume"), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_mtimes(train_runs / f"train_{tid}") == before  # the search was not run again
    assert "refine: the top 1 config(s), each re-trained with 2 new seeds" in resumed.stdout
    parents, trials = sweep_runs(tmp_path, "refine_resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [t.data.tags["bagssl.trial_id"] for t in trials] == [tid]
    refines = sweep_runs(tmp_path, "refine_resume", role="refine")[1]
    assert sorted(r.data.params["run.seed"] for r in refines) == ["1000", "2000"]  # one child per seed
    assert all(r.info.status == "FINISHED" and r.data.tags["bagssl.refines"] == tid for r in refines)
    assert all("test/knn_top1/mean_emb" in r.data.metrics for r in refines)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for r in refines:  # the interrupted runs went on where they were: no epoch logged twice
        assert [int(m.step) for m in client.get_metric_history(r.info.run_id, "epoch")] == [1, 2]
    # Both drivers recorded their Ray jobs, for a later resume to release what they might leave.
    jobs = json.loads((tmp_path / "storage" / "refine_resume" / "sweep.json").read_text())["ray_jobs"]
    assert len(jobs) == len(set(jobs)) == 2
    assert (tmp_path / "storage" / "refine_resume" / "refine" / tid).is_dir()
    best = load_config(tmp_path / "storage" / "refine_resume" / "best_config.yaml")
    assert best.patch.size == int(trials[0].data.params["patch.size"])


# A driver on the test cluster: `prepare_ray_environment` as `sweeps.run` calls it, then the snippet.
_DRIVER = """
import json, sys
from sweeps.ray_env import prepare_ray_environment
prepare_ray_environment(sys.argv[1])
import ray
from ray.util.placement_group import placement_group
from sweeps.cluster import driver_job, release_leftovers
ray.init(address=sys.argv[1], logging_level="ERROR")
"""
# Detached, so that it outlives its driver as the leaked group of a Train worker group does (that leak
# is a race, docs/operations.md "Resuming"; a detached group is the same thing deterministically).
_LEAK = (
    _DRIVER
    + """
pg = placement_group([{"CPU": 0.01}], lifetime="detached")
ray.get(pg.ready(), timeout=60)
print(json.dumps({"job": driver_job(), "pg": pg.id.hex()}))
"""
)
_RELEASE = (
    _DRIVER
    + """
print(json.dumps(release_leftovers(json.loads(sys.argv[2]))))
"""
)


def _driver(script: str, *args: str) -> object:
    done = _run([sys.executable, "-c", script, *args], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_resumed_sweep_releases_only_the_placement_groups_its_own_dead_driver_left(
    ray_address: str,
) -> None:
    ours, other = (_driver(_LEAK, ray_address) for _ in range(2))
    assert isinstance(ours, dict) and isinstance(other, dict)
    session = ours["job"].split("/")[0]
    # The same job id on another cluster is not this job.
    assert _driver(_RELEASE, ray_address, json.dumps([f"elsewhere/{ours['job'].split('/')[1]}"])) == []
    removed: object = []
    deadline = time.time() + 60
    while not removed and time.time() < deadline:  # the GCS marks a driver's job dead once it has gone
        removed = _driver(_RELEASE, ray_address, json.dumps([ours["job"]]))
    assert removed == [ours["pg"]]
    assert other["job"].startswith(session + "/")
    assert _driver(_RELEASE, ray_address, json.dumps([other["job"]])) == [other["pg"]]
    assert _driver(_RELEASE, ray_address, json.dumps([ours["job"], other["job"]])) == []

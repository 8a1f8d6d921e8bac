"""A sweep across two real Ray nodes (`conftest.two_nodes`), and the placement arithmetic behind it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps.resources import baseline_resources, ddp_backend, trials_that_fit, worker_group_fits
from sweeps.spec import FailureSpec, ResourcesSpec
from sweeps.trainable import WORKER_BACKEND, WORKER_NODES, train_environment
from tests.sweeps.conftest import LocalCluster, SpreadSweep, sweep_cmd, tiny_spec, tune_results

ROOT = Path(__file__).resolve().parents[2]
ONE_CPU = {"CPU": 1.0}


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_submitted_to_the_head_spreads_a_trial_one_worker_per_node_with_gloo_ddp(
    two_nodes: LocalCluster, spread_sweep: SpreadSweep
) -> None:
    """`ray job submit --working-dir . -- python -m sweeps.run SPEC`, as the README says, of a sweep whose
    trials have 2 workers placed `spread` (`conftest.spread_sweep`): rank 0 and rank 1 run on the two
    nodes, one each, with gloo DDP between them (as the workers report it). The spec's MLflow store and
    storage path are absolute paths every node sees (the job runs in a copy of the working directory that
    Ray deletes with its session), and the trials' checkpoints land in that storage path.

    Read from the trial that ran uninterrupted; the other one had a worker killed
    (test_faults.py::test_a_train_worker_killed_mid_trial_restarts_from_its_checkpoint_with_the_same_result).
    """
    sweep = spread_sweep
    assert sweep.returncode == 0, sweep.output[-3000:]
    assert "succeeded" in sweep.output and "best trial" in sweep.output
    exp_dir = sweep.root / "storage" / "spread"
    assert (exp_dir / "best_config.yaml").is_file()

    results = tune_results(exp_dir)
    assert len(results) == 2
    (*_, result) = next(rs for tid, rs in results.items() if tid != sweep.victim_trial)  # its last result
    ranks = result[WORKER_NODES].split(",")
    print("node ids per rank:", ranks, "cluster:", sweep.node_ids)
    assert sorted(ranks) == sorted(sweep.node_ids.values())
    assert result[WORKER_BACKEND] == "gloo"
    assert result["epoch"] == 2 and result["val/knn_top1/mean_emb"] > 0
    for tid in results:
        run_dir = exp_dir / "train_runs" / f"train_{tid}"
        checkpoints = [c for c in run_dir.glob("checkpoint_*") if c.is_dir()]
        assert checkpoints and all(any(c.iterdir()) for c in checkpoints)
    client = MlflowClient(f"sqlite:///{sweep.root}/mlflow.db")
    children = client.search_runs(
        [client.get_experiment_by_name("spread").experiment_id], "tags.`bagssl.role` = 'trial'"
    )
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_spread_trial_wider_than_the_cluster_is_refused_before_it_starts(
    tmp_path: Path, two_nodes: LocalCluster
) -> None:
    spec = tiny_spec(
        tmp_path, "wide", resources={"workers_per_trial": 3, "cpus_per_worker": 0.5, "placement": "spread"}
    )
    proc = subprocess.run(
        sweep_cmd(spec, "--address", two_nodes.address),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # 3 x 0.5 CPU would fit the cluster's 2 CPUs packed, but not on 3 distinct nodes.
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "resources.placement: spread" in proc.stderr and "only 2 of the cluster's 2 node(s)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or "wide" not in _experiments(tmp_path)


def _experiments(tmp_path: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return [e.name for e in client.search_experiments()]


def test_spread_needs_as_many_nodes_with_room_as_workers() -> None:
    two = [ONE_CPU, ONE_CPU]
    assert worker_group_fits(two, 2, ONE_CPU, spread=True)
    assert not worker_group_fits([{"CPU": 4.0}], 2, ONE_CPU, spread=True)  # room for both, one node
    assert worker_group_fits([{"CPU": 4.0}], 2, ONE_CPU)  # packed, they fit
    assert not worker_group_fits([{"CPU": 4.0}, {"CPU": 0.5}], 2, ONE_CPU, spread=True)


def test_the_baselines_task_holds_one_gpu_and_the_trials_cpus_that_one_node_has() -> None:
    cpu = ResourcesSpec(workers_per_trial=2, cpus_per_worker=1)
    assert baseline_resources(cpu, [{"CPU": 2.0}]) == {"CPU": 2.0}  # this machine: both cores
    assert baseline_resources(cpu, [ONE_CPU, ONE_CPU]) == {"CPU": 1.0}  # spread over 1-CPU nodes
    assert baseline_resources(cpu, [{"CPU": 16.0}]) == {"CPU": 2.0}  # never more than the trial's
    gpu = ResourcesSpec(workers_per_trial=4, cpus_per_worker=4, gpus_per_worker=1)
    assert baseline_resources(gpu, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 64.0, "GPU": 8.0}]) == {
        "CPU": 16.0,
        "GPU": 1.0,
    }


def test_trials_at_once_counts_distinct_nodes_for_spread_trials() -> None:
    # 6 CPUs over (4, 1, 1): three packed trials of 2 workers, but only two spread ones (each takes a
    # worker on the big node and one on a small one), where dividing the totals would say three.
    nodes = [{"CPU": 4.0}, ONE_CPU, ONE_CPU]
    assert trials_that_fit(nodes, 2, ONE_CPU) == 3
    assert trials_that_fit(nodes, 2, ONE_CPU, spread=True) == 2
    assert trials_that_fit([{"CPU": 2.0, "GPU": 1.0}] * 2, 1, {"CPU": 1.0, "GPU": 1.0}) == 2
    assert trials_that_fit(nodes, 2, ONE_CPU, limit=1) == 1


def test_fractional_gpus_with_several_workers_are_refused() -> None:
    with pytest.raises(ValueError, match="two DDP \\(NCCL\\) ranks of one trial on one GPU"):
        ResourcesSpec(workers_per_trial=2, gpus_per_worker=0.5)
    ResourcesSpec(workers_per_trial=1, gpus_per_worker=0.5)  # trials may share a GPU
    ResourcesSpec(workers_per_trial=2, gpus_per_worker=1)


def test_ddp_backend_is_nccl_on_gpus_and_gloo_on_cpus() -> None:
    assert ddp_backend(ResourcesSpec(workers_per_trial=2, gpus_per_worker=1)) == "nccl"
    assert ddp_backend(ResourcesSpec(workers_per_trial=2)) == "gloo"


def test_the_specs_train_settings_are_variables_train_hands_its_controller() -> None:
    # Set anywhere else, or under a name Train does not propagate, they would silently do nothing.
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    env = train_environment(FailureSpec(worker_start_timeout_s=15, health_check_interval_s=0.25))
    assert env == {
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15.0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }
    assert set(env) <= ENV_VARS_TO_PROPAGATE
    assert train_environment(FailureSpec())["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"

"""What a trial did, told right: Optuna hears COMPLETE, PRUNED or FAIL at the trainer's epochs; a diverged
run is a failed result, not a retried error; a searched schedule.epochs sets ASHA's max_t and each
trial's status. The end-to-end test runs a real sweep on the suite's single-node Ray cluster."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from bagssl_core.metrics import DIVERGED_AT_STEP, EPOCH, EPOCHS_PLANNED, TRAIN_LOSS
from sweeps.report import trial_status
from sweeps.run import main
from sweeps.searcher import FidelitySearch, journal_storage
from sweeps.space import param_space
from sweeps.spec import SweepSpec, asha_max_t, epoch_range
from tests.sweeps.conftest import sweep_cmd, tiny_spec, tune_results

ROOT = Path(__file__).resolve().parents[2]
METRIC = "val/knn_top1/mean_emb"
SPEC = SweepSpec.model_validate({"name": "t", "metric": METRIC, "space": {"patch.size": {"choice": [8, 12]}}})


def report(epoch: int, value: float, iteration: int, **extra: float) -> dict[str, Any]:
    """A Tune result as the searcher sees it (`training_iteration` restarts at 1 after a resume)."""
    return {EPOCH: epoch, METRIC: value, "training_iteration": iteration, **extra}


DIVERGED = {DIVERGED_AT_STEP: 7, METRIC: math.nan}  # run_trial's last report after a diverged run


def searcher(exp_dir: Path, base_epochs: int = 2) -> FidelitySearch:
    """As Tune sets one up: built, then given the metric, mode and space (which creates the study)."""
    s = FidelitySearch(optuna.samplers.RandomSampler(seed=0), journal_storage(str(exp_dir)), "t", base_epochs)
    s.set_search_properties(METRIC, "max", param_space(SPEC))
    return s


def study_trials(exp_dir: Path) -> list[FrozenTrial]:
    """The study as anyone reads it after the sweep: from the journal in the experiment directory."""
    storage = journal_storage(str(exp_dir))
    return optuna.load_study(study_name="t", storage=storage).get_trials(deepcopy=False)


# --- the searcher -------------------------------------------------------------------------------------


def test_optuna_hears_complete_pruned_and_failed_at_each_epoch(tmp_path: Path) -> None:
    s = searcher(tmp_path)
    for tid in "abcde":
        s.suggest(tid)  # Optuna trials 0..4
    # a ran both epochs, resumed after the first from an older checkpoint (training_iteration restarts).
    s.on_trial_result("a", report(1, 40.0, 1))
    s.on_trial_result("a", report(1, 41.0, 1))
    s.on_trial_result("a", report(2, 55.0, 2))
    s.on_trial_complete("a", report(2, 55.0, 2))
    # b was stopped by the scheduler after 1 of its 2 planned epochs. As in Tune, the result on which
    # the scheduler stops a trial reaches the searcher only at its completion.
    s.on_trial_complete("b", report(1, 30.0, 1, **{EPOCHS_PLANNED: 2}))
    # c diverged in its second epoch.
    s.on_trial_result("c", report(1, 35.0, 1))
    s.on_trial_result("c", DIVERGED)
    s.on_trial_complete("c", DIVERGED)
    # d failed with an error after reporting an epoch.
    s.on_trial_result("d", report(1, 45.0, 1))
    s.on_trial_complete("d", report(1, 45.0, 1), error=True)
    # e planned one epoch and ran it.
    s.on_trial_result("e", report(1, 20.0, 1, **{EPOCHS_PLANNED: 1}))
    s.on_trial_complete("e", report(1, 20.0, 1, **{EPOCHS_PLANNED: 1}))

    a, b, c, d, e = study_trials(tmp_path)
    assert (a.state, a.value, a.intermediate_values) == (TrialState.COMPLETE, 55.0, {1: 40.0, 2: 55.0})
    # Pruned, not complete: TPE ranks it below every complete trial, by how far it got.
    assert (b.state, b.intermediate_values) == (TrialState.PRUNED, {1: 30.0})
    assert (c.state, c.intermediate_values) == (TrialState.FAIL, {1: 35.0})
    assert d.state == TrialState.FAIL
    assert (e.state, e.value) == (TrialState.COMPLETE, 20.0)


def test_searcher_restored_from_its_pickle_continues_the_same_study(tmp_path: Path) -> None:
    s = searcher(tmp_path)
    s.suggest("a")
    s.suggest("b")
    s.on_trial_result("a", report(1, 40.0, 1))
    s.on_trial_complete("b", report(2, 50.0, 2))
    s.save(str(tmp_path / "searcher.pkl"))  # what Tune stores in its experiment state

    restored = searcher(tmp_path)  # Tuner.restore: a searcher set up again, then its pickle loaded
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", report(2, 55.0, 1))
    restored.on_trial_complete("a", report(2, 55.0, 1))
    restored.on_trial_complete("b", report(2, 50.0, 2))  # told twice: ignored
    restored.suggest("c")

    trials = study_trials(tmp_path)
    assert [(t.number, t.state) for t in trials] == [
        (0, TrialState.COMPLETE),
        (1, TrialState.COMPLETE),
        (2, TrialState.RUNNING),
    ]
    assert trials[0].intermediate_values == {1: 40.0, 2: 55.0}


def test_remote_storage_keeps_the_study_in_memory() -> None:
    assert journal_storage("s3://bucket/sweeps/x") is None


# --- statuses and schedule.epochs as an axis ------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "params", "failed", "status"),
    [
        ({EPOCH: 2}, {}, False, "FINISHED"),
        ({EPOCH: 1}, {}, False, "KILLED"),
        ({EPOCH: 1}, {"schedule.epochs": 1}, False, "FINISHED"),  # its own count, not the base's 2
        ({EPOCH: 1, EPOCHS_PLANNED: 1}, {}, False, "FINISHED"),  # what the trainer says it planned
        ({EPOCH: 2, EPOCHS_PLANNED: 3}, {"schedule.epochs": 2}, False, "KILLED"),
        ({EPOCH: 2}, {}, True, "FAILED"),
        (DIVERGED, {}, False, "FAILED"),
    ],
)
def test_trial_status(metrics: dict, params: dict, failed: bool, status: str) -> None:
    assert trial_status(metrics, params, failed, base_epochs=2) == status


def test_searched_epochs_set_asha_max_t_and_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "epochs.yaml"
    spec = {
        "name": "epochs",
        "base": {"schedule": {"epochs": 5, "warmup_epochs": 0.5}, "eval": {"every": 1}},
        "space": {"schedule.epochs": {"choice": [1, 2]}, "eval.knn_k": {"randint": [5, 50]}},
        "metric": METRIC,
    }
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1-2 epochs" in out and "asha: max_t 3 " in out  # the axis' largest value + 1, not base 5 + 1
    parsed = SweepSpec.model_validate(spec)
    assert epoch_range(parsed, 5) == (1, 2)
    assert asha_max_t(parsed, 5) == 3
    assert asha_max_t(SPEC, 5) == 6


@pytest.mark.parametrize(("scheduler", "reuse"), [("none", True), ("asha", False), ("median", False)])
def test_trial_actors_are_reused_only_when_no_scheduler_stops_a_trial(scheduler: str, reuse: bool) -> None:
    # A trial stopped early is still inside TorchTrainer.fit: Tune's reset of its actor for the next
    # trial would fail that next trial (docs/operations.md, "Reusing trial actors").
    from sweeps.tuner import reuse_trial_actors

    spec = SPEC.model_copy(update={"scheduler": SPEC.scheduler.model_copy(update={"name": scheduler})})
    assert reuse_trial_actors(spec) is reuse


# --- a real sweep -------------------------------------------------------------------------------------------


def _by_kind(params: dict[str, Any]) -> str:
    """The role each trial of the end-to-end sweep was drawn for."""
    if float(params["optim.base_lr"]) > 1:
        return "diverges"
    if int(params["schedule.epochs"]) == 1:
        return "one_epoch"
    return "worse" if float(params["loss.var_weight"]) > 100 else "two_epochs"


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_reports_pruned_diverged_and_own_epoch_trials_to_optuna_and_mlflow(
    tmp_path: Path, ray_address: str
) -> None:
    """Four trials, drawn by the seeded sampler in this order, two at a time on the 2-CPU cluster:

    two_epochs  2 epochs           first at ASHA's rung 1: runs both epochs     FINISHED / COMPLETE
    diverges    base_lr 1e12       non-finite loss at its 2nd step              FAILED   / FAIL
    one_epoch   schedule.epochs 1  runs its one epoch                           FINISHED / COMPLETE
    worse       2 epochs, var x10  epoch-1 loss ~8x the others': stopped there   KILLED   / PRUNED
    """
    spec = tiny_spec(
        tmp_path,
        "fidelity",
        base={
            "data": {"name": "fashion_mnist", "train_subset": 128, "test_subset": 64, "batch_size": 32},
            "patch": {"num": 2, "input_size": 14},
            "model": {"backbone": "resnet18", "projector": [64, 64]},
            "optim": {"name": "sgd"},
            "schedule": {"epochs": 2, "warmup_epochs": 0.5},
            "eval": {"aggregation": ["mean_emb"], "grid_stride": 7, "probes": ["knn"]},
        },
        space={
            "schedule.epochs": {"choice": [1, 2]},
            "optim.base_lr": {"choice": [0.03, 1e12]},
            "loss.var_weight": {"choice": [25.0, 250.0]},
        },
        # Seed 5041 draws the four roles above in that order (asserted below).
        search={"algo": "optuna", "seed": 5041, "n_startup_trials": 4},
        metric=TRAIN_LOSS,
        mode="min",
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
        failure={"max_retries": 1},  # a diverged trial must not use it
    )
    proc = subprocess.run(
        sweep_cmd(spec, "--address", ray_address), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep ran to its end; a trial failed
    exp_dir = tmp_path / "storage" / "fidelity"

    optuna_trials = optuna.load_study(study_name="fidelity", storage=journal_storage(str(exp_dir))).trials
    assert [_by_kind(t.params) for t in optuna_trials] == ["two_epochs", "diverges", "one_epoch", "worse"]
    state = {_by_kind(t.params): t for t in optuna_trials}
    assert state["two_epochs"].state == TrialState.COMPLETE
    assert sorted(state["two_epochs"].intermediate_values) == [1, 2]
    assert state["one_epoch"].state == TrialState.COMPLETE
    assert sorted(state["one_epoch"].intermediate_values) == [1]
    assert state["worse"].state == TrialState.PRUNED
    assert sorted(state["worse"].intermediate_values) == [1]
    assert state["diverges"].state == TrialState.FAIL
    assert state["diverges"].intermediate_values == {}

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("fidelity")
    children = [
        r
        for r in client.search_runs([exp.experiment_id], max_results=100)
        if r.data.tags.get("bagssl.role") == "trial"
    ]
    runs = {_by_kind(r.data.params): r for r in children}  # the params are the resolved config
    assert {k: r.info.status for k, r in runs.items()} == {
        "two_epochs": "FINISHED",
        "diverges": "FAILED",
        "one_epoch": "FINISHED",
        "worse": "KILLED",
    }
    assert re.fullmatch(
        r"diverged at step \d+: the loss was not finite", runs["diverges"].data.tags["bagssl.failure"]
    )
    # The summary says why, beside the table.
    diverged = runs["diverges"].data.tags["bagssl.trial_id"]
    assert f"trial {diverged} failed: diverged at step" in proc.stdout
    # The test split is scored once, at the end of a finished run; the stopped one has none.
    assert {k: "test/knn_top1/mean_emb" in r.data.metrics for k, r in runs.items()} == {
        "two_epochs": True,
        "diverges": False,
        "one_epoch": True,
        "worse": False,
    }
    for kind in ("two_epochs", "one_epoch", "worse"):  # Optuna learnt what MLflow shows, epoch by epoch
        history = client.get_metric_history(runs[kind].info.run_id, TRAIN_LOSS)
        assert {int(m.step): m.value for m in history} == pytest.approx(state[kind].intermediate_values)

    # The diverged trial ended as a result: Tune holds it TERMINATED (so --resume never runs it again),
    # after one Train attempt (each attempt would report its divergence once).
    tid = runs["diverges"].data.tags["bagssl.trial_id"]
    statuses = {}
    for state_file in exp_dir.glob("experiment_state-*.json"):
        for trial_json, _ in json.loads(state_file.read_text())["trial_data"]:
            trial = json.loads(trial_json)
            statuses[trial["trial_id"]] = trial["status"]
    assert set(statuses.values()) == {"TERMINATED"} and len(statuses) == 4
    (reports,) = tune_results(exp_dir, tid).values()
    assert sum(DIVERGED_AT_STEP in r for r in reports) == 1


@pytest.mark.slow
@pytest.mark.ray
def test_probing_at_asha_rungs_only_on_a_real_sweep(tmp_path: Path, ray_address: str) -> None:
    """`scheduler.probe_epochs: rungs` with 3 epochs, grace 1 and reduction factor 3: ASHA's rungs are
    epochs 1 and 3, so epoch 2 trains and checkpoints without probing. Tune accepts its loss-only report,
    MLflow holds the loss of every epoch and the validation probes of epochs 1 and 3 only, and Optuna
    hears the objective at exactly those epochs."""
    spec = tiny_spec(
        tmp_path,
        "rungs",
        num_samples=1,
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 3, "probe_epochs": "rungs"},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
    )
    tree = yaml.safe_load(spec.read_text())
    del tree["base"]["eval"]["every"]  # the sweep sets each trial's probing epochs
    tree["base"]["schedule"]["epochs"] = 3
    spec.write_text(yaml.safe_dump(tree, sort_keys=False))
    dry = subprocess.run(sweep_cmd(spec, "--dry-run"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "# probes: after epochs 1, 3 (ASHA's rungs) and each trial's last" in dry.stdout, dry.stderr

    proc = subprocess.run(
        sweep_cmd(spec, "--address", ray_address), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("rungs")
    (child,) = [
        r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bagssl.role") == "trial"
    ]
    assert child.info.status == "FINISHED"
    assert (child.data.params["eval.every"], child.data.params["eval.epochs"]) == ("0", "[1]")

    def steps(key: str) -> list[int]:
        return sorted(int(m.step) for m in client.get_metric_history(child.info.run_id, key))

    assert steps(TRAIN_LOSS) == [1, 2, 3]
    assert steps(METRIC) == steps("val/linear_top1/mean_emb") == [1, 3]
    (trial,) = optuna.load_study(
        study_name="rungs", storage=journal_storage(str(tmp_path / "storage" / "rungs"))
    ).trials
    assert trial.state == TrialState.COMPLETE and sorted(trial.intermediate_values) == [1, 3]
    assert trial.value == pytest.approx(child.data.metrics[METRIC])

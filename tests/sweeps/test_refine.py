"""Refine: the search's best configs re-trained with new seeds, chosen on their validation means."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bagssl_core.config import load_config
from bagssl_core.metrics import ProbeKey
from sweeps.refine import describe_refine, refine_experiment, refine_seeds, summarize, top_configs
from sweeps.report import TrialOutcome
from sweeps.run import main
from sweeps.spec import Objective, load_spec
from sweeps.trainable import TrialPlan
from tests.sweeps.conftest import sweep_cmd, tiny_spec

ROOT = Path(__file__).resolve().parents[2]
KNN = Objective.of("val/knn_top1", "max")


def key(scheme: str, variant: str = "", split: str = "val") -> ProbeKey:
    return ProbeKey(split, "knn", "top1", scheme, variant)  # type: ignore[arg-type]


def run(tid: str, status: str = "FINISHED", **values: float) -> TrialOutcome:
    return TrialOutcome(tid, {"run.seed": 0}, status, {"epoch": 2.0, **values})


def test_seeds_are_the_config_seed_plus_multiples_of_1000() -> None:
    assert refine_seeds(0, 3) == [1000, 2000, 3000]
    assert refine_seeds(7, 2) == [1007, 2007]


def test_top_configs_skip_failed_and_repeated_parameters() -> None:
    trials = [
        TrialOutcome("a", {"patch.size": 8}, "FINISHED", {str(key("mean_emb")): 60.0}),
        TrialOutcome("b", {"patch.size": 12}, "FAILED", {str(key("mean_emb")): 99.0}),
        TrialOutcome("c", {"patch.size": 8}, "KILLED", {str(key("mean_emb")): 70.0}),  # same params as a
        TrialOutcome("d", {"patch.size": 16}, "FINISHED", {str(key("mean_emb")): 50.0}),
        TrialOutcome("e", {"patch.size": 20}, "KILLED", {}),  # never reported the objective
    ]
    assert [t.trial_id for t in top_configs(trials, KNN, 5)] == ["c", "d"]
    assert [t.trial_id for t in top_configs(trials, KNN, 1)] == ["c"]


def test_summarize_picks_the_key_with_the_best_mean_and_reads_test_there() -> None:
    """Per seed, centre and mean_emb trade places; by their means mean_emb wins. Averaging each seed's own
    best (the copy under the objective's name) would report 70.5, a value no single key reaches."""
    m, c = key("mean_emb"), key("centre")
    seeds = [
        run("s1", **{str(m): 70.0, str(c): 71.0, "val/knn_top1": 71.0, str(m.in_split("test")): 60.0}),
        run("s2", **{str(m): 70.0, str(c): 66.0, "val/knn_top1": 70.0, str(m.in_split("test")): 64.0}),
        run("s3", "FAILED", **{str(m): 10.0, str(c): 99.0}),
    ]
    r = summarize(TrialOutcome("t", {}, "FINISHED"), [1000, 2000, 3000], seeds, KNN)
    assert r.key == m
    assert r.n == 2  # the failed seed does not count
    assert r.val == pytest.approx((70.0, 0.0))
    assert r.test == pytest.approx((62.0, 2.8284271))
    assert r.seeds == [1000, 2000, 3000] and len(r.runs) == 3


def test_summarize_without_finished_seeds() -> None:
    r = summarize(TrialOutcome("t", {}, "FINISHED"), [1000, 2000], [run("s1", "FAILED")] * 2, KNN)
    assert (r.key, r.val, r.test, r.n) == (None, None, None, 0)


def test_summarize_an_epoch_metric() -> None:
    runs = [run("s1", **{"train/loss": 2.0}), run("s2", **{"train/loss": 3.0})]
    r = summarize(TrialOutcome("t", {}, "FINISHED"), [1000, 2000], runs, Objective.of("train/loss", "min"))
    assert (r.key, r.test, r.n) == (None, None, 2)
    assert r.val == pytest.approx((2.5, 0.70710678))


def test_refine_experiment_fixes_the_config_and_grids_the_seeds() -> None:
    spec, _ = load_spec(ROOT / "search_spaces" / "smoke.yaml", ["refine={top_k: 2, seeds: 3}"])
    plan = TrialPlan(base={"schedule": {"epochs": 2}}, eval_variants={"": {}}, metric=spec.metric, mode="max")
    rspec, rplan = refine_experiment(
        spec, plan, {"patch.size": 10, "loss.inv_weight": 12.5}, [1000, 2000, 3000]
    )
    assert list(rspec.space) == ["run.seed"] and rspec.space["run.seed"].grid == [1000, 2000, 3000]
    assert (rspec.search.algo, rspec.scheduler.name, rspec.num_samples, rspec.refine) == (
        "grid",
        "none",
        1,
        None,
    )
    cfg = rplan.config({"run.seed": 2000})
    assert (cfg.patch.size, cfg.loss.inv_weight, cfg.run.seed, cfg.schedule.epochs) == (10, 12.5, 2000, 2)
    assert (rspec.metric, rspec.mode, rspec.resources) == (spec.metric, spec.mode, spec.resources)


def test_dry_run_prints_the_refine_plan(capsys: pytest.CaptureFixture[str]) -> None:
    smoke = ROOT / "search_spaces" / "smoke.yaml"
    assert main([str(smoke), "--dry-run", "--set", "refine={top_k: 2, seeds: 3}"]) == 0
    out = capsys.readouterr().out
    assert "refine:\n  top_k: 2\n  seeds: 3" in out  # the spec as read
    assert "# refine: after the search, the top 2 config(s) by val/knn_top1/mean_emb" in out
    assert "3 new seeds each, every epoch (2), no pruning: 6 extra runs" in out
    assert "run.seed = the config's seed + 1000·j, j = 1..3: 1000, 2000, 3000" in out
    spec, base_cfg = load_spec(smoke)
    assert spec.refine is None and describe_refine(spec, base_cfg) == []


def test_refine_end_to_end_locally(tmp_path: Path) -> None:
    """A real sweep on real Fashion-MNIST images: 2 configs (a grid over patch.size), then each re-trained
    with 2 new seeds, 1 epoch each, one scheme on a coarse grid to keep it short (the base's 2-epoch linear
    probe stays: the spec sets its epochs, and knn alone would leave that knob ignored); every run is an MLflow child, the
    refine runs tagged with the trial they refine."""
    spec = tiny_spec(
        tmp_path,
        "refine",
        space={"patch.size": {"grid": [10, 14]}},
        search={"algo": "grid"},
        scheduler={"name": "none"},
        num_samples=1,
        refine={"top_k": 2, "seeds": 2},
    )
    proc = subprocess.run(
        sweep_cmd(
            spec,
            "--local",
            *("--set", "base.schedule.epochs=1"),
            *("--set", "base.eval.aggregation=[mean_emb]"),
            *("--set", "base.eval.grid_stride=14"),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert (
        "refine local_00000: run.seed 1000, 2000" in out and "refine local_00001: run.seed 1000, 2000" in out
    )
    assert "refine: the top 2 config(s), each re-trained with 2 new seeds" in out

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("refine")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("bagssl.role") == "sweep")
    trials = {r.data.tags["bagssl.trial_id"]: r for r in runs if r.data.tags.get("bagssl.role") == "trial"}
    refines = [r for r in runs if r.data.tags.get("bagssl.role") == "refine"]
    assert set(trials) == {"local_00000", "local_00001"}
    assert len(refines) == 4
    for r in refines:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED"
        refined = trials[r.data.tags["bagssl.refines"]]
        assert r.data.params["patch.size"] == refined.data.params["patch.size"]  # the same config...
        assert r.data.params["run.seed"] in {"1000", "2000"}  # ...with a new seed
        assert "val/knn_top1/mean_emb" in r.data.metrics
        assert "test/knn_top1/mean_emb" in r.data.metrics  # a finished run is scored on the test split
    pairs = {(r.data.tags["bagssl.refines"], r.data.params["run.seed"]) for r in refines}
    assert pairs == {(t, s) for t in trials for s in ("1000", "2000")}

    report = json.loads((tmp_path / "storage" / "refine_local" / "report.json").read_text())
    assert len(report["refined"]) == 2 and all(c["seeds_counted"] == 2 for c in report["refined"])
    means = {c["trial"]: c["val_mean"] for c in report["refined"]}
    winner = max(means, key=lambda t: means[t])
    assert report["selected"]["trial"] == report["refine"]["trial"] == winner
    best = tmp_path / "storage" / "refine_local" / "best_config.yaml"
    cfg = load_config(best)
    assert cfg.patch.size == int(trials[winner].data.params["patch.size"])
    assert cfg.eval.aggregation == [report["selected"]["scheme"]]
    assert parent.data.tags["best.selected.trial"] == winner
    assert parent.data.metrics["refine.val_mean"] == pytest.approx(means[winner])
    assert yaml.safe_load(best.read_text())["run"]["seed"] == 0  # the config, not one refine seed

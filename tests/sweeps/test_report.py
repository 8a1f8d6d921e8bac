"""A finished sweep's report: the best trial, its config as YAML, the trial table, the files written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bagssl_core.config import load_config
from sweeps.report import TrialOutcome, best_config_yaml, best_trial, format_table, trial_status, write_report
from sweeps.spec import SweepSpec, load_spec, resolve_base

ROOT = Path(__file__).resolve().parents[2]
AGGREGATION = ROOT / "search_spaces" / "aggregation.yaml"


@pytest.fixture(scope="module")
def aggregation() -> tuple[SweepSpec, dict]:
    """The ready aggregation sweep (patch.size searched, grid_stride an evaluation variant) and its base."""
    spec, _ = load_spec(AGGREGATION)
    return spec, resolve_base(spec, AGGREGATION.parent, str(AGGREGATION))


def outcome(tid: str, status: str, size: int, **metrics: float) -> TrialOutcome:
    return TrialOutcome(tid, {"patch.size": size}, status, {"epoch": 10.0, **metrics})


TRIALS = [
    outcome(
        "a",
        "FINISHED",
        7,
        **{"linear_top1/mean_emb:grid_stride-4": 60.0, "linear_top1/centre:grid_stride-7": 65.0},
    ),
    outcome("b", "FAILED", 14, **{"linear_top1/mean_emb:grid_stride-4": 99.0}),
    outcome(
        "c",
        "FINISHED",
        14,
        **{"linear_top1/mean_emb:grid_stride-4": 70.0, "linear_top1/mean_emb:grid_stride-7": 80.0},
    ),
    TrialOutcome(
        "d", {"patch.size": 21}, "KILLED", {"epoch": 1.0, "linear_top1/mean_emb:grid_stride-4": 20.0}
    ),
    TrialOutcome("e", {"patch.size": 21}, "KILLED", {"epoch": 0.0}),  # stopped before any probe
]


def test_best_trial_ignores_failed() -> None:
    best, value, key = best_trial(TRIALS, "linear_top1", "max")  # b (99) failed
    assert (best.trial_id, value, key) == ("c", 80.0, "linear_top1/mean_emb:grid_stride-7")


def test_best_trial_honours_mode() -> None:
    best, value, key = best_trial(TRIALS, "linear_top1", "min")
    assert (best.trial_id, value, key) == ("d", 20.0, "linear_top1/mean_emb:grid_stride-4")


def test_best_trial_none_without_objective() -> None:
    assert best_trial(TRIALS[1:2] + TRIALS[4:], "linear_top1", "max") is None


def test_trial_status() -> None:
    assert trial_status({"epoch": 10.0}, {}, failed=False, base_epochs=10) == "FINISHED"
    assert trial_status({"epoch": 3.0}, {}, failed=False, base_epochs=10) == "KILLED"
    assert trial_status({"epoch": 10.0}, {}, failed=True, base_epochs=10) == "FAILED"


def test_best_config_yaml_loads_and_carries_params_and_variant(aggregation, tmp_path: Path) -> None:
    spec, base = aggregation
    text = best_config_yaml(spec, base, {"patch.size": 14}, "linear_top1/mean_emb:grid_stride-7")
    path = tmp_path / "best.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.patch.size == 14  # the trial's sampled value
    assert cfg.eval.grid_stride == 7  # the winning evaluation variant
    # The base of the spec is kept.
    assert (cfg.data.name, cfg.patch.num, cfg.model.projector, cfg.schedule.epochs) == (
        "fashion_mnist",
        16,
        [2048, 2048],
        10,
    )
    assert yaml.safe_load(text)["eval"]["grid_stride"] == 7


def test_best_config_yaml_without_variant(aggregation) -> None:
    spec, base = aggregation
    cfg = yaml.safe_load(best_config_yaml(spec, base, {"patch.size": 21}, "linear_top1/mean_emb"))
    assert cfg["patch"]["size"] == 21
    assert cfg["eval"]["grid_stride"] is None


def test_format_table_sorts_best_first() -> None:
    lines = format_table(TRIALS, "linear_top1", "max").splitlines()
    assert lines[0].split() == ["trial", "status", "epochs", "linear_top1", "patch.size"]
    rows = [line.split() for line in lines[1:]]
    # Every trial, failed ones included; no objective ("-") last.
    assert [r[0] for r in rows] == ["b", "c", "a", "d", "e"]
    assert rows[1] == ["c", "FINISHED", "10", "80.00", "14"]
    assert rows[-1][3] == "-"
    assert [
        r[0] for r in (line.split() for line in format_table(TRIALS, "linear_top1", "min").splitlines()[1:])
    ] == [
        "d",
        "a",
        "c",
        "b",
        "e",
    ]


def test_write_report_writes_best_config_and_table(aggregation, tmp_path: Path) -> None:
    spec, base = aggregation
    out = tmp_path / "sweep"
    report = write_report(spec, base, TRIALS, out, "sqlite:///mlflow.db", "parent123")
    assert (out / "best_config.yaml").read_text() == report.artifacts["best_config.yaml"]
    cfg = load_config(out / "best_config.yaml")
    assert (cfg.patch.size, cfg.eval.grid_stride) == (14, 7)
    assert (out / "trials.txt").read_text() == format_table(TRIALS, "linear_top1", "max") + "\n"
    assert report.summary["best_trial"] == "c"
    assert report.summary["best_value"] == 80.0
    assert (
        report.summary["trials_finished"],
        report.summary["trials_killed"],
        report.summary["trials_failed"],
    ) == (2, 2, 1)
    assert set(report.artifacts) == {"trials.txt", "best_config.yaml"}
    assert "best trial c" in report.text
    assert "parent123" in report.text and "'bagssl-aggregation'" in report.text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in report.text


def test_write_report_without_out_dir_prints_config(
    aggregation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, base = aggregation
    monkeypatch.chdir(tmp_path)
    report = write_report(spec, base, TRIALS, None, "http://mlflow:5000", "p")
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert report.artifacts["best_config.yaml"] in report.text


def test_write_report_no_best(aggregation, tmp_path: Path) -> None:
    spec, base = aggregation
    report = write_report(spec, base, TRIALS[1:2], tmp_path / "sweep", "sqlite:///m.db", "p")
    assert "no best config" in report.text
    assert not (tmp_path / "sweep" / "best_config.yaml").exists()
    assert report.summary == {"trials_finished": 0, "trials_killed": 0, "trials_failed": 1}


def test_best_config_keeps_the_winning_variant_and_scheme_of_a_real_report(aggregation) -> None:
    """Trials report the objective under its bare name too (trainable.with_objective); the best config
    must still carry the variant and scheme that produced it."""
    from sweeps.trainable import with_objective

    spec, base = aggregation
    raw = {
        "epoch": 10.0,
        "linear_top1/mean_emb:grid_stride-4": 70.0,
        "linear_top1/centre:grid_stride-7": 80.0,
    }
    trial = TrialOutcome("t", {"patch.size": 14}, "FINISHED", with_objective(raw, spec.metric, spec.mode))
    assert trial.metrics[spec.metric] == 80.0
    best, value, key = best_trial([trial], spec.metric, spec.mode)
    assert (value, key) == (80.0, "linear_top1/centre:grid_stride-7")
    cfg = yaml.safe_load(best_config_yaml(spec, base, best.params, key))
    assert cfg["eval"]["grid_stride"] == 7
    assert cfg["eval"]["aggregation"][0] == "centre"
    assert cfg["patch"]["size"] == 14

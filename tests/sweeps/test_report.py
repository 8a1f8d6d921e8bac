"""A finished sweep's report: the best trial by validation, intervals and within-noise marks, the selected
config with its scheme and variant as fields, the files written."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from bagssl_core.config import load_config
from bagssl_core.metrics import ProbeKey, n_images, wilson_interval
from sweeps.report import (
    Refined,
    TrialOutcome,
    best_config_yaml,
    best_trial,
    format_refine_table,
    format_table,
    score,
    trial_status,
    write_report,
)
from sweeps.spec import Objective, SweepSpec, load_spec, resolve_base

ROOT = Path(__file__).resolve().parents[2]
AGGREGATION = ROOT / "search_spaces" / "aggregation.yaml"
N_VAL = 1000  # validation images: a 95% interval is about ±3 points around 60%
BEST_LINEAR = Objective.of("val/linear_top1", "max")


@pytest.fixture(scope="module")
def aggregation() -> tuple[SweepSpec, dict]:
    """The ready aggregation sweep (patch.size searched, grid_stride an evaluation variant) and its base."""
    spec, _ = load_spec(AGGREGATION)
    return spec, resolve_base(spec, AGGREGATION.parent, str(AGGREGATION))


def key(scheme: str, variant: str, split: str = "val") -> ProbeKey:
    return ProbeKey(split, "linear", "top1", scheme, variant)  # type: ignore[arg-type]


def probe(scheme: str, variant: str, val: float, test: float | None = None) -> dict[str, float]:
    """What the trainer reports for one scheme and variant: the value and its Wilson bounds on each split
    (the test split only in a run's final report)."""
    out = {}
    for split, value in (("val", val), ("test", test)):
        if value is not None:
            k = key(scheme, variant, split)
            lo, hi = wilson_interval(value, N_VAL)
            out.update({str(k): value, str(k.with_bound("lo")): lo, str(k.with_bound("hi")): hi})
            out[n_images(k.split)] = N_VAL
    return out


def outcome(tid: str, status: str, size: int, *probes: dict[str, float], epoch: float = 10.0) -> TrialOutcome:
    metrics: dict[str, float] = {"epoch": epoch}
    for p in probes:
        metrics.update(p)
    return TrialOutcome(tid, {"patch.size": size}, status, metrics)


TRIALS = [
    outcome(
        "a",
        "FINISHED",
        7,
        probe("mean_emb", "grid_stride-4", 60.0, 59.0),
        probe("centre", "grid_stride-7", 65.0, 64.0),
    ),
    outcome("b", "FAILED", 14, probe("mean_emb", "grid_stride-4", 99.0)),
    outcome(
        "c",
        "FINISHED",
        14,
        probe("mean_emb", "grid_stride-4", 70.0, 71.0),
        probe("mean_emb", "grid_stride-7", 80.0, 78.0),
    ),
    outcome("d", "KILLED", 21, probe("mean_emb", "grid_stride-4", 78.5), epoch=1.0),  # within noise of c's 80
    outcome("e", "KILLED", 21, epoch=0.0),  # stopped before any probe
]


def test_best_trial_ignores_failed() -> None:
    best, s = best_trial(TRIALS, BEST_LINEAR)  # b (99) failed
    assert (best.trial_id, s.key, s.val, s.test) == ("c", key("mean_emb", "grid_stride-7"), 80.0, 78.0)
    assert s.val_ci == pytest.approx(wilson_interval(80.0, N_VAL))
    assert s.test_ci == pytest.approx(wilson_interval(78.0, N_VAL))


def test_best_trial_prefers_a_finished_trial_to_a_pruned_one_with_a_higher_score() -> None:
    pruned = outcome("p", "KILLED", 21, probe("mean_emb", "grid_stride-4", 95.0), epoch=1.0)
    best, s = best_trial([*TRIALS, pruned], BEST_LINEAR)
    assert (best.trial_id, s.val) == ("c", 80.0)
    only_pruned, s = best_trial([pruned, TRIALS[4]], BEST_LINEAR)
    assert (only_pruned.trial_id, s.val) == ("p", 95.0)


def test_best_trial_honours_mode() -> None:
    best, s = best_trial(TRIALS, Objective.of("val/linear_top1", "min"))
    assert (best.trial_id, s.key, s.val) == ("a", key("mean_emb", "grid_stride-4"), 60.0)


def test_best_trial_none_without_objective() -> None:
    assert best_trial(TRIALS[1:2] + TRIALS[4:], BEST_LINEAR) is None


def test_best_pick_ignores_test_values_that_would_rank_differently() -> None:
    """x wins on validation; y's test values are far higher, on every scheme and variant. The pick, its
    scheme and variant, and the value reported under the objective's name come from validation alone."""
    from sweeps.trainable import with_objective

    x = outcome("x", "FINISHED", 7, probe("mean_emb", "", 70.0, 50.0), probe("centre", "", 60.0, 95.0))
    y = outcome("y", "FINISHED", 14, probe("mean_emb", "", 65.0, 99.0), probe("centre", "", 64.0, 99.5))
    trials = [
        TrialOutcome(t.trial_id, t.params, t.status, with_objective(t.metrics, BEST_LINEAR)) for t in (x, y)
    ]
    assert [t.metrics["val/linear_top1"] for t in trials] == [70.0, 65.0]  # what Tune's searcher reads
    best, s = best_trial(trials, BEST_LINEAR)
    assert (best.trial_id, s.key.scheme, s.val, s.test) == ("x", "mean_emb", 70.0, 50.0)


def test_trial_status() -> None:
    assert trial_status({"epoch": 10.0}, {}, failed=False, base_epochs=10) == "FINISHED"
    assert trial_status({"epoch": 3.0}, {}, failed=False, base_epochs=10) == "KILLED"
    assert trial_status({"epoch": 10.0}, {}, failed=True, base_epochs=10) == "FAILED"


def test_score_of_an_epoch_metric_has_no_key_interval_or_test() -> None:
    s = score({"train/loss": 1.25, "epoch": 2.0}, Objective.of("train/loss", "min"))
    assert (s.key, s.val, s.val_ci, s.test, s.test_ci) == (None, 1.25, None, None, None)


def test_best_config_carries_the_winning_scheme_and_variant_as_fields(aggregation, tmp_path: Path) -> None:
    spec, base = aggregation
    text = best_config_yaml(spec, base, {"patch.size": 14}, key("mean_emb", "grid_stride-7"))
    path = tmp_path / "best.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.patch.size == 14  # the trial's sampled value
    assert cfg.eval.grid_stride == 7  # the winning evaluation variant's setting
    assert cfg.eval.aggregation == ["mean_emb"]  # the winning scheme
    # A scheme that ignores the variant's knob: the knob is left out, and the file still loads.
    centre = tmp_path / "centre.yaml"
    centre.write_text(best_config_yaml(spec, base, {"patch.size": 14}, key("centre", "grid_stride-7")))
    assert load_config(centre).eval.aggregation == ["centre"]
    assert "grid_stride" not in yaml.safe_load(centre.read_text())["eval"]
    # The base of the spec is kept.
    assert (cfg.data.name, cfg.patch.num, cfg.model.projector, cfg.schedule.epochs) == (
        "fashion_mnist",
        16,
        [2048, 2048],
        10,
    )


def test_best_config_of_an_epoch_metric_keeps_the_base_evaluation(aggregation) -> None:
    spec, base = aggregation
    cfg = yaml.safe_load(best_config_yaml(spec, base, {"patch.size": 21}, None))
    assert cfg["patch"]["size"] == 21
    assert cfg["eval"]["grid_stride"] is None
    assert cfg["eval"]["aggregation"] == ["mean_emb"]


def cells(line: str, header: str | None = None) -> list[str]:
    """A table row's cells, cut where the header's columns start (a cell may hold single spaces)."""
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header or line)]
    return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]


def test_format_table_shows_val_and_test_with_intervals_and_marks_trials_within_noise() -> None:
    lines = format_table(TRIALS, BEST_LINEAR).splitlines()
    assert cells(lines[0]) == [
        "trial",
        "status",
        "epochs",
        "vs best",
        "val/linear_top1",
        "test/linear_top1",
        "patch.size",
    ]
    rows = [cells(line, lines[0]) for line in lines[1:]]
    # Every trial, failed ones included, best validation value first; no objective ("-") last.
    assert [r[0] for r in rows] == ["b", "c", "d", "a", "e"]
    lo, hi = wilson_interval(80.0, N_VAL)
    tlo, thi = wilson_interval(78.0, N_VAL)
    assert rows[1] == [
        "c",
        "FINISHED",
        "10",
        "best",
        f"80.00 [{lo:.1f}, {hi:.1f}]",
        f"78.00 [{tlo:.1f}, {thi:.1f}]",
        "14",
    ]
    assert rows[2][3] == "~"  # d's 78.5 on 1000 images overlaps c's 80: within noise
    assert rows[2][5] == "-"  # a stopped trial was never scored on the test split
    assert rows[3][3] == ""  # a's best, 65, is clearly below
    assert rows[0][3] == ""  # b failed: never within noise of anything
    assert rows[-1][3:6] == ["", "-", "-"]
    order_min = [
        cells(line)[0]
        for line in format_table(TRIALS, Objective.of("val/linear_top1", "min")).splitlines()[1:]
    ]
    assert order_min == ["a", "c", "d", "b", "e"]  # each by its lowest variant: 60, 70, 78.5, 99


def test_format_table_of_an_epoch_metric_has_no_test_column() -> None:
    trials = [TrialOutcome("a", {}, "FINISHED", {"epoch": 2.0, "train/loss": 1.5})]
    assert cells(format_table(trials, Objective.of("train/loss", "min")).splitlines()[0]) == [
        "trial",
        "status",
        "epochs",
        "vs best",
        "train/loss",
    ]


def test_write_report_files_summary_and_noise_line(aggregation, tmp_path: Path) -> None:
    spec, base = aggregation
    out = tmp_path / "sweep"
    report = write_report(spec, base, TRIALS, out, "sqlite:///mlflow.db", "parent123")
    assert (out / "best_config.yaml").read_text() == report.artifacts["best_config.yaml"]
    cfg = load_config(out / "best_config.yaml")
    assert (cfg.patch.size, cfg.eval.grid_stride, cfg.eval.aggregation) == (14, 7, ["mean_emb"])
    assert (out / "trials.txt").read_text() == format_table(TRIALS, BEST_LINEAR) + "\n"
    s = report.summary
    assert (s["trials_finished"], s["trials_killed"], s["trials_failed"]) == (2, 2, 1)
    assert (s["best_trial"], s["best_val"], s["best_test"]) == ("c", 80.0, 78.0)
    assert (s["best_val_lo"], s["best_val_hi"]) == pytest.approx(wilson_interval(80.0, N_VAL))
    assert (s["best_test_lo"], s["best_test_hi"]) == pytest.approx(wilson_interval(78.0, N_VAL))
    assert s["best_key"] == "val/linear_top1/mean_emb:grid_stride-7"
    assert s["selected"] == {
        "trial": "c",
        "scheme": "mean_emb",
        "variant": "grid_stride-7",
        "metric_key": "val/linear_top1/mean_emb:grid_stride-7",
    }
    assert s["within_noise"] == 1
    assert json.loads((out / "report.json").read_text())["selected"] == s["selected"]
    assert set(report.artifacts) == {"trials.txt", "best_config.yaml", "report.json"}
    assert "best trial c: val/linear_top1 = 80.00" in report.text
    assert "scheme mean_emb, variant grid_stride-7" in report.text
    assert "test 78.00" in report.text
    assert "1 other trial(s) within noise of it" in report.text
    assert f"not distinguishable on this validation set ({N_VAL} images)" in report.text
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


def test_write_report_says_why_each_failed_trial_failed(aggregation, tmp_path: Path) -> None:
    spec, base = aggregation
    why = "diverged at step 7: the loss was not finite"
    trials = [replace(t, failure=why) if t.status == "FAILED" else t for t in TRIALS]
    report = write_report(spec, base, trials, tmp_path / "sweep", "sqlite:///m.db", "p")
    assert f"trial b failed: {why}" in report.text.splitlines()
    details = json.loads((tmp_path / "sweep" / "report.json").read_text())
    assert {t["trial"]: t.get("failure") for t in details["trials"]} == {
        "a": None,
        "b": why,
        "c": None,
        "d": None,
        "e": None,
    }


def test_write_report_no_best(aggregation, tmp_path: Path) -> None:
    spec, base = aggregation
    report = write_report(spec, base, TRIALS[1:2], tmp_path / "sweep", "sqlite:///m.db", "p")
    assert "no best config" in report.text
    assert not (tmp_path / "sweep" / "best_config.yaml").exists()
    assert report.summary == {"trials_finished": 0, "trials_killed": 0, "trials_failed": 1}


# --- refine ----------------------------------------------------------------------------------------------


def refined(
    trial: TrialOutcome, val: tuple[float, float], test: tuple[float, float], variant: str
) -> Refined:
    runs = [TrialOutcome(f"{trial.trial_id}-{j}", {"run.seed": 1000 * j}, "FINISHED") for j in (1, 2)]
    return Refined(trial, [1000, 2000], runs, key("mean_emb", variant), val, test, 2)


def test_refine_picks_the_best_validation_mean_and_its_variant(aggregation, tmp_path: Path) -> None:
    """The search's best single run (c) loses to a's config once both are averaged over new seeds."""
    spec, base = aggregation
    a, c = TRIALS[0], TRIALS[2]
    configs = [
        refined(c, (74.0, 3.0), (90.0, 1.0), "grid_stride-7"),
        refined(a, (76.5, 0.5), (60.0, 1.0), "grid_stride-4"),
    ]
    report = write_report(spec, base, TRIALS, tmp_path, "sqlite:///m.db", "p", configs)
    assert report.summary["best_trial"] == "c"  # the search's best run, reported as such
    assert report.summary["selected"]["trial"] == "a"  # chosen on the validation mean, not test's 90
    assert report.summary["selected"]["variant"] == "grid_stride-4"
    assert report.summary["refine"] == {
        "trial": "a",
        "seeds_counted": 2,
        "val_mean": 76.5,
        "val_std": 0.5,
        "test_mean": 60.0,
        "test_std": 1.0,
        "key": "val/linear_top1/mean_emb:grid_stride-4",
    }
    cfg = load_config(tmp_path / "best_config.yaml")
    assert (cfg.patch.size, cfg.eval.grid_stride, cfg.eval.aggregation) == (7, 4, ["mean_emb"])
    lines = format_refine_table(configs, BEST_LINEAR).splitlines()
    rows = [cells(line, lines[0]) for line in lines]
    assert rows[0] == [
        "trial",
        "run.seed",
        "finished",
        "val/linear_top1 (mean ± sd)",
        "test/linear_top1 (mean ± sd)",
        "key",
    ]
    assert rows[1] == [
        "a",
        "1000,2000",
        "2/2",
        "76.50 ± 0.50",
        "60.00 ± 1.00",
        "val/linear_top1/mean_emb:grid_stride-4",
    ]
    assert "refine: the top 2 config(s)" in report.text
    assert json.loads((tmp_path / "report.json").read_text())["refined"][1]["seeds"] == [1000, 2000]


def test_refine_table_keeps_its_columns_when_no_seed_finished() -> None:
    """A refined config whose seeds all failed has no key: its row shows '-' in the key column."""
    a, c = TRIALS[0], TRIALS[2]
    runs = [TrialOutcome("a-1", {"run.seed": 1000}, "FAILED")]
    failed = Refined(a, [1000], runs, None, None, None, 0)
    lines = format_refine_table([refined(c, (74.0, 3.0), (90.0, 1.0), ""), failed], BEST_LINEAR).splitlines()
    rows = [cells(line, lines[0]) for line in lines]
    assert len(rows[2]) == len(rows[0]) and rows[2][0] == "a" and rows[2][-1] == "-"

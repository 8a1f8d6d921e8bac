"""Sweep specs: the ready ones round-trip, and every bad one exits 2 with one line naming file, line and key.

Bad specs go through the real CLI (`sweeps.run.main`), mostly in-process; a representative subset runs as
`python -m sweeps.run` subprocesses to check the exit status and that no traceback reaches the user.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweeps.run import EXIT_BAD_INPUT, main
from sweeps.spec import SpecError, asha_max_t, asha_probe_epochs, load_spec, spec_to_dict

ROOT = Path(__file__).resolve().parents[2]
READY_SPECS = sorted((ROOT / "search_spaces").glob("*.yaml"))

# Line numbers are part of the expected messages: 1 name, 2 base, 3 data, 4 eval, 5 space, 6 patch.size,
# 7 metric; a key appended to VALID is on line 8, an axis inserted before metric on line 7.
VALID = """\
name: t
base:
  data: {name: fashion_mnist}
  eval: {every: 1}
space:
  patch.size: {choice: [8, 12]}
metric: val/knn_top1/mean_emb
"""


def with_axis(axis: str) -> str:
    """VALID with one more space axis (on line 7; metric moves to line 8)."""
    return VALID.replace("metric:", f"  {axis}\nmetric:")


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def runnable(tmp_path: Path, text: str = VALID) -> str:
    """A spec that may get past validation: storage and MLflow store inside tmp_path."""
    return (
        text
        + f"storage_path: {tmp_path / 'store'}\ntracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
    )


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


@pytest.fixture(autouse=True)
def _no_ambient_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    # The spec, not the caller's shell, must decide where MLflow and Ray are.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def assert_bad_input(rc: int, err: str, path: Path, *expected: str) -> None:
    assert rc == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    assert str(path) in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


# --- the ready specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", READY_SPECS, ids=lambda p: p.name)
def test_ready_spec_round_trips(path: Path, tmp_path: Path) -> None:
    spec, base = load_spec(path)
    again = write(tmp_path, yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    spec2, base2 = load_spec(again)
    assert spec2 == spec
    assert base2 == base


def test_a_grid_spec_dumped_whole_with_optunas_defaults_reads_back(tmp_path: Path) -> None:
    """Optuna's options are refused under algo: grid only when changed: a sweep logs its spec whole, their
    defaults included, and reads it back (sweeps.results)."""
    spec, _ = load_spec(write(tmp_path, VALID + "search: {algo: grid}\n"))
    dumped = spec_to_dict(spec)
    assert dumped["search"]["sampler"] == "tpe" and dumped["search"]["n_startup_trials"] == 4
    again, _ = load_spec(write(tmp_path, yaml.safe_dump(dumped, sort_keys=False), "again.yaml"))
    assert again == spec


def test_ready_specs_cover_the_readme() -> None:
    assert {p.stem for p in READY_SPECS} >= {"smoke", "patch_size", "aggregation", "loss_weights"}


@pytest.mark.parametrize("path", READY_SPECS, ids=lambda p: p.name)
def test_ready_spec_dry_run(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"# sweep {path.stem!r}" in out
    assert "# trials:" in out


# --- bad specs, in-process ------------------------------------------------------------------------

BAD_SPECS = {
    "bad_yaml": ("name: t\nspace: {patch.size: [1, 2\nmetric: x\n", [":3:", "not valid YAML"]),
    "empty_file": ("", ["the file is empty"]),
    "top_level_list": ("- name\n- space\n", ["expected a mapping", "list"]),
    "unknown_top_key": (VALID + "bogus: 1\n", [":8: bogus: unknown key"]),
    "unknown_nested_key": (VALID + "resources: {workerz: 2}\n", [":8: resources.workerz: unknown key"]),
    "wrong_type": (VALID + "num_samples: abc\n", [":8: num_samples:", "integer", "'abc'"]),
    "scheduler_knob_none_reads": (
        VALID + "scheduler: {name: none, grace_period: 2}\n",
        [
            ":8: scheduler: grace_period: not read by name: none; expected name: asha or median, or no grace_period"
        ],
    ),
    "scheduler_knob_median_ignores": (
        VALID + "scheduler: {name: median, reduction_factor: 3}\n",
        [
            ":8: scheduler: reduction_factor: not read by name: median; expected name: asha, or no reduction_factor"
        ],
    ),
    "name_of_dots": (
        VALID.replace("name: t", "name: ..", 1),
        [":1: name: expected a string matching '^[A-Za-z0-9_][A-Za-z0-9_.-]*$' (got '..')"],
    ),
    "empty_experiment": (
        VALID + "tracking: {experiment: ''}\n",
        [":8: tracking.experiment: expected at least 1 character (got '')"],
    ),
    "empty_space": (
        VALID.replace("space:\n  patch.size: {choice: [8, 12]}\n", "space: {}\n"),
        [":5: space: expected at least 1 item"],
    ),
    "uniform_on_a_whole_number_knob": (
        VALID.replace(
            "  patch.size: {choice: [8, 12]}\n",
            "  patch.size: {choice: [8, 12]}\n  schedule.epochs: {uniform: [1, 3]}\n",
        ),
        [
            ":7: space.schedule.epochs: uniform draws fractional values such as 1.74, and schedule.epochs takes "
            "whole numbers; expected randint, choice or grid"
        ],
    ),
    "bool_for_a_count": (VALID + "num_samples: yes\n", [":8: num_samples: expected a number, not true"]),
    "bool_in_the_base": (
        VALID.replace("eval: {every: 1}", "eval: {every: 1}\n  patch: {size: true}"),
        [":5: base.patch.size: expected a number, not true"],
    ),
    "infinite_cpus": (
        VALID + "resources: {cpus_per_worker: .inf}\n",
        [":8: resources.cpus_per_worker: expected a finite number (got inf)"],
    ),
    "negative_search_seed": (
        VALID + "search: {seed: -1}\n",
        [":8: search.seed: expected greater than or equal to 0 (got -1)"],
    ),
    "health_check_interval_not_positive": (
        VALID + "failure: {health_check_interval_s: 0}\n",
        [":8: failure.health_check_interval_s: expected greater than 0 (got 0)"],
    ),
    "optuna_options_under_grid": (
        VALID + "search: {algo: grid, sampler: cmaes, n_startup_trials: 2}\n",
        [":8: search: sampler, n_startup_trials: used by algo: optuna only, and algo is grid"],
    ),
    "n_startup_trials_without_tpe": (
        VALID + "search: {sampler: random, n_startup_trials: 8}\n",
        [":8: search: n_startup_trials: used by sampler: tpe only, and sampler is random"],
    ),
    "missing_metric": (
        VALID.replace("metric: val/knn_top1/mean_emb\n", ""),
        ["metric: required key is missing"],
    ),
    "path_not_in_config": (
        VALID.replace("patch.size:", "patch.sise:"),
        [":6: space.patch.sise: not a TrainConfig field"],
    ),
    "two_paths_not_in_config": (
        VALID.replace("patch.size:", "patch.sise:").replace(
            "metric:", "  eval.grid_sise: {choice: [4]}\nmetric:"
        ),
        [
            ":6: space.patch.sise: not a TrainConfig field",
            ":7: space.eval.grid_sise: not a TrainConfig field",
        ],
    ),
    "choice_not_a_list": (
        VALID.replace(" {choice: [8, 12]}", "\n    choice: 8"),
        [":7: space.patch.size.choice: expected a valid list", "(got 8)"],
    ),
    "patch_too_big": (
        VALID.replace("[8, 12]", "[8, 40]"),
        [":6: space.patch.size: value 40 is rejected", "28"],
    ),
    "bogus_loss": (with_axis("loss.name: {choice: [bag_vicreg, bogus]}"), [":7: space.loss.name", "'bogus'"]),
    "range_below_limit": (
        with_axis("loss.inv_weight: {uniform: [-5, 10]}"),
        [":7: space.loss.inv_weight", "-5"],
    ),
    "randint_upper_too_big": (
        VALID.replace("{choice: [8, 12]}", "{randint: [8, 30]}"),
        [":6: space.patch.size", "29"],
    ),
    "two_kinds": (
        VALID.replace("{choice: [8, 12]}", "{choice: [8, 12], uniform: [8, 12]}"),
        [":6: space.patch.size: expected exactly one of", "'choice', 'uniform'"],
    ),
    "no_kind": (
        VALID.replace("{choice: [8, 12]}", "{}"),
        [":6: space.patch.size: expected exactly one of", "none"],
    ),
    "unknown_kind": (
        VALID.replace("{choice: [8, 12]}", "{normal: [8, 12]}"),
        [":6: space.patch.size", "normal"],
    ),
    "empty_choice": (VALID.replace("[8, 12]", "[]"), [":6: space.patch.size", "non-empty"]),
    "reversed_range": (
        with_axis("loss.inv_weight: {uniform: [10, 5]}"),
        [":7: space.loss.inv_weight", "low < high"],
    ),
    # The expected names come from the core (bagssl_core.metrics.expected_metrics): every validation
    # statistic of every scheme probed, the best over schemes, and the epoch metrics.
    "metric_never_reported": (
        VALID.replace("knn_top1/mean_emb", "knn_top1/whole"),
        [
            ":7: metric: 'val/knn_top1/whole' is never reported by the trainer; expected one of val/knn_top1, ",
            "val/linear_top1/mean_emb",
            "or an epoch metric: ",
            "train/loss",
        ],
    ),
    # Names from before validation splits existed are not guessed at: the message lists the right ones.
    "metric_without_split": (
        VALID.replace("val/knn_top1/mean_emb", "knn_top1/mean_emb"),
        [":7: metric: 'knn_top1/mean_emb' is never reported", "val/knn_top1/mean_emb"],
    ),
    "metric_on_test_split": (
        VALID.replace("val/knn_top1/mean_emb", "test/knn_top1/mean_emb"),
        [
            ":7: metric: 'test/knn_top1/mean_emb' is scored on the test split, which must never choose a "
            "config (the searcher, scheduler and best-config pick read validation only); expected "
            "val/knn_top1/mean_emb"
        ],
    ),
    "metric_on_test_split_any_scheme": (
        VALID.replace("val/knn_top1/mean_emb", "test/linear_top5"),
        [":7: metric: 'test/linear_top5' is scored on the test split", "expected val/linear_top5"],
    ),
    "metric_test_variant": (
        VALID.replace("val/knn_top1/mean_emb", "test/knn_top1_lo/centre:grid_stride-4"),
        [":7: metric:", "scored on the test split", "expected val/knn_top1/centre"],
    ),
    "metric_interval_bound": (
        VALID.replace("val/knn_top1/mean_emb", "val/knn_top1_lo/mean_emb"),
        [":7: metric: 'val/knn_top1_lo/mean_emb' names an interval bound; expected val/knn_top1/mean_emb"],
    ),
    "metric_one_variant": (
        VALID.replace("val/knn_top1/mean_emb", "val/knn_top1/mean_emb:grid_stride-4"),
        [":7: metric:", "names one evaluation variant (grid_stride-4); expected val/knn_top1/mean_emb"],
    ),
    # A swept eval.aggregation replaces the base list in every trial: the base scheme is not probed.
    "metric_of_replaced_scheme": (
        VALID.replace("every: 1}", "every: 1, aggregation: [whole]}")
        .replace("knn_top1/mean_emb", "knn_top1/whole")
        .replace("metric:", "  eval.aggregation: {choice: [mean_emb, centre]}\nmetric:"),
        [":8: metric: 'val/knn_top1/whole' is never reported", "val/knn_top1/centre"],
    ),
    "metric_of_unprobed_probe": (
        VALID.replace("every: 1}", "every: 1, probes: [knn]}").replace("val/knn_top1", "val/linear_top1"),
        [":7: metric: 'val/linear_top1/mean_emb' is never reported", "val/knn_top1/mean_emb"],
    ),
    "refine_top_k_zero": (VALID + "refine: {top_k: 0, seeds: 3}\n", [":8: refine.top_k:", "(got 0)"]),
    "refine_one_seed": (VALID + "refine: {top_k: 2, seeds: 1}\n", [":8: refine.seeds:", "2", "(got 1)"]),
    "refine_unknown_key": (VALID + "refine: {top: 2}\n", [":8: refine.top: unknown key"]),
    "bad_mode": (VALID + "mode: maximize\n", [":8: mode:", "'maximize'"]),
    "loguniform_not_positive": (
        with_axis("loss.inv_weight: {loguniform: [0, 10]}"),
        [":7: space.loss.inv_weight: loguniform: expected positive bounds"],
    ),
    "no_workers": (
        VALID + "resources: {workers_per_trial: 0}\n",
        [":8: resources.workers_per_trial:", "(got 0)"],
    ),
    "grid_with_optuna": (
        VALID.replace("choice", "grid"),
        [":6: space.patch.size: grid needs search.algo: grid"],
    ),
    "bad_base": (
        VALID.replace("{name: fashion_mnist}", "{name: mnist}"),
        [":3: base.data.name: expected", "'mnist'"],
    ),
    "base_sets_inside_a_value": (
        VALID.replace("  eval: {every: 1}", "  patch: {size: 8}\n  patch.size.px: 1"),
        ["base: patch.size: is a value, not a section"],
    ),
    "probe_not_every_epoch": (
        VALID.replace("every: 1", "every: 2"),
        [":4: base.eval.every:", "expected base.eval.every: 1 (got 2), or scheduler.probe_epochs: rungs"],
    ),
    "rungs_beside_the_base_probing_epochs": (
        VALID + "scheduler: {probe_epochs: rungs}\n",
        [":4: base.eval.every: scheduler.probe_epochs: rungs sets each trial's probing epochs"],
    ),
    "rungs_without_asha": (
        VALID.replace("  eval: {every: 1}\n", "") + "scheduler: {name: median, probe_epochs: rungs}\n",
        ["probe_epochs: rungs are ASHA's; expected name: asha (got median)"],
    ),
    # Options are axes too: a knob is checked in every combination of the discrete axes' values, since
    # Tune samples each of them and a trial whose config ignores an axis would fail at its start.
    "axis_ignored_by_one_loss": (
        VALID.replace(
            "metric:",
            "  loss.name: {choice: [bag_vicreg, tcr]}\n  loss.inv_weight: {uniform: [5, 30]}\nmetric:",
        ),
        [
            ":8: space.loss.inv_weight: rejected when loss.name=tcr: loss.inv_weight: not a knob of loss 'tcr'",
            "; sweep loss.inv_weight only with loss.name=bag_vicreg, or split the sweep into one spec per "
            "loss.name",
        ],
    ),
    "base_knob_ignored_by_one_option": (
        VALID.replace("  eval: {every: 1}", "  eval: {every: 1}\n  optim: {momentum: 0.95}").replace(
            "metric:", "  optim.name: {choice: [sgd, adamw]}\nmetric:"
        ),
        [
            ":8: space.optim.name: value 'adamw' is rejected: optim.momentum: ignored with optim.name=adamw; "
            "it is used only with optim.name=lars or sgd"
        ],
    ),
    "values_wrong_only_together": (
        VALID.replace("[8, 12]", "[8, 30]").replace(
            "metric:", "  data.name: {choice: [fashion_mnist, cifar10]}\nmetric:"
        ),
        [
            ":6: space.patch.size: rejected when patch.size=30, data.name=fashion_mnist: patch.size: a 30-px "
            "patch does not fit a 28-px image"
        ],
    ),
    "eval_axis_no_variant_uses": (
        VALID.replace("every: 1}", "every: 1, probes: [linear]}")
        .replace("val/knn_top1", "val/linear_top1")
        .replace("metric:", "  eval.knn_k: {choice: [5, 10]}\nmetric:"),
        [
            ":7: space.eval.knn_k: ignored by every evaluation variant: eval.knn_k: ignored with "
            "eval.probes=[linear], eval.analyses=[]; it is used only with knn in eval.probes, or bag_curve "
            "or locality in eval.analyses"
        ],
    ),
    # A continuous eval axis is sampled into each trial's own config, before the evaluation variants.
    "continuous_eval_axis_the_base_ignores": (
        VALID.replace(
            "metric:",
            "  eval.patches: {choice: [grid, random]}\n  eval.num_patches: {randint: [4, 9]}\nmetric:",
        ),
        [
            ":8: space.eval.num_patches: rejected with every value: eval.num_patches: ignored with "
            "eval.patches=grid",
            "list its values with choice to probe them in each evaluation variant",
        ],
    ),
    "too_many_combinations": (
        VALID.replace(
            "metric:",
            "".join(
                f"  patch.aug.{k}: {{choice: {[round(i / 16, 4) for i in range(17)]}}}\n"
                for k in ("flip_p", "jitter_p", "blur_p")
            )
            + "metric:",
        ),
        [
            ":5: space: the discrete axes patch.size (2), patch.aug.flip_p (17), patch.aug.jitter_p (17), "
            "patch.aug.blur_p (17) make 9826 combinations, more than the 4096 that are checked"
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_exits_2_naming_file_line_and_key(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD_SPECS[case]
    path = write(tmp_path, text)
    rc = main([str(path), "--dry-run"])
    captured = capsys.readouterr()
    assert_bad_input(rc, captured.err, path, *expected)
    assert captured.out == ""  # no plan printed


def test_bad_spec_raises_spec_error_from_load_spec(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "resources: {workerz: 2}\n")
    with pytest.raises(SpecError, match=r"spec\.yaml:8: resources\.workerz: unknown key"):
        load_spec(path)


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yaml"
    assert_bad_input(main([str(path), "--dry-run"]), capsys.readouterr().err, path, "no such file")


def test_a_spec_that_is_a_directory_or_binary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_bad_input(
        main([str(tmp_path), "--dry-run"]),
        capsys.readouterr().err,
        tmp_path,
        "is a directory; expected a YAML file",
    )
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xff\xfe\x00n\x00a\x00m\x00e")  # UTF-16, as some editors save
    assert_bad_input(main([str(path), "--dry-run"]), capsys.readouterr().err, path, ":1: not UTF-8 text")


def test_randint_upper_bound_is_exclusive(tmp_path: Path) -> None:
    # randint [8, 29] draws at most 28 = the Fashion-MNIST side: valid, unlike [8, 30] above.
    spec, _ = load_spec(write(tmp_path, VALID.replace("{choice: [8, 12]}", "{randint: [8, 29]}")))
    assert spec.space["patch.size"].probe_values() == [8, 28]


def test_an_axis_every_combination_uses_passes(tmp_path: Path) -> None:
    # Both VICReg losses have inv_weight: a loss.name axis over them leaves it used in every trial.
    text = VALID.replace("  eval: {every: 1}", "  eval: {every: 1}\n  patch: {num: 2}").replace(
        "metric:",
        "  loss.name: {choice: [bag_vicreg, vicreg]}\n  loss.inv_weight: {uniform: [5, 30]}\nmetric:",
    )
    spec, _ = load_spec(write(tmp_path, text))
    assert set(spec.train_axes()) == {"patch.size", "loss.name", "loss.inv_weight"}


def test_a_value_valid_only_with_another_axis_passes(tmp_path: Path) -> None:
    # vicreg needs 2 patches: invalid over the base (16) alone, valid in every combination the sweep samples.
    text = VALID.replace(
        "metric:", "  loss.name: {choice: [bag_vicreg, vicreg]}\n  patch.num: {choice: [2]}\nmetric:"
    )
    spec, base = load_spec(write(tmp_path, text))
    assert base.patch.num == 16 and spec.space["loss.name"].args == ["bag_vicreg", "vicreg"]


def test_an_eval_knob_some_variants_use_passes_and_dry_run_lists_the_real_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # num_patches matters with random evaluation patches, grid_stride with a grid: each is swept where it
    # is used, and a variant never claims a knob its probes ignore (2 x 2 x 2 combinations, 4 variants).
    text = VALID.replace(
        "metric:",
        "  eval.patches: {choice: [grid, random]}\n  eval.num_patches: {choice: [4, 8]}\n"
        "  eval.grid_stride: {choice: [4, 7]}\nmetric:",
    )
    path = write(tmp_path, text)
    load_spec(path)
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "evaluation variants per trial: patches-grid:grid_stride-4, patches-grid:grid_stride-7, "
        "patches-random:num_patches-4, patches-random:num_patches-8\n"
    ) in out
    assert "# evaluation-only axes: 4 evaluation settings per trained model" in out


# --- base: a config file under the spec's own settings -------------------------------------------------

BASE_FILE = """\
data: {name: fashion_mnist}
eval: {every: 1}
patch:
  size: 8
  aug: {jitter_p: 0.3, blur_p: 0.0}
"""


@pytest.mark.parametrize(
    "base",
    [
        "{config: base.yaml, patch: {aug: {flip_p: 0.0}}}",
        "{config: base.yaml, patch.aug.flip_p: 0.0}",
        "{config: base.yaml, patch: {aug.flip_p: 0.0}}",
        "{config: base.yaml, patch.aug: {flip_p: 0.0}}",
    ],
)
def test_base_merges_over_its_config_file_key_by_key(base: str, tmp_path: Path) -> None:
    write(tmp_path, BASE_FILE, "base.yaml")
    path = write(
        tmp_path, VALID.replace("base:\n  data: {name: fashion_mnist}\n  eval: {every: 1}", f"base: {base}")
    )
    _, cfg = load_spec(path)
    assert cfg.patch.aug.flip_p == 0.0  # the spec's own setting
    assert (cfg.patch.aug.jitter_p, cfg.patch.aug.blur_p, cfg.patch.size) == (0.3, 0.0, 8)  # the file's


# --- bad state: tracking, storage, data (past validation, before Ray) ---------------------------


def test_sqlite_directory_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = runnable(tmp_path).replace(
        f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'no' / 'm.db'}"
    )
    path = write(tmp_path, text)
    rc = main([str(path)])
    assert_bad_input(rc, capsys.readouterr().err, path, "tracking.uri", str(tmp_path / "no"))
    assert not (tmp_path / "store").exists()


def test_file_store_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        runnable(tmp_path).replace(f"sqlite:///{tmp_path / 'mlflow.db'}", f"file://{tmp_path}/mlruns"),
    )
    assert_bad_input(main([str(path)]), capsys.readouterr().err, path, "tracking.uri", "sqlite:///")
    assert not (tmp_path / "mlruns").exists()


def test_resume_with_nothing_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, runnable(tmp_path))
    rc = main([str(path), "--resume"])
    assert_bad_input(
        rc, capsys.readouterr().err, path, "--resume: nothing to resume", str(tmp_path / "store" / "t")
    )
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "mlflow.db").exists()


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_an_existing_sweep_is_left_alone_and_the_next_run_is_a_new_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "store" / "t"
    (exp / "trial_0").mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"\x80state")
    (exp / "trial_0" / "result.json").write_text('{"epoch": 1}\n')
    before = snapshot(tmp_path / "store")
    path = write(tmp_path, runnable(tmp_path))
    assert main([str(path), "--dry-run"]) == 0
    assert f"# storage: {tmp_path / 'store' / 't-2'} (a new sweep" in capsys.readouterr().out
    assert snapshot(tmp_path / "store") == before
    assert not (tmp_path / "mlflow.db").exists()


# --- --set ------------------------------------------------------------------------------------------


def test_set_overrides_are_applied(capsys: pytest.CaptureFixture[str]) -> None:
    smoke = ROOT / "search_spaces" / "smoke.yaml"
    sets = ["num_samples=2", "base.schedule.epochs=1", "space.patch.size={choice: [8, 12]}"]
    spec, base = load_spec(smoke, sets)
    assert spec.num_samples == 2
    assert base.schedule.epochs == 1
    assert spec.space["patch.size"].choice == [8, 12]
    assert spec.space["loss.inv_weight"].loguniform == (10.0, 50.0)  # untouched axes stay
    assert main([str(smoke), "--dry-run", *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert "num_samples: 2" in out
    assert "patch.size: choice [8, 12]" in out
    assert "# trials: 2 " in out
    assert "1 epochs" in out


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("bogus=1", "bogus: unknown key"),
        ("resources.workerz=2", "resources.workerz: unknown key"),
        ("base.schedule.epochz=1", "schedule.epochz: unknown key"),
        ("space.patch.sise={choice: [8]}", "space.patch.sise: not a TrainConfig field"),
        ("num_samples=abc", "num_samples:"),
        ("name.x=1", "spec.yaml (--set): name.x: name: is a value, not a section"),
        ("novalue", "'novalue': expected key=value"),
    ],
)
def test_bad_set_key_exits_2(
    item: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID)
    rc = main([str(path), "--dry-run", "--set", item])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    assert expected in err, err


def test_a_value_given_by_set_is_located_at_set_not_at_the_file_line_it_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID + "resources: {workers_per_trial: 2}\n")
    cases = {
        # the file's line 8 says workers_per_trial: 2; the 0 came from --set
        "resources.workers_per_trial=0": f"error: {path} (--set): resources.workers_per_trial: expected greater",
        "resources={workers_per_trial: 0}": f"error: {path} (--set): resources.workers_per_trial: expected",
        "space.patch.size={choice: [40]}": f"error: {path} (--set): space.patch.size: rejected with every value",
        "metric=test/knn_top1/mean_emb": f"error: {path} (--set): metric: 'test/knn_top1/mean_emb' is scored",
        # the base's line 3 says name: fashion_mnist
        "base.data.name=mnist": f"error: {path} (--set): base.data.name: expected 'fashion_mnist'",
        "base.data={name: mnist}": f"error: {path} (--set): base.data.name: expected 'fashion_mnist'",
    }
    for item, expected in cases.items():
        rc = main([str(path), "--dry-run", "--set", item])
        err = capsys.readouterr().err
        assert rc == EXIT_BAD_INPUT, err
        assert err.startswith(expected), err
        assert err.count("\n") == 1, err
    # Among several --set, the bad value is still located at --set ...
    rc = main([str(path), "--dry-run", "--set", "num_samples=2", "--set", "space.patch.size={choice: [40]}"])
    assert rc == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(f"error: {path} (--set): space.patch.size:")
    # ... and a bad value from the file keeps its line beside an unrelated --set.
    bad_file = write(tmp_path, VALID.replace("[8, 12]", "[40]"), "bad.yaml")
    rc = main([str(bad_file), "--dry-run", "--set", "num_samples=2"])
    assert rc == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(
        f"error: {bad_file}:6: space.patch.size: rejected with every value"
    )


def test_a_bad_base_value_is_located_where_it_was_given(tmp_path: Path) -> None:
    """At its own line in the spec, at `--set`, or at its line in the `base.config` file; each problem on its
    line, named by its key in the spec (`base.<key>`)."""
    write(tmp_path, "data: {name: fashion_mnist}\nrun:\n  precision: fp16\npatch: {num: 4}\n", "base.yaml")
    spec = VALID.replace("base:\n", "base:\n  config: base.yaml\n").replace(
        "  eval: {every: 1}", "  eval: {every: 1}\n  patch: {num: -1}"
    )
    path = write(tmp_path, spec)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).splitlines() == [
        f"{path}:6: base.patch.num: expected greater than or equal to 1 (got -1)",
        f"{tmp_path / 'base.yaml'}:3: base.run.precision: expected 'auto', 'fp32' or 'bf16' (got 'fp16')",
    ]
    # A --set over a key of the base file, or over a spec section the file's keys merge into.
    with pytest.raises(SpecError) as info:
        load_spec(path, ["base.run.precision=fp17", "base.patch={num: -3}"])
    assert str(info.value).splitlines() == [
        f"{path} (--set): base.patch.num: expected greater than or equal to 1 (got -3)",
        f"{path} (--set): base.run.precision: expected 'auto', 'fp32' or 'bf16' (got 'fp17')",
    ]
    # A check over the whole config, by the key it names.
    with pytest.raises(SpecError) as info:
        load_spec(path, ["base.run.precision=fp32", "base.patch={num: 3, size: 50}"])
    assert str(info.value) == (
        f"{path} (--set): base.patch.size: a 50-px patch does not fit a 28-px image (fashion_mnist); expected at "
        "most 28 pixels or a fraction <= 1"
    )


# --- the real command line, as a user runs it ---------------------------------------------------------


def run_cli(
    tmp_path: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps.run", *args],
        cwd=tmp_path,
        env=clean_env() | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.perf_counter() - start


CLI_CASES = {
    "bad_yaml": (BAD_SPECS["bad_yaml"][0], ["--dry-run"], [":3:", "not valid YAML"]),
    "unknown_nested_key": (
        VALID + "resources: {workerz: 2}\n",
        ["--dry-run"],
        [":8: resources.workerz: unknown key"],
    ),
    "patch_too_big": (BAD_SPECS["patch_too_big"][0], ["--dry-run"], [":6: space.patch.size", "40"]),
    "metric_never_reported": (
        BAD_SPECS["metric_never_reported"][0],
        ["--dry-run"],
        [":7: metric:", "knn_top1/whole"],
    ),
    "metric_on_test_split": (
        BAD_SPECS["metric_on_test_split"][0],
        ["--dry-run"],
        [":7: metric: 'test/knn_top1/mean_emb' is scored on the test split"],
    ),
    "bad_set_key": (VALID, ["--dry-run", "--set", "resources.workerz=2"], ["resources.workerz: unknown key"]),
    "local_with_address": (
        VALID,
        ["--local", "--address", "127.0.0.1:6379"],
        ["--address: --local runs no Ray"],
    ),
    "resume_nothing_dry_run": (
        VALID,
        ["--dry-run", "--resume", "nosuch"],
        ["--resume nosuch: not a sweep of 't' under", "expected one of: none"],
    ),
    "base_config_not_a_path": (
        VALID.replace("  eval: {every: 1}", "  eval: {every: 1}\n  config: [a]"),
        ["--dry-run"],
        ["base.config: [a]; expected the path of a TrainConfig YAML file"],
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_spec(case: str, tmp_path: Path) -> None:
    text, args, expected = CLI_CASES[case]
    path = write(tmp_path, text)
    proc, _ = run_cli(tmp_path, str(path), *args)
    assert_bad_input(proc.returncode, proc.stderr, path, *expected)
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1  # one message


def refused_before_the_sweep(tmp_path: Path, text: str, *expected: str) -> subprocess.CompletedProcess[str]:
    """Run the spec `text` (no --dry-run: the checks that touch tracking, data and storage) and check that it
    is one bad-input message holding `expected`, given before Ray started, MLflow's store or the storage."""
    path = write(tmp_path, text)
    proc, _ = run_cli(tmp_path, str(path))
    assert_bad_input(proc.returncode, proc.stderr, path, *expected)
    assert proc.stderr.count("\n") == 1, proc.stderr  # the message alone
    assert "Ray" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "store").exists()
    return proc


def test_cli_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    text = runnable(tmp_path).replace(f"sqlite:///{tmp_path / 'mlflow.db'}", "http://127.0.0.1:9")
    refused_before_the_sweep(tmp_path, text, "tracking.uri", "http://127.0.0.1:9")  # not a dry run


def test_cli_storage_path_that_cannot_be_written(tmp_path: Path) -> None:
    """Refused before Ray starts and before any trial or MLflow run: a file stands where a directory of the
    storage path must go, and it is left as it was."""
    (tmp_path / "a_file").write_text("kept\n")
    text = runnable(tmp_path).replace(str(tmp_path / "store"), str(tmp_path / "a_file" / "store"))
    refused_before_the_sweep(
        tmp_path,
        text,
        f"storage_path: cannot write to {tmp_path / 'a_file' / 'store'}: {tmp_path / 'a_file'} is a file, not a "
        "directory; expected a directory this user can create and write",
    )
    assert (tmp_path / "a_file").read_text() == "kept\n"


def test_a_tracking_server_that_never_answers_is_given_up_on_after_the_timeout() -> None:
    """What makes the CLI fail fast, timed alone: the process's own imports (seconds, more on a busy
    machine) are not part of it. The server accepts the connection (the kernel completes the handshake for
    the listening socket) and never answers."""
    from sweeps.tracking import TrackingError, check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(TrackingError) as info:
            check_reachable(uri, timeout_s=0.5)
        seconds = time.perf_counter() - start
    assert str(info.value) == (
        f"tracking.uri: cannot reach the MLflow server at {uri} (no answer within 0.5 s); expected a running "
        "server (mlflow server ...) or a sqlite:///file.db URI"
    )
    # At least the timeout (it waited for an answer), and well under the 5 s default: the timeout given
    # bounds it (a connect at once, then one read that timed out), with room for a busy machine.
    assert 0.5 <= seconds < 3


def test_cli_missing_dataset(tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    text = runnable(tmp_path).replace("{name: fashion_mnist}", f"{{name: cifar10, root: {empty}}}")
    refused_before_the_sweep(tmp_path, text, "base.data", "cifar10", str(empty), "data.download=true")
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize(
    ("axis", "expected"),
    [
        (
            "patch.size: {choice: [16, 40]}",
            ":6: space.patch.size: value 40 is rejected: patch.size: a 40-px patch does not fit a 32-px image "
            "(imagefolder)",
        ),
        (  # an evaluation axis, probed inside each trial, is checked at the images' size too
            "eval.grid_size: {choice: [16, 48]}",
            ":7: space.eval.grid_size: value 48 is rejected: eval.grid_size: a 48-px grid patch does not fit a "
            "32-px image",
        ),
    ],
    ids=["training_axis", "evaluation_axis"],
)
def test_cli_an_axis_value_that_does_not_fit_an_imagefolders_own_size(
    tmp_path: Path, axis: str, expected: str
) -> None:
    """An ImageFolder that keeps its images' size has none until they are read: once the driver reads it, the
    spec's space is checked again at that size, so a 40-px patch on 32-px images is refused there, at its
    line in the spec and before Ray or MLflow, instead of failing every trial that draws it."""
    from PIL import Image

    for split in ("train", "val"):
        for cls, colour in (("ant", (250, 10, 10)), ("bee", (10, 10, 250))):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / split / cls / f"{i}.png")
    text = (
        with_axis(axis) if axis.startswith("eval.") else VALID.replace("patch.size: {choice: [8, 12]}", axis)
    )
    text = runnable(tmp_path, text).replace(
        "{name: fashion_mnist}",
        f"{{name: imagefolder, root: {tmp_path / 'images'}, batch_size: 2, val_size: 1}}",
    )
    refused_before_the_sweep(tmp_path, text, expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            "{name: fashion_mnist, train_subset: 300, val_size: 280, batch_size: 64}",
            "base.data: data.val_size: 280 validation images leave 20 of the 300 training images, less than one "
            "batch (data.batch_size=64); expected at most 236 validation images",
        ),
        (
            "{name: fashion_mnist, train_subset: 70000}",
            "base.data: data.train_subset: 70000 is more than the 60000 images of fashion_mnist train; expected "
            "at most 60000",
        ),
    ],
    ids=["val_size", "train_subset"],
)
def test_cli_a_split_the_dataset_cannot_give(tmp_path: Path, data: str, expected: str) -> None:
    """The driver reads the training images as trials do, so a validation split or a subset that the
    dataset cannot give is refused before Ray or MLflow, not by every trial at its start."""
    text = runnable(tmp_path).replace("{name: fashion_mnist}", data)
    refused_before_the_sweep(tmp_path, text, expected)


@pytest.mark.parametrize("given", ["--address", "RAY_ADDRESS"])
def test_cli_address_where_nothing_listens_fails_fast(tmp_path: Path, given: str) -> None:
    """`ray.init` would retry such an address for minutes without a word. The message names where the
    address came from: the flag, or the environment (as `ray job submit` passes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    path = write(tmp_path, runnable(tmp_path))
    address = f"127.0.0.1:{port}"
    if given == "--address":
        proc, seconds = run_cli(tmp_path, str(path), "--address", address)
    else:
        proc, seconds = run_cli(tmp_path, str(path), env={"RAY_ADDRESS": address})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {given}: nothing answers at {address} (Connection refused); expected a Ray head's GCS "
        "address, as `ray start --head` prints it (HOST:6379 by default)"
    ]
    assert "Traceback" not in proc.stderr
    assert seconds < 60


def test_cli_a_store_uri_from_the_environment_is_named_so(tmp_path: Path) -> None:
    """A spec without tracking.uri takes MLFLOW_TRACKING_URI: a bad one is named as the variable, not as a
    spec key the user never wrote."""
    path = write(tmp_path, VALID + f"storage_path: {tmp_path / 'store'}\n")
    proc, _ = run_cli(tmp_path, str(path), env={"MLFLOW_TRACKING_URI": "junk://x"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {path}: MLFLOW_TRACKING_URI: junk://x: unsupported scheme 'junk'")


def test_cli_missing_dataset_of_a_space_axis(tmp_path: Path) -> None:
    """A dataset an axis picks is checked as the base's is: before Ray or MLflow, not in every trial."""
    empty = tmp_path / "data"
    empty.mkdir()
    text = (
        runnable(tmp_path)
        .replace(
            "  patch.size: {choice: [8, 12]}\n",
            "  patch.size: {choice: [8, 12]}\n  data.name: {choice: [fashion_mnist, cifar10]}\n",
        )
        .replace("{name: fashion_mnist}", f"{{name: fashion_mnist, root: {empty}}}")
    )
    refused_before_the_sweep(tmp_path, text, "space.data.name=cifar10: cifar10: not found", str(empty))


def test_a_base_mapping_given_by_set_merges_and_any_other_replaces() -> None:
    """`base.data={...}` changes the keys it names, as the core's overrides do; `search={...}` is the whole
    search, and an axis the whole axis."""
    smoke = ROOT / "search_spaces" / "smoke.yaml"
    sets = ["base.data={batch_size: 32}", "search={algo: grid, seed: 0}", "space.patch.size={grid: [10, 14]}"]
    spec, base = load_spec(smoke, sets)
    assert (base.data.batch_size, base.data.train_subset, base.data.test_subset) == (32, 512, 256)
    assert (spec.search.algo, spec.search.n_startup_trials) == ("grid", 4)  # the spec's 2 went with it
    assert spec.space["patch.size"].grid == [10, 14] and spec.space["patch.size"].choice is None
    with pytest.raises(SpecError, match=r"smoke\.yaml \(--set\): base\.data\.batch_size: expected greater"):
        load_spec(smoke, ["base.data={batch_size: 0}"])


@pytest.mark.parametrize(
    ("epochs", "grace", "rf", "expected"),
    [(2, 1, 2.0, [1, 2]), (10, 1, 2.0, [1, 2, 4, 8]), (10, 2, 3.0, [2, 6]), (9, 1, 1.5, [1, 2, 3, 4, 6, 8])],
)
def test_asha_probe_epochs_are_the_epochs_rays_asha_records(
    tmp_path: Path, epochs: int, grace: int, rf: float, expected: list[int]
) -> None:
    """Ray's own bracket, fed one result per epoch, records each trial at exactly these epochs: probing
    only there (`scheduler.probe_epochs: rungs`) leaves every ASHA decision as it was."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    text = VALID.replace("  eval: {every: 1}\n", "") + (
        f"scheduler: {{grace_period: {grace}, reduction_factor: {rf}, probe_epochs: rungs}}\n"
    )
    spec, base = load_spec(write(tmp_path, text), [f"base.schedule.epochs={epochs}"])
    assert asha_probe_epochs(spec, base.schedule.epochs) == expected

    class Trial:
        trial_id = "t"

    bracket = _Bracket(grace, asha_max_t(spec, epochs), rf, s=0)
    recorded = []
    for epoch in range(1, epochs + 1):
        before = sum(len(r) for _, r in bracket._rungs)
        bracket.on_result(Trial(), epoch, 1.0)
        if sum(len(r) for _, r in bracket._rungs) > before:
            recorded.append(epoch)
    assert recorded == expected

"""Spec -> Tune search space, and the evaluation-only axes enumerated inside each trial."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray import tune
from ray.tune.search import sample

from bagssl_core.config import TrainConfig
from bagssl_core.metrics import ProbeKey
from sweeps.run import main
from sweeps.space import (
    eval_variants,
    param_space,
    trial_overrides,
    tune_domain,
    variant_overrides,
    variant_values,
)
from sweeps.spec import Distribution, Objective, SweepSpec, coerce_value, load_spec, trial_count
from sweeps.trainable import TrialPlan

ROOT = Path(__file__).resolve().parents[2]
# Characters MLflow accepts in a metric name.
MLFLOW_SAFE = re.compile(r"^[A-Za-z0-9_\-. :/]+$")


def make_spec(space: dict[str, Any], **fields: Any) -> SweepSpec:
    return SweepSpec.model_validate({"name": "t", "metric": "val/knn_top1", "space": space, **fields})


def draws(domain: Any, n: int = 400) -> np.ndarray:
    return np.asarray(domain.sample(size=n, random_state=np.random.RandomState(0)))


# --- Tune domains -------------------------------------------------------------------------------------


def test_choice_domain() -> None:
    d = tune_domain(Distribution(choice=[8, 12, 16]))
    assert isinstance(d, sample.Categorical)
    assert d.categories == [8, 12, 16]
    assert set(draws(d).tolist()) == {8, 12, 16}


def test_grid_domain() -> None:
    assert tune_domain(Distribution(grid=[7, 14])) == tune.grid_search([7, 14])


def test_uniform_domain() -> None:
    d = tune_domain(Distribution(uniform=[0.5, 2.0]))
    assert isinstance(d, sample.Float)
    assert isinstance(d.get_sampler(), sample.Uniform)
    assert (d.lower, d.upper) == (0.5, 2.0)
    x = draws(d)
    assert x.min() >= 0.5 and x.max() <= 2.0


def test_loguniform_domain() -> None:
    d = tune_domain(Distribution(loguniform=[5, 125]))
    assert isinstance(d, sample.Float)
    assert isinstance(d.get_sampler(), sample.LogUniform)
    x = draws(d)
    assert x.min() >= 5 and x.max() <= 125
    # Log-uniform: half of the draws below the geometric mean 25, not the arithmetic mean 65.
    assert 0.4 < np.mean(x < 25) < 0.6


def test_randint_domain_upper_bound_is_exclusive() -> None:
    d = tune_domain(Distribution(randint=[8, 11]))
    assert isinstance(d, sample.Integer)
    assert (d.lower, d.upper) == (8, 11)
    assert set(draws(d).tolist()) == {8, 9, 10}
    # Validation probes the same bounds Tune can draw.
    assert Distribution(randint=[8, 11]).probe_values() == [8, 10]


def test_quniform_domain() -> None:
    d = tune_domain(Distribution(quniform=[0.25, 1.0, 0.25]))
    assert isinstance(d, sample.Float)
    assert isinstance(d.get_sampler(), sample.Quantized)
    assert d.get_sampler().q == 0.25
    x = draws(d)
    assert set(np.round(x / 0.25, 6).tolist()) <= {1.0, 2.0, 3.0, 4.0}


# --- which axes reach Tune ------------------------------------------------------------------------------


def test_param_space_excludes_discrete_eval_axes() -> None:
    spec = make_spec(
        {
            "patch.size": {"choice": [8, 12]},
            "loss.inv_weight": {"loguniform": [5, 125]},
            "eval.aggregation": {"choice": ["mean_emb", "centre"]},
            "eval.grid_stride": {"grid": [4, 7]},
            "eval.knn_temperature": {"uniform": [0.05, 0.1]},  # continuous: searched like any axis
        }
    )
    assert set(spec.eval_axes()) == {"eval.aggregation", "eval.grid_stride"}
    space = param_space(spec)
    assert set(space) == {"patch.size", "loss.inv_weight", "eval.knn_temperature"}
    assert isinstance(space["eval.knn_temperature"], sample.Float)


def test_trial_count_multiplies_grids_by_num_samples() -> None:
    spec = make_spec(
        {
            "patch.size": {"grid": [7, 14, 21]},
            "loss.name": {"grid": ["bag_vicreg", "tcr"]},
            "loss.inv_weight": {"uniform": [5, 50]},
            "eval.grid_stride": {"grid": [4, 7]},  # evaluation-only: no extra trials
        },
        num_samples=2,
        search={"algo": "grid"},
    )
    assert trial_count(spec) == 2 * 3 * 2
    assert trial_count(make_spec({"patch.size": {"choice": [8, 12]}}, num_samples=5)) == 5


# --- evaluation variants ------------------------------------------------------------------------------


def test_aggregation_values_are_one_list() -> None:
    spec = make_spec(
        {"eval.aggregation": {"choice": [["mean_emb", "centre"], "max_emb", "mean_emb", "whole"]}}
    )
    variants = eval_variants(spec, TrainConfig())
    assert list(variants) == [""]
    assert variants[""].aggregation == ["mean_emb", "centre", "max_emb", "whole"]


def test_other_eval_axes_form_named_variants() -> None:
    spec = make_spec(
        {
            "eval.aggregation": {"choice": ["mean_emb", "centre"]},
            "eval.grid_stride": {"grid": [4, 7]},
            "eval.knn_k": {"choice": [10, 30]},
        }
    )
    variants = eval_variants(spec, TrainConfig())
    assert set(variants) == {
        "grid_stride-4:knn_k-10",
        "grid_stride-4:knn_k-30",
        "grid_stride-7:knn_k-10",
        "grid_stride-7:knn_k-30",
    }
    v = variants["grid_stride-7:knn_k-10"]
    assert (v.grid_stride, v.knn_k) == (7, 10)
    assert all(ev.aggregation == ["mean_emb", "centre"] for ev in variants.values())
    assert variant_values(spec, TrainConfig())["grid_stride-4:knn_k-30"] == {
        "eval.grid_stride": 4,
        "eval.knn_k": 30,
    }


def test_a_variant_leaves_out_the_knobs_its_options_ignore_and_is_probed_once() -> None:
    # grid_stride plays no part with random patches, num_patches none with a grid: 2 x 2 x 2 combinations
    # are 4 distinct evaluations, and no name claims a stride (or a count) its probes never used.
    spec = make_spec(
        {
            "eval.grid_stride": {"grid": [4, 7]},
            "eval.patches": {"choice": ["grid", "random"]},
            "eval.num_patches": {"choice": [4, 8]},
        }
    )
    variants = eval_variants(spec, TrainConfig())
    assert list(variants) == [
        "grid_stride-4:patches-grid",
        "patches-random:num_patches-4",
        "patches-random:num_patches-8",
        "grid_stride-7:patches-grid",
    ]
    assert (
        variants["patches-random:num_patches-8"].patches,
        variants["patches-random:num_patches-8"].num_patches,
    ) == ("random", 8)
    assert variants["grid_stride-7:patches-grid"].grid_stride == 7
    values = variant_values(spec, TrainConfig())
    assert values["patches-random:num_patches-4"] == {"eval.patches": "random", "eval.num_patches": 4}
    assert variant_overrides(spec, TrainConfig()).keys() == variants.keys()


def test_which_knobs_a_variant_ignores_depends_on_the_base() -> None:
    # Without a bag scheme among the base's schemes no stride is used, with one it is.
    spec = make_spec({"eval.grid_stride": {"grid": [4, 7]}, "eval.knn_k": {"choice": [10, 30]}})
    centre = TrainConfig.model_validate({"eval": {"aggregation": ["centre"]}})
    assert list(variant_values(spec, centre)) == ["knn_k-10", "knn_k-30"]
    assert len(variant_values(spec, {"eval": {"aggregation": ["centre", "max_emb"]}})) == 4


def test_variant_names_are_mlflow_safe_and_distinct() -> None:
    spec = make_spec(
        {
            "eval.grid_size": {"choice": [0.5, 14]},
            "eval.multiscale_sizes": {"choice": [[0.25, 0.5], [0.5, 1.0], 0.75]},
            "eval.num_patches": {"grid": [4, 16]},
        }
    )
    # Random patches and a multiscale bag: else num_patches and multiscale_sizes would be ignored (and
    # left out of every name).
    base = {"eval": {"patches": "random", "aggregation": ["mean_emb", "multiscale"]}}
    variants = eval_variants(spec, TrainConfig.model_validate(base))
    assert len(variants) == 2 * 3 * 2
    for name in variants:
        assert MLFLOW_SAFE.match(name), name
        assert MLFLOW_SAFE.match(str(ProbeKey("val", "knn", "top1", "mean_emb", name)))
    # A scalar for a list field is a one-element list.
    assert {tuple(ev.multiscale_sizes) for ev in variants.values()} == {(0.25, 0.5), (0.5, 1.0), (0.75,)}


def test_no_eval_axis_gives_one_unnamed_variant() -> None:
    base = TrainConfig.model_validate({"eval": {"aggregation": ["centre", "mean_emb"], "grid_stride": 3}})
    variants = eval_variants(make_spec({"patch.size": {"choice": [8, 12]}}), base)
    assert list(variants) == [""]
    assert variants[""] == base.eval


def test_a_sampled_eval_value_reaches_every_variant_of_its_trial() -> None:
    # eval.knn_k is continuous, so Tune samples it per trial; eval.grid_stride is enumerated inside it.
    spec = make_spec({"eval.knn_k": {"randint": [5, 50]}, "eval.grid_stride": {"grid": [4, 7]}})
    plan = TrialPlan(
        base={"eval": {"knn_k": 20, "knn_temperature": 0.1}},
        eval_variants=variant_overrides(spec, TrainConfig()),
        metric="knn_top1",
        mode="max",
    )
    assert set(param_space(spec)) == {"eval.knn_k"}
    cfg = plan.config({"eval.knn_k": 7})
    variants = plan.variants(cfg)  # what run_trial hands the trainer's probes
    assert {name: (ev.grid_stride, ev.knn_k) for name, ev in variants.items()} == {
        "grid_stride-4": (4, 7),
        "grid_stride-7": (7, 7),
    }
    assert all(ev.knn_temperature == 0.1 for ev in variants.values())  # the rest from the base


def test_coerce_value_wraps_scalars_for_list_fields() -> None:
    assert coerce_value("eval.aggregation", "centre") == ["centre"]
    assert coerce_value("eval.aggregation", ["centre", "whole"]) == ["centre", "whole"]
    assert coerce_value("model.projector", 512) == [512]
    assert coerce_value("patch.size", 8) == 8
    assert trial_overrides({"eval.probes": "knn", "loss.inv_weight": 10.0}) == {
        "eval.probes": ["knn"],
        "loss.inv_weight": 10.0,
    }


# --- the objective ---------------------------------------------------------------------------------------

REPORT = {
    "epoch": 3.0,
    "train/loss": 1.5,
    "val/knn_top1/mean_emb:grid_stride-4": 40.0,
    "val/knn_top1_hi/mean_emb:grid_stride-4": 95.0,  # a bound is never the objective
    "val/knn_top1/mean_emb:grid_stride-7": 55.0,
    "val/knn_top1/centre:grid_stride-4": 90.0,
    "val/knn_top5/mean_emb:grid_stride-4": 99.0,
    "val/linear_top1/mean_emb:grid_stride-4": 70.0,
    # The test split, scored at a run's end, would rank differently: it must never be read.
    "test/knn_top1/mean_emb:grid_stride-4": 100.0,
    "test/knn_top1/whole:grid_stride-4": 100.0,
}


def key(scheme: str, variant: str = "", stat: str = "top1") -> ProbeKey:
    return ProbeKey("val", "knn", stat, scheme, variant)  # type: ignore[arg-type]


def test_objective_exact_metric() -> None:
    plain = {"val/knn_top1/mean_emb": 50.0, "val/knn_top1/centre": 60.0, "epoch": 2.0}
    assert Objective.of("val/knn_top1/mean_emb", "max").best(plain) == (key("mean_emb"), 50.0)
    assert Objective.of("epoch", "max").best(plain) == (None, 2.0)  # an epoch metric: no key


def test_objective_best_over_variants() -> None:
    best = Objective.of("val/knn_top1/mean_emb", "max").best(REPORT)
    assert best == (key("mean_emb", "grid_stride-7"), 55.0)
    assert Objective.of("val/knn_top1/mean_emb", "min").best(REPORT) == (
        key("mean_emb", "grid_stride-4"),
        40.0,
    )


def test_objective_bare_probe_is_best_over_schemes() -> None:
    # val/knn_top5 (99) is another statistic, not a scheme of val/knn_top1; test/... (100) is never read.
    assert Objective.of("val/knn_top1", "max").best(REPORT) == (key("centre", "grid_stride-4"), 90.0)
    assert Objective.of("val/knn_top1", "min").best(REPORT) == (key("mean_emb", "grid_stride-4"), 40.0)
    plain = {"val/knn_top1/mean_emb": 50.0, "val/knn_top1/centre": 60.0}
    assert Objective.of("val/knn_top1", "max").best(plain) == (key("centre"), 60.0)


def test_objective_copy_under_its_own_name_never_hides_the_winning_variant() -> None:
    """A report carries the objective under the spec's name too (trainable.with_objective); for a query
    naming a scheme that name reads like the base variant's key, and must not win the tie with the key it
    was copied from."""
    objective = Objective.of("val/knn_top1/mean_emb", "max")
    assert objective.best({**REPORT, "val/knn_top1/mean_emb": 55.0}) == (
        key("mean_emb", "grid_stride-7"),
        55.0,
    )


def test_objective_absent() -> None:
    assert Objective.of("val/knn_top1", "max").best({"epoch": 1.0, "train/loss": 2.0}) is None
    assert Objective.of("val/linear_top1/centre", "max").best(REPORT) is None
    assert Objective.of("val/knn_top1/mean", "max").best(REPORT) is None  # a prefix of a scheme is not it


def test_objective_never_reads_another_split() -> None:
    with pytest.raises(ValueError, match="only validation metrics may choose"):
        Objective.of("test/knn_top1/mean_emb", "max")


# --- the plan ----------------------------------------------------------------------------------------------


def test_dry_run_shows_enumerated_axes_and_saving(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "search_spaces" / "aggregation.yaml"
    spec, _ = load_spec(path)
    assert trial_count(spec) == 3
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "patch.size: grid [7, 14, 21] -> searched by grid" in out
    assert "eval.aggregation: choice" in out
    assert "eval.grid_stride: grid [4, 7] -> enumerated inside each trial (no retraining)" in out
    assert "evaluation variants per trial: grid_stride-4, grid_stride-7" in out
    assert "schemes probed per trial: centre, max_emb, mean_emb, mean_proj, multiscale, whole" in out
    assert "# trials: 3 " in out
    assert "would train 36 models instead of 3" in out

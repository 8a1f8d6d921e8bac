"""The metric-name contract: keys round-trip, queries match what they should, intervals are Wilson's, and
`expected_metrics` names what a config reports (the real run that reports exactly these is in test_train)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter

from bagssl_core.config import EvalConfig, LossConfig, TrainConfig
from bagssl_core.losses import LOSSES, build_loss, loss_parts
from bagssl_core.metrics import (
    EPOCH_METRICS,
    ProbeKey,
    ProbeQuery,
    expected_metrics,
    intervals_overlap,
    metric_names,
    probe_keys,
    wilson_interval,
    with_intervals,
)


@pytest.mark.parametrize(
    "name",
    [
        "val/knn_top1/mean_emb",
        "test/linear_top5/centre:grid_stride-4",
        "val/knn_top1_lo/max_emb",
        "val/knn_top1_hi/whole:patches-random:grid_stride-2",
    ],
)
def test_probe_key_round_trips(name: str) -> None:
    key = ProbeKey.parse(name)
    assert key is not None
    assert str(key) == name


@pytest.mark.parametrize(
    "name",
    [
        "train/loss",
        "epoch",
        "knn_top1/mean_emb",
        "val/knn_top1",
        "train/knn_top1/mean_emb",
        "val/svm_top1/mean_emb",
        "val/knn_top3/mean_emb",
    ],
)
def test_other_names_are_not_probe_keys(name: str) -> None:
    assert ProbeKey.parse(name) is None


def test_query_matches_schemes_and_variants_but_not_bounds_or_other_splits() -> None:
    q = ProbeQuery.parse("val/knn_top1")
    assert q is not None and q.scheme is None
    hits = [
        "val/knn_top1/mean_emb",
        "val/knn_top1/centre:grid_stride-4",
    ]
    misses = [
        "val/knn_top1_lo/mean_emb",
        "test/knn_top1/mean_emb",
        "val/knn_top5/mean_emb",
        "val/linear_top1/mean_emb",
    ]
    for name in hits:
        key = ProbeKey.parse(name)
        assert key is not None and q.matches(key), name
    for name in misses:
        key = ProbeKey.parse(name)
        assert key is not None and not q.matches(key), name
    scheme_q = ProbeQuery.parse("val/knn_top1/centre")
    assert scheme_q is not None and str(scheme_q) == "val/knn_top1/centre"
    assert not scheme_q.matches(ProbeKey("val", "knn", "top1", "mean_emb"))
    assert ProbeQuery.parse("val/knn_top1/centre:grid_stride-4") is None
    assert ProbeQuery.parse("val/knn_top1_lo") is None


def test_best_picks_the_extreme_value_with_its_key() -> None:
    metrics = {
        "val/knn_top1/mean_emb": 60.0,
        "val/knn_top1/centre:grid_stride-4": 62.5,
        "val/knn_top1_hi/mean_emb": 99.0,
        "test/knn_top1/mean_emb": 90.0,
        "train/loss": 1000.0,
    }
    q = ProbeQuery("val", "knn", "top1")
    best = q.best(metrics)
    assert best is not None
    key, value = best
    assert (str(key), value) == ("val/knn_top1/centre:grid_stride-4", 62.5)
    worst = q.best(metrics, mode="min")
    assert worst is not None and worst[1] == 60.0
    assert ProbeQuery("val", "linear", "top1").best(metrics) is None


def test_probe_keys_cover_every_probe_stat_scheme_and_bound() -> None:
    keys = probe_keys("val", ["knn", "linear"], ["mean_emb", "centre"], variant="v-1")
    assert len(keys) == 2 * 2 * 2 * 3
    assert len(set(keys)) == len(keys)
    assert all(k.variant == "v-1" and k.split == "val" for k in keys)


def test_wilson_interval_matches_the_formula_and_known_values() -> None:
    # Wilson 95% for 58% of 256 images, computed by hand from the closed form.
    lo, hi = wilson_interval(58.0, 256)
    z = 1.959963984540054
    p, n = 0.58, 256
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert lo == pytest.approx(100 * (centre - half))
    assert hi == pytest.approx(100 * (centre + half))
    assert hi - lo == pytest.approx(12.0, abs=0.3)  # about ±6 points: a 1.6-point gap is noise
    # Edges stay inside [0, 100] and are not degenerate.
    lo0, hi0 = wilson_interval(0.0, 10)
    assert lo0 == 0.0 and 0 < hi0 < 35
    lo1, hi1 = wilson_interval(100.0, 10)
    assert hi1 == pytest.approx(100.0) and 65 < lo1 < 100
    with pytest.raises(ValueError, match="n: expected a positive"):
        wilson_interval(50.0, 0)


@pytest.mark.parametrize("n", [7, 9, 10, 37, 256, 1000])
def test_wilson_interval_holds_its_point_at_zero_and_full_accuracy(n: int) -> None:
    # The closed form misses p = 0 and p = 1 by a rounding error (2.8e-15 above 0 at n = 7), and the
    # report's error bars (value - low) then come out negative, which matplotlib refuses.
    for acc in (0.0, 100.0, 100.0 * (n - 1) / n, 100.0 / n):
        lo, hi = wilson_interval(acc, n)
        assert lo <= acc <= hi


def test_intervals_overlap() -> None:
    assert intervals_overlap((50, 60), (59, 70))
    assert not intervals_overlap((50, 60), (61, 70))


def test_with_intervals_puts_the_wilson_bounds_beside_each_accuracy() -> None:
    key = ProbeKey("val", "knn", "top1", "mean_emb")
    out = with_intervals({key: 58.0}, 256)
    assert list(out) == [key, key.with_bound("lo"), key.with_bound("hi")]
    assert (out[key.with_bound("lo")], out[key.with_bound("hi")]) == wilson_interval(58.0, 256)


def test_metric_names_are_the_keys_string_forms() -> None:
    key = ProbeKey("test", "linear", "top5", "centre", "grid_stride-4")
    assert metric_names({key: 1, "lr": 0.5}) == {"test/linear_top5/centre:grid_stride-4": 1.0, "lr": 0.5}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_returns_the_parts_it_names(name: str) -> None:
    z = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(0))
    cfg = TypeAdapter(LossConfig).validate_python({"name": name, "gather_distributed": False})
    assert tuple(build_loss(cfg)(z).parts) == loss_parts(name)


def test_expected_metrics_of_a_config() -> None:
    cfg = TrainConfig.model_validate(
        {"loss": {"name": "tcr"}, "eval": {"aggregation": ["mean_emb", "centre"]}}
    )
    per_epoch, at_end = expected_metrics(cfg)
    assert set(EPOCH_METRICS) | {"train/coding_rate", "train/similarity", "val/n_images"} <= per_epoch
    assert "train/invariance" not in per_epoch
    val = set(map(str, probe_keys("val", ["knn", "linear"], ["mean_emb", "centre"])))
    assert len(val) == 2 * 2 * 2 * 3 and val <= per_epoch
    assert at_end == {str(k.in_split("test")) for k in map(ProbeKey.parse, val) if k} | {"test/n_images"}
    assert not any(name.startswith("test/") for name in per_epoch)

    variants = {"": cfg.eval, "small": EvalConfig(aggregation=["whole"], probes=["knn"])}
    with_variant = expected_metrics(cfg, variants)
    assert with_variant.per_epoch - per_epoch == {
        "val/knn_top1/whole:small",
        "val/knn_top1_lo/whole:small",
        "val/knn_top1_hi/whole:small",
        "val/knn_top5/whole:small",
        "val/knn_top5_lo/whole:small",
        "val/knn_top5_hi/whole:small",
    }
    assert len(with_variant.at_end - at_end) == 6


def test_baseline_names_round_trip_and_reject_other_names() -> None:
    from bagssl_core.metrics import baseline_name, parse_baseline

    key = ProbeKey("val", "knn", "top1", "pixels")
    name = baseline_name("raw_pixels", key)
    assert name == "baseline/raw_pixels/val/knn_top1/pixels"
    assert parse_baseline(name) == ("raw_pixels", key)
    assert parse_baseline(str(key)) is None
    assert parse_baseline("baseline/raw_pixels/lr") is None
    with pytest.raises(ValueError, match="baseline"):
        baseline_name("a/b", key)

"""kNN and linear probes on frozen features: real digits, a float64 reference, chunking, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from bagssl_core.config import EvalConfig
from bagssl_core.metrics import ProbeKey, format_probe_table, probe_keys, wilson_interval
from bagssl_core.probes import knn_classify, linear_probe, run_probes


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1,797 real 8x8 digits as raw 64-pixel features, split 1,200 train / 597 test by a seeded shuffle."""
    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(x, dtype=torch.float32)[perm]
    y = torch.as_tensor(y, dtype=torch.long)[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def clustered(
    seed: int, num_train: int = 120, num_test: int = 45, dim: int = 16, num_classes: int = 7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random class centres: accuracies well between chance and 100%."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen)
    ytr = torch.randint(0, num_classes, (num_train,), generator=gen)
    yte = torch.randint(0, num_classes, (num_test,), generator=gen)
    xtr = centres[ytr] + 1.5 * torch.randn(num_train, dim, generator=gen)
    xte = centres[yte] + 1.5 * torch.randn(num_test, dim, generator=gen)
    return xtr, ytr, xte, yte


def reference_knn_ranking(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, num_classes: int, k: int, temperature: float
) -> np.ndarray:
    """DINO's eval_knn re-written one test sample at a time in float64: (Nte, C) classes, best first.

    Ties between class votes rank the lower class index first (stable sort), the documented convention.
    """
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    rankings = []
    for row in test:
        sims = train @ row
        votes = np.zeros(num_classes)
        for j in np.argsort(-sims, kind="stable")[:k]:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        rankings.append(np.argsort(-votes, kind="stable"))
    return np.stack(rankings)


def test_knn_on_real_digits(digits):
    xtr, ytr, xte, yte = digits
    result = knn_classify(xtr, ytr, xte, yte, num_classes=10)
    assert result["top1"] > 90.0
    assert result["top5"] >= result["top1"]


def test_linear_probe_on_real_digits(digits):
    xtr, ytr, xte, yte = digits
    result = linear_probe(xtr, ytr, xte, yte, num_classes=10)
    assert result["top1"] > 90.0
    assert result["top5"] >= result["top1"]


@pytest.mark.parametrize(
    ("seed", "k", "temperature"), [(0, 20, 0.07), (1, 5, 0.5), (2, 1, 0.1), (3, 60, 0.07)]
)
def test_knn_matches_float64_reference(seed, k, temperature):
    xtr, ytr, xte, yte = clustered(seed)
    ranking = reference_knn_ranking(
        xtr.double().numpy(), ytr.numpy(), xte.double().numpy(), 7, k, temperature
    )
    # Labelling each test sample with the reference's prediction must score 100%: identical predictions.
    same = knn_classify(xtr, ytr, xte, torch.as_tensor(ranking[:, 0]), 7, k=k, temperature=temperature)
    assert same["top1"] == 100.0
    result = knn_classify(xtr, ytr, xte, yte, 7, k=k, temperature=temperature)
    expected_top1 = 100.0 * np.mean(ranking[:, 0] == yte.numpy())
    expected_top5 = 100.0 * np.mean((ranking[:, :5] == yte.numpy()[:, None]).any(axis=1))
    assert result["top1"] == pytest.approx(expected_top1)
    assert result["top5"] == pytest.approx(expected_top5)
    assert 100.0 / 7 < result["top1"] < 100.0


def test_knn_chunking_invariance():
    xtr, ytr, xte, yte = clustered(4, num_test=101)
    one_chunk = knn_classify(xtr, ytr, xte, yte, 7, chunk_size=10**9)
    assert knn_classify(xtr, ytr, xte, yte, 7, chunk_size=1) == one_chunk
    assert knn_classify(xtr, ytr, xte, yte, 7, chunk_size=17) == one_chunk
    # A byte budget below one row still makes progress, one test row at a time.
    assert knn_classify(xtr, ytr, xte, yte, 7, max_bytes=1) == one_chunk


def test_knn_clamps_k_to_train_size():
    xtr, ytr, xte, yte = clustered(5, num_train=6)
    assert knn_classify(xtr, ytr, xte, yte, 7, k=50) == knn_classify(xtr, ytr, xte, yte, 7, k=6)


def test_top5_clamps_to_num_classes():
    xtr, ytr, xte, yte = clustered(6, num_classes=3)
    for result in (knn_classify(xtr, ytr, xte, yte, 3), linear_probe(xtr, ytr, xte, yte, 3, epochs=2)):
        assert result["top5"] == 100.0
        assert result["top1"] <= result["top5"]


def test_top5_at_least_top1():
    xtr, ytr, xte, yte = clustered(7, num_classes=10)
    for result in (knn_classify(xtr, ytr, xte, yte, 10), linear_probe(xtr, ytr, xte, yte, 10, epochs=3)):
        assert result["top1"] <= result["top5"] <= 100.0


def test_linear_probe_deterministic_and_leaves_global_rng_alone():
    xtr, ytr, xte, yte = clustered(8, num_train=300, num_test=200, num_classes=10)
    rng_before = torch.get_rng_state()
    first = linear_probe(xtr, ytr, xte, yte, 10, epochs=3, batch_size=32, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert linear_probe(xtr, ytr, xte, yte, 10, epochs=3, batch_size=32, seed=3) == first


def test_linear_probe_under_inference_mode():
    # The training loop extracts features and probes them with autograd off; the probe must still train.
    xtr, ytr, xte, yte = clustered(9)
    expected = linear_probe(xtr, ytr, xte, yte, 7, epochs=2)
    with torch.inference_mode():
        frozen = [t.clone() for t in (xtr, ytr, xte, yte)]
        assert linear_probe(*frozen, 7, epochs=2) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "width",
        "labels",
        "range",
        "nan",
    ],
)
def test_bad_inputs_raise(bad):
    xtr, ytr, xte, yte = clustered(10)
    if bad == "width":
        xte = xte[:, :8]
    elif bad == "labels":
        ytr = ytr[:-1]
    elif bad == "range":
        yte = yte + 7
    else:
        xtr = xtr.clone()
        xtr[3, 2] = float("nan")
    for probe in (knn_classify, linear_probe):
        with pytest.raises(ValueError):
            probe(xtr, ytr, xte, yte, 7)


def test_run_probes_keys_every_split_scheme_and_probe_with_intervals():
    xtr, ytr, xte, yte = clustered(11)
    xva, yva = xte[:20], yte[:20]
    train = {"mean_emb": xtr, "max_emb": xtr.abs()}
    evals = {
        "val": ({"mean_emb": xva, "max_emb": xva.abs()}, yva),
        "test": ({"mean_emb": xte, "max_emb": xte.abs()}, yte),
    }
    cfg = EvalConfig(aggregation=["mean_emb", "max_emb"], knn_k=7, knn_temperature=0.2, linear_epochs=2)
    metrics = run_probes(train, ytr, evals, 7, cfg, seed=1, variant="v")
    schemes = ["mean_emb", "max_emb"]
    assert set(metrics) == set(probe_keys("val", ["knn", "linear"], schemes, "v")) | set(
        probe_keys("test", ["knn", "linear"], schemes, "v")
    )
    # Each split scores the probe fitted on the training features, as if probed alone.
    knn = knn_classify(xtr, ytr, xte, yte, 7, k=7, temperature=0.2)
    assert metrics[ProbeKey("test", "knn", "top1", "mean_emb", "v")] == knn["top1"]
    linear = linear_probe(xtr.abs(), ytr, xva.abs(), yva, 7, epochs=2, seed=1)
    top5 = ProbeKey("val", "linear", "top5", "max_emb", "v")
    assert metrics[top5] == linear["top5"]
    assert (metrics[top5.with_bound("lo")], metrics[top5.with_bound("hi")]) == wilson_interval(
        linear["top5"], 20
    )
    test_top5 = top5.in_split("test")
    assert metrics[test_top5] == linear_probe(xtr.abs(), ytr, xte.abs(), yte, 7, epochs=2, seed=1)["top5"]
    assert metrics[test_top5.with_bound("hi")] - metrics[test_top5.with_bound("lo")] < (
        metrics[top5.with_bound("hi")] - metrics[top5.with_bound("lo")]
    )  # 45 test images pin the accuracy down more than 20 validation images

    # kNN on a device named apart from the features' (the GPU in training) scores the same.
    assert run_probes(train, ytr, evals, 7, cfg, seed=1, variant="v", knn_device="cpu") == metrics

    knn_only = run_probes(
        train, ytr, {"val": evals["val"]}, 7, cfg.model_copy(update={"probes": ["knn"]}), seed=1
    )
    assert set(knn_only) == set(probe_keys("val", ["knn"], schemes))


def test_format_probe_table_shows_val_and_test_side_by_side_with_intervals():
    metrics = {
        "train/loss": 1.5,
        "epoch": 3.0,
        "val/n_images": 400,
        "test/n_images": 1000,
        "val/knn_top1/mean_emb": 62.5,
        "val/knn_top1_lo/mean_emb": 57.66,
        "val/knn_top1_hi/mean_emb": 67.11,
        "test/knn_top1/mean_emb": 61.234,
        "test/knn_top1_lo/mean_emb": 58.2,
        "test/knn_top1_hi/mean_emb": 64.2,
        "val/linear_top5/centre": 100.0,
        "test/linear_top5/centre": 99.0,
    }
    lines = format_probe_table(metrics).splitlines()
    assert lines[0].split() == ["scheme", "probe", "stat", "val", "(n=400)", "test", "(n=1000)"]
    assert lines[1].split() == [
        "mean_emb",
        "knn",
        "top1",
        "62.50",
        "[57.7,",
        "67.1]",
        "61.23",
        "[58.2,",
        "64.2]",
    ]
    assert lines[2].split() == ["centre", "linear", "top5", "100.00", "99.00"]
    # Right-aligned: every value column ends where its header ends.
    assert len({len(line) for line in lines}) == 1
    assert "loss" not in "\n".join(lines) and "epoch" not in "\n".join(lines)

    val_only = format_probe_table({"val/knn_top1/whole": 12.0, "val/knn_top1/whole:grid_stride-4": 14.0})
    assert [line.split() for line in val_only.splitlines()] == [
        ["scheme", "variant", "probe", "stat", "val"],
        ["whole", "base", "knn", "top1", "12.00"],
        ["whole", "grid_stride-4", "knn", "top1", "14.00"],
    ]
    assert format_probe_table({"train/loss": 1.0, "knn_top1/mean_emb": 50.0}) == ""

"""kNN and linear probes on frozen features: real digits, a float64 reference, chunking, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from bagssl_core.config import EvalConfig
from bagssl_core.probes import format_probe_table, knn_classify, linear_probe, run_probes


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


def test_run_probes_names_every_scheme_and_probe():
    xtr, ytr, xte, yte = clustered(11)
    features = {"mean_emb": (xtr, xte), "max_emb": (xtr.abs(), xte.abs())}
    cfg = EvalConfig(aggregation=["mean_emb", "max_emb"], knn_k=7, knn_temperature=0.2, linear_epochs=2)
    metrics = run_probes(features, ytr, yte, 7, cfg, seed=1)
    assert set(metrics) == {
        f"{probe}_{top}/{scheme}"
        for probe in ("knn", "linear")
        for top in ("top1", "top5")
        for scheme in ("mean_emb", "max_emb")
    }
    knn = knn_classify(xtr, ytr, xte, yte, 7, k=7, temperature=0.2)
    assert metrics["knn_top1/mean_emb"] == knn["top1"]
    linear = linear_probe(xtr.abs(), ytr, xte.abs(), yte, 7, epochs=2, seed=1)
    assert metrics["linear_top5/max_emb"] == linear["top5"]

    knn_only = run_probes(features, ytr, yte, 7, cfg.model_copy(update={"probes": ["knn"]}), seed=1)
    assert set(knn_only) == {"knn_top1/mean_emb", "knn_top5/mean_emb", "knn_top1/max_emb", "knn_top5/max_emb"}


def test_format_probe_table():
    metrics = {
        "loss/total": 1.5,
        "epoch": 3.0,
        "knn_top1/mean_emb": 91.234,
        "knn_top5/mean_emb": 99.5,
        "linear_top1/mean_emb": 93.0,
        "linear_top5/mean_emb": 100.0,
        "knn_top1/centre": 7.0,
        "knn_top5/centre": 50.0,
        "linear_top1/centre": 8.125,
        "linear_top5/centre": 51.0,
    }
    lines = format_probe_table(metrics).splitlines()
    assert lines[0].split() == ["scheme", "knn_top1", "knn_top5", "linear_top1", "linear_top5"]
    assert lines[1].split() == ["mean_emb", "91.23", "99.50", "93.00", "100.00"]
    assert lines[2].split() == ["centre", "7.00", "50.00", "8.12", "51.00"]
    # Right-aligned: every value ends where its header ends.
    assert len({len(line) for line in lines}) == 1
    assert lines[2].endswith(" 51.00") and lines[1].endswith("100.00")
    assert "loss" not in "\n".join(lines)

    knn_only = format_probe_table({"knn_top1/whole": 12.0, "knn_top5/whole": 40.0})
    assert knn_only.splitlines()[0].split() == ["scheme", "knn_top1", "knn_top5"]
    assert format_probe_table({"loss/total": 1.0}) == ""

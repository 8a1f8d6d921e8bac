"""Probes on frozen, precomputed features: weighted kNN and a linear classifier.

Both take feature matrices already extracted by the backbone (and aggregated by a scheme), so one pass of
the backbone serves every scheme and every probe. Pure torch: the work runs on the device of the
training features; test features and labels are moved there chunk by chunk.

Ranking convention shared by both probes: classes are ordered by descending score with a stable sort, so
tied scores rank the lower class index first. Top-5 is clamped to top-`num_classes` when there are fewer
than five classes.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from bagssl_core.config import EvalConfig

logger = logging.getLogger(__name__)

# Default budget for one (test chunk x train) similarity matrix: 50k train features keep ~1.3k test rows.
KNN_MAX_BYTES = 256 * 2**20
# Test rows scored at once by the linear probe: (rows x num_classes) logits stay small.
_LINEAR_EVAL_ROWS = 8192
_TABLE_COLUMNS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")


def _check_inputs(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(
            f"expected 2-D features (N, D), got train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"feature widths differ: train D={train_feats.shape[1]}, test D={test_feats.shape[1]}"
        )
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise ValueError(
            f"expected labels (N,) matching the features, got train {tuple(train_labels.shape)} for "
            f"{train_feats.shape[0]} features, test {tuple(test_labels.shape)} for {test_feats.shape[0]}"
        )
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("expected at least one training and one test feature")
    if num_classes < 1:
        raise ValueError(f"expected num_classes >= 1, got {num_classes}")
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
            )
    # A diverged backbone yields NaN features; a probe on them would report a meaningless accuracy.
    for name, feats in (("train", train_feats), ("test", test_feats)):
        if not bool(torch.isfinite(feats).all()):
            raise ValueError(f"{name} features contain non-finite values")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 features (autocast) are scored in fp32; fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


def _count_topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """How many rows rank their target within the top k, for each k.

    Args:
        scores: (n, C) class scores, higher is better.
        targets: (n,) class indices.
        ks: each k in [1, C].
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : max(ks)]
    hits = order.eq(targets[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
    max_bytes: int = KNN_MAX_BYTES,
) -> dict[str, float]:
    """Weighted kNN on cosine similarity, as InstDisc / DINO's `eval_knn`.

    Features are L2-normalised; each test feature takes its k most similar training features, each
    neighbour votes for its class with weight exp(similarity / temperature), and classes are ranked by
    their summed votes. Test features are processed in chunks so the (chunk, Ntr) similarity matrix
    stays within `max_bytes`.

    Args:
        train_feats: (Ntr, D) training features; the computation runs on their device.
        train_labels: (Ntr,) integer labels in [0, num_classes).
        test_feats: (Nte, D) test features.
        test_labels: (Nte,) integer labels in [0, num_classes).
        num_classes: number of classes C.
        k: neighbours per test feature; clamped to Ntr.
        temperature: T in exp(sim / T).
        chunk_size: test rows per chunk; None derives it from `max_bytes`.
        max_bytes: budget for one similarity chunk when `chunk_size` is None.

    Returns:
        {"top1": %, "top5": %}, top-5 meaning top-min(5, C).
    """
    _check_inputs(train_feats, train_labels, test_feats, test_labels, num_classes)
    if k < 1:
        raise ValueError(f"expected k >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"expected temperature > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"expected chunk_size >= 1, got {chunk_size}")

    device = train_feats.device
    dtype = _compute_dtype(train_feats.dtype)
    num_train, num_test = train_feats.shape[0], test_feats.shape[0]
    k = min(k, num_train)
    top5 = min(5, num_classes)
    if chunk_size is None:
        bytes_per_row = num_train * torch.empty((), dtype=dtype).element_size()
        chunk_size = max(1, max_bytes // bytes_per_row)
    logger.debug(
        "kNN: %d test x %d train features, k=%d, %d test rows per chunk", num_test, num_train, k, chunk_size
    )

    train = F.normalize(train_feats.to(dtype), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    correct1 = correct5 = 0
    for start in range(0, num_test, chunk_size):
        chunk = F.normalize(test_feats[start : start + chunk_size].to(device=device, dtype=dtype), dim=1)
        targets = test_labels[start : start + chunk_size].to(device=device, dtype=torch.long)
        sims, idx = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes, device=device, dtype=dtype)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        c1, c5 = _count_topk_correct(votes, targets, (1, top5))
        correct1 += c1
        correct5 += c5
    return {"top1": 100.0 * correct1 / num_test, "top5": 100.0 * correct5 / num_test}


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train one linear layer on frozen features with cross-entropy, then score the test features.

    Features are standardised with the training mean and std (computed once; dimensions that are
    constant on the training set are only centred). The layer (weights N(0, 0.01^2), zero bias, as in
    DINO's linear eval) is trained with SGD, momentum 0.9, and a per-step cosine schedule from `lr`
    to 0 over all `epochs`; mini-batches are reshuffled every epoch. All randomness comes from a
    generator seeded with `seed`, so the result is deterministic and the global RNG is left untouched
    (a probe run mid-training must not change the training's random stream). Runs with gradients on
    even when called under `torch.no_grad()` or `torch.inference_mode()`.

    Args:
        train_feats: (Ntr, D) training features; the computation runs on their device.
        train_labels: (Ntr,) integer labels in [0, num_classes).
        test_feats: (Nte, D) test features.
        test_labels: (Nte,) integer labels in [0, num_classes).
        num_classes: number of classes C.
        epochs: passes over the training features.
        lr: peak learning rate.
        batch_size: training features per step (the last batch of an epoch may be smaller).
        weight_decay: SGD L2 penalty.
        seed: seeds initialisation and shuffling.

    Returns:
        {"top1": %, "top5": %}, top-5 meaning top-min(5, C).
    """
    _check_inputs(train_feats, train_labels, test_feats, test_labels, num_classes)
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"expected epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0; "
            f"got {epochs}, {batch_size}, {lr}, {weight_decay}"
        )
    device = train_feats.device
    dtype = _compute_dtype(train_feats.dtype)
    num_train, dim = train_feats.shape
    steps_per_epoch = math.ceil(num_train / batch_size)
    total_steps = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)

    with torch.inference_mode(False), torch.enable_grad():
        x = train_feats.to(dtype)
        std, mean = torch.std_mean(x, dim=0, correction=0)
        # Constant dimensions (e.g. always-black pixels) would divide a non-zero test value by ~0.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        x = (x - mean) / std
        y = train_labels.to(device=device, dtype=torch.long)

        linear = torch.nn.utils.skip_init(torch.nn.Linear, dim, num_classes, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(num_classes, dim, generator=gen, dtype=dtype) * 0.01)
            linear.bias.zero_()
        opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        lrs = [0.5 * lr * (1 + math.cos(math.pi * t / total_steps)) for t in range(total_steps)]

        step = 0
        for _ in range(epochs):
            perm = torch.randperm(num_train, generator=gen).to(device)
            for start in range(0, num_train, batch_size):
                idx = perm[start : start + batch_size]
                for group in opt.param_groups:
                    group["lr"] = lrs[step]
                loss = F.cross_entropy(linear(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        logger.debug("linear probe: %d steps, final batch loss %.4f", total_steps, float(loss.detach()))

    top5 = min(5, num_classes)
    correct1 = correct5 = 0
    with torch.no_grad():
        for start in range(0, test_feats.shape[0], _LINEAR_EVAL_ROWS):
            chunk = (
                test_feats[start : start + _LINEAR_EVAL_ROWS].to(device=device, dtype=dtype) - mean
            ) / std
            targets = test_labels[start : start + _LINEAR_EVAL_ROWS].to(device=device, dtype=torch.long)
            c1, c5 = _count_topk_correct(linear(chunk), targets, (1, top5))
            correct1 += c1
            correct5 += c5
    num_test = test_feats.shape[0]
    return {"top1": 100.0 * correct1 / num_test, "top5": 100.0 * correct5 / num_test}


def run_probes(
    features: dict[str, tuple[torch.Tensor, torch.Tensor]],
    train_labels: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    eval_cfg: EvalConfig,
    seed: int,
) -> dict[str, float]:
    """Run every probe of `eval_cfg.probes` on every aggregation scheme's features.

    Args:
        features: scheme name -> ((Ntr, D) train features, (Nte, D) test features).
        train_labels: (Ntr,) integer labels.
        test_labels: (Nte,) integer labels.
        num_classes: number of classes C.
        eval_cfg: knn_k, knn_temperature, linear_epochs, linear_lr, linear_batch_size and the probe list.
        seed: seeds the linear probe.

    Returns:
        `{probe}_top1/{scheme}` and `{probe}_top5/{scheme}` in percent, e.g. "knn_top1/mean_emb".
    """
    metrics: dict[str, float] = {}
    for scheme, (train_feats, test_feats) in features.items():
        for probe in eval_cfg.probes:
            began = time.perf_counter()
            if probe == "knn":
                result = knn_classify(
                    train_feats,
                    train_labels,
                    test_feats,
                    test_labels,
                    num_classes,
                    k=eval_cfg.knn_k,
                    temperature=eval_cfg.knn_temperature,
                )
            else:
                result = linear_probe(
                    train_feats,
                    train_labels,
                    test_feats,
                    test_labels,
                    num_classes,
                    epochs=eval_cfg.linear_epochs,
                    lr=eval_cfg.linear_lr,
                    batch_size=eval_cfg.linear_batch_size,
                    seed=seed,
                )
            logger.info(
                "%s probe on %s: top1 %.2f%%, top5 %.2f%% (%.1f s)",
                probe,
                scheme,
                result["top1"],
                result["top5"],
                time.perf_counter() - began,
            )
            for name, value in result.items():
                metrics[f"{probe}_{name}/{scheme}"] = value
    return metrics


def format_probe_table(metrics: dict[str, float]) -> str:
    """A plain-text table of probe metrics: one row per scheme, two decimals, right-aligned.

    Only `knn_top1`, `knn_top5`, `linear_top1`, `linear_top5` columns that occur are shown; other
    metrics (losses, epoch, ...) are ignored and a missing cell reads "-". Rows keep the order in which
    schemes first appear.

    Args:
        metrics: names like "knn_top1/mean_emb" -> percent, as returned by `run_probes`.

    Returns:
        The table, lines joined by newlines without a trailing one; "" when no probe metric is present.
    """
    cells: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        column, sep, scheme = key.partition("/")
        if sep and scheme and column in _TABLE_COLUMNS:
            cells.setdefault(scheme, {})[column] = value
    if not cells:
        return ""
    columns = [c for c in _TABLE_COLUMNS if any(c in row for row in cells.values())]
    rows = [
        [scheme] + [f"{row[c]:.2f}" if c in row else "-" for c in columns] for scheme, row in cells.items()
    ]
    header = ["scheme", *columns]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(
            [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        )

    return "\n".join(render(line) for line in [header, *rows])

"""The bag curve: kNN accuracy against the number of patch embeddings averaged into an image's representation.

Each image's evaluation grid (`eval.grid_size`, `eval.grid_stride`: the grid `mean_emb` reads) is put in a
seeded random order, fixed per image; with n patches its representation is the mean of the first n. The
subsets are nested (the n = 4 bag holds the n = 2 bag), so the curve moves only by what the extra patches
add, and its last point (every grid patch) is the `mean_emb` representation. Bank (training) and query
(validation) images are represented alike, with the same n.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from bagssl_core.analyses.common import (
    BANK_ORDER,
    BANK_SUBSET,
    VAL_ORDER,
    AnalysisInputs,
    batches,
    embed,
    scored_images,
    seeded_subset,
)
from bagssl_core.crops import grid_boxes, grid_patches
from bagssl_core.data import ImageData
from bagssl_core.metrics import AnalysisKey, bag_curve_key, bag_sizes, with_analysis_interval
from bagssl_core.probes import knn_classify


def nested_means(h: torch.Tensor, order: torch.Tensor, sizes: list[int]) -> dict[int, torch.Tensor]:
    """For each n, the mean of the first n patch embeddings of each image in its `order`.

    Args:
        h: (B, G, D) patch embeddings.
        order: (B, G) a permutation of range(G) per image.

    Returns:
        n -> (B, D).
    """
    ordered = h.gather(1, order[..., None].expand_as(h))
    sums = ordered.cumsum(1)
    return {n: sums[:, n - 1] / n for n in sizes}


def knn_curve(
    bank: dict[int, torch.Tensor],
    bank_labels: torch.Tensor,
    val: dict[int, torch.Tensor],
    val_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> dict[int, float]:
    """n -> kNN top-1 (%) of `val[n]` against the bank `bank[n]`: both sides represented with n patches."""
    return {
        n: knn_classify(bank[n], bank_labels, val[n], val_labels, num_classes, k, temperature)["top1"]
        for n in bank
    }


@dataclass
class BagCurve:
    sizes: list[int]  # the bag sizes n
    top1: dict[int, float]  # n -> kNN top-1 (%) on the validation images
    n_val: int
    n_bank: int
    grid: int  # grid patches per image
    patch_px: int

    def metrics(self) -> dict[AnalysisKey, float]:
        out: dict[AnalysisKey, float] = {}
        for n in self.sizes:
            out.update(with_analysis_interval(bag_curve_key(n), self.top1[n], self.n_val))
        out[AnalysisKey("bag_curve", "n_images")] = self.n_val
        out[AnalysisKey("bag_curve", "bank_images")] = self.n_bank
        return out

    def summary(self) -> list[str]:
        m = self.metrics()
        lines = [
            f"bag curve: kNN top-1 on {self.n_val} val images against patches averaged "
            f"({self.patch_px}-px grid of {self.grid}; bank: {self.n_bank} train images)"
        ]
        for n in self.sizes:
            lo, hi = m[bag_curve_key(n, "lo")], m[bag_curve_key(n, "hi")]
            lines.append(f"  n={n:<4d} {self.top1[n]:6.2f} [{lo:.1f}, {hi:.1f}]")
        return lines

    def plot(self, path: Path) -> None:
        m = self.metrics()
        acc = [self.top1[n] for n in self.sizes]
        err = [
            [a - m[bag_curve_key(n, "lo")] for n, a in zip(self.sizes, acc, strict=True)],
            [m[bag_curve_key(n, "hi")] - a for n, a in zip(self.sizes, acc, strict=True)],
        ]
        fig = Figure(figsize=(5, 3.6), layout="constrained")
        ax = fig.add_subplot()
        ax.errorbar(self.sizes, acc, yerr=err, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(self.sizes, [str(n) for n in self.sizes])
        ax.set_xlabel(f"patch embeddings averaged (of {self.grid} grid patches, {self.patch_px} px)")
        ax.set_ylabel("kNN top-1 on val (%)")
        ax.set_title(f"Bag curve ({self.n_val} val images, 95% intervals)", fontsize=10)
        ax.grid(alpha=0.3)
        fig.savefig(path, dpi=120)


def _curve_features(
    inputs: AnalysisInputs, data: ImageData, indices: torch.Tensor, sizes: list[int], order_seed: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """n -> (K, D) nested-mean features of the images at `indices`, and their labels; batch by batch, so only
    (K, len(sizes), D) is ever held."""
    cfg = inputs.cfg
    grid = sizes[-1]
    # Drawn for all images at once, so an image's order does not depend on the batch size.
    orders = torch.rand(len(indices), grid, generator=torch.Generator().manual_seed(order_seed)).argsort(1)
    feats: dict[int, list[torch.Tensor]] = {n: [] for n in sizes}
    labels = []
    done = 0
    for images, y in batches(data, indices, cfg.eval.batch_size):
        x = grid_patches(images.to(inputs.device), cfg.eval_patch_px, cfg.eval_stride, cfg.input_size)
        h = embed(inputs, x)
        for n, mean in nested_means(h, orders[done : done + len(y)], sizes).items():
            feats[n].append(mean)
        labels.append(y)
        done += len(y)
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)


def bag_curve(inputs: AnalysisInputs) -> BagCurve:
    """kNN top-1 (the run's eval.knn_k and eval.knn_temperature) of validation images against the bank of
    training images, both represented by the mean of n of their grid patch embeddings, for each n of
    `bag_sizes`; eval.analysis.val_images and eval.analysis.bank_images cap the two sets (seeded)."""
    cfg, seed = inputs.cfg, inputs.cfg.run.seed
    grid = len(grid_boxes(cfg.image_size, cfg.eval_patch_px, cfg.eval_stride))
    sizes = bag_sizes(grid)
    val_idx = scored_images(inputs)
    bank_idx = seeded_subset(len(inputs.train_data), cfg.eval.analysis.bank_images, seed + BANK_SUBSET)
    bank, bank_labels = _curve_features(inputs, inputs.train_data, bank_idx, sizes, seed + BANK_ORDER)
    val, val_labels = _curve_features(inputs, inputs.val_data, val_idx, sizes, seed + VAL_ORDER)
    classes = inputs.train_data.num_classes
    top1 = knn_curve(bank, bank_labels, val, val_labels, classes, cfg.eval.knn_k, cfg.eval.knn_temperature)
    return BagCurve(sizes, top1, len(val_idx), len(bank_idx), grid, cfg.eval_patch_px)

"""Locality: which training patches a patch's embedding is closest to, and what one patch says of its image.

The search set is a seeded random subset of eval.analysis.train_patches (image, position) pairs among
every training image's evaluation grid (`eval.grid_size`, `eval.grid_stride`), each patch carrying its
image's label. Similarity is the cosine of backbone embeddings h.

- The figure: a fixed seeded set of eval.analysis.queries validation patches, each followed by its
  eval.analysis.neighbours nearest training patches, drawn from the images' own pixels (not normalised).
- Patch-level kNN: every grid patch of every scored validation image predicts its image's label from
  its own neighbours alone (the run's eval.knn_k and eval.knn_temperature), and the accuracy is averaged
  over all those patches. Its 95% interval counts the validation images, not the patches: the patches of
  one image are not independent draws, so n = images is the conservative choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from bagssl_core.analyses.common import (
    BANK_PATCHES,
    QUERIES,
    AnalysisInputs,
    batches,
    embed,
    scored_images,
    seeded_subset,
)
from bagssl_core.crops import crop_patches, grid_boxes, grid_patches
from bagssl_core.data import ImageData
from bagssl_core.metrics import AnalysisKey, with_analysis_interval
from bagssl_core.probes import knn_classify

PATCH_KNN = AnalysisKey("locality", "patch_knn_top1")


@dataclass
class PatchRef:
    """A patch: the image it comes from (an index into its split) and its grid position."""

    image: int
    position: int


@dataclass
class Locality:
    top1: float  # patch-level kNN top-1 (%)
    n_val: int  # validation images scored
    n_val_patches: int
    n_bank: int  # training patches searched
    n_bank_total: int  # training grid patches there are
    queries: list[PatchRef]  # into the validation split
    neighbours: list[list[PatchRef]]  # per query, nearest first, into the training split
    similarities: torch.Tensor  # (queries, neighbours) cosine
    neighbour_labels: torch.Tensor  # (queries, neighbours)
    query_labels: torch.Tensor  # (queries,)
    pixels: tuple[torch.Tensor, torch.Tensor]  # uint8 (Q, C, p, p) queries, (Q, K, C, p, p) neighbours
    patch_px: int

    def metrics(self) -> dict[AnalysisKey, float]:
        out = with_analysis_interval(PATCH_KNN, self.top1, self.n_val)
        out[AnalysisKey("locality", "n_images")] = self.n_val
        out[AnalysisKey("locality", "n_patches")] = self.n_val_patches
        out[AnalysisKey("locality", "bank_patches")] = self.n_bank
        return out

    def summary(self) -> list[str]:
        m = self.metrics()
        lo, hi = m[PATCH_KNN.with_bound("lo")], m[PATCH_KNN.with_bound("hi")]
        same = float((self.neighbour_labels == self.query_labels[:, None]).float().mean() * 100)
        return [
            f"locality: {self.n_bank} of {self.n_bank_total} training {self.patch_px}-px grid patches searched",
            f"  patch-level kNN top-1 (one patch -> its image's label): {self.top1:.2f} [{lo:.1f}, {hi:.1f}]"
            f" over {self.n_val_patches} patches of {self.n_val} val images (interval over images)",
            f"  figure: {len(self.queries)} queries x {self.similarities.shape[1]} neighbours, "
            f"{same:.0f}% of the neighbours from the query's class",
        ]

    def plot(self, path: Path) -> None:
        queries, neighbours = self.pixels
        rows, k = self.similarities.shape
        fig = Figure(figsize=(1.1 * (k + 1), 1.25 * rows), layout="constrained")
        axes = fig.subplots(rows, k + 1, squeeze=False)
        for r in range(rows):
            _show(axes[r][0], queries[r], f"query y={int(self.query_labels[r])}", "black")
            for c in range(k):
                same = bool(self.neighbour_labels[r, c] == self.query_labels[r])
                label = f"{float(self.similarities[r, c]):.2f} y={int(self.neighbour_labels[r, c])}"
                _show(axes[r][c + 1], neighbours[r, c], label, "tab:green" if same else "tab:red")
        fig.suptitle(
            f"Nearest training patches (cosine of h; {self.n_bank} searched); green: same class as the query"
        )
        fig.savefig(path, dpi=110)


def _show(ax: object, pixels: torch.Tensor, title: str, colour: str) -> None:
    img = pixels.permute(1, 2, 0).numpy()
    if img.shape[2] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)  # type: ignore[attr-defined]
    else:
        ax.imshow(img)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=7, color=colour)  # type: ignore[attr-defined]
    ax.set_xticks([])  # type: ignore[attr-defined]
    ax.set_yticks([])  # type: ignore[attr-defined]
    for spine in ax.spines.values():  # type: ignore[attr-defined]
        spine.set_edgecolor(colour)
        spine.set_linewidth(2)


def _patch_pixels(data: ImageData, refs: list[PatchRef], boxes: torch.Tensor, px: int) -> torch.Tensor:
    """The uint8 pixels (R, C, px, px) of each patch, cut from its image as it is stored."""
    if not refs:
        return torch.empty(0, data.channels, px, px, dtype=torch.uint8)
    images, _ = data.__getitems__([r.image for r in refs])
    out = []
    for img, ref in zip(images, refs, strict=True):
        top, left = boxes[ref.position].tolist()
        out.append(img[:, top : top + px, left : left + px])
    return torch.stack(out)


def _bank(inputs: AnalysisInputs, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (K, D), labels (K,) and flat (image * G + position) ids (K,) of the searched patches."""
    cfg, data = inputs.cfg, inputs.train_data
    g = len(grid)
    ids = seeded_subset(len(data) * g, cfg.eval.analysis.train_patches, cfg.run.seed + BANK_PATCHES)
    feats, labels = [], []
    for start in range(0, len(ids), cfg.eval.batch_size):
        chunk = ids[start : start + cfg.eval.batch_size]
        images, y = data.__getitems__((chunk // g).tolist())
        boxes = grid[chunk % g].unsqueeze(1).to(inputs.device)
        x = crop_patches(images.to(inputs.device), boxes, cfg.eval_patch_px, cfg.input_size)
        feats.append(embed(inputs, x)[:, 0])
        labels.append(y)
    return torch.cat(feats), torch.cat(labels), ids


def locality(inputs: AnalysisInputs) -> Locality:
    """Patch-level kNN of the scored validation images (eval.analysis.val_images, seeded) and the
    nearest training patches of the figure's queries."""
    cfg, seed = inputs.cfg, inputs.cfg.run.seed
    px = cfg.eval_patch_px
    grid = grid_boxes(cfg.image_size, px, cfg.eval_stride)
    g = len(grid)
    bank, bank_labels, bank_ids = _bank(inputs, grid)

    val_idx = scored_images(inputs)
    val_feats, val_labels = [], []
    for images, y in batches(inputs.val_data, val_idx, cfg.eval.batch_size):
        h = embed(inputs, grid_patches(images.to(inputs.device), px, cfg.eval_stride, cfg.input_size))
        val_feats.append(h.flatten(0, 1))
        val_labels.append(y.repeat_interleave(g))
    feats, labels = torch.cat(val_feats), torch.cat(val_labels)
    classes = inputs.train_data.num_classes
    top1 = knn_classify(bank, bank_labels, feats, labels, classes, cfg.eval.knn_k, cfg.eval.knn_temperature)

    # The figure's queries: seeded (scored image, grid position) pairs among those just embedded.
    n_q = min(cfg.eval.analysis.queries, len(feats))
    q_rows = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed + QUERIES))[:n_q]
    k = min(cfg.eval.analysis.neighbours, len(bank))
    sims, nearest = (F.normalize(feats[q_rows], dim=1) @ F.normalize(bank, dim=1).T).topk(k, dim=1)
    queries = [PatchRef(int(val_idx[r // g]), int(r % g)) for r in q_rows]
    found = bank_ids[nearest]
    neighbours = [[PatchRef(int(i // g), int(i % g)) for i in row] for row in found]
    flat = [ref for row in neighbours for ref in row]
    pixels = (
        _patch_pixels(inputs.val_data, queries, grid, px),
        _patch_pixels(inputs.train_data, flat, grid, px).view(n_q, k, -1, px, px),
    )
    return Locality(
        top1=top1["top1"],
        n_val=len(val_idx),
        n_val_patches=len(feats),
        n_bank=len(bank),
        n_bank_total=len(inputs.train_data) * g,
        queries=queries,
        neighbours=neighbours,
        similarities=sims,
        neighbour_labels=bank_labels[nearest],
        query_labels=labels[q_rows],
        pixels=pixels,
        patch_px=px,
    )

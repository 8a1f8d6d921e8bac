"""Whole ≈ mean of patches: how close an image's whole-image embedding is to the mean of its patch embeddings.

For each scale p (eval.analysis.scales), the image is cut into non-overlapping p-px tiles (`grid_boxes`
with stride p; when p does not divide the side, a last row and column flush with the border overlap their
neighbours). The whole image and every tile are resized to the backbone's input size, as evaluation does,
and embedded by the backbone (h, before the projector). Matched: cosine(whole_i, mean of i's tiles).
Mismatched, the baseline that says what a cosine of that size means for this embedding: cosine(whole_i,
mean of the tiles of image j), j = σ(i) for a seeded derangement σ (every image paired with another one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from bagssl_core.analyses.common import PAIRING, AnalysisInputs, batches, derangement, embed, scored_images
from bagssl_core.config import patch_pixels
from bagssl_core.crops import grid_patches, whole_image
from bagssl_core.metrics import AnalysisKey, whole_vs_mean_key

STATS = ("cos_matched", "cos_matched_std", "cos_mismatched", "cos_mismatched_std")


@dataclass
class WholeVsMean:
    scales_px: list[int]
    matched: dict[int, torch.Tensor]  # px -> (N,) cosine of each image's whole embedding and its own mean
    mismatched: dict[int, torch.Tensor]  # px -> (N,) ... and another image's mean
    tiles: dict[int, int]  # px -> tiles per image
    image_px: int

    @property
    def n_images(self) -> int:
        return len(next(iter(self.matched.values())))

    def metrics(self) -> dict[AnalysisKey, float]:
        out: dict[AnalysisKey, float] = {}
        for px in self.scales_px:
            for name, cos in (("cos_matched", self.matched[px]), ("cos_mismatched", self.mismatched[px])):
                out[whole_vs_mean_key(name, px)] = float(cos.mean())
                out[whole_vs_mean_key(f"{name}_std", px)] = float(cos.std(correction=0))
        out[AnalysisKey("whole_vs_mean", "n_images")] = self.n_images
        return out

    def summary(self) -> list[str]:
        lines = [
            f"whole vs mean of patches: cosine of backbone embeddings h, mean ± std over {self.n_images} val images",
            f"  {'tiles':<12} {'matched':>15} {'mismatched':>15}",
        ]
        for px in self.scales_px:
            m, x = self.matched[px], self.mismatched[px]
            lines.append(
                f"  {px:>2} px ({self.tiles[px]:>3}) {m.mean():8.3f} ± {m.std(correction=0):.3f}"
                f" {x.mean():8.3f} ± {x.std(correction=0):.3f}"
            )
        return lines

    def plot(self, path: Path) -> None:
        pos = np.arange(len(self.scales_px))
        fig = Figure(figsize=(5, 4), layout="constrained")
        ax = fig.add_subplot()
        for shift, label, cos in (
            (-0.2, "own patches (matched)", self.matched),
            (0.2, "another image's patches", self.mismatched),
        ):
            means = [float(cos[px].mean()) for px in self.scales_px]
            stds = [float(cos[px].std(correction=0)) for px in self.scales_px]
            ax.bar(pos + shift, means, width=0.4, yerr=stds, capsize=3, label=label)
        ax.set_xticks(pos, [f"{px} px\n({self.tiles[px]} tiles)" for px in self.scales_px])
        ax.set_xlabel(f"tile side (image: {self.image_px} px)")
        ax.set_ylabel("cosine(whole image, mean of tiles)")
        ax.set_title(f"Whole ≈ mean of patches ({self.n_images} val images, ±1 std)", fontsize=10)
        ax.axhline(0, color="black", linewidth=0.5)
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
        fig.savefig(path, dpi=120)


def whole_vs_mean(inputs: AnalysisInputs) -> WholeVsMean:
    """Matched and mismatched cosines for each scale of eval.analysis.scales, over eval.analysis.val_images
    validation images (a seeded subset; the same images the bag curve scores)."""
    cfg, data = inputs.cfg, inputs.val_data
    img = cfg.image_size
    scales = list(dict.fromkeys(patch_pixels(s, img) for s in cfg.eval.analysis.scales))
    idx = scored_images(inputs)
    whole: list[torch.Tensor] = []
    means: dict[int, list[torch.Tensor]] = {px: [] for px in scales}
    tiles: dict[int, int] = {}
    for images, _ in batches(data, idx, cfg.eval.batch_size):
        images = images.to(inputs.device)
        whole.append(embed(inputs, whole_image(images, cfg.input_size))[:, 0])
        for px in scales:
            h = embed(inputs, grid_patches(images, px, px, cfg.input_size))
            tiles[px] = h.shape[1]
            means[px].append(h.mean(1))
    w = torch.cat(whole)
    other = derangement(len(w), cfg.run.seed + PAIRING)
    matched, mismatched = {}, {}
    for px in scales:
        m = torch.cat(means[px])
        matched[px] = F.cosine_similarity(w, m, dim=1)
        mismatched[px] = F.cosine_similarity(w, m[other], dim=1)
    return WholeVsMean(scales, matched, mismatched, tiles, img)

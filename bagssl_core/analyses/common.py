"""What every analysis shares: its inputs, seeded subsets, and the backbone embedding of patches in batches.

Every analysis reads the backbone output h (before the projector): the embedding the probes score and the
paper calls the representation. Patches are cut, resized to the backbone's input size and normalised
exactly as evaluation does (`bagssl_core.aggregate`), unaugmented.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from bagssl_core.config import TrainConfig
from bagssl_core.data import ImageData
from bagssl_core.metrics import AnalysisKey
from bagssl_core.patches import normalize

# Seed streams, as offsets from run.seed: each random choice of the analyses draws from its own.
VAL_SUBSET, BANK_SUBSET, VAL_ORDER, BANK_ORDER, PAIRING, BANK_PATCHES, QUERIES = range(101, 108)

# Patches through the backbone at once: bounds the activations whatever the grid or batch size.
FORWARD_ROWS = 2048


@dataclass
class AnalysisInputs:
    """One model and the data an analysis reads.

    Attributes:
        model: a `BagSSLModel` (or any module mapping (M, C, S, S) patches to (h, z)), in eval mode.
        train_data: the training split: the kNN banks and the patches searched.
        val_data: the validation split: what is scored.
        mean_std: the dataset's channel statistics (`bagssl_core.patches.channel_stats`).
        autocast: bf16 autocast for the forward pass.
    """

    model: nn.Module
    cfg: TrainConfig
    train_data: ImageData
    val_data: ImageData
    device: torch.device
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    autocast: bool = False


class AnalysisResult(Protocol):
    """What an analysis returns: its scalar metrics, a few lines of text, and its figure."""

    def metrics(self) -> dict[AnalysisKey, float]: ...

    def summary(self) -> list[str]: ...

    def plot(self, path: Path) -> None: ...


def seeded_subset(n: int, cap: int | None, seed: int) -> torch.Tensor:
    """Indices of `cap` of n items drawn without replacement from `seed`, sorted; all n when cap is None or
    not smaller."""
    if cap is None or cap >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def scored_images(inputs: AnalysisInputs) -> torch.Tensor:
    """The validation images every analysis scores: eval.analysis.val_images of them (seeded), the same
    images for each analysis."""
    cap = inputs.cfg.eval.analysis.val_images
    return seeded_subset(len(inputs.val_data), cap, inputs.cfg.run.seed + VAL_SUBSET)


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(n) without fixed points (n >= 2): one random cycle through every
    item, so item i is paired with another item, each item used once."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def batches(data: ImageData, indices: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images uint8 (B, C, H, W), labels (B,)) of `data` at `indices`, `size` images at a time."""
    for start in range(0, len(indices), size):
        yield data.__getitems__(indices[start : start + size].tolist())


@torch.no_grad()
def embed(inputs: AnalysisInputs, patches: torch.Tensor) -> torch.Tensor:
    """Backbone embeddings h of float patches in [0, 1].

    Args:
        patches: (B, P, C, S, S), on any device.

    Returns:
        (B, P, D) float32 on the CPU.
    """
    b, p = patches.shape[:2]
    x = patches.flatten(0, 1)
    out = []
    mean, std = inputs.mean_std
    for start in range(0, x.shape[0], FORWARD_ROWS):
        chunk = x[start : start + FORWARD_ROWS].to(inputs.device)
        if inputs.cfg.patch.aug.normalize:
            chunk = normalize(chunk, mean, std)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=inputs.autocast):
            h, _ = inputs.model(chunk)
        out.append(h.float().cpu())
    return torch.cat(out).view(b, p, -1)

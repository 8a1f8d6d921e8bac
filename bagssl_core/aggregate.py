"""Aggregation schemes: an image's representation from the embeddings of its patches.

Aggregation is an evaluation-time choice. Schemes that read the same set of patches (a "view") share
one forward pass: `mean_emb`, `mean_proj` and `max_emb` all reduce the evaluation bag, so asking for all
three costs one pass of patch embeddings, not three.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bagssl_core.config import TrainConfig, patch_pixels
from bagssl_core.crops import centre_patch, grid_patches, sample_patches, whole_image
from bagssl_core.patches import normalize

# (h, z) of shape (B, P, D_h), (B, P, D_z) -> (B, D)
Reducer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Scheme:
    """An aggregation scheme: the patches it reads, and how it reduces their (h, z) to one row per image."""

    view: str  # which patches the scheme reads: "bag", "centre", "whole" or "multiscale"
    reduce: Reducer


SCHEMES: dict[str, Scheme] = {
    "mean_emb": Scheme("bag", lambda h, z: h.mean(1)),
    "mean_proj": Scheme("bag", lambda h, z: z.mean(1)),
    "max_emb": Scheme("bag", lambda h, z: h.amax(1)),
    "centre": Scheme("centre", lambda h, z: h[:, 0]),
    "whole": Scheme("whole", lambda h, z: h[:, 0]),
    "multiscale": Scheme("multiscale", lambda h, z: h.mean(1)),
}


def check_schemes(names: Iterable[str]) -> None:
    """Raise unless every name is a scheme of `SCHEMES`."""
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise ValueError(f"eval.aggregation: unknown scheme(s) {unknown}; expected any of {sorted(SCHEMES)}")


def view_patches(
    images: torch.Tensor, view: str, cfg: TrainConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """The float patches in [0, 1] of shape (B, P, C, S, S) that a view reads from uint8 images (B, C, H, W)."""
    img, size = cfg.image_size, cfg.input_size
    if view == "bag":
        if cfg.eval.patches == "grid":
            return grid_patches(images, cfg.eval_patch_px, cfg.eval_stride, size)
        if generator is None:
            raise ValueError("random evaluation patches need a generator")
        return sample_patches(images, cfg.eval_num_patches, cfg.eval_patch_px, size, generator)
    if view == "centre":
        return centre_patch(images, cfg.eval_patch_px, size)
    if view == "whole":
        return whole_image(images, size)
    if view == "multiscale":
        bags = []
        for s in cfg.eval.multiscale_sizes:
            px = patch_pixels(s, img)
            bags.append(grid_patches(images, px, max(1, px // 2), size))
        return torch.cat(bags, dim=1)
    raise ValueError(f"unknown view {view!r}")


@torch.no_grad()
def embed_views(
    model: nn.Module,
    images: torch.Tensor,
    cfg: TrainConfig,
    views: Sequence[str],
    mean_std: tuple[tuple[float, ...], tuple[float, ...]],
    generator: torch.Generator | None = None,
    autocast: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each view, (h, z) of shape (B, P, D_h) and (B, P, D_z): one forward of all B*P patches per view."""
    out = {}
    mean, std = mean_std
    for view in views:
        x = view_patches(images, view, cfg, generator)
        b, p = x.shape[:2]
        x = x.flatten(0, 1)
        if cfg.patch.aug.normalize:
            x = normalize(x, mean, std)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            h, z = model(x)
        out[view] = (h.float().view(b, p, -1), z.float().view(b, p, -1))
    return out


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    schemes: Sequence[str],
    device: torch.device,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]],
    autocast: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features of every image in `loader` under every scheme, on the CPU.

    Returns:
        ({scheme: (N, D)}, labels (N,)). Random evaluation patches are drawn from a generator seeded by
        cfg.run.seed, so the same checkpoint always gives the same features.
    """
    check_schemes(schemes)
    views = list(dict.fromkeys(SCHEMES[s].view for s in schemes))
    gen = (
        torch.Generator(device=device).manual_seed(cfg.run.seed + 7919)
        if cfg.eval.patches == "random"
        else None
    )
    feats: dict[str, list[torch.Tensor]] = {s: [] for s in schemes}
    labels = []
    was_training = model.training
    model.eval()
    try:
        for images, y in loader:
            embedded = embed_views(
                model, images.to(device, non_blocking=True), cfg, views, mean_std, gen, autocast
            )
            for s in schemes:
                h, z = embedded[SCHEMES[s].view]
                feats[s].append(SCHEMES[s].reduce(h, z).cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return {s: torch.cat(v) for s, v in feats.items()}, torch.cat(labels)

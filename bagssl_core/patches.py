"""The training pipeline's input: one step's augmented, normalised patches of every image (`train_batch`).

It chains the crops of `bagssl_core.crops`, the augmentations of `bagssl_core.augment` and the
normalisation defined here (`channel_stats`, `normalize`), which evaluation also applies to its
unaugmented patches, when and where it decides.
"""

from __future__ import annotations

import torch

from bagssl_core.augment import augment_blocks, draw_plan
from bagssl_core.config import TrainConfig
from bagssl_core.crops import check_images, crop_patches, crop_resize_boxes, sample_boxes, sample_view_boxes

# Per-dataset channel (mean, std) of pixel values in [0, 1], for 3-channel inputs.
CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Grayscale, replicated to 3 channels (data.to_rgb); `channel_stats(..., 1)` gives the single value.
    "fashion_mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    # ImageNet statistics: the usual choice for ImageFolder data such as ImageNet-100.
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def channel_stats(dataset_name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of a dataset's pixels in [0, 1], for `channels` input channels.

    One channel is only available for datasets whose three channels share their statistics (grayscale
    data such as fashion_mnist, not replicated).
    """
    if dataset_name not in CHANNEL_STATS:
        raise ValueError(
            f"dataset_name: no channel statistics for {dataset_name!r}; "
            f"expected one of {sorted(CHANNEL_STATS)}"
        )
    mean, std = CHANNEL_STATS[dataset_name]
    if channels == 3:
        return mean, std
    if channels == 1 and len(set(mean)) == 1 and len(set(std)) == 1:
        return mean[:1], std[:1]
    raise ValueError(f"channels: {dataset_name!r} has statistics for 3 channels, not {channels}")


def _normalize_affine(
    mean: tuple[float, ...], std: tuple[float, ...], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each `(C, 1, 1)`, with (x - mean) / std = x * scale + shift."""
    if len(mean) != x.shape[-3] or len(std) != x.shape[-3]:
        raise ValueError(f"mean/std: expected {x.shape[-3]} values each, got {len(mean)} and {len(std)}")
    scale = 1.0 / torch.tensor(std, device=x.device, dtype=torch.float64)
    shift = -torch.tensor(mean, device=x.device, dtype=torch.float64) * scale
    return shift.to(x.dtype).view(-1, 1, 1), scale.to(x.dtype).view(-1, 1, 1)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, on channel dim -3 of `(..., C, S, S)`; returns a new tensor.

    Computed in one pass as x * (1 / std) + (-mean / std): equal to (x - mean) / std up to rounding.
    """
    shift, scale = _normalize_affine(mean, std, x)
    return torch.addcmul(shift, x, scale)


def train_batch(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """One step's whole training input: sample, augment every patch, normalise.

    Bag losses get `cfg.patch.num` fixed-scale patches of `cfg.patch_px` pixels per image; two-view
    VICReg (`loss.name == "vicreg"`) gets two RandomResizedCrop views with area in `patch.view_scale`.
    Each is resized to `cfg.input_size`, augmented as `bagssl_core.augment.augment` does, and normalised
    with the dataset's channel statistics when `patch.aug.normalize` is set. All positions and
    augmentation parameters are drawn first; the pixel work then runs block by block (`augment_blocks`:
    blocks of whole images on CPU, so that every intermediate stays in cache). The result is the same
    either way.

    Args:
        images: `(B, C, H, W)` uint8 at `cfg.image_size` (H = W), on the training device.
        cfg: The run's configuration.
        generator: On the images' device.

    Returns:
        `(B, N, C, S, S)` float32, S = `cfg.input_size`, N = `cfg.patch.num` (2 for vicreg).
    """
    check_images(images)
    b, c, h, w = images.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"images: expected {cfg.image_size}x{cfg.image_size} images (cfg.image_size), got {h}x{w}"
        )
    if c not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {c}")
    size, dev = cfg.input_size, images.device
    if cfg.loss.name == "vicreg":
        n = 2
        boxes = sample_view_boxes(b, n, (h, w), cfg.patch.view_scale, generator, dev)

        def cut(lo: int, hi: int) -> torch.Tensor:
            return crop_resize_boxes(images[lo:hi], boxes[lo:hi], size).view(-1, c, size, size)

    else:
        n = cfg.patch.num
        boxes = sample_boxes(b, n, (h, w), cfg.patch_px, generator, dev)

        def cut(lo: int, hi: int) -> torch.Tensor:
            return crop_patches(images[lo:hi], boxes[lo:hi], cfg.patch_px, size).view(-1, c, size, size)

    plan = draw_plan(b * n, c, size, cfg.patch.aug, generator, dev)
    out = torch.empty(b * n, c, size, size, device=dev)
    norm = _normalize_affine(*channel_stats(cfg.data.name, c), out) if cfg.patch.aug.normalize else None
    for rows, x in augment_blocks(plan, b, n, cut, dev):
        if norm is None:
            out[rows] = x
        else:
            torch.addcmul(norm[0], x, norm[1], out=out[rows])
    return out.view(b, n, c, size, size)

"""Fixed-scale patch sampling and per-patch augmentation, batched on the training device.

Every function works on whole batches: one step's B x N patches are cut, resized and augmented by a few
tensor ops, with no Python loop over images or patches and no PIL, so the same code runs on CPU and GPU
(on CPU, augmentation walks the batch in blocks of samples to stay in cache; see `augment`).
Random draws all come from an explicit `torch.Generator` living on the images' device: the same seed
gives the same patches, positions and augmentations.

Shapes: images are `(B, C, H, W)` (uint8 in [0, 255], or float in [0, 1]); patch batches are
`(B, N, C, S, S)` float in [0, 1]; positions are `(B, N, 2)` integer `(top, left)` corners.
Normalisation is a separate step (`normalize`), so evaluation callers decide when to apply it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bagssl_core.config import AugConfig, TrainConfig

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

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# torchvision RandomResizedCrop's aspect-ratio range and number of rejection-sampling attempts.
_VIEW_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_VIEW_ATTEMPTS = 10
# Samples per block when augmenting on CPU (see `_augment`).
_CPU_BLOCK = 256
# An augmentation applied to some samples: (those samples (K, C, S, S), their indices in the whole
# batch, or slice(None) for all of it) -> the augmented samples as a new tensor.
_SampleOp = Callable[[torch.Tensor, "torch.Tensor | slice"], torch.Tensor]


# --- helpers ---------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images: expected shape (B, C, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images: expected uint8 in [0, 255] or float in [0, 1], got {images.dtype}")


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    # torch's own error for a generator on the wrong device does not say which argument is wrong.
    if generator.device.type != device.type:
        raise ValueError(f"generator: expected one on the images' device ({device}), got {generator.device}")


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is copied as float32. Never shares x's memory."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)


def _resize_matrix(size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(size, out)` matrix R with signal @ R = the 1-D bilinear resize F.interpolate does (antialiased
    when shrinking, as torchvision's Resize), found by resizing the identity."""
    eye = torch.eye(size, device=device, dtype=dtype).view(size, 1, 1, size)
    r = F.interpolate(
        eye, size=(1, out_size), mode="bilinear", align_corners=False, antialias=out_size < size
    )
    return r.view(size, out_size)


def _resize(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """`(M, C, h, w)` -> `(M, C, out, out)`, bilinear, antialiased when shrinking (as torchvision's Resize).

    Bilinear resizing is separable and linear: two matrix products, R_h^T @ x @ R_w, equal to
    F.interpolate up to rounding and about twice as fast on CPU. The weights are non-negative and sum
    to one, so the clamp only removes rounding outside [0, 1].
    """
    h, w = x.shape[-2:]
    if (h, w) == (out_size, out_size):
        return x
    rw = _resize_matrix(w, out_size, x.device, x.dtype)
    rh = rw if h == w else _resize_matrix(h, out_size, x.device, x.dtype)
    return rh.t().matmul(x.matmul(rw)).clamp_(0.0, 1.0)


def _rand_mask(m: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`(M, 1, 1, 1)` bool: True with probability p, independently per sample."""
    return (torch.rand(m, generator=generator, device=device) < p).view(m, 1, 1, 1)


def _uniform(
    m: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(m, generator=generator, device=device) * (high - low) + low


# --- positions and crops ---------------------------------------------------------------------------


def sample_boxes(
    batch: int,
    num: int,
    image_hw: tuple[int, int],
    patch_px: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random top-left corners of `num` square patches per image, each lying wholly inside the image.

    Args:
        batch: Number of images B.
        num: Patches per image N.
        image_hw: Image height and width (H, W).
        patch_px: Patch side p in pixels (p <= min(H, W)).
        generator: Source of randomness, on `device`.
        device: Where the positions are created.

    Returns:
        LongTensor `(B, N, 2)` of `(top, left)`, top uniform in [0, H - p], left uniform in [0, W - p].
    """
    h, w = image_hw
    if not 1 <= patch_px <= min(h, w):
        raise ValueError(f"patch_px: a {patch_px}-px patch does not fit a {h}x{w} image")
    device = torch.device(device)
    _check_generator(generator, device)
    top = torch.randint(0, h - patch_px + 1, (batch, num), generator=generator, device=device)
    left = torch.randint(0, w - patch_px + 1, (batch, num), generator=generator, device=device)
    return torch.stack((top, left), dim=-1)


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, patch_px: int, out_size: int) -> torch.Tensor:
    """Cut square patches at given corners and resize them all to `out_size`, in one gather + one resize.

    The crop is an exact integer slice (no resampling), then every patch is resized together (bilinear,
    antialiased when shrinking).

    Args:
        images: `(B, C, H, W)` uint8 or float in [0, 1].
        boxes: `(B, N, 2)` integer `(top, left)` corners, each patch inside its image.
        patch_px: Patch side p in pixels.
        out_size: Output side S.

    Returns:
        `(B, N, C, S, S)` float32 in [0, 1].
    """
    _check_images(images)
    b, c = images.shape[:2]
    if boxes.dim() != 3 or boxes.shape[0] != b or boxes.shape[2] != 2:
        raise ValueError(f"boxes: expected shape ({b}, N, 2), got {tuple(boxes.shape)}")
    n = boxes.shape[1]
    # A view (B, C, H-p+1, W-p+1, p, p) of every possible patch; indexing copies only the chosen ones.
    windows = images.unfold(2, patch_px, 1).unfold(3, patch_px, 1)
    rows = torch.arange(b, device=images.device).view(b, 1).expand(b, n)
    # Advanced indices split by the channel slice put (B, N) first: the result is (B, N, C, p, p).
    patches = windows[rows, :, boxes[..., 0], boxes[..., 1]]
    patches = _resize(_to_unit_float(patches.reshape(b * n, c, patch_px, patch_px)), out_size)
    return patches.view(b, n, c, out_size, out_size)


def sample_train_patches(
    images: torch.Tensor, num: int, patch_px: int, out_size: int, generator: torch.Generator
) -> torch.Tensor:
    """N fixed-scale patches per image at uniform random positions, resized to `out_size` (no augmentation).

    Args:
        images: `(B, C, H, W)` uint8 (or float in [0, 1]) on any device.
        num: Patches per image N.
        patch_px: Patch side in pixels.
        out_size: Output side S.
        generator: On the images' device; its positions are those `sample_boxes` draws from the same state.

    Returns:
        `(B, N, C, S, S)` float32 in [0, 1].
    """
    _check_images(images)
    b, _, h, w = images.shape
    boxes = sample_boxes(b, num, (h, w), patch_px, generator, images.device)
    return crop_patches(images, boxes, patch_px, out_size)


def random_patches_eval(
    images: torch.Tensor, num: int, patch_px: int, out_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Evaluation's "random" patches: as `sample_train_patches`, unaugmented.

    Pass a generator re-seeded identically at every evaluation so that each image gets the same patches
    every time and probes are comparable across epochs.

    Returns:
        `(B, N, C, S, S)` float32 in [0, 1].
    """
    return sample_train_patches(images, num, patch_px, out_size, generator)


def sample_view_boxes(
    batch: int,
    views: int,
    image_hw: tuple[int, int],
    scale: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """RandomResizedCrop boxes, drawn as torchvision does but for all crops at once.

    For each crop, up to 10 candidates with area fraction uniform in `scale` and aspect ratio w/h
    log-uniform in (3/4, 4/3); the first whose rounded size fits the image is kept, at a uniform position.
    When none fits, torchvision's fallback: the largest centred crop whose ratio lies in (3/4, 4/3).

    Returns:
        LongTensor `(B, V, 4)` of `(top, left, height, width)`.
    """
    h, w = image_hw
    device = torch.device(device)
    _check_generator(generator, device)
    m = batch * views
    area = (
        torch.rand(m, _VIEW_ATTEMPTS, generator=generator, device=device) * (scale[1] - scale[0]) + scale[0]
    )
    area = area * (h * w)
    log_lo, log_hi = math.log(_VIEW_RATIO[0]), math.log(_VIEW_RATIO[1])
    ratio = torch.exp(
        torch.rand(m, _VIEW_ATTEMPTS, generator=generator, device=device) * (log_hi - log_lo) + log_lo
    )
    cw = torch.sqrt(area * ratio).round().long()
    ch = torch.sqrt(area / ratio).round().long()
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    # argmax returns the first maximum: the first candidate that fits, as torchvision's loop keeps.
    first = fits.int().argmax(dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    fb_h, fb_w = _fallback_crop(h, w)
    ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), fb_h)
    cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), fb_w)
    u = torch.rand(m, 2, generator=generator, device=device)
    top = torch.where(any_fit, (u[:, 0] * (h - ch + 1)).long().clamp(max=h - ch), (h - ch) // 2)
    left = torch.where(any_fit, (u[:, 1] * (w - cw + 1)).long().clamp(max=w - cw), (w - cw) // 2)
    return torch.stack((top, left, ch, cw), dim=-1).view(batch, views, 4)


def _fallback_crop(h: int, w: int) -> tuple[int, int]:
    """torchvision RandomResizedCrop's fallback size: the whole image, trimmed to the ratio range."""
    in_ratio = w / h
    if in_ratio < _VIEW_RATIO[0]:
        return round(w / _VIEW_RATIO[0]), w
    if in_ratio > _VIEW_RATIO[1]:
        return h, round(h * _VIEW_RATIO[1])
    return h, w


def crop_resize_boxes(images: torch.Tensor, boxes: torch.Tensor, out_size: int) -> torch.Tensor:
    """Crops of any size, each resized to `out_size`, in one `grid_sample` (bilinear, no antialiasing).

    Args:
        images: `(B, C, H, W)` uint8 or float in [0, 1].
        boxes: `(B, V, 4)` `(top, left, height, width)` in pixels, inside the image.
        out_size: Output side S.

    Returns:
        `(B, V, C, S, S)` float32 in [0, 1].
    """
    _check_images(images)
    b, c, h, w = images.shape
    v = boxes.shape[1]
    x = _to_unit_float(images)
    top, left, bh, bw = boxes.to(x.dtype).unbind(-1)
    # align_corners=False: normalised -1/+1 are the outer edges of the border pixels, so a box maps to
    # scale = size / side and centre = 2 * (start + size / 2) / side - 1.
    theta = torch.zeros(b, v, 2, 3, device=x.device, dtype=x.dtype)
    theta[..., 0, 0] = bw / w
    theta[..., 0, 2] = (2 * left + bw) / w - 1
    theta[..., 1, 1] = bh / h
    theta[..., 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta.view(b * v, 2, 3), [b * v, c, out_size, out_size], align_corners=False)
    # Stack each image's V grids vertically so grid_sample reads the images once, with no per-view copy.
    grid = grid.view(b, v * out_size, out_size, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(b, c, v, out_size, out_size).transpose(1, 2).contiguous()


def sample_two_views(
    images: torch.Tensor, scale: tuple[float, float], out_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Two multi-scale RandomResizedCrop views per image, for the two-view VICReg baseline.

    Args:
        images: `(B, C, H, W)` uint8 (or float in [0, 1]).
        scale: Range of the crop's area as a fraction of the image's.
        out_size: Output side S.
        generator: On the images' device.

    Returns:
        `(B, 2, C, S, S)` float32 in [0, 1].
    """
    _check_images(images)
    b, _, h, w = images.shape
    boxes = sample_view_boxes(b, 2, (h, w), scale, generator, images.device)
    return crop_resize_boxes(images, boxes, out_size)


# --- deterministic evaluation patches -------------------------------------------------------------


def _grid_starts(side: int, patch_px: int, stride: int) -> list[int]:
    last = side - patch_px
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)  # flush with the border so the grid covers the whole image
    return starts


def grid_boxes(image_size: int | tuple[int, int], patch_px: int, stride: int) -> torch.Tensor:
    """Top-left corners of a grid of patches covering the image, row-major.

    Starts at 0 and steps by `stride`; a last row/column flush with the bottom/right border is added when
    the stride does not land on it, so every pixel lies in some patch.

    Args:
        image_size: Side of a square image, or (H, W).
        patch_px: Patch side in pixels.
        stride: Step between neighbouring patches in pixels.

    Returns:
        LongTensor `(G, 2)` of `(top, left)`.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not 1 <= patch_px <= min(h, w):
        raise ValueError(f"patch_px: a {patch_px}-px patch does not fit a {h}x{w} image")
    if stride < 1:
        raise ValueError(f"stride: expected >= 1, got {stride}")
    tops = torch.tensor(_grid_starts(h, patch_px, stride))
    lefts = torch.tensor(_grid_starts(w, patch_px, stride))
    return torch.cartesian_prod(tops, lefts).view(-1, 2)


def grid_patches(images: torch.Tensor, patch_px: int, stride: int, out_size: int) -> torch.Tensor:
    """Every patch of the `grid_boxes` grid, resized to `out_size`.

    Returns:
        `(B, G, C, S, S)` float32 in [0, 1].
    """
    _check_images(images)
    b, _, h, w = images.shape
    boxes = grid_boxes((h, w), patch_px, stride).to(images.device)
    return crop_patches(images, boxes.expand(b, -1, -1), patch_px, out_size)


def centre_patch(images: torch.Tensor, patch_px: int, out_size: int) -> torch.Tensor:
    """The centred patch of each image (rounded up-left when the margin is odd), resized to `out_size`.

    Returns:
        `(B, 1, C, S, S)` float32 in [0, 1].
    """
    _check_images(images)
    b, _, h, w = images.shape
    if not 1 <= patch_px <= min(h, w):
        raise ValueError(f"patch_px: a {patch_px}-px patch does not fit a {h}x{w} image")
    top, left = (h - patch_px) // 2, (w - patch_px) // 2
    x = _to_unit_float(images[:, :, top : top + patch_px, left : left + patch_px])
    return _resize(x, out_size).unsqueeze(1)


def whole_image(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """Each whole image resized to `out_size` (square output).

    Returns:
        `(B, 1, C, S, S)` float32 in [0, 1].
    """
    _check_images(images)
    return _resize(_to_unit_float(images), out_size).unsqueeze(1)


# --- augmentation ----------------------------------------------------------------------------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    """`(M, 3, S, S)` -> `(M, 1, S, S)` luma, as torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(dim=1)
    return (
        torch.mul(r, _GRAY_WEIGHTS[0])
        .add_(g, alpha=_GRAY_WEIGHTS[1])
        .add_(b, alpha=_GRAY_WEIGHTS[2])
        .unsqueeze(1)
    )


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1], as a new tensor; factor 1 returns x's values."""
    return torch.addcmul(other * (1.0 - factor), x, factor).clamp_(0.0, 1.0)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn, `(M, 1, 1)`), keeping HSV saturation and value.

    Hue as torchvision's rgb->hsv, kept in sixths of a turn (h6 in [0, 6)). Back to RGB in closed form:
    with V = max, C = V * S = max - min of the channels, channel = V - C * clamp(||h6 - c| - 3| - 1, 0, 1)
    for c = 3, 5, 1 (r, g, b) — the HSV sector formula written as a distance on the hue circle.
    """
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    cr = maxc - x.amin(dim=1)
    # Sector by sector (max is r, else g, else b) as torchvision; divided by C below.
    h6 = torch.where(
        maxc == r, g - b, torch.where(maxc == g, (b - r).add_(cr, alpha=2.0), (r - g).add_(cr, alpha=4.0))
    )
    # Where max == min, h6's numerator is 0 and hue is irrelevant (C = 0); a divisor of 1 avoids NaN.
    h6.div_(torch.where(cr == 0, torch.ones_like(cr), cr)).add_(6.0 * shift)
    h6 = torch.remainder(h6, 6.0)
    centres = torch.tensor([3.0, 5.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    t = (h6.unsqueeze(1) - centres).abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return torch.sub(maxc.unsqueeze(1), t.mul_(cr.unsqueeze(1)))


def color_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor | None = None,
    contrast: torch.Tensor | None = None,
    saturation: torch.Tensor | None = None,
    hue: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample colour jitter with given factors, in the fixed order brightness, contrast, saturation, hue.

    Each step matches torchvision's `adjust_*` for that sample's factor (torchvision's ColorJitter
    shuffles the order per call; here it is fixed). A step whose factors are None is skipped; with one
    channel, saturation and hue are always skipped (torchvision leaves 1-channel images unchanged there).
    The input is not modified.

    Args:
        x: `(M, C, S, S)` float in [0, 1], C in {1, 3}.
        brightness: `(M,)` factors >= 0 (1 = unchanged).
        contrast: `(M,)` factors >= 0 (1 = unchanged).
        saturation: `(M,)` factors >= 0 (1 = unchanged).
        hue: `(M,)` shifts in [-0.5, 0.5] (0 = unchanged up to rounding).

    Returns:
        `(M, C, S, S)` in [0, 1].
    """
    m, c = x.shape[:2]
    if brightness is not None:
        x = x.mul(brightness.view(m, 1, 1, 1)).clamp_(0.0, 1.0)
    if contrast is not None:
        gray = _gray(x) if c == 3 else x
        x = _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), contrast.view(m, 1, 1, 1))
    if c == 3 and saturation is not None:
        x = _blend(x, _gray(x), saturation.view(m, 1, 1, 1))
    if c == 3 and hue is not None:
        x = _shift_hue(x, hue.view(m, 1, 1))
    return x


def blur_kernel_size(side: int) -> int:
    """Gaussian blur kernel size: about 10% of the image side, made odd, at least 3."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per sample, reflect padding (as torchvision's gaussian_blur).

    Both passes are depthwise (grouped) convolutions with one kernel per sample and channel.

    Args:
        x: `(M, C, S, S)` float.
        sigma: `(M,)` standard deviations > 0.
        kernel_size: Odd kernel side K < S.

    Returns:
        `(M, C, S, S)`.
    """
    m, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(m, 1)) ** 2)
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (M*C, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, m * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k1.view(m * c, 1, 1, kernel_size), groups=m * c)
    y = F.conv2d(y, k1.view(m * c, 1, kernel_size, 1), groups=m * c)
    return y.view(m, c, h, w)


def augment(x: torch.Tensor, aug: AugConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment every sample independently: flip, colour jitter, grayscale, blur, solarize (in that order).

    - horizontal flip with probability `flip_p`;
    - colour jitter with probability `jitter_p`: factors drawn per sample as torchvision's ColorJitter
      (brightness/contrast/saturation uniform in [max(0, 1 - v), 1 + v], hue uniform in [-hue, hue]),
      applied in the fixed order brightness -> contrast -> saturation -> hue (see `color_jitter`);
    - grayscale with probability `grayscale_p` (luma replicated to the 3 channels);
    - Gaussian blur with probability `blur_p`, sigma uniform in `blur_sigma`, kernel `blur_kernel_size(S)`;
    - solarize with probability `solarize_p`: x >= 0.5 becomes 1 - x.

    With one channel, saturation, hue and grayscale are skipped. An operation whose probability or
    strength is 0 is skipped entirely and draws no random numbers. Unselected samples pass through
    bit-exact. On CPU each operation runs on its selected samples only (gathered by index), block by
    block of 256 samples; elsewhere (GPU) it runs on all and `torch.where` keeps the selected ones, which
    needs no host-device synchronisation. Both give the same result for the same generator state.

    Args:
        x: `(M, C, S, S)` float in [0, 1], C in {1, 3}; not modified.
        aug: Probabilities and strengths.
        generator: On x's device.

    Returns:
        `(M, C, S, S)` float in [0, 1].
    """
    return _augment(x, aug, generator, by_index=x.device.type == "cpu")


def _augment(x: torch.Tensor, aug: AugConfig, generator: torch.Generator, by_index: bool) -> torch.Tensor:
    """`augment`, choosing how selected samples are processed: gathered by index, or all + torch.where."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected shape (M, C, S, S) with C in {{1, 3}}, got {tuple(x.shape)}")
    _check_generator(generator, x.device)
    plan = _draw_plan(x.shape[0], x.shape[1], x.shape[-1], aug, generator, x.device)
    if not by_index:
        return _apply_plan(x, plan, 0, by_index=False)
    out = x.clone()  # augmented in place below; the caller's tensor stays untouched
    for start in range(0, len(out), _CPU_BLOCK):
        _apply_plan(out[start : start + _CPU_BLOCK], plan, start, by_index=True)
    return out


# Augmentations to apply: for each, the `(M, 1, 1, 1)` mask of selected samples and the operation.
_Plan = list[tuple[torch.Tensor, _SampleOp]]


def _draw_plan(
    m: int, c: int, side: int, aug: AugConfig, generator: torch.Generator, dev: torch.device
) -> _Plan:
    """Every random draw of `augment` for M samples, in a fixed order, before any pixel work.

    Drawing up front makes the result independent of how the samples are later split into blocks.
    """
    plan: _Plan = []
    if aug.flip_p > 0:
        plan.append((_rand_mask(m, aug.flip_p, generator, dev), _flip))
    strengths = (aug.brightness, aug.contrast) + ((aug.saturation, aug.hue) if c == 3 else (0.0, 0.0))
    if aug.jitter_p > 0 and any(v > 0 for v in strengths):
        plan.append(_draw_jitter(m, c, aug, generator, dev))
    if aug.grayscale_p > 0 and c == 3:
        plan.append((_rand_mask(m, aug.grayscale_p, generator, dev), _grayscale))
    if aug.blur_p > 0:
        on = _rand_mask(m, aug.blur_p, generator, dev)
        sigma = _uniform(m, aug.blur_sigma[0], aug.blur_sigma[1], generator, dev)
        k = blur_kernel_size(side)
        plan.append((on, lambda xs, i: gaussian_blur(xs, sigma[i], k)))
    if aug.solarize_p > 0:
        plan.append((_rand_mask(m, aug.solarize_p, generator, dev), _solarize))
    return plan


def _apply_plan(x: torch.Tensor, plan: _Plan, start: int, by_index: bool) -> torch.Tensor:
    """Apply `plan` to samples `start .. start + len(x)` of the batch it was drawn for.

    by_index: each operation runs on its selected samples only, gathered and written back into x in
    place (x must be the caller's own tensor). Otherwise each runs on all of x and `torch.where` keeps
    the selected samples: no data-dependent shapes, so no host-device synchronisation on GPU.
    """
    stop = start + len(x)
    for on, op in plan:
        if by_index:
            idx = on.view(-1)[start:stop].nonzero().squeeze(1)
            if idx.numel():
                x.index_copy_(0, idx, op(x.index_select(0, idx), idx + start))
        else:
            x = torch.where(on[start:stop], op(x, slice(start, stop)), x)
    return x


def _flip(xs: torch.Tensor, _: torch.Tensor | slice) -> torch.Tensor:
    return xs.flip(-1)


def _grayscale(xs: torch.Tensor, _: torch.Tensor | slice) -> torch.Tensor:
    return _gray(xs).expand(-1, 3, -1, -1)


def _solarize(xs: torch.Tensor, _: torch.Tensor | slice) -> torch.Tensor:
    return torch.where(xs >= 0.5, 1.0 - xs, xs)


def _draw_jitter(
    m: int, c: int, aug: AugConfig, generator: torch.Generator, dev: torch.device
) -> tuple[torch.Tensor, _SampleOp]:
    """The jitter mask and per-sample factors, drawn as torchvision's ColorJitter, and the op using them."""
    on = _rand_mask(m, aug.jitter_p, generator, dev)

    def factor(v: float, colour: bool = False) -> torch.Tensor | None:
        if v == 0 or colour and c == 1:
            return None
        return _uniform(m, max(0.0, 1.0 - v), 1.0 + v, generator, dev)

    brightness, contrast, saturation = (
        factor(aug.brightness),
        factor(aug.contrast),
        factor(aug.saturation, True),
    )
    hue = _uniform(m, -aug.hue, aug.hue, generator, dev) if aug.hue > 0 and c == 3 else None

    def op(xs: torch.Tensor, i: torch.Tensor | slice) -> torch.Tensor:
        pick = [None if f is None else f[i] for f in (brightness, contrast, saturation, hue)]
        return color_jitter(xs, *pick)

    return on, op


# --- normalisation and the training pipeline --------------------------------------------------------


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
    Each is resized to `cfg.input_size`, augmented as `augment` does, and normalised with the dataset's
    channel statistics when `patch.aug.normalize` is set. All positions and augmentation parameters are
    drawn first; on CPU the pixel work then runs block by block of images (about 256 patches each) so
    that every intermediate stays in cache. The result is the same either way.

    Args:
        images: `(B, C, H, W)` uint8 at `cfg.image_size` (H = W), on the training device.
        cfg: The run's configuration.
        generator: On the images' device.

    Returns:
        `(B, N, C, S, S)` float32, S = `cfg.input_size`, N = `cfg.patch.num` (2 for vicreg).
    """
    _check_images(images)
    b, c, h, w = images.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"images: expected {cfg.image_size}x{cfg.image_size} images (cfg.image_size), got {h}x{w}"
        )
    if c not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {c}")
    size, dev = cfg.input_size, images.device
    views = cfg.loss.name == "vicreg"
    if views:
        n = 2
        boxes = sample_view_boxes(b, n, (h, w), cfg.patch.view_scale, generator, dev)
    else:
        n = cfg.patch.num
        boxes = sample_boxes(b, n, (h, w), cfg.patch_px, generator, dev)
    plan = _draw_plan(b * n, c, size, cfg.patch.aug, generator, dev)
    by_index = dev.type == "cpu"
    out = torch.empty(b * n, c, size, size, device=dev)
    norm = _normalize_affine(*channel_stats(cfg.data.name, c), out) if cfg.patch.aug.normalize else None
    per_block = max(1, _CPU_BLOCK // n) if by_index else b
    for lo in range(0, b, per_block):
        hi = min(b, lo + per_block)
        if views:
            x = crop_resize_boxes(images[lo:hi], boxes[lo:hi], size)
        else:
            x = crop_patches(images[lo:hi], boxes[lo:hi], cfg.patch_px, size)
        x = _apply_plan(x.view(-1, c, size, size), plan, lo * n, by_index)
        if norm is None:
            out[lo * n : hi * n] = x
        else:
            torch.addcmul(norm[0], x, norm[1], out=out[lo * n : hi * n])
    return out.view(b, n, c, size, size)

"""Where patches and views lie in an image, and cutting them out at the model's input size.

Every function works on whole batches: one step's B x N crops are cut and resized by a few tensor ops,
with no Python loop over images or patches and no PIL, so the same code runs on CPU and GPU. Random
positions come from an explicit `torch.Generator` on the images' device: the same seed gives the same
boxes.

Shapes: images are `(B, C, H, W)` (uint8 in [0, 255], or float in [0, 1]); crop batches are
`(B, N, C, S, S)` float32 in [0, 1]; positions are `(B, N, 2)` integer `(top, left)` corners, or
`(B, V, 4)` `(top, left, height, width)` boxes for views of any size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# torchvision RandomResizedCrop's aspect-ratio range and number of rejection-sampling attempts.
_VIEW_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_VIEW_ATTEMPTS = 10


# --- argument checks, conversion and resizing -------------------------------------------------------


def check_images(images: torch.Tensor) -> None:
    """Raise unless `images` is a `(B, C, H, W)` batch, uint8 or floating point."""
    if images.dim() != 4:
        raise ValueError(f"images: expected shape (B, C, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images: expected uint8 in [0, 255] or float in [0, 1], got {images.dtype}")


def check_generator(generator: torch.Generator, device: torch.device) -> None:
    """Raise unless `generator` lives on `device`'s type (cpu, cuda, ...)."""
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
    check_generator(generator, device)
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
    check_images(images)
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


def sample_patches(
    images: torch.Tensor, num: int, patch_px: int, out_size: int, generator: torch.Generator
) -> torch.Tensor:
    """N fixed-scale patches per image at uniform random positions, resized to `out_size` (no augmentation).

    Evaluation's "random" patches: pass a generator re-seeded identically at every evaluation so that each
    image gets the same patches every time and probes are comparable across epochs.

    Args:
        images: `(B, C, H, W)` uint8 (or float in [0, 1]) on any device.
        num: Patches per image N.
        patch_px: Patch side in pixels.
        out_size: Output side S.
        generator: On the images' device; its positions are those `sample_boxes` draws from the same state.

    Returns:
        `(B, N, C, S, S)` float32 in [0, 1].
    """
    check_images(images)
    b, _, h, w = images.shape
    boxes = sample_boxes(b, num, (h, w), patch_px, generator, images.device)
    return crop_patches(images, boxes, patch_px, out_size)


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
    check_generator(generator, device)
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
    check_images(images)
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
    check_images(images)
    b, _, h, w = images.shape
    boxes = grid_boxes((h, w), patch_px, stride).to(images.device)
    return crop_patches(images, boxes.expand(b, -1, -1), patch_px, out_size)


def centre_patch(images: torch.Tensor, patch_px: int, out_size: int) -> torch.Tensor:
    """The centred patch of each image (rounded up-left when the margin is odd), resized to `out_size`.

    Returns:
        `(B, 1, C, S, S)` float32 in [0, 1].
    """
    check_images(images)
    h, w = images.shape[-2:]
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
    check_images(images)
    return _resize(_to_unit_float(images), out_size).unsqueeze(1)

"""Per-sample augmentation of patch batches: torchvision's flip, colour jitter, grayscale, blur and
solarize, re-implemented to run on a whole batch at once with a different random draw per sample.

Every random draw for a batch is made first (`draw_plan`), before any pixel work, so that the result for
a given generator state does not depend on how the batch is later split into blocks (`augment_blocks`).
The generator lives on the samples' device.

Shapes: samples are `(M, C, S, S)` float in [0, 1], C in {1, 3}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from bagssl_core.config import AugConfig
from bagssl_core.crops import check_generator

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Samples per block on CPU (see `augment_blocks`).
_CPU_BLOCK = 256
# An augmentation applied to some samples: (those samples (K, C, S, S), their indices in the whole
# batch, or a slice of it) -> the augmented samples as a new tensor.
_SampleOp = Callable[[torch.Tensor, "torch.Tensor | slice"], torch.Tensor]
# Augmentations to apply, in order: for each, the `(M, 1, 1, 1)` mask of selected samples and the operation.
AugmentPlan = list[tuple[torch.Tensor, _SampleOp]]


# --- pixel operations ----------------------------------------------------------------------------------


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


# --- drawing and applying a plan -----------------------------------------------------------------------


def augment(
    x: torch.Tensor, aug: AugConfig, generator: torch.Generator, by_index: bool | None = None
) -> torch.Tensor:
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
    bit-exact.

    Args:
        x: `(M, C, S, S)` float in [0, 1], C in {1, 3}; not modified.
        aug: Probabilities and strengths.
        generator: On x's device.
        by_index: Which execution path `augment_blocks` takes; None (the default) picks it by x's device.

    Returns:
        `(M, C, S, S)` float in [0, 1], a new tensor.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected shape (M, C, S, S) with C in {{1, 3}}, got {tuple(x.shape)}")
    check_generator(generator, x.device)
    plan = draw_plan(x.shape[0], x.shape[1], x.shape[-1], aug, generator, x.device)
    out = torch.empty_like(x)
    for rows, y in augment_blocks(plan, len(x), 1, lambda lo, hi: x[lo:hi].clone(), x.device, by_index):
        out[rows] = y
    return out


def augment_blocks(
    plan: AugmentPlan,
    items: int,
    samples_per_item: int,
    cut: Callable[[int, int], torch.Tensor],
    device: torch.device,
    by_index: bool | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Cut and augment a batch block by block: the one loop of `augment` and of the training pipeline.

    Two execution paths, chosen here by device, because each is the fast one on its device:

    - CPU (gather by index): the batch is walked in blocks of about 256 samples, whole items at a time,
      so that every intermediate of the pixel work stays in cache; each operation runs on its selected
      samples only, gathered by index and written back in place, which skips the work on unselected ones.
    - elsewhere (GPU): the whole batch is one block and each operation runs on every sample, `torch.where`
      keeping the selected ones. Gathering by index would need the number of selected samples on the
      host: a host-device synchronisation per operation, which costs more than the skipped work.

    On one CPU thread, `augment` of 2048 samples of 3 x 28 x 28 with the default augmentation took 0.26 s
    by index and 1.1 s with `torch.where`.

    Both give the same result for the same plan, up to float rounding.

    Args:
        plan: Drawn by `draw_plan` for all `items * samples_per_item` samples.
        items: Units the batch is cut in (images, or single samples); a block never splits one.
        samples_per_item: Samples each item gives (patches per image, or 1).
        cut: `(lo, hi)` -> the unaugmented samples of items lo..hi, `((hi - lo) * samples_per_item, C, S, S)`,
            as a tensor of their own: the gather-by-index path overwrites it.
        device: Where the pixel work runs; picks the path.
        by_index: Forces a path (tests compare the two); None picks it by device.

    Yields:
        `(rows, samples)`: the block's rows of the flattened batch, and its augmented samples
        `(rows.stop - rows.start, C, S, S)`.
    """
    if by_index is None:
        by_index = device.type == "cpu"
    per_block = max(1, _CPU_BLOCK // samples_per_item) if by_index else max(1, items)
    for lo in range(0, items, per_block):
        hi = min(items, lo + per_block)
        rows = slice(lo * samples_per_item, hi * samples_per_item)
        yield rows, _apply_plan(cut(lo, hi), plan, rows, by_index)


def draw_plan(
    m: int, c: int, side: int, aug: AugConfig, generator: torch.Generator, dev: torch.device
) -> AugmentPlan:
    """Every random draw of `augment` for M samples, in a fixed order, before any pixel work.

    Drawing up front makes the result independent of how the samples are later split into blocks.

    Args:
        m: Number of samples M.
        c: Channels C (1 skips saturation, hue and grayscale).
        side: Sample side S (sets the blur kernel size).
        aug: Probabilities and strengths.
        generator: On `dev`.
        dev: Where the draws are made: the samples' device.

    Returns:
        The plan, for `augment_blocks`.
    """
    plan: AugmentPlan = []
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


def _apply_plan(x: torch.Tensor, plan: AugmentPlan, rows: slice, by_index: bool) -> torch.Tensor:
    """Apply `plan` to x, the samples at `rows` of the batch it was drawn for (see `augment_blocks`).

    by_index overwrites x in place; otherwise x is left untouched and a new tensor returned.
    """
    for on, op in plan:
        if by_index:
            idx = on.view(-1)[rows].nonzero().squeeze(1)
            if idx.numel():
                x.index_copy_(0, idx, op(x.index_select(0, idx), idx + rows.start))
        else:
            x = torch.where(on[rows], op(x, rows), x)
    return x


def _rand_mask(m: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`(M, 1, 1, 1)` bool: True with probability p, independently per sample."""
    return (torch.rand(m, generator=generator, device=device) < p).view(m, 1, 1, 1)


def _uniform(
    m: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(m, generator=generator, device=device) * (high - low) + low


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
        if v == 0 or (colour and c == 1):
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

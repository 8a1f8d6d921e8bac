"""Aggregation schemes: an image's representation from the embeddings of its patches.

Aggregation is an evaluation-time choice. Feature extraction (`extract_features`) embeds every distinct
patch the asked-for schemes read once, whatever the number of schemes: `mean_emb`, `mean_proj` and
`max_emb` reduce the same evaluation bag, the centre patch is often one of the grid's patches, and the
multiscale bag's scale equal to the grid's patch size is the grid itself. Probing all six schemes thus
costs the distinct patches they read (`patches_per_image`), not the sum of each scheme's patches.

Memory is bounded by `cfg.eval_patch_chunk` (eval.patch_chunk): patches are cut from the images, resized
and forwarded that many at a time, and each scheme's reduction (a sum or a running max) is accumulated
chunk by chunk, so neither the patches of a batch nor their embeddings are ever held at once. This is what keeps a dense
grid on large images (961 patches an image for 14-px patches at stride 7 on 224 px) from exhausting
memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bagssl_core.config import TrainConfig, patch_pixels
from bagssl_core.crops import (
    centre_patch,
    check_images,
    crop_patches,
    grid_boxes,
    grid_patches,
    sample_boxes,
    sample_patches,
    whole_image,
)
from bagssl_core.patches import normalize

# How a scheme reduces its view's patches: the mean of the embeddings h, the mean of the projections z,
# or the per-dimension max of h. A one-patch view's mean is that patch's embedding.
Stat = Literal["mean_h", "mean_z", "max_h"]
View = Literal["bag", "centre", "whole", "multiscale"]
MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Scheme:
    """An aggregation scheme: the patches it reads (its view), and how it reduces their (h, z) to one row."""

    view: str  # "bag", "centre", "whole" or "multiscale"
    stat: Stat

    def reduce(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(h, z) of shape (B, P, D_h), (B, P, D_z) -> (B, D)."""
        if self.stat == "mean_z":
            return z.mean(1)
        return h.amax(1) if self.stat == "max_h" else h.mean(1)


SCHEMES: dict[str, Scheme] = {
    "mean_emb": Scheme("bag", "mean_h"),
    "mean_proj": Scheme("bag", "mean_z"),
    "max_emb": Scheme("bag", "max_h"),
    "centre": Scheme("centre", "mean_h"),
    "whole": Scheme("whole", "mean_h"),
    "multiscale": Scheme("multiscale", "mean_h"),
}


def check_schemes(names: Iterable[str]) -> None:
    """Raise unless every name is a scheme of `SCHEMES`."""
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise ValueError(f"eval.aggregation: unknown scheme(s) {unknown}; expected any of {sorted(SCHEMES)}")


# --- where each view's patches lie ---------------------------------------------------------------------


@dataclass(frozen=True)
class PatchGroup:
    """Patches of one side cut at the same corners of every image, or (random patches) at each image's own.

    Attributes:
        px: patch side in pixels.
        boxes: LongTensor (G, 2) of (top, left) shared by every image, or (B, G, 2) per image.
        weights: float (V, G): how many times each of the plan's V views reads each patch (0 = not).
    """

    px: int
    boxes: torch.Tensor
    weights: torch.Tensor

    @property
    def per_image(self) -> bool:
        return self.boxes.dim() == 3


def view_boxes(cfg: TrainConfig, view: str, image_hw: tuple[int, int]) -> list[tuple[int, torch.Tensor]]:
    """The patches a deterministic view reads, in `view_patches`' order: [(side px, corners (G, 2))].

    The random bag (eval.patches=random) has no fixed corners: `PatchPlan.for_batch` draws them.
    """
    h, w = image_hw
    if view == "bag":
        if cfg.eval.patches != "grid":
            raise ValueError("view_boxes: random evaluation patches are drawn per batch, not fixed")
        return [(cfg.eval_patch_px, grid_boxes((h, w), cfg.eval_patch_px, cfg.eval_stride))]
    if view == "centre":
        px = cfg.eval_patch_px
        if not 1 <= px <= min(h, w):
            raise ValueError(f"patch_px: a {px}-px patch does not fit a {h}x{w} image")
        return [(px, torch.tensor([[(h - px) // 2, (w - px) // 2]]))]
    if view == "whole":
        if h != w:  # a crop is square; the datasets all yield square images
            raise ValueError(f"whole: expected square images, got {h}x{w}")
        return [(h, torch.zeros(1, 2, dtype=torch.long))]
    if view == "multiscale":
        out = []
        for s in cfg.eval.multiscale_sizes:
            px = patch_pixels(s, cfg.image_size)
            out.append((px, grid_boxes((h, w), px, max(1, px // 2))))
        return out
    raise ValueError(f"unknown view {view!r}")


@dataclass(frozen=True)
class PatchPlan:
    """The distinct patches a set of views reads, grouped by side, with which view reads which.

    A patch read by several views (the centre patch when it lies on the grid, the multiscale scale equal
    to the grid's) is one entry, embedded once; the weights keep a view's reduction what it would be on
    its own patches (a patch a view lists twice counts twice in its mean).
    """

    views: tuple[str, ...]
    groups: tuple[PatchGroup, ...]
    random_bag: bool  # the bag view's patches are random: its group is drawn per batch

    @classmethod
    def build(cls, cfg: TrainConfig, views: Sequence[str], image_hw: tuple[int, int]) -> PatchPlan:
        views = tuple(dict.fromkeys(views))
        random_bag = "bag" in views and cfg.eval.patches == "random"
        # (px, top, left) -> (group, index in group), and each view's count of every patch
        where: dict[tuple[int, int, int], tuple[int, int]] = {}
        corners: dict[int, list[tuple[int, int]]] = {}
        counts: list[dict[tuple[int, int], int]] = [{} for _ in views]
        for v, view in enumerate(views):
            if view == "bag" and random_bag:
                continue
            for px, boxes in view_boxes(cfg, view, image_hw):
                for top, left in boxes.tolist():
                    key = (px, top, left)
                    if key not in where:
                        group = list(corners).index(px) if px in corners else len(corners)
                        corners.setdefault(px, []).append((top, left))
                        where[key] = (group, len(corners[px]) - 1)
                    counts[v][where[key]] = counts[v].get(where[key], 0) + 1
        groups = []
        for g, (px, cs) in enumerate(corners.items()):
            weights = torch.zeros(len(views), len(cs))
            for v in range(len(views)):
                for (gi, i), n in counts[v].items():
                    if gi == g:
                        weights[v, i] = n
            groups.append(PatchGroup(px, torch.tensor(cs, dtype=torch.long), weights))
        return cls(views, tuple(groups), random_bag)

    def patches_per_image(self, cfg: TrainConfig) -> int:
        """Distinct patches embedded for each image."""
        return sum(g.boxes.shape[-2] for g in self.groups) + (cfg.eval_num_patches if self.random_bag else 0)

    def for_batch(
        self, cfg: TrainConfig, images: torch.Tensor, generator: torch.Generator | None
    ) -> list[PatchGroup]:
        """The groups for one batch of images (B, C, H, W): the fixed ones, plus the random bag's corners
        drawn from `generator` as `sample_patches` draws them."""
        groups = list(self.groups)
        if self.random_bag:
            if generator is None:
                raise ValueError("random evaluation patches need a generator")
            b, _, h, w = images.shape
            n, px = cfg.eval_num_patches, cfg.eval_patch_px
            boxes = sample_boxes(b, n, (h, w), px, generator, images.device)
            weights = torch.zeros(len(self.views), n)
            weights[self.views.index("bag")] = 1.0
            groups.append(PatchGroup(px, boxes, weights))
        return groups


def patches_per_image(cfg: TrainConfig, schemes: Sequence[str]) -> int:
    """How many patches of each image `extract_features` embeds for `schemes` (shared patches once)."""
    check_schemes(schemes)
    img = cfg.image_size
    return PatchPlan.build(cfg, [SCHEMES[s].view for s in schemes], (img, img)).patches_per_image(cfg)


# --- embedding in bounded chunks ---------------------------------------------------------------------


def _chunks(num_images: int, per_image: int, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(i0, i1, g0, g1) blocks covering images x patches with (i1 - i0) * (g1 - g0) <= chunk: whole images
    of patches when an image's patches fit a chunk, else one image at a time, `chunk` patches at once."""
    if per_image <= chunk:
        step = chunk // per_image
        for i0 in range(0, num_images, step):
            yield i0, min(num_images, i0 + step), 0, per_image
    else:
        for i0 in range(num_images):
            for g0 in range(0, per_image, chunk):
                yield i0, i0 + 1, g0, min(per_image, g0 + chunk)


def _embed_group(
    model: nn.Module,
    images: torch.Tensor,
    group: PatchGroup,
    cfg: TrainConfig,
    mean_std: MeanStd,
    autocast: bool,
    chunk: int | None,
) -> Iterator[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
    """Embed a group's patches at most `chunk` (default `cfg.eval_patch_chunk`) at a time: (i0, i1, g0, g1,
    h, z), h of shape (i1 - i0, g1 - g0, D_h). Only the chunk's patches are ever cut out (`crop_patches`
    indexes a view of the images)."""
    chunk = chunk or cfg.eval_patch_chunk(group.px, images.device.type)
    mean, std = mean_std
    size = cfg.input_size
    n_img, n_patch = images.shape[0], group.boxes.shape[-2]
    for i0, i1, g0, g1 in _chunks(n_img, n_patch, chunk):
        if group.per_image:
            boxes = group.boxes[i0:i1, g0:g1]
        else:
            boxes = group.boxes[g0:g1].to(images.device).expand(i1 - i0, -1, -1)
        x = crop_patches(images[i0:i1], boxes, group.px, size).flatten(0, 1)
        if cfg.patch.aug.normalize:
            x = normalize(x, mean, std)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            h, z = model(x)
        yield i0, i1, g0, g1, h.float().view(i1 - i0, g1 - g0, -1), z.float().view(i1 - i0, g1 - g0, -1)


@torch.no_grad()
def embed_views(
    model: nn.Module,
    images: torch.Tensor,
    cfg: TrainConfig,
    views: Sequence[str],
    mean_std: MeanStd,
    generator: torch.Generator | None = None,
    autocast: bool = False,
    chunk: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each view, (h, z) of every one of its patches: shapes (B, P, D_h) and (B, P, D_z), patches in
    `view_patches`' order.

    For analyses that need each patch's embedding. The patches are forwarded at most `chunk` at a time
    (default `cfg.eval_patch_chunk(side)`), but the B * P embeddings returned are held at once: to probe
    schemes, `extract_features` reduces chunk by chunk instead.
    """
    check_images(images)
    b, _, h, w = images.shape
    out = {}
    for view in dict.fromkeys(views):
        plan = PatchPlan.build(cfg, [view], (h, w))
        # No sharing inside one view: each of its parts in order, duplicates included.
        if view == "bag" and plan.random_bag:
            parts = plan.for_batch(cfg, images, generator)
        else:
            parts = [
                PatchGroup(px, boxes, torch.ones(1, len(boxes)))
                for px, boxes in view_boxes(cfg, view, (h, w))
            ]
        hs, zs = [], []
        for group in parts:
            n = group.boxes.shape[-2]
            blocks = list(_embed_group(model, images, group, cfg, mean_std, autocast, chunk))
            gh = blocks[0][4].new_empty(b, n, blocks[0][4].shape[-1])
            gz = blocks[0][5].new_empty(b, n, blocks[0][5].shape[-1])
            for i0, i1, g0, g1, ch, cz in blocks:
                gh[i0:i1, g0:g1], gz[i0:i1, g0:g1] = ch, cz
            hs.append(gh)
            zs.append(gz)
        out[view] = (torch.cat(hs, dim=1), torch.cat(zs, dim=1))
    return out


def view_patches(
    images: torch.Tensor, view: str, cfg: TrainConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """The float patches in [0, 1] of shape (B, P, C, S, S) that a view reads from uint8 images (B, C, H, W).

    All of them at once, for inspection and tests: extraction cuts them chunk by chunk (`embed_views`).
    """
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


# --- features for the probes ---------------------------------------------------------------------


class _Reduction:
    """One view's running sums and maxima over a batch of b images, fed chunk by chunk: every (image,
    patch) pair of the view arrives in exactly one chunk, so sums start at 0 and maxima at -inf."""

    def __init__(self, stats: set[Stat], total_weight: float, b: int) -> None:
        self.stats, self.total, self.b = stats, total_weight, b
        self.acc: dict[Stat, torch.Tensor] = {}

    def add(self, i0: int, i1: int, h: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> None:
        """Patches (i1 - i0, P, D) of images i0..i1, each read w[p] times (0: not by this view)."""
        read = w > 0
        if not bool(read.any()):
            return
        if not bool(read.all()):
            h, z, w = h[:, read], z[:, read], w[read]
        ones = bool((w == 1).all())
        for stat in self.stats:
            x = z if stat == "mean_z" else h
            if stat not in self.acc:
                fill = float("-inf") if stat == "max_h" else 0.0
                self.acc[stat] = x.new_full((self.b, x.shape[-1]), fill)
            acc = self.acc[stat][i0:i1]
            if stat == "max_h":
                torch.maximum(acc, x.amax(1), out=acc)
            else:
                acc += x.sum(1) if ones else torch.einsum("bpd,p->bd", x, w.to(x))

    def result(self, stat: Stat) -> torch.Tensor:
        acc = self.acc[stat]
        return acc if stat == "max_h" else acc / self.total


@torch.no_grad()
def reduce_batch(
    model: nn.Module,
    images: torch.Tensor,
    cfg: TrainConfig,
    schemes: Sequence[str],
    mean_std: MeanStd,
    generator: torch.Generator | None = None,
    autocast: bool = False,
    plan: PatchPlan | None = None,
) -> dict[str, torch.Tensor]:
    """Every scheme's features (B, D) of one image batch (B, C, H, W), on the images' device.

    Each distinct patch of the plan (built from the schemes' views when not given) is embedded once,
    `cfg.eval_patch_chunk(side)` patches at a time, and folded into every view that reads it.
    """
    check_images(images)
    check_schemes(schemes)
    b, _, h, w = images.shape
    if plan is None:
        plan = PatchPlan.build(cfg, [SCHEMES[s].view for s in schemes], (h, w))
    groups = plan.for_batch(cfg, images, generator)
    reductions = []
    for v, view in enumerate(plan.views):
        stats = {SCHEMES[s].stat for s in schemes if SCHEMES[s].view == view}
        total = float(sum(g.weights[v].sum() for g in groups))
        reductions.append(_Reduction(stats, total, b))
    for group in groups:
        weights = group.weights.to(images.device)
        for i0, i1, g0, g1, gh, gz in _embed_group(model, images, group, cfg, mean_std, autocast, None):
            for v, red in enumerate(reductions):
                red.add(i0, i1, gh, gz, weights[v, g0:g1])
    return {s: reductions[plan.views.index(SCHEMES[s].view)].result(SCHEMES[s].stat) for s in schemes}


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    schemes: Sequence[str],
    device: torch.device,
    mean_std: MeanStd,
    autocast: bool = False,
    batch_ids: Iterable[int] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features of every image in `loader` under every scheme, on the CPU.

    Each distinct patch the schemes read is embedded once (`reduce_batch`), at most
    `cfg.eval_patch_chunk(side)` at a time.

    Args:
        batch_ids: the index of each batch the loader yields in the whole split (default 0, 1, 2, ...):
            a rank that extracts a share of the batches (`train.extract_split`) draws the random patches
            of each one as a single process would.

    Returns:
        ({scheme: (N, D)}, labels (N,)). Random evaluation patches are drawn from a generator seeded by
        cfg.run.seed and the batch index, so the same checkpoint always gives the same features, however
        the batches are shared among ranks.
    """
    check_schemes(schemes)
    gen = torch.Generator(device=device) if cfg.eval.patches == "random" else None
    ids = iter(batch_ids) if batch_ids is not None else itertools.count()
    feats: dict[str, list[torch.Tensor]] = {s: [] for s in schemes}
    labels = []
    plans: dict[tuple[int, int], PatchPlan] = {}
    was_training = model.training
    model.eval()
    try:
        for images, y in loader:
            if gen is not None:
                gen.manual_seed(cfg.run.seed + 7919 + 104729 * next(ids))
            images = images.to(device, non_blocking=True)
            hw = (images.shape[-2], images.shape[-1])
            if hw not in plans:
                plans[hw] = PatchPlan.build(cfg, [SCHEMES[s].view for s in schemes], hw)
            reduced = reduce_batch(model, images, cfg, schemes, mean_std, gen, autocast, plans[hw])
            for s in schemes:
                feats[s].append(reduced[s].cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return {s: torch.cat(v) for s, v in feats.items()}, torch.cat(labels)

"""Benchmark: what probing all six aggregation schemes costs in feature extraction, against one.

Issue 9 measured 79 s for `eval.aggregation=[mean_emb]` and 785 s for all six on the quick preset's
checkpoint. The cost of extraction is the patches forwarded: the quick preset's grid (14-px patches at
stride 7 on 28 px) is 9 patches an image, while the multiscale bag (sides 0.25, 0.5 and 0.75 of the image,
each at half-patch stride) is 64 + 9 + 4 = 77. Before, each view was embedded on its own (88 patches an
image for six schemes); now every distinct patch is embedded once (78: the multiscale bag's 14-px scale is
the grid, the centre patch lies on it).

Model: the quick preset's ResNet-18 (CIFAR stem), randomly initialised (extraction time does not depend on
the weights). Images: real Fashion-MNIST test images (Debian's dataset-fashion-mnist). One torch thread.
"before" is the former extraction, kept here: every patch of a view at once, one forward per view.
Run: `python bench/eval_schemes.py [--images N]`. The last line is the 6-vs-1 ratio.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from torch import nn

from bagssl_core.aggregate import SCHEMES, extract_features, patches_per_image, view_patches
from bagssl_core.config import TrainConfig, load_config
from bagssl_core.data import load_split
from bagssl_core.models import build_model
from bagssl_core.patches import channel_stats, normalize

ALL = list(SCHEMES)
CPU = torch.device("cpu")


@torch.no_grad()
def before(model: nn.Module, batches: list[torch.Tensor], cfg: TrainConfig, schemes: list[str]) -> None:
    """The former extraction: for each view the schemes read, all its patches of a batch in one forward."""
    mean, std = channel_stats(cfg.data.name, 3)
    views = list(dict.fromkeys(SCHEMES[s].view for s in schemes))
    for images in batches:
        for view in views:
            x = view_patches(images, view, cfg, None)
            h, z = model(normalize(x.flatten(0, 1), mean, std))
            for s in schemes:
                if SCHEMES[s].view == view:
                    SCHEMES[s].reduce(h.view(*x.shape[:2], -1), z.view(*x.shape[:2], -1))


def after(model: nn.Module, batches: list[torch.Tensor], cfg: TrainConfig, schemes: list[str]) -> None:
    mean_std = channel_stats(cfg.data.name, 3)
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
    extract_features(model, loader, cfg, schemes, CPU, mean_std)


def seconds(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48, help="Fashion-MNIST test images (default 48)")
    p.add_argument("--batch", type=int, default=16, help="images per extraction batch (default 16)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, {"eval.aggregation": ALL, "data.test_subset": args.images}, preset="quick")
    data = load_split(cfg.data, "test", cfg.run.seed)
    images = data.__getitems__(range(len(data)))[0]
    batches = list(images.split(args.batch))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.in_channels).eval()
    after(model, batches[:1], cfg, ["mean_emb"])  # warm-up
    print(
        f"{len(images)} Fashion-MNIST test images at {cfg.image_size} px; patch {cfg.eval_patch_px} px, stride "
        f"{cfg.eval_stride}, input {cfg.input_size} px; multiscale sizes {cfg.eval.multiscale_sizes}"
    )
    print(f"{'scheme':<12}{'patches/image':>14}{'seconds':>10}")
    for s in ALL:
        t = seconds(functools.partial(after, model, batches, cfg, [s]))
        print(f"{s:<12}{patches_per_image(cfg, [s]):>14}{t:>10.2f}")
    one_before = seconds(lambda: before(model, batches, cfg, ["mean_emb"]))
    six_before = seconds(lambda: before(model, batches, cfg, ALL))
    one_after = seconds(lambda: after(model, batches, cfg, ["mean_emb"]))
    six_after = seconds(lambda: after(model, batches, cfg, ALL))
    summed = sum(
        len(view_patches(images[:1], v, cfg, None)[0]) for v in dict.fromkeys(SCHEMES[s].view for s in ALL)
    )
    print(f"before: mean_emb {one_before:.2f} s, all six {six_before:.2f} s ({summed} patches/image)")
    print(
        f"after:  mean_emb {one_after:.2f} s, all six {six_after:.2f} s "
        f"({patches_per_image(cfg, ALL)} patches/image)"
    )
    print(
        f"patch ratio 6-vs-1: before {summed / patches_per_image(cfg, ['mean_emb']):.2f}, "
        f"after {patches_per_image(cfg, ALL) / patches_per_image(cfg, ['mean_emb']):.2f}"
    )
    print(
        f"6-vs-1 extraction time ratio: {six_after / one_after:.2f}x (before: {six_before / one_before:.2f}x)"
    )


if __name__ == "__main__":
    main()

"""Benchmark: channels_last against contiguous (NCHW) weights on the CPU, for extraction and training steps.

`models.prepare_for_device` turns the model to channels_last (model.channels_last, default true). It did so
on CUDA only, from a belief that on the CPU it slows the convolutions down, never measured. This measures
it with the real code paths, both memory formats of the same seeded model taking turns
(`bench/patches.py:best_times`):

- extraction: `aggregate.reduce_batch` of one batch of Fashion-MNIST images (mean_emb over the grid), the
  patches forwarded `cfg.eval_patch_chunk` at a time, as every probe does;
- training: `train.train_step` (forward of B x N augmented patches, bag VICReg, backward, LARS step).

Shapes (ResNet-18, CIFAR stem, 3 input channels):
- smoke: the smoke spec's trial, 14-px patches input at 14 px, 9 grid patches at stride 7, 4 patches an
  image in a training step (`--batch 32` is one Ray worker's half of the spec's 64-image batch);
- default: the default config, 16-px patches resized to 28 px, grid stride 8, 16 patches an image.

Run: `python bench/memory_format.py [--threads N] [--repeat R] [--images N] [--batch B]` on an idle
machine (about 6 minutes on 2 cores with one thread and the defaults: 128 images extracted, training
steps of 16 images). Each line gives each format's fastest of R timed calls and their ratio; the last
line is the ratio for the smoke shape's extraction, e.g. `smoke extraction, channels_last vs contiguous:
1.5x`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from functools import partial

import torch

# bench/ is the script's directory, so its sibling benchmark imports as a top-level module.
from patches import best_times, cpu_images

from bagssl_core.aggregate import reduce_batch
from bagssl_core.config import TrainConfig
from bagssl_core.losses import build_loss
from bagssl_core.models import BagSSLModel, build_model
from bagssl_core.optim import build_optimizer
from bagssl_core.patches import channel_stats
from bagssl_core.train import train_step

SHAPES = {
    "smoke": {"patch": {"num": 4, "size": 14, "input_size": 14}, "eval": {"grid_stride": 7}},
    "default": {},
}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def config(shape: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {"data": {"name": "fashion_mnist"}, "model": {"backbone": "resnet18_cifar"}, **SHAPES[shape]}
    )


def seeded_model(cfg: TrainConfig, memory_format: torch.memory_format = torch.channels_last) -> BagSSLModel:
    """The config's model, initialised from seed 0, in `memory_format`."""
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.in_channels).to(memory_format=memory_format)


def models(cfg: TrainConfig) -> dict[str, BagSSLModel]:
    """The same seeded model in each memory format."""
    return {name: seeded_model(cfg, fmt) for name, fmt in FORMATS.items()}


def report(label: str, seconds: dict[str, float]) -> float:
    ratio = seconds["contiguous"] / seconds["channels_last"]
    cells = ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items())
    print(f"{label}: {cells}; channels_last vs contiguous: {ratio:.2f}x", flush=True)
    return ratio


def extraction_times(
    cfg: TrainConfig, images: torch.Tensor, repeat: int, ways: Mapping[str, tuple[torch.nn.Module, bool]]
) -> dict[str, float]:
    """Fastest seconds of `reduce_batch` (mean_emb over the evaluation grid, `cfg.eval_patch_chunk` patches a
    forward, as every probe extracts) for each way: name -> (model in eval mode, bf16 autocast)."""
    mean_std = channel_stats(cfg.data.name, cfg.in_channels)
    work = {
        name: partial(reduce_batch, model, images, cfg, ["mean_emb"], mean_std, None, autocast)
        for name, (model, autocast) in ways.items()
    }
    return best_times(work, dict.fromkeys(work, repeat), torch.device("cpu"))


def training_times(
    cfg: TrainConfig, batch: int, repeat: int, ways: Mapping[str, tuple[BagSSLModel, bool]]
) -> dict[str, float]:
    """Fastest seconds of `train_step` (forward of batch x patch.num patches, bag VICReg, backward, LARS step)
    for each way: name -> (model, bf16 autocast). Each way needs a model of its own: the steps update it."""
    n, s = cfg.patch.num, cfg.input_size
    views = torch.rand(batch, n, cfg.in_channels, s, s, generator=torch.Generator().manual_seed(0))
    loss_fn = build_loss(cfg.loss)
    work = {}
    for name, (model, autocast) in ways.items():
        model.train()
        opt = build_optimizer(model, cfg)
        work[name] = partial(
            train_step, model, views, loss_fn, opt, cfg.effective_lr(), cfg.optim.grad_clip, autocast
        )
    return best_times(work, dict.fromkeys(work, repeat), torch.device("cpu"))


def parse_args(doc: str, compared: str) -> argparse.Namespace:
    """The options of the benchmarks that compare `compared` (formats, ways) on extraction and training."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3, help=f"timed rounds per {compared}")
    ap.add_argument("--images", type=int, default=128, help="images extracted per round")
    ap.add_argument("--batch", type=int, default=16, help="images per training step")
    return ap.parse_args()


def main() -> None:
    args = parse_args(__doc__, "format")
    images, header = cpu_images(args.threads, args.images)
    print(f"{header}; fastest of {args.repeat}")
    extraction_ratios = {}
    for shape in SHAPES:
        cfg = config(shape)
        chunk = cfg.eval_patch_chunk(cfg.patch_px)
        what = f"{cfg.patch_px}-px patches at {cfg.input_size} px, {chunk} a forward"
        ways = {name: (model.eval(), False) for name, model in models(cfg).items()}
        extraction_ratios[shape] = report(
            f"{shape} extraction ({args.images} images, {what})",
            extraction_times(cfg, images, args.repeat, ways),
        )
        ways = {name: (model, False) for name, model in models(cfg).items()}
        report(
            f"{shape} training step ({args.batch} x {cfg.patch.num} patches)",
            training_times(cfg, args.batch, args.repeat, ways),
        )
    print(f"smoke extraction, channels_last vs contiguous: {extraction_ratios['smoke']:.2f}x")


if __name__ == "__main__":
    main()

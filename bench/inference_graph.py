"""Benchmark: feature extraction on the CPU with eval.cpu_graph's frozen graph against the eager model.

`models.inference_graph` traces the model, freezes it and lets TorchScript optimise it for inference
(BatchNorm folded into the convolutions, oneDNN-prepacked weights, activations in oneDNN's blocked layout).
Every probe on the CPU extracts with it unless `eval.cpu_graph=false`. This times the real extraction path,
`aggregate.reduce_batch` (mean_emb and centre over the evaluation grid, `cfg.eval_patch_chunk` patches a
forward) of one batch of Fashion-MNIST images, the eager channels_last model and its graph taking turns
(`bench/patches.py:best_times`), for these shapes:

- smoke: the smoke spec's trial, CIFAR-stem ResNet-18, 14-px patches input at 14 px, 9 grid patches an
  image at stride 7;
- default: the default config, CIFAR-stem ResNet-18, 16-px patches resized to 28 px, grid stride 8;
- imagenet-stem 14 px: the ImageNet-stem ResNet-18 of the test suite's tiny sweeps, 14-px patches;
- imagenet-stem 32 px: the same backbone, 14-px patches resized to 32 px.

It also prints the seconds each graph took to build (once per evaluation). With `--compile` it also times
torch.compile of the smoke model, the other way to a faster CPU forward: its compilation, its first call at
a chunk's size (a second compilation, for the new batch size) and its fastest call after that.

Run: `python bench/inference_graph.py [--threads N] [--repeat R] [--images N] [--compile]` on an idle
machine (about 3 minutes on 2 cores with one thread and the defaults, 2 more with --compile). Each line
gives both ways' fastest of R timed calls and their ratio; the last line is the ratio for the smoke shape,
e.g. `smoke extraction, frozen graph vs eager: 1.55x`.
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial

import torch

# bench/ is the script's directory, so its sibling benchmark imports as a top-level module.
from patches import best_times, cpu_images

from bagssl_core.aggregate import reduce_batch
from bagssl_core.config import TrainConfig
from bagssl_core.models import BagSSLModel, build_model, inference_graph
from bagssl_core.patches import channel_stats

SHAPES = {
    "smoke": {"model": {"backbone": "resnet18_cifar", "projector": [256, 256]},
              "patch": {"num": 4, "size": 14, "input_size": 14}, "eval": {"grid_stride": 7}},
    "default": {},
    "imagenet-stem 14 px": {"model": {"backbone": "resnet18", "projector": [256, 256]},
                            "patch": {"num": 4, "size": 14, "input_size": 14}, "eval": {"grid_stride": 7}},
    "imagenet-stem 32 px": {"model": {"backbone": "resnet18", "projector": [256, 256]},
                            "patch": {"num": 4, "size": 14, "input_size": 32}, "eval": {"grid_stride": 7}},
}  # fmt: skip
SCHEMES = ["mean_emb", "centre"]


def config(shape: str) -> TrainConfig:
    return TrainConfig.model_validate({"data": {"name": "fashion_mnist"}, **SHAPES[shape]})


def seeded_model(cfg: TrainConfig) -> BagSSLModel:
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.in_channels).to(memory_format=torch.channels_last).eval()


def extraction(cfg: TrainConfig, images: torch.Tensor, repeat: int) -> tuple[dict[str, float], float]:
    """Fastest seconds of each way, and the seconds the graph took to build."""
    model = seeded_model(cfg)
    start = time.perf_counter()
    graph = inference_graph(model, cfg.in_channels, cfg.input_size)
    built = time.perf_counter() - start
    mean_std = channel_stats(cfg.data.name, cfg.in_channels)
    work = {
        name: partial(reduce_batch, m, images, cfg, SCHEMES, mean_std)
        for name, m in (("eager", model), ("graph", graph))
    }
    return best_times(work, dict.fromkeys(work, repeat), torch.device("cpu")), built


@torch.no_grad()
def compiled(cfg: TrainConfig, repeat: int) -> None:
    model = seeded_model(cfg)
    x = torch.randn(cfg.eval_patch_chunk(cfg.patch_px), cfg.in_channels, cfg.input_size, cfg.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        fn = torch.compile(model)
        fn(x[:2])
        first = time.perf_counter() - start
        start = time.perf_counter()
        fn(x)
        second = time.perf_counter() - start
        times = best_times(
            {"compiled": partial(fn, x), "eager": partial(model, x)},
            {"compiled": repeat, "eager": repeat},
            torch.device("cpu"),
        )
    print(
        f"smoke, torch.compile of one {len(x)}-patch forward: compiled and first called in {first:.1f} s, "
        f"{second:.1f} s more at the chunk's size, then {times['compiled']:.2f} s against eager "
        f"{times['eager']:.2f} s: {times['eager'] / times['compiled']:.2f}x",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per way")
    ap.add_argument("--images", type=int, default=128, help="images extracted per round")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on the smoke shape")
    args = ap.parse_args()
    images, header = cpu_images(args.threads, args.images)
    print(f"{header}; schemes {SCHEMES}; fastest of {args.repeat}", flush=True)
    ratios = {}
    for shape in SHAPES:
        cfg = config(shape)
        chunk = cfg.eval_patch_chunk(cfg.patch_px)
        seconds, built = extraction(cfg, images, args.repeat)
        ratios[shape] = seconds["eager"] / seconds["graph"]
        print(
            f"{shape} extraction ({args.images} images, {cfg.model.backbone}, {cfg.patch_px}-px patches at "
            f"{cfg.input_size} px, {chunk} a forward): eager {seconds['eager']:.2f} s, graph "
            f"{seconds['graph']:.2f} s (built in {built:.2f} s); frozen graph vs eager: {ratios[shape]:.2f}x",
            flush=True,
        )
    if args.compile:
        compiled(config("smoke"), args.repeat)
    print(f"smoke extraction, frozen graph vs eager: {ratios['smoke']:.2f}x")


if __name__ == "__main__":
    main()

"""Benchmark: the batched patch pipeline (patches.train_batch) vs per-patch torchvision PIL transforms.

The reference does what public many-patch implementations (EMP-SSL) do: every patch of every image goes
through a torchvision PIL transform chain one by one (RandomCrop -> Resize -> RandomHorizontalFlip ->
RandomApply(ColorJitter) -> RandomGrayscale -> RandomApply(GaussianBlur) -> RandomSolarize -> ToTensor ->
Normalize), then the patches are stacked. Both produce the same (B, N, C, S, S) normalised batch from the
same uint8 images with the same probabilities and strengths.

Images: real Fashion-MNIST training images (28x28, replicated to 3 channels) when Debian's
dataset-fashion-mnist is installed, else random 28x28 images. Run: `python bench/patches.py [--help]`.
The last line printed is the ratio, e.g. `batched vs per-patch PIL: 12.3x`.
"""

from __future__ import annotations

import argparse
import gzip
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from bagssl_core.augment import blur_kernel_size
from bagssl_core.config import TrainConfig
from bagssl_core.patches import channel_stats, train_batch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def load_images(batch: int, seed: int) -> tuple[torch.Tensor, str]:
    """(batch, 3, 28, 28) uint8: Fashion-MNIST training images if installed, else random pixels."""
    if FASHION_MNIST.is_file():
        with gzip.open(FASHION_MNIST, "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)  # idx3: 16-byte header, then pixels
        images = torch.from_numpy(raw.reshape(-1, 1, 28, 28).copy())
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:batch]
        return images[pick].expand(-1, 3, -1, -1).contiguous(), f"Fashion-MNIST ({FASHION_MNIST})"
    images = torch.randint(0, 256, (batch, 3, 28, 28), generator=torch.Generator().manual_seed(seed))
    return images.to(torch.uint8), "random 28x28 pixels (Fashion-MNIST files not installed)"


def cpu_images(threads: int | None, n: int) -> tuple[torch.Tensor, str]:
    """Set torch's CPU threads (None: torch's own choice) and load n images (`load_images`, seed 0): the
    images and a first line for the benchmark's output naming them, torch and the threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    images, source = load_images(n, seed=0)
    return images, f"images: {source}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"


def pil_reference(cfg: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-patch PIL pipeline with the config's settings: (B, C, H, W) uint8 -> (B, N, C, S, S)."""
    aug = cfg.patch.aug
    mean, std = channel_stats(cfg.data.name, 3)
    per_patch = T.Compose(
        [
            T.RandomCrop(cfg.patch_px),
            T.Resize(cfg.input_size),
            T.RandomHorizontalFlip(aug.flip_p),
            T.RandomApply(
                [T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p
            ),
            T.RandomGrayscale(aug.grayscale_p),
            T.RandomApply([T.GaussianBlur(blur_kernel_size(cfg.input_size), aug.blur_sigma)], p=aug.blur_p),
            T.RandomSolarize(128, p=aug.solarize_p),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    num = cfg.patch.num

    def run(images: torch.Tensor) -> torch.Tensor:
        pils = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        return torch.stack([torch.stack([per_patch(p) for _ in range(num)]) for p in pils])

    return run


def best_times(
    fns: Mapping[str, Callable[[], object]], reps: dict[str, int], device: torch.device
) -> dict[str, float]:
    """Fastest seconds per call of each function: one warm-up call each, then timed calls interleaved
    round by round, so that both pipelines see the same background load (other jobs share the cores)."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for round_ in range(max(reps.values())):
        for name, fn in fns.items():
            if round_ >= reps[name]:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="images per step (B)")
    parser.add_argument("--num", type=int, default=16, help="patches per image (N)")
    parser.add_argument("--patch", type=int, default=16, help="patch side in pixels")
    parser.add_argument("--size", type=int, default=28, help="side each patch is resized to (input size)")
    parser.add_argument(
        "--device", default="cpu", help="device of the batched pipeline (the reference is CPU/PIL)"
    )
    parser.add_argument("--reps", type=int, default=10, help="timed calls of the batched pipeline")
    parser.add_argument("--ref-reps", type=int, default=3, help="timed calls of the PIL reference")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the batched pipeline (default: torch's choice); PIL runs on one",
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TrainConfig.model_validate(
        {
            "data": {"name": "fashion_mnist"},
            "patch": {"size": args.patch, "num": args.num, "input_size": args.size},
        }
    )
    images, source = load_images(args.batch, seed=0)
    patches = args.batch * args.num
    aug = cfg.patch.aug
    print(f"images: {source}; batch {args.batch} x {args.num} patches of {args.patch} px -> {args.size} px")
    print(
        f"aug: flip {aug.flip_p}, jitter p {aug.jitter_p} "
        f"({aug.brightness}, {aug.contrast}, {aug.saturation}, {aug.hue}), gray {aug.grayscale_p}, "
        f"blur p {aug.blur_p} sigma {aug.blur_sigma} k {blur_kernel_size(args.size)}, "
        f"solarize {aug.solarize_p}, normalize {aug.normalize}"
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} (batched); "
        "the PIL reference is single-threaded"
    )

    gen = torch.Generator(device=device).manual_seed(0)
    on_device = images.to(device)
    torch.manual_seed(0)  # torchvision's random transforms draw from the global generator
    reference = pil_reference(cfg)
    best = best_times(
        {"batched": lambda: train_batch(on_device, cfg, gen), "pil": lambda: reference(images)},
        {"batched": args.reps, "pil": args.ref_reps},
        device,
    )
    batched, per_patch = patches / best["batched"], patches / best["pil"]
    print(
        f"timing: best of {args.reps} (batched) and {args.ref_reps} (PIL) interleaved calls, after a warm-up"
    )
    print(f"batched train_batch on {device}: {batched:,.0f} patches/s ({best['batched'] * 1e3:.1f} ms/step)")
    print(f"per-patch PIL (torchvision): {per_patch:,.0f} patches/s ({best['pil'] * 1e3:.1f} ms/step)")
    print(f"batched vs per-patch PIL: {batched / per_patch:.1f}x")


if __name__ == "__main__":
    main()

"""Benchmark: patches/s of a whole BagSSL training step, batched patch pipeline vs per-patch PIL transforms.

One step = build the (B, N, C, S, S) batch of augmented patches + forward of all B*N patches through
resnet18_cifar and the projector + bag VICReg loss + backward + LARS step (`bagssl_core.train.train_step`).
Two ways to build the batch feed the same model step:
  - batched: `patches.train_batch` on the training device, as the trainer does;
  - reference: EMP-SSL style, every patch of every image through a torchvision PIL transform chain one by
    one on the CPU (`pil_reference` in bench/patches.py, same probabilities and strengths), then copied to
    the device.
On CUDA the model is prepared as the trainer prepares it (`prepare_for_device`: channels_last) and runs
under bf16 autocast (run.precision=auto). Images: Fashion-MNIST training images when installed, else random.

Run: `python bench/train_step.py [--help]`. The last line printed is the ratio, e.g.
`batched pipeline step vs per-patch PIL step: 1.8x`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

# bench/ is the script's directory, so its sibling benchmark imports as a top-level module.
from patches import load_images, pil_reference

from bagssl_core.config import TrainConfig
from bagssl_core.losses import build_loss
from bagssl_core.models import build_model, prepare_for_device
from bagssl_core.optim import build_optimizer
from bagssl_core.patches import train_batch
from bagssl_core.train import train_step, use_bf16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    builders: dict[str, Callable[[], torch.Tensor]],
    step: Callable[[torch.Tensor], None],
    steps: int,
    device: torch.device,
) -> dict[str, tuple[float, float]]:
    """(batch-building seconds, model-step seconds) of each builder's fastest whole step.

    One untimed warm-up step first, then the builders take turns step by step, so that both see the same
    background load (other jobs may share the cores) and the same model state.
    """
    step(next(iter(builders.values()))())
    sync(device)
    best: dict[str, tuple[float, float]] = {name: (float("inf"), float("inf")) for name in builders}
    for _ in range(steps):
        for name, build in builders.items():
            sync(device)
            t0 = time.perf_counter()
            views = build()
            sync(device)
            t1 = time.perf_counter()
            step(views)
            sync(device)
            t2 = time.perf_counter()
            if t2 - t0 < sum(best[name]):
                best[name] = (t1 - t0, t2 - t1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch", type=int, default=None, help="images per step B (default 32 on CPU, 256 on CUDA)"
    )
    parser.add_argument("--num", type=int, default=16, help="patches per image N")
    parser.add_argument("--patch", type=int, default=16, help="patch side in pixels")
    parser.add_argument("--size", type=int, default=32, help="side each patch is resized to (backbone input)")
    parser.add_argument(
        "--steps", type=int, default=2, help="timed steps per pipeline, after one warm-up step"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 32)
    cfg = TrainConfig.model_validate(
        {
            "data": {"name": "fashion_mnist", "batch_size": batch},
            "patch": {"size": args.patch, "num": args.num, "input_size": args.size},
            "model": {"backbone": "resnet18_cifar"},
            "loss": {"name": "bag_vicreg"},
            "optim": {"name": "lars"},
        }
    )
    images, source = load_images(batch, seed=0)
    patches = batch * args.num
    autocast = use_bf16(cfg, device)
    torch.manual_seed(0)  # the model's initialisation, and torchvision's random transforms
    model = prepare_for_device(build_model(cfg.model, cfg.in_channels), device, cfg.model)
    model.train()
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg.loss)
    lr = cfg.effective_lr()

    print(f"images: {source}; batch {batch} x {args.num} patches of {args.patch} px -> {args.size} px")
    print(
        f"model: {cfg.model.backbone}, projector {cfg.model.projector}, "
        f"loss {cfg.loss.name}, optim {cfg.optim.name}; "
        f"device {device}, {'bf16 autocast' if autocast else 'fp32'}"
        f"{', channels_last' if device.type == 'cuda' and cfg.model.channels_last else ''}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )

    gen = torch.Generator(device=device).manual_seed(0)
    on_device = images.to(device)
    reference = pil_reference(cfg)

    def step(views: torch.Tensor) -> None:
        train_step(model, views, loss_fn, optimizer, lr, cfg.optim.grad_clip, autocast)

    best = time_steps(
        {
            "batched": lambda: train_batch(on_device, cfg, gen),
            "pil": lambda: reference(images).to(device, non_blocking=True),
        },
        step,
        args.steps,
        device,
    )
    rates = {name: patches / sum(parts) for name, parts in best.items()}
    print(f"timing: fastest of {args.steps} interleaved steps per pipeline, after a warm-up step")
    for name, label in (
        ("batched", f"batched train_batch on {device}"),
        ("pil", "per-patch PIL (torchvision)"),
    ):
        build_s, model_s = best[name]
        print(
            f"{label} + model step: {rates[name]:,.0f} patches/s "
            f"(batch {build_s * 1e3:.0f} ms + model step {model_s * 1e3:.0f} ms)"
        )
    print(f"batched pipeline step vs per-patch PIL step: {rates['batched'] / rates['pil']:.1f}x")


if __name__ == "__main__":
    main()

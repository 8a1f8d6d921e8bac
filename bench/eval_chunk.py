"""Benchmark: feature extraction time and peak memory against the patches forwarded at once (eval.patch_chunk).

Extraction cuts out and forwards at most `cfg.eval_patch_chunk(side, device)` patches at a time, which bounds
its memory whatever the image size or grid (issue 9). The bound is a pixel budget: EVAL_CHUNK_PIXELS (2^18)
on the CPU, EVAL_CHUNK_PIXELS_CUDA (2^22) on a GPU. On an H100 the CPU's budget (334 patches of 28 px a
forward) made the default config's probe take 11 s against a 14-s training epoch: the GPU waited between
small forwards. This benchmark times the real path, `train.extract_split` over a split of Fashion-MNIST
training images, for budgets 2^16 .. 2^23 pixels, and prints the budget's patches per forward, the
seconds, the images/s and the peak memory (GPU memory allocated on CUDA; on the CPU the process's peak
resident memory, which only grows, so read it as a ceiling).

Model: the default config's ResNet-18 (CIFAR stem), randomly initialised (extraction time does not depend on
the weights), prepared for the device as the trainer does (channels_last and bf16 autocast on CUDA).
Config: the defaults (16-px grid patches at stride 8 on 28 px, resized to 28, mean_emb), eval.batch_size
images a batch.
Run: `python bench/eval_chunk.py [--device cuda] [--images N]`. The last line is the ratio of the
extraction time at the CPU's budget to that at the GPU's, e.g. `... 2^18 px vs 2^22 px: 3.1x`.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from bagssl_core.config import EVAL_CHUNK_PIXELS, EVAL_CHUNK_PIXELS_CUDA, load_config
from bagssl_core.data import load_split
from bagssl_core.models import build_model, prepare_for_device
from bagssl_core.patches import channel_stats
from bagssl_core.train import extract_split, use_bf16


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="training images extracted (default 20000 on CUDA, 1000 on CPU)",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed extractions per budget; the fastest counts")
    args = p.parse_args()
    device = torch.device(args.device)
    n = args.images or (20000 if device.type == "cuda" else 1000)
    cfg = load_config(None, {"data.train_subset": n + 1, "data.val_size": 1})
    data = load_split(cfg.data, "train", cfg.run.seed)
    torch.manual_seed(0)
    model = prepare_for_device(build_model(cfg.model, cfg.in_channels), device, cfg.model).eval()
    autocast = use_bf16(cfg, device)
    mean_std = channel_stats(cfg.data.name, data.channels)
    side = max(cfg.eval_patch_px, cfg.input_size)
    print(
        f"{len(data)} Fashion-MNIST training images at {cfg.image_size} px on {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
        f"grid patch {cfg.eval_patch_px} px stride {cfg.eval_stride} -> input {cfg.input_size} px; "
        f"{cfg.eval.aggregation}; {cfg.eval.batch_size} images a batch; "
        f"{'bf16 autocast' if autocast else 'fp32'}; torch {torch.__version__}"
    )
    print(f"{'budget':>8}{'patches/fwd':>12}{'seconds':>9}{'images/s':>10}{'peak MB':>9}")
    seconds: dict[int, float] = {}
    for log2 in range(16, 24):
        chunk = max(1, 2**log2 // side**2)
        run_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"patch_chunk": chunk})})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            extract_split(model, data, run_cfg, run_cfg.eval, device, mean_std, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        seconds[log2] = best
        print(f"{'2^' + str(log2):>8}{chunk:>12}{best:>9.2f}{len(data) / best:>10.0f}{peak_mb(device):>9.0f}")
    cpu, gpu = EVAL_CHUNK_PIXELS.bit_length() - 1, EVAL_CHUNK_PIXELS_CUDA.bit_length() - 1
    print(
        f"extraction on {device.type} at the CPU's budget vs the GPU's, 2^{cpu} px vs 2^{gpu} px: "
        f"{seconds[cpu] / seconds[gpu]:.2f}x"
    )


if __name__ == "__main__":
    main()

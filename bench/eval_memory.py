"""Benchmark: peak resident memory of evaluation (feature extraction + kNN and linear probes) against image
side, 28 -> 56 -> 112 -> 224 px, at a fixed grid fraction.

Each side runs in a fresh subprocess: the quick preset's model (ResNet-18, CIFAR stem, random init) and
probes, on real Fashion-MNIST images (Debian's dataset-fashion-mnist) upsampled to the side by
`data.image_size` (bilinear, antialiased), 180 training, 20 validation and 50 test images. Evaluation
patches are half the image side (`patch.size=0.5`) at a quarter-side stride (a 3x3 grid), resized to a
16-px backbone input. One torch thread. The peak is the child's ru_maxrss; "eval adds" is what the peak
grew by during `evaluate` (the data and the model are loaded before).

Printed first, the same for the raw-pixel baseline a sweep scores in its driver (`score_raw_pixels`, 1000
training images, 100 of them validation, and 250 test images, 5 linear epochs): its features are the images
averaged down to at most 32 px a side (`bagssl_core.baselines.PIXEL_SIDE`); the reference, measured in the
same run, keeps each image's own side, as before 2026-11-28. "adds" is what the peak resident memory grew by
while scoring, the images already loaded (Linux: the peak is reset through /proc/self/clear_refs).

Issue 9: before chunked extraction, evaluation of 28-px PNGs resized to 224 px was killed at 21.9 GB.
Run: `python bench/eval_memory.py`. The last line is the ratio of the largest evaluation peak to the smallest.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SIDES = (28, 56, 112, 224)


def child(side: int) -> None:
    import torch

    from bagssl_core.config import load_config
    from bagssl_core.models import build_model
    from bagssl_core.train import evaluate, load_splits

    torch.set_num_threads(1)
    overrides = {
        "data.image_size": side,
        "data.train_subset": 200,
        "data.test_subset": 50,
        "data.batch_size": 64,
        "patch.size": 0.5,
        "patch.input_size": 16,
        "eval.grid_stride": side // 4,
        "eval.linear_epochs": 5,
    }
    cfg = load_config(None, overrides, preset="quick")
    train, splits = load_splits(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.in_channels)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    evaluate(model, cfg, train, splits, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {"peak_kib": peak, "before_kib": before, "seconds": seconds, "patch_px": cfg.eval_patch_px}
        )
    )


def baseline_child(side: int, keep_side: bool) -> None:
    import torch

    from bagssl_core.baselines import PIXEL_SIDE, score_raw_pixels
    from bagssl_core.config import load_config
    from bagssl_core.train import load_splits

    torch.set_num_threads(1)
    overrides = {
        "data.image_size": side,
        "data.train_subset": 1000,
        "data.val_size": 100,
        "data.test_subset": 250,
        "eval.linear_epochs": 5,
    }
    cfg = load_config(None, overrides, preset="quick")
    splits = load_splits(cfg)
    # Upsampling the images peaked above what scoring adds: reset the peak (VmHWM) once they are loaded.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    score_raw_pixels(cfg, splits, None if keep_side else PIXEL_SIDE)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_kib": _status_kib("VmHWM"), "before_kib": before, "seconds": seconds}))


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def baselines() -> None:
    print("raw-pixel baseline, fresh process per side; 1000 training images (100 validation), 250 test")
    print(f"{'side':>5}{'adds MiB, 32 px':>17}{'adds MiB, own side':>20}{'own / 32 px':>13}")
    for side in SIDES:
        capped, own = (
            run_child("--baseline-child", str(side)),
            run_child("--baseline-child", str(side), "--own"),
        )
        a, b = ((r["peak_kib"] - r["before_kib"]) / 1024 for r in (capped, own))
        print(f"{side:>5}{a:>17.0f}{b:>20.0f}{b / a:>13.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--baseline-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--own", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    if args.baseline_child:
        baseline_child(args.baseline_child, args.own)
        return
    baselines()
    print("fresh process per side; Fashion-MNIST upsampled; patch 0.5 of the side, stride 0.25, input 16 px")
    print(f"{'side':>5}{'patch px':>10}{'peak MiB':>10}{'eval adds MiB':>15}{'seconds':>9}")
    peaks = []
    for side in SIDES:
        r = run_child("--child", str(side))
        peak, added = r["peak_kib"] / 1024, (r["peak_kib"] - r["before_kib"]) / 1024
        peaks.append(peak)
        print(f"{side:>5}{r['patch_px']:>10}{peak:>10.0f}{added:>15.0f}{r['seconds']:>9.1f}")
    print(f"largest / smallest peak: {max(peaks) / min(peaks):.2f}")


if __name__ == "__main__":
    main()

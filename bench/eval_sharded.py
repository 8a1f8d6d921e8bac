"""Benchmark: a trial's probe with its features extracted by 2 ranks against 1.

Issue 9: rank 0 extracted every feature alone while the other ranks of a trial waited at a broadcast.
Now the ranks share the evaluation batches of all the splits, largest first, each to the rank with the
fewest images so far (`bagssl_core.train.shard_batches`), in batches small enough to even out the ranks'
shares (`bagssl_core.train.sharing_batch`), and rank 0 gathers them and probes. This times
`bagssl_core.train.evaluate` (extraction of the training, validation and test splits, then the kNN and
linear probes on rank 0) for 1 process, and for 2 gloo processes as a 2-worker trial runs it, each process
with one torch thread, on the same machine.

The 2 ranks run three ways, taking turns: as now; in whole batches of eval.batch_size (the sharing before
2026-11-29: at the smoke spec's last probe, 461 images for rank 0 and 307 for rank 1); and split by split,
every other batch of each split (before 2026-11-27), which leaves a split's last, short batch and a split
of one batch to rank 0.

Model: the quick preset's ResNet-18 (CIFAR stem), randomly initialised (the time does not depend on the
weights). Images: real Fashion-MNIST (Debian's dataset-fashion-mnist), `--train` training images, a tenth
of them validation, and `--test` test images; by default the smoke spec's last probe, 512 and 256, in the
default evaluation batches of 256.
Run: `python bench/eval_sharded.py [--train N] [--test N] [--batch-size N]`. The last lines are the
2-vs-1 speed-ups (2-rank times: the median of `--repeat` runs each); the probes themselves run on rank 0
alone, so they stay below 2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagssl_core import train
from bagssl_core.config import EvalConfig, TrainConfig, load_config
from bagssl_core.data import load_split
from bagssl_core.models import build_model
from bagssl_core.train import evaluate


def config(train_images: int, test_images: int, batch_size: int) -> TrainConfig:
    return load_config(
        None,
        {
            "data.train_subset": train_images,
            "data.test_subset": test_images or None,
            "data.val_size": 0.1,
            "eval.aggregation": ["mean_emb", "centre"],
            "eval.batch_size": batch_size,
        },
        preset="quick",
    )


def split_by_split(split_sizes: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The first reference sharing: every world-th batch of each split, from the rank's own on."""
    return [list(range(rank, math.ceil(n / batch_size), world)) for n in split_sizes]


def whole_batches(split_sizes: Sequence[int], ev: EvalConfig, world: int) -> int:
    """The second reference: the ranks share batches of eval.batch_size, what one process forms."""
    return ev.batch_size


# label -> (the batch size the ranks share, how they share the batches), in `bagssl_core.train`'s signatures
SHARINGS = {
    "now": (train.sharing_batch, train.shard_batches),
    "whole batches": (whole_batches, train.shard_batches),
    "split by split": (whole_batches, split_by_split),
}


def use_sharing(label: str) -> None:
    """Make `evaluate` share its batches as `label` says (it looks both functions up at each call)."""
    train.sharing_batch, train.shard_batches = SHARINGS[label]


def timed_evaluate(cfg: TrainConfig) -> float:
    """Seconds of one `evaluate` of the probed splits (`probed_splits`), every rank starting together."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.in_channels)
    train_data = load_split(cfg.data, "train", cfg.run.seed)
    evals = {split: load_split(cfg.data, split, cfg.run.seed) for split in probed_splits(cfg)}
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    evaluate(model, cfg, train_data, evals, torch.device("cpu"))
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - t0


def probed_splits(cfg: TrainConfig) -> list[str]:
    """The splits probed: validation, and test when it has images (a trial's last epoch)."""
    return ["val", "test"] if cfg.data.test_subset else ["val"]


def _rank(rank: int, world: int, store: str, out: str, cfg: TrainConfig, sharing: str) -> None:
    use_sharing(sharing)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        seconds = timed_evaluate(cfg)
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def with_ranks(world: int, cfg: TrainConfig, sharing: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "seconds.json"
        mp.spawn(_rank, args=(world, f"{d}/store", str(out), cfg, sharing), nprocs=world, join=True)
        return float(json.loads(out.read_text()))


def images_per_rank(sizes: Sequence[int], cfg: TrainConfig, sharing: str, world: int = 2) -> list[int]:
    batch_size, share = SHARINGS[sharing]
    unit = batch_size(sizes, cfg.eval, world)
    return [
        sum(
            train.batch_length(n, unit, b)
            for n, bs in zip(sizes, share(sizes, unit, r, world), strict=True)
            for b in bs
        )
        for r in range(world)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=512, help="Fashion-MNIST training images (default 512)")
    p.add_argument("--test", type=int, default=256, help="test images, 0 for none (default 256)")
    p.add_argument("--batch-size", type=int, default=256, help="eval.batch_size (default 256)")
    p.add_argument(
        "--repeat", type=int, default=3, help="runs of each 2-rank sharing, taking turns (default 3)"
    )
    args = p.parse_args()
    cfg = config(args.train, args.test, args.batch_size)
    n_val = round(args.train * 0.1)
    sizes = [args.train - n_val, n_val] + ([args.test] if args.test else [])
    for label in SHARINGS:
        print(f"images per rank, {label}: {images_per_rank(sizes, cfg, label)}")
    print(
        f"quick preset: {args.train} training images ({n_val} of them validation), {args.test} test, "
        f"eval.batch_size {args.batch_size}, schemes {cfg.eval.aggregation}, probes {cfg.eval.probes}, "
        "1 torch thread per rank"
    )
    one = timed_evaluate(cfg)
    runs: dict[str, list[float]] = {label: [] for label in SHARINGS}
    for _ in range(args.repeat):  # taking turns, so that a drift of the machine's speed hits all alike
        for label in SHARINGS:
            runs[label].append(with_ranks(2, cfg, label))
    median = {label: statistics.median(v) for label, v in runs.items()}
    print(f"1 rank:  {one:.1f} s")
    for label in SHARINGS:
        print(f"2 ranks, {label}: {median[label]:.1f} s (median of {[round(t, 1) for t in runs[label]]})")
    now = median["now"]
    print(
        f"sharing now vs whole batches: {median['whole batches'] / now:.2f}x faster; "
        f"vs split by split: {median['split by split'] / now:.2f}x"
    )
    print(
        "2-vs-1 probe speed-up: "
        + ", ".join(f"{one / median[label]:.2f}x {label}" for label in reversed(SHARINGS))
    )


if __name__ == "__main__":
    main()

"""Benchmark: a trial's probe with its features extracted by 2 ranks against 1.

Issue 9: rank 0 extracted every feature alone while the other ranks of a trial waited at a broadcast.
Now the ranks share the evaluation batches of all the splits, largest first, each to the rank with the
fewest images so far (`bagssl_core.train.shard_batches`), and rank 0 gathers them and probes. This times
`bagssl_core.train.evaluate` (extraction of the training and validation splits, then the kNN and linear
probes on rank 0) for 1 process, and for 2 gloo processes as a 2-worker trial runs it, each process with
one torch thread, on the same machine.

The 2 ranks run twice: with the batches shared as now, and, as the reference, split by split, every
other batch of each split (the sharing before 2026-11-27), which leaves a split's last, short batch and a
split of one batch to rank 0.

Model: the quick preset's ResNet-18 (CIFAR stem), randomly initialised (the time does not depend on the
weights). Images: real Fashion-MNIST (Debian's dataset-fashion-mnist), `--train` training images, a tenth
of them validation; by default the smoke spec's 512, in the default evaluation batches of 256.
Run: `python bench/eval_sharded.py [--train N] [--batch-size N]`. The last lines are the 2-vs-1
speed-ups (2-rank times: the median of `--repeat` runs each); the probes themselves run on rank 0
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
from bagssl_core.config import TrainConfig, load_config
from bagssl_core.data import load_split
from bagssl_core.models import build_model
from bagssl_core.train import evaluate


def config(train_images: int, batch_size: int) -> TrainConfig:
    return load_config(
        None,
        {
            "data.train_subset": train_images,
            "data.val_size": 0.1,
            "eval.aggregation": ["mean_emb", "centre"],
            "eval.batch_size": batch_size,
        },
        preset="quick",
    )


def split_by_split(split_sizes: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The reference sharing: every world-th batch of each split, from the rank's own on."""
    return [list(range(rank, math.ceil(n / batch_size), world)) for n in split_sizes]


def timed_evaluate(cfg: TrainConfig) -> float:
    """Seconds of one `evaluate` of the validation split, every rank starting together."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.in_channels)
    train_data = load_split(cfg.data, "train", cfg.run.seed)
    val = load_split(cfg.data, "val", cfg.run.seed)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    evaluate(model, cfg, train_data, {"val": val}, torch.device("cpu"))
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - t0


def _rank(
    rank: int, world: int, store: str, out: str, train_images: int, batch_size: int, reference: bool
) -> None:
    if reference:
        train.shard_batches = split_by_split  # evaluate() looks it up in its module at each call
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        seconds = timed_evaluate(config(train_images, batch_size))
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def with_ranks(world: int, train_images: int, batch_size: int, reference: bool = False) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "seconds.json"
        args = (world, f"{d}/store", str(out), train_images, batch_size, reference)
        mp.spawn(_rank, args=args, nprocs=world, join=True)
        return float(json.loads(out.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=512, help="Fashion-MNIST training images (default 512)")
    p.add_argument("--batch-size", type=int, default=256, help="images per extraction batch (default 256)")
    p.add_argument(
        "--repeat", type=int, default=3, help="runs of each 2-rank sharing, alternated (default 3)"
    )
    args = p.parse_args()
    cfg = config(args.train, args.batch_size)
    n_val = round(args.train * 0.1)
    sizes = (args.train - n_val, n_val)
    for label, share in (("now", train.shard_batches), ("split by split", split_by_split)):
        images = [
            sum(
                train.batch_length(n, args.batch_size, b)
                for n, bs in zip(sizes, share(sizes, args.batch_size, r, 2), strict=True)
                for b in bs
            )
            for r in range(2)
        ]
        print(f"images per rank, {label}: {images}")
    print(
        f"quick preset: {args.train} training images ({n_val} of them validation), batches of "
        f"{args.batch_size}, schemes {cfg.eval.aggregation}, probes {cfg.eval.probes}, 1 torch thread per rank"
    )
    one = timed_evaluate(cfg)
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeat):  # alternated, so that a drift of the machine's speed hits both alike
        for reference in (True, False):
            runs[reference].append(with_ranks(2, args.train, args.batch_size, reference))
    before, two = statistics.median(runs[True]), statistics.median(runs[False])
    print(f"1 rank:  {one:.1f} s")
    print(f"2 ranks, batches split by split (reference): {before:.1f} s (median of {runs[True]})")
    print(f"2 ranks, batches shared as now: {two:.1f} s (median of {runs[False]})")
    print(f"sharing now vs split by split: {before / two:.2f}x faster")
    print(f"2-vs-1 probe speed-up: {one / before:.2f}x split by split, {one / two:.2f}x now")


if __name__ == "__main__":
    main()

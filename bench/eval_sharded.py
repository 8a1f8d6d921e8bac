"""Benchmark: a trial's probe with its features extracted by 2 ranks against 1.

Issue 9: rank 0 extracted every feature alone while the other ranks of a trial waited at a broadcast.
Now each rank extracts every world-th batch (`bagssl_core.train.extract_split`) and rank 0 gathers them
and probes. This times `bagssl_core.train.evaluate` (extraction of the training and validation splits,
then the kNN and linear probes on rank 0) for 1 process, and for 2 gloo processes as a 2-worker trial
runs it, each process with one torch thread, on the same machine.

Model: the quick preset's ResNet-18 (CIFAR stem), randomly initialised (the time does not depend on the
weights). Images: real Fashion-MNIST (Debian's dataset-fashion-mnist), `--train` training images.
Run: `python bench/eval_sharded.py [--train N]`. The last line is the 2-vs-1 speed-up; the probes
themselves run on rank 0 alone, so it stays below 2.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagssl_core.config import TrainConfig, load_config
from bagssl_core.data import load_split
from bagssl_core.models import build_model
from bagssl_core.train import evaluate


def config(train_images: int) -> TrainConfig:
    return load_config(
        None,
        {
            "data.train_subset": train_images,
            "data.val_size": 0.1,
            "eval.aggregation": ["mean_emb", "centre"],
            "eval.batch_size": 64,
        },
        preset="quick",
    )


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


def _rank(rank: int, world: int, store: str, out: str, train_images: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        seconds = timed_evaluate(config(train_images))
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def with_ranks(world: int, train_images: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "seconds.json"
        mp.spawn(_rank, args=(world, f"{d}/store", str(out), train_images), nprocs=world, join=True)
        return float(json.loads(out.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=1200, help="Fashion-MNIST training images (default 1200)")
    args = p.parse_args()
    cfg = config(args.train)
    print(
        f"quick preset: {args.train} training images ({cfg.data.val_size} of them validation), "
        f"schemes {cfg.eval.aggregation}, probes {cfg.eval.probes}, 1 torch thread per rank"
    )
    one = timed_evaluate(cfg)
    two = with_ranks(2, args.train)
    print(f"1 rank:  {one:.1f} s")
    print(f"2 ranks: {two:.1f} s")
    print(f"2-vs-1 probe speed-up: {one / two:.2f}x")


if __name__ == "__main__":
    main()

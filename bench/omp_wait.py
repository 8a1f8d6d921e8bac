"""Benchmark: torch's OpenMP threads waiting passively (OMP_WAIT_POLICY=PASSIVE) against libgomp's default
(spin a while, then sleep), when processes share the cores (`bagssl_core.openmp`).

Each case starts K copies of one worker at the same moment. A worker does the smoke trial's work with
torch's default threads (one per core): training steps (`train.train_step`, `--batch` images x 4
patches) and extraction (`aggregate.reduce_batch`, mean_emb over the 9-patch grid of `--images`
Fashion-MNIST images), the smoke shape of `bench/memory_format.py`. The cases differ only in the
workers' environment: OMP_WAIT_POLICY unset (libgomp's default, what every torch process had before) or
PASSIVE (what `python -m bagssl_core`, `python -m sweeps.run` and the test suite now set). The default
and passive cases take turns, so both see the same background load.

Each line gives, for one case, the wall time of its slowest copy (imports excluded) and the CPU seconds
of all its copies; then, per K, default over passive. The last line is the ratio for 2 copies, e.g.
`2 copies side by side, default vs passive wall: 1.60x`.

Run: `python bench/omp_wait.py [--copies 1 2] [--rounds R]` on an otherwise idle machine (about 2.5
minutes on 2 cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bagssl_core.openmp import WAIT_POLICY

CASES = {"default": None, "passive": "PASSIVE"}


def worker(rounds: int, images: int, batch: int) -> None:
    """The work of one copy; prints {"wall": s, "cpu": s} of the work alone (after the imports)."""
    import torch

    # bench/ is the script's directory, so its sibling benchmarks import as top-level modules.
    from memory_format import config
    from patches import load_images

    from bagssl_core.aggregate import reduce_batch
    from bagssl_core.losses import build_loss
    from bagssl_core.models import build_model
    from bagssl_core.optim import build_optimizer
    from bagssl_core.patches import channel_stats
    from bagssl_core.train import train_step

    cfg = config("smoke")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.in_channels).to(memory_format=torch.channels_last)
    pixels, _ = load_images(images, seed=0)
    views = torch.rand(batch, cfg.patch.num, cfg.in_channels, cfg.input_size, cfg.input_size)
    loss_fn, opt = build_loss(cfg.loss), build_optimizer(model, cfg)
    mean_std = channel_stats(cfg.data.name, cfg.in_channels)

    start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(rounds):
        model.train()
        for _ in range(4):
            train_step(model, views, loss_fn, opt, cfg.effective_lr())
        model.eval()
        reduce_batch(model, pixels, cfg, ["mean_emb"], mean_std)
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = end.ru_utime + end.ru_stime - used.ru_utime - used.ru_stime
    print(json.dumps({"wall": time.perf_counter() - start, "cpu": cpu}))


def run_case(policy: str | None, copies: int, args: argparse.Namespace) -> tuple[float, float]:
    """(wall of the slowest copy, CPU of all copies) for `copies` workers started at once."""
    env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY}
    if policy is not None:
        env[WAIT_POLICY] = policy
    cmd = [sys.executable, __file__, "--worker", f"--rounds={args.rounds}"]
    cmd += [f"--images={args.images}", f"--batch={args.batch}"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
        for _ in range(copies)
    ]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a worker failed")
    return max(o["wall"] for o in outs), sum(o["cpu"] for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 2], help="workers side by side, per case")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of 4 training steps and 1 extraction")
    ap.add_argument("--images", type=int, default=64, help="images extracted per round")
    ap.add_argument("--batch", type=int, default=16, help="images per training step")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.rounds, args.images, args.batch)
        return
    print(f"{os.cpu_count()} cores; {WAIT_POLICY} unset (default) against PASSIVE; imports not timed")
    ratios = {}
    for copies in args.copies:
        walls = {}
        for case, policy in CASES.items():
            wall, cpu = run_case(policy, copies, args)
            walls[case] = wall
            print(f"{copies} copies, {case:7s}: wall {wall:6.1f} s, CPU {cpu:6.1f} s", flush=True)
        ratios[copies] = walls["default"] / walls["passive"]
        print(f"{copies} copies: default / passive wall {ratios[copies]:.2f}x", flush=True)
    last = max(ratios)
    print(f"{last} copies side by side, default vs passive wall: {ratios[last]:.2f}x")


if __name__ == "__main__":
    main()

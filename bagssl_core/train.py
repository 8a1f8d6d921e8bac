"""The BagSSL training loop: step, epoch, evaluate, checkpoint and exact resume.

Metrics leave through a `Reporter` callback, so Ray Train and MLflow plug in from outside without this
module knowing them. Runs alone or under a torch.distributed process group the caller initialised.

Data: the model trains on the "train" split; the probes' kNN bank and linear training set are that same
split. Each probing epoch scores the "val" split (carved from the training images, see
`bagssl_core.data.validation_split`), so that model selection sees validation scores only; the "test" split
is scored once, on the final model of a finished run, and reported with the last epoch's metrics.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from bagssl_core import dist
from bagssl_core.aggregate import MeanStd, extract_features
from bagssl_core.config import (
    ConfigError,
    EvalConfig,
    TrainConfig,
    config_to_yaml,
    tiny_patches,
    validate_config,
)
from bagssl_core.data import (
    ImageData,
    check_same_data,
    collate_images,
    data_identity,
    load_split,
    resolve_image_size,
)
from bagssl_core.losses import build_loss
from bagssl_core.memory import Need, require_memory
from bagssl_core.metrics import (
    ANALYSES_DIR,
    CHECKPOINT_SECONDS,
    DIVERGED_AT_STEP,
    EPOCH,
    EPOCH_SECONDS,
    EPOCHS_PLANNED,
    LR,
    PATCHES_PER_S,
    PROBE_SECONDS,
    SETUP_SECONDS,
    TRAIN_LOSS,
    MetricKey,
    Split,
    metric_names,
    n_images,
    train_part,
)
from bagssl_core.models import build_model, inference_graph, prepare_for_device
from bagssl_core.optim import build_optimizer, lr_schedule, set_lr
from bagssl_core.patches import channel_stats, train_batch
from bagssl_core.probes import run_probes
from bagssl_core.run_files import (
    CHECKPOINT_FILE,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    RunResult,
    find_checkpoint,
)

log = logging.getLogger(__name__)

# metrics (name -> float, see bagssl_core.metrics) and, on rank 0 when one was written, the checkpoint
# directory
Reporter = Callable[[dict[str, float], "Path | None"], None]


@dataclass
class Run:
    """The objects of one training run, built by `start_run`; `step` advances as the run trains."""

    cfg: TrainConfig
    out: Path  # the run directory (rank 0 writes there)
    device: torch.device
    autocast: bool  # bf16 autocast for the forward pass
    model: nn.Module  # wrapped in DistributedDataParallel under a process group
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    lrs: torch.Tensor  # (epochs * steps_per_epoch,) float64: the lr of every global step
    steps_per_epoch: int
    train_data: ImageData  # what the model trains on, and the probes' kNN bank / linear training set
    eval_data: dict[Split, ImageData]  # "val" (every probing epoch) and "test" (the end)
    eval_variants: Mapping[str, EvalConfig] | None  # see `evaluate`
    data_id: dict[str, Any]  # `data_identity(train_data)`, read once: every checkpoint keeps it
    start_epoch: int = 0  # epochs done before this process started (resume)
    step: int = 0  # global steps done


# --- set-up --------------------------------------------------------------------------------------


def resolve_device(cfg: TrainConfig) -> torch.device:
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "run.device: cuda was asked for but no CUDA device is available; expected auto or cpu"
        )
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and dist.is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(want)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(cfg: TrainConfig, epoch: int, device: torch.device) -> torch.Generator:
    """The patch-sampling generator of one epoch on this rank: reseeded from (seed, epoch, rank), so a
    run resumed at an epoch boundary draws exactly the patches of an uninterrupted run."""
    seed = (cfg.run.seed * 1_000_003 + epoch * 1009 + dist.rank()) % 2**63
    return torch.Generator(device=device).manual_seed(seed)


def per_rank_batch(cfg: TrainConfig) -> int:
    world = dist.world_size()
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size: the global batch {cfg.data.batch_size} does not split over {world} ranks; "
            f"expected a multiple of {world}"
        )
    return cfg.data.batch_size // world


def train_loader(data: ImageData, cfg: TrainConfig, epoch: int) -> DataLoader:
    """Shuffled per epoch from the seed; each rank gets its slice (DistributedSampler, also for 1 rank)."""
    bs = per_rank_batch(cfg)
    if len(data) < cfg.data.batch_size:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} images per step but the training set has {len(data)}; "
            "expected a smaller batch or a larger data.train_subset"
        )
    sampler: DistributedSampler[int] = DistributedSampler(
        data,
        num_replicas=dist.world_size(),
        rank=dist.rank(),
        shuffle=True,
        seed=cfg.run.seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        data,
        batch_size=bs,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_images,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def eval_loader(
    data: ImageData, batch_size: int, num_workers: int, batches: Sequence[int] | None = None
) -> DataLoader:
    """The split's images in order, `batch_size` at a time; only the batches numbered in `batches` (a
    rank's share, `shard_batches`) when given."""
    if batches is None:
        return DataLoader(
            data, batch_size=batch_size, shuffle=False, collate_fn=collate_images, num_workers=num_workers
        )
    n = len(data)
    index = [list(range(b * batch_size, min(n, (b + 1) * batch_size))) for b in batches]
    return DataLoader(data, batch_sampler=index, collate_fn=collate_images, num_workers=num_workers)


def batch_length(n: int, batch_size: int, b: int) -> int:
    """Images in batch b of a split of n images cut into batches of `batch_size` (the last may be short)."""
    return min(batch_size, n - b * batch_size)


def shard_batches(split_sizes: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The evaluation batches one rank extracts, for each split of `split_sizes` images, all of which the
    ranks extract together (`evaluate`). Whole batches, so that each is the batch a single process forms,
    with the same random patches (`extract_features`).

    The batches of all the splits are shared out together, largest first, each to the rank with the
    fewest images so far (the lowest rank on a tie), so that the ranks finish together. Sharing each split
    on its own leaves its last, short batch and any split of one batch to rank 0: the smoke spec's 461
    training images and 51 validation images in batches of 256 were 307 images for rank 0 and 205 for
    rank 1; shared together, 256 and 256."""
    batches = [
        (batch_length(n, batch_size, b), split, b)
        for split, n in enumerate(split_sizes)
        for b in range(math.ceil(n / batch_size))
    ]
    load = [0] * world
    mine: list[list[int]] = [[] for _ in split_sizes]
    for size, split, b in sorted(batches, key=lambda t: -t[0]):  # stable: ties stay in split, batch order
        to = min(range(world), key=lambda r: load[r])
        load[to] += size
        if to == rank:
            mine[split].append(b)
    return [sorted(bs) for bs in mine]


def default_wrapper(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# --- one step ------------------------------------------------------------------------------------


class StepResult(NamedTuple):
    """What one training step returns.

    Attributes:
        loss: the detached total loss, a scalar tensor.
        parts: its unweighted terms as floats.
    """

    loss: torch.Tensor
    parts: dict[str, float]

    @property
    def finite(self) -> bool:
        """False when the loss was NaN or inf: the step then left the weights and optimizer untouched."""
        return bool(torch.isfinite(self.loss))


def train_step(
    model: nn.Module,
    views: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    grad_clip: float | None = None,
    autocast: bool = False,
) -> StepResult:
    """Forward all B*N patches in one batch, the bag loss, backward, optimizer step.

    A loss that is not finite skips backward and the optimizer step. Under DDP with loss.gather_distributed
    (the default) every rank agrees on that: the batch terms are computed on the projections gathered from
    all ranks, so a non-finite projection on any rank makes every rank's total non-finite, and no rank is
    left waiting in the gradient all-reduce.

    Args:
        views: (B, N, C, S, S) normalised patches of B images.
    """
    b, n = views.shape[:2]
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=views.device.type, dtype=torch.bfloat16, enabled=autocast):
        _, z = model(views.flatten(0, 1))
    out = loss_fn(z.float().view(b, n, -1))
    result = StepResult(out.total.detach(), _floats(out.parts))
    if not result.finite:
        return result
    out.total.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return result


def _floats(parts: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in parts.items()}


# --- evaluation ----------------------------------------------------------------------------------


def eval_variant_config(cfg: TrainConfig, ev: EvalConfig) -> TrainConfig:
    """cfg with its eval part replaced, re-validated (the grid must still fit the image).

    Every key is a default here (`validate_config`): a variant may switch off knobs the base uses, such
    as the base's `eval.grid_stride` in a variant with `eval.patches=random`."""
    return validate_config({}, defaults={**cfg.model_dump(), "eval": ev.model_dump()})


def evaluate(
    model: nn.Module,
    cfg: TrainConfig,
    train_data: ImageData,
    eval_data: Mapping[Split, ImageData],
    device: torch.device,
    variants: Mapping[str, EvalConfig] | None = None,
) -> dict[MetricKey, float]:
    """Probe every scheme of every evaluation variant on frozen features: fitted on `train_data`, scored on
    each split of `eval_data`.

    Args:
        eval_data: split -> its images, e.g. {"val": ...} or {"val": ..., "test": ...}.
        variants: name -> EvalConfig; "" (no variant) is cfg.eval, the default.

    Returns:
        `ProbeKey(split, probe, stat, scheme, variant)` -> accuracy (%) with its Wilson interval bounds (see
        `run_probes`), and `n_images(split)` -> the number of images each split's accuracies are over.

    Under torch.distributed every rank calls it: each extracts its share of the batches of all the splits
    (`shard_batches`), rank 0 gathers them in order and probes, and the other ranks return the image
    counts alone. The metrics are those of one process extracting everything.
    """
    cfg = resolve_image_size(cfg)  # a no-op unless imagefolder's size is left to its files
    variants = {"": cfg.eval} if variants is None else variants
    mean_std = channel_stats(cfg.data.name, train_data.channels)
    autocast = use_bf16(cfg, device)
    metrics: dict[MetricKey, float] = {n_images(split): len(data) for split, data in eval_data.items()}
    graph: nn.Module | None = None  # built once, for the variants that ask for it (eval.cpu_graph)
    for name, ev in variants.items():
        vcfg = eval_variant_config(cfg, ev)
        extractor = model
        if ev.cpu_graph and device.type == "cpu" and not autocast:
            if graph is None:
                graph = inference_graph(model, cfg.in_channels, cfg.input_size)
            extractor = graph
        extracted = extract_splits(
            extractor, [train_data, *eval_data.values()], vcfg, ev, device, mean_std, autocast
        )
        if not dist.is_main():
            continue
        (train_feats, train_labels), *evals = (e for e in extracted if e is not None)
        by_split = dict(zip(eval_data, evals, strict=True))
        probes = run_probes(
            train_feats, train_labels, by_split, train_data.num_classes, ev, cfg.run.seed, name, device
        )
        metrics.update(probes.items())
    return metrics


Features = tuple[dict[str, torch.Tensor], torch.Tensor]  # {scheme: (N, D)}, labels (N,)


def extract_split(
    model: nn.Module,
    data: ImageData,
    cfg: TrainConfig,
    ev: EvalConfig,
    device: torch.device,
    mean_std: MeanStd,
    autocast: bool = False,
) -> Features | None:
    """A split's features under every scheme of `ev` (`extract_splits` of the one split)."""
    return extract_splits(model, [data], cfg, ev, device, mean_std, autocast)[0]


def extract_splits(
    model: nn.Module,
    splits: Sequence[ImageData],
    cfg: TrainConfig,
    ev: EvalConfig,
    device: torch.device,
    mean_std: MeanStd,
    autocast: bool = False,
) -> list[Features | None]:
    """Each split's features under every scheme of `ev`, `ev.batch_size` images a batch (or fewer, when
    the ranks share them: `sharing_batch`).

    Under torch.distributed each rank extracts its share of the batches of all the splits
    (`shard_batches`), and only then are the shares gathered, split by split: rank 0 gets every split's
    features in order (None on the other ranks), what one process extracting every batch gets. Gathering
    after each split instead would make a rank that finished its share of one split wait for the others
    there, and the sharing over all the splits would even out nothing."""
    sizes = [len(d) for d in splits]
    batch_size = sharing_batch(sizes, ev, dist.world_size())
    shares = shard_batches(sizes, batch_size, dist.rank(), dist.world_size())
    extracted = [
        extract_features(
            model,
            eval_loader(data, batch_size, cfg.data.num_workers, batches),
            cfg,
            ev.aggregation,
            device,
            mean_std,
            autocast,
            batches,
        )
        if batches  # a rank may have no batch of a split
        else None
        for data, batches in zip(splits, shares, strict=True)
    ]
    return [
        _gather_shares(batches, share, len(data), batch_size)
        for data, batches, share in zip(splits, shares, extracted, strict=True)
    ]


# Ranks sharing fixed patches' extraction cut it into about this many batches each (`sharing_batch`).
SHARED_BATCHES_PER_RANK = 8


def sharing_batch(split_sizes: Sequence[int], ev: EvalConfig, world: int) -> int:
    """Images per extraction batch when `world` ranks share splits of `split_sizes` images.

    Whole batches are shared (`shard_batches`), so a batch as large as a rank's whole share leaves the
    ranks uneven: the smoke spec's last probe (461 training, 51 validation and 256 test images in batches
    of 256) was 461 images for rank 0 and 307 for rank 1. With fixed patches (eval.patches=grid) a
    feature does not depend on its batch, so the batches shrink to about `SHARED_BATCHES_PER_RANK` per
    rank, never above ev.batch_size: 48 images, and 384 for each rank there. Smaller batches cost nothing
    on the CPU (patches are forwarded in chunks of their own size; the smoke trial's 461 training images
    took 9.0 to 9.8 s in batches of 256, 8.2 to 9.5 s in batches of 32 to 48). They shrink only when all
    the splits together hold fewer than `SHARED_BATCHES_PER_RANK` x world x eval.batch_size images, so a
    GPU keeps its large forwards on a real dataset. Random patches are drawn per batch
    (`extract_features`), so their batches stay those of one process."""
    if world == 1 or ev.patches == "random":
        return ev.batch_size
    return max(1, min(ev.batch_size, math.ceil(sum(split_sizes) / (SHARED_BATCHES_PER_RANK * world))))


def _gather_shares(batches: list[int], share: Features | None, n: int, batch_size: int) -> Features | None:
    """Every rank's share of a split of n images (`shard_batches`), put back in batch order on rank 0 (None
    elsewhere): the features a single process extracts. The share itself when not distributed."""
    if not dist.is_distributed():
        return share
    gathered: list[Any] | None = [None] * dist.world_size() if dist.is_main() else None
    torch.distributed.gather_object((batches, share), gathered, dst=0)
    if gathered is None:
        return None
    pieces: list[tuple[int, dict[str, torch.Tensor], torch.Tensor]] = []
    for ids, got in gathered:
        if got is None:
            continue
        feats, labels = got
        start = 0
        for b in ids:
            stop = start + batch_length(n, batch_size, b)
            pieces.append((b, {k: f[start:stop] for k, f in feats.items()}, labels[start:stop]))
            start = stop
    pieces.sort(key=lambda piece: piece[0])
    schemes = list(pieces[0][1])
    return (
        {k: torch.cat([f[k] for _, f, _ in pieces]) for k in schemes},
        torch.cat([y for _, _, y in pieces]),
    )


# --- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(run: Run, epoch: int) -> Path:
    """Write `checkpoints/epoch_XXXX/state.pt` (+ config.yaml) in the run directory atomically: a crash
    mid-write never leaves a torn checkpoint."""
    ckpt_dir = run.out / CHECKPOINTS_DIR
    final = ckpt_dir / f"epoch_{epoch:04d}"
    tmp = ckpt_dir / f".tmp_epoch_{epoch:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "model": unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "epoch": epoch,
        "step": run.step,
        "config": run.cfg.model_dump(mode="json"),
        "data": run.data_id,  # to refuse other data under a moved data.root
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
    }
    torch.save(state, tmp / CHECKPOINT_FILE)
    (tmp / "config.yaml").write_text(config_to_yaml(run.cfg))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for old in sorted(ckpt_dir.glob("epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# What every reader of a checkpoint (eval, analyze, a resume) needs of what `save_checkpoint` writes.
_CHECKPOINT_KEYS = ("model", "epoch", "config")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state `save_checkpoint` wrote; RuntimeError (one line) for a torn file or one this project did
    not write."""
    ckpt = find_checkpoint(path) / CHECKPOINT_FILE
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which, never restart silently at epoch 0
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"{ckpt}: cannot load checkpoint ({type(err).__name__}: {first})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RuntimeError(
            f"{ckpt}: not a bagssl checkpoint (no {', '.join(missing)}); expected the state.pt that train writes"
        )
    return state


def _restore_rng(rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_as_tuple(rng["python"]))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (loss, patches/s, ETA); a plain line per update when not a tty."""

    def __init__(self, epochs: int, steps_per_epoch: int, start_epoch: int, enabled: bool):
        self.epochs, self.steps_per_epoch, self.start_epoch = epochs, steps_per_epoch, start_epoch
        self.total = epochs * steps_per_epoch
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, epoch: int, steps_in_epoch: int, loss: float, patches_per_s: float) -> None:
        """`epoch` is 0-based; `steps_in_epoch` the steps done in it."""
        if not self.enabled:
            return
        step = epoch * self.steps_per_epoch + steps_in_epoch
        done_here = step - self.start_epoch * self.steps_per_epoch
        eta = (time.perf_counter() - self.t0) / max(1, done_here) * (self.total - step)
        filled = int(24 * step / self.total)
        line = (
            f"epoch {epoch + 1}/{self.epochs} [{'#' * filled}{'-' * (24 - filled)}] {step}/{self.total} "
            f"loss {loss:.4f} {patches_per_s:,.0f} patches/s ETA {_hms(eta)}"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# --- the run -------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    reporter: Reporter | None = None,
    resume_from: str | Path | None = None,
    eval_variants: Mapping[str, EvalConfig] | None = None,
    progress: bool = False,
) -> RunResult:
    """Train BagSSL as configured; returns the status and the final metrics.

    Args:
        out_dir: run directory (config.yaml, metrics.jsonl, checkpoints/, summary.json); default
            cfg.run.out_dir. Only rank 0 writes there.
        reporter: called on every rank after each epoch with that epoch's metrics by name (the epoch
            metrics; on probing epochs the "val" probes; in the last epoch's call of a finished run the "test"
            probes too: `bagssl_core.metrics.expected_metrics` lists them), and on rank 0 with the checkpoint
            directory written for it (None otherwise).
        resume_from: a checkpoint (or run) directory; training continues after its epoch, exactly. From
            the checkpoint of the last epoch nothing is trained, and that epoch's metrics are reported
            again, with no checkpoint.
        eval_variants: extra evaluation settings probed on the same model (see `evaluate`).
        progress: show a progress bar on rank 0.
    """
    out = Path(out_dir if out_dir is not None else cfg.run.out_dir)
    t0 = time.perf_counter()
    run = start_run(cfg, out, resume_from, eval_variants)
    setup_seconds = time.perf_counter() - t0
    epochs = cfg.schedule.epochs
    bar = Progress(epochs, run.steps_per_epoch, run.start_epoch, enabled=progress and dist.is_main())
    result = RunResult(status="finished", epochs=run.start_epoch, out_dir=run.out)
    probe: dict[MetricKey, float] = {}  # the latest probe results, part of every later epoch's result
    if resume_from is not None and run.start_epoch == epochs:
        # Nothing left to train, but the caller may never have seen the last report: a sweep driver killed
        # after the workers reported the final epoch restarts the trial from that very checkpoint.
        last = checkpoint_metrics(resume_from)
        if last is not None:
            result.metrics = last
            if reporter is not None:
                reporter(dict(last), None)
    try:
        for epoch in range(run.start_epoch, epochs):
            metrics = train_one_epoch(run, epoch, bar)
            if DIVERGED_AT_STEP in metrics:
                result.status = "diverged"
                result.metrics.update(metric_names(metrics))
                break
            metrics[EPOCH] = epoch + 1
            metrics[EPOCHS_PLANNED] = epochs
            metrics[SETUP_SECONDS], setup_seconds = setup_seconds, 0.0
            t0 = time.perf_counter()
            if probe_due(cfg, epoch + 1):
                # The last epoch always probes; only there, with the training finished, is test scored.
                probe = _evaluate_sharded(run, ["val", "test"] if epoch + 1 == epochs else ["val"])
                metrics.update(probe)
            metrics[PROBE_SECONDS] = time.perf_counter() - t0
            if epoch + 1 == epochs and cfg.eval.analyses:
                found, result.figures = _analyse_on_main(run)
                metrics.update(found)
            t0 = time.perf_counter()
            ckpt = _save_checkpoint_if_due(run, epoch + 1)
            metrics[CHECKPOINT_SECONDS] = time.perf_counter() - t0
            named = metric_names(metrics)
            _append_metrics(run, named, ckpt)
            result.epochs, result.metrics = epoch + 1, metric_names({**probe, **metrics})
            if reporter is not None:
                reporter(named, ckpt)
    finally:
        bar.close()
    if dist.is_main():
        summary = {"status": result.status, "epochs": result.epochs, **result.metrics}
        (run.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return result


def start_run(
    cfg: TrainConfig,
    out: Path,
    resume_from: str | Path | None = None,
    eval_variants: Mapping[str, EvalConfig] | None = None,
) -> Run:
    """Seed, load the data, build the model, optimizer, lr schedule and loss, restore `resume_from` (weights,
    optimizer, step and random state) and, on rank 0, write `out/config.yaml`.

    `out/config.yaml` is `cfg` as given; the run (and its checkpoints' config) uses it with imagefolder's
    image size resolved from the files (`resolve_image_size`), so that `--resume` compares like with like.
    """
    given, cfg = cfg, resolve_image_size(cfg)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed + dist.rank())
    device = resolve_device(cfg)
    require_memory(training_needs(cfg), device)  # before the data load, which may take minutes
    train_data, eval_data = load_splits(cfg)
    data_id = data_identity(train_data)
    if dist.is_main():  # once the sizes are known to fit: a warning would be noise before their error
        for line in tiny_patches(cfg):
            log.warning(line)
    model: nn.Module = prepare_for_device(build_model(cfg.model, cfg.in_channels), device, cfg.model)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(train_loader(train_data, cfg, 0))
    start_epoch, step = (
        _resume(resume_from, model, optimizer, data_id, cfg.data.root) if resume_from is not None else (0, 0)
    )
    model = default_wrapper(model, device)
    model.train()
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(given))
    return Run(
        cfg=cfg,
        out=out,
        device=device,
        autocast=use_bf16(cfg, device),
        model=model,
        optimizer=optimizer,
        loss_fn=build_loss(cfg.loss),
        lrs=lr_schedule(cfg, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        train_data=train_data,
        eval_data=eval_data,
        eval_variants=eval_variants,
        data_id=data_id,
        start_epoch=start_epoch,
        step=step,
    )


def training_needs(cfg: TrainConfig) -> list[Need]:
    """What one training step holds at once on a rank, at the least (`bagssl_core.memory`): its batch of
    patches, the model's weights and gradients, and the features the projector keeps for its backward
    pass. The model is built on the meta device, which allocates nothing, to count its parameters."""
    b, n, c, side = per_rank_batch(cfg), cfg.patch.num, cfg.in_channels, cfg.input_size
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.in_channels)
    params = sum(p.numel() for p in model.parameters())
    features = model.embed_dim + sum(cfg.model.projector)
    fewer = "fewer or smaller patches a step: a smaller data.batch_size, patch.num or patch.input_size"
    return [
        Need(
            f"one batch of patches ({b} images a rank x patch.num={n} x {c}x{side}x{side} px, float32)",
            b * n * c * side * side * 4,
            "data.batch_size, patch.num, patch.input_size",
            fewer,
        ),
        Need(
            f"the model's weights and gradients ({params:,} parameters, float32)",
            params * 4 * 2,
            "model.projector",
            f"a narrower model.projector (got {list(cfg.model.projector)})",
        ),
        Need(
            f"the projector's features of one batch ({b * n:,} patches x {features:,} features, float32)",
            b * n * features * 4,
            "data.batch_size, patch.num, model.projector",
            f"{fewer}, or a narrower model.projector (got {list(cfg.model.projector)})",
        ),
    ]


def load_splits(cfg: TrainConfig) -> tuple[ImageData, dict[Split, ImageData]]:
    """The "train" split (trained on; the probes' kNN bank and linear training set) and the splits the probes
    score, {"val": ..., "test": ...}."""
    train_data = load_split(cfg.data, "train", cfg.run.seed)
    return train_data, {s: load_split(cfg.data, s, cfg.run.seed) for s in ("val", "test")}


def _resume(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_id: dict[str, Any],
    data_root: str,
) -> tuple[int, int]:
    """Load a checkpoint into the (unwrapped) model and the optimizer and restore the random state;
    returns the epochs and steps it had done. ConfigError when `data_id` is not the data it trained on."""
    state = load_checkpoint(path)
    where = f"the checkpoint at {find_checkpoint(path)}"
    check_same_data(state.get("data"), data_id, data_root, where)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _restore_rng(state["rng"])
    epoch, step = int(state["epoch"]), int(state["step"])
    log.info("resumed from %s at epoch %d (step %d)", find_checkpoint(path), epoch, step)
    return epoch, step


def train_one_epoch(run: Run, epoch: int, progress: Progress | None = None) -> dict[MetricKey, float]:
    """One pass over the epoch's shuffled training set (`epoch` 0-based); advances `run.step`, each step at
    lr `run.lrs[run.step]`.

    Returns:
        The epoch's metrics: `train/<part>` means over every step of every rank (`train/loss` the total),
        the last lr, global patches/s and seconds. If a loss is not finite the epoch stops before that
        step and returns only `{DIVERGED_AT_STEP: its global step}`, on every rank (see `train_step`).
        `progress` is updated every `run.log_every` steps and at the end.
    """
    cfg = run.cfg
    loader = train_loader(run.train_data, cfg, epoch)
    generator = step_generator(cfg, epoch, run.device)
    patches_per_step = cfg.data.batch_size * cfg.patch.num
    sums: dict[str, float] = {}
    n_steps = 0
    t0 = time.perf_counter()
    for images, _ in loader:
        views = train_batch(images.to(run.device, non_blocking=True), cfg, generator)
        lr = float(run.lrs[run.step])
        out = train_step(run.model, views, run.loss_fn, run.optimizer, lr, cfg.optim.grad_clip, run.autocast)
        if not out.finite:
            log.error("stopping: loss is %s (parts: %s)", out.loss.item(), out.parts)
            return {DIVERGED_AT_STEP: run.step + 1}
        run.step += 1
        n_steps += 1
        loss = float(out.loss)
        for k, v in {TRAIN_LOSS: loss, **{train_part(p): x for p, x in out.parts.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v
        if progress is not None and (n_steps % cfg.run.log_every == 0 or n_steps == len(loader)):
            speed = n_steps * patches_per_step / (time.perf_counter() - t0)
            progress.update(epoch, n_steps, loss, speed)
    seconds = time.perf_counter() - t0
    metrics = _global_means(sums, n_steps, run.device)
    metrics[LR] = float(run.lrs[run.step - 1])
    metrics[PATCHES_PER_S] = n_steps * patches_per_step / seconds
    metrics[EPOCH_SECONDS] = seconds
    return metrics


def _global_means(sums: Mapping[str, float], n_steps: int, device: torch.device) -> dict[MetricKey, float]:
    """Epoch means of the loss and its parts over every step of every rank (the invariance term is local).
    The tensor lives on the training device because NCCL reduces CUDA tensors only."""
    keys = sorted(sums)
    local = torch.tensor([sums[k] / n_steps for k in keys], dtype=torch.float64, device=device)
    means = dist.all_reduce_mean(local).cpu()
    return {k: float(v) for k, v in zip(keys, means, strict=True)}


def probe_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the run probes after `epoch` (1-based): the last, every `eval.every`-th, and `eval.epochs`."""
    every = cfg.eval.every
    return epoch == cfg.schedule.epochs or (every > 0 and epoch % every == 0) or epoch in cfg.eval.epochs


def _checkpoint_due(cfg: TrainConfig, epoch: int) -> bool:
    every = cfg.run.checkpoint_every
    return every > 0 and (epoch % every == 0 or epoch == cfg.schedule.epochs)


def _evaluate_sharded(run: Run, splits: list[Split]) -> dict[MetricKey, float]:
    """Every rank extracts its share of the features with the unwrapped model (no collectives in its
    forward), rank 0 gathers them and probes; every rank then gets the same metrics, so that all of them
    report the same values."""
    data = {s: run.eval_data[s] for s in splits}
    metrics = evaluate(unwrap(run.model), run.cfg, run.train_data, data, run.device, run.eval_variants)
    if dist.is_distributed():
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return {k: float(v) for k, v in metrics.items()}


def _analyse_on_main(run: Run) -> tuple[dict[MetricKey, float], dict[str, Path]]:
    """Rank 0 runs the analyses of eval.analyses on the final model, writing their figures under
    `out/analyses/`, while the others wait; every rank then gets the same metrics (see `_evaluate_sharded`).

    Returns:
        The metrics, and analysis name -> figure (empty on ranks other than 0).
    """
    metrics: dict[MetricKey, float] = {}
    figures: dict[str, Path] = {}
    if dist.is_main():
        # Imported here: matplotlib and the analyses are needed only by runs that ask for them.
        from bagssl_core.analyses import run_analyses

        report = run_analyses(
            unwrap(run.model),
            run.cfg,
            run.train_data,
            run.eval_data["val"],
            run.device,
            run.cfg.eval.analyses,
            run.out / ANALYSES_DIR,
            run.autocast,
        )
        metrics = {k: v for k, v in report.metrics.items()}
        figures = report.figures
    if dist.is_distributed():
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return {k: float(v) for k, v in metrics.items()}, figures


def _save_checkpoint_if_due(run: Run, epoch: int) -> Path | None:
    """On rank 0, when one is due: the epoch's checkpoint (pruning old ones).

    Returns:
        The checkpoint directory written, or None (none due, or not rank 0).
    """
    if not dist.is_main() or not _checkpoint_due(run.cfg, epoch):
        return None
    ckpt = save_checkpoint(run, epoch)
    prune_checkpoints(ckpt.parent, run.cfg.run.keep_checkpoints)
    return ckpt


def _append_metrics(run: Run, metrics: Mapping[str, float], ckpt: Path | None) -> None:
    """On rank 0: the epoch's line of metrics.jsonl, and the same metrics in its checkpoint, if one was
    written (`checkpoint_metrics`)."""
    if not dist.is_main():
        return
    line = json.dumps(metrics)
    if ckpt is not None:
        tmp = ckpt / f".{METRICS_FILE}"
        tmp.write_text(line + "\n")
        tmp.rename(ckpt / METRICS_FILE)
    with (run.out / "metrics.jsonl").open("a") as f:
        f.write(line + "\n")


def checkpoint_metrics(path: str | Path) -> dict[str, float] | None:
    """The metrics reported for the epoch of a checkpoint (a checkpoint or run directory, as
    `find_checkpoint`), or None for a checkpoint written without them."""
    f = find_checkpoint(path) / METRICS_FILE
    return {k: float(v) for k, v in json.loads(f.read_text()).items()} if f.is_file() else None

"""Baselines a trained BagSSL model must beat, scored with the same probes on the same splits.

- `raw_pixels`: no model at all. An image's feature is its pixels as the backbone would receive the whole
  image (at the dataset's image size, normalised with the channel statistics when patch.aug.normalize is
  set), flattened; its scheme is `pixels`. An image larger than `PIXEL_SIDE` (32 px) is first averaged
  down by area to that longer side, as raw-pixel kNN baselines are usually scored on "tiny images": its
  features would otherwise grow with the square of the side (below). Fashion-MNIST and CIFAR are kept at
  their own size; STL-10 (96 px) and ImageFolder images are averaged down.
- `random_init`: the config's backbone, randomly initialised from run.seed, under the config's own
  aggregation schemes: what the architecture and the aggregation give before any training. It is exactly
  `python -m bagssl_core eval --random-init` (both call `probe_backbone`).

Both go through `bagssl_core.probes.run_probes` with the config's eval settings (kNN k and temperature,
linear epochs, lr and batch size, seed): fitted on the train split, scored on val and test, as `evaluate`
scores a trained model. Metric names: `bagssl_core.metrics.baseline_name`, e.g.
`baseline/raw_pixels/val/knn_top1/pixels` and `baseline/random_init/test/linear_top1_lo/mean_emb`.

Memory: the raw-pixel features are N x (C * H * W) float32 for the train split, at most 3 x 32 x 32 floats an
image (Fashion-MNIST's 54,000 training images: 0.5 GB; CIFAR-10's 45,000: 0.55 GB; ImageNet-100's 126,689:
1.6 GB). At its own 224 px, ImageNet-100's would be 76 GB, more than one process of a sweep holds (its
driver with `--local`, else one Ray task). `bench/eval_memory.py` measures both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from bagssl_core.config import TrainConfig
from bagssl_core.data import ImageData
from bagssl_core.metrics import MetricKey, ProbeKey, Split, baseline_name, format_probe_table, parse_baseline
from bagssl_core.models import build_model, prepare_for_device
from bagssl_core.patches import channel_stats, normalize
from bagssl_core.probes import run_probes
from bagssl_core.train import eval_loader, evaluate, load_splits, resolve_device, seed_everything

RAW_PIXELS, RANDOM_INIT = "raw_pixels", "random_init"
PIXELS = "pixels"  # the raw-pixel baseline's scheme
PIXEL_SIDE = 32  # the raw-pixel baseline's longest image side, px (module docstring)

Splits = tuple[ImageData, dict[Split, ImageData]]


def probe_backbone(
    cfg: TrainConfig, weights: Mapping[str, Any] | None = None, splits: Splits | None = None
) -> dict[MetricKey, float]:
    """`evaluate` (val and test) on the model `cfg` describes: with `weights` (a checkpoint's "model" state),
    or randomly initialised from run.seed when None.

    Args:
        splits: (train, {"val": ..., "test": ...}) already loaded; None loads them (`load_splits`).
    """
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg)
    model = build_model(cfg.model, cfg.in_channels)
    if weights is not None:
        model.load_state_dict(weights)
    model = prepare_for_device(model, device, cfg.model)
    train_data, eval_data = splits if splits is not None else load_splits(cfg)
    return evaluate(model, cfg, train_data, eval_data, device)


def pixel_size(height: int, width: int, side: int | None = PIXEL_SIDE) -> tuple[int, int]:
    """(H, W) of the raw-pixel baseline's images: as given when neither exceeds `side` (None: no limit), else
    scaled to `side` on the longer one, keeping the aspect ratio."""
    longest = max(height, width)
    if side is None or longest <= side:
        return height, width
    return max(1, round(height * side / longest)), max(1, round(width * side / longest))


@torch.no_grad()
def pixel_features(
    data: ImageData, cfg: TrainConfig, side: int | None = PIXEL_SIDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C * H * W) float32 raw-pixel features of every image (see the module docstring), and labels.

    Args:
        side: the longest side kept (`pixel_size`); None keeps the images' own, as `bench/eval_memory.py`'s
            reference does.
    """
    mean, std = channel_stats(cfg.data.name, data.channels)
    feats = torch.empty(0)  # filled in place, once the first batch gives the width: no second copy at the end
    labels = torch.empty(len(data), dtype=torch.long)
    start = 0
    for images, y in eval_loader(data, cfg.eval.batch_size, cfg.data.num_workers):
        labels[start : start + len(y)] = y
        # A few images at a time: 256 images of 224 px are 150 MB as floats, 32 of them 19 MB.
        for part in images.split(32):
            x = part.float().div_(255.0)
            size = pixel_size(x.shape[-2], x.shape[-1], side)
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode="area")  # averaging commutes with the normalisation
            if cfg.patch.aug.normalize:
                x = normalize(x, mean, std)
            if start == 0:
                feats = torch.empty(len(data), x[0].numel())
            feats[start : start + len(x)] = x.flatten(1)
            start += len(x)
    return feats, labels


def score_raw_pixels(
    cfg: TrainConfig, splits: Splits, side: int | None = PIXEL_SIDE
) -> dict[ProbeKey, float]:
    """The probes of cfg.eval on raw pixels: `ProbeKey(split, probe, stat, "pixels")` -> accuracy (%) and
    its interval bounds, for val and test. `side`: as in `pixel_features`."""
    train_data, eval_data = splits
    train_feats, train_labels = pixel_features(train_data, cfg, side)
    evals = {}
    for split, data in eval_data.items():
        feats, labels = pixel_features(data, cfg, side)
        evals[split] = ({PIXELS: feats}, labels)
    return run_probes(
        {PIXELS: train_feats}, train_labels, evals, train_data.num_classes, cfg.eval, cfg.run.seed
    )


def score_baselines(cfg: TrainConfig) -> dict[str, float]:
    """Both baselines of `cfg`, by metric name (`baseline/{raw_pixels,random_init}/{probe key}`), on the
    splits a run of `cfg` trains and is scored on (`load_splits`, loaded once for both)."""
    return score_baselines_on(cfg, load_splits(cfg))


def score_baselines_on(cfg: TrainConfig, splits: Splits) -> dict[str, float]:
    """`score_baselines` on splits already loaded. Only probe keys are returned: the splits' sizes are the
    run's own `{split}/n_images`."""
    out = {baseline_name(RAW_PIXELS, k): v for k, v in score_raw_pixels(cfg, splits).items()}
    for key, value in probe_backbone(cfg, splits=splits).items():
        if isinstance(key, ProbeKey):
            out[baseline_name(RANDOM_INIT, key)] = float(value)
    return out


def format_baselines(metrics: Mapping[str, float], sizes: Mapping[str, float] | None = None) -> str:
    """One probe table (`format_probe_table`) per baseline in `metrics`, each under its name.

    Args:
        sizes: `{split}/n_images` -> n, shown in the tables' headers.
    """
    by_baseline: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        parsed = parse_baseline(name)
        if parsed is not None:
            by_baseline.setdefault(parsed[0], dict(sizes or {}))[str(parsed[1])] = value
    return "\n\n".join(f"{b}:\n{format_probe_table(m)}" for b, m in by_baseline.items())

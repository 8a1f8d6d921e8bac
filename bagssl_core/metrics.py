"""Metric names as typed keys: the one place a metric name is built or read.

The trainer and the probes make `ProbeKey`s; MLflow and Tune see their string form (`str(key)`);
a sweep's objective is a `ProbeQuery` that matches keys. Nobody else splits a metric name.

Probe metric names:

    {split}/{probe}_{stat}[_{bound}]/{scheme}[:{variant}]
    val/knn_top1/mean_emb            kNN top-1 accuracy (percent) on the validation split, mean_emb scheme
    val/knn_top1_lo/mean_emb         lower end of its 95% Wilson interval
    test/linear_top5/centre:grid_stride-4   a named evaluation variant (see sweeps.space)

`:` separates the variant because MLflow metric names allow only letters, digits and `_ - . space : /`.
Epoch metrics (`train/loss`, `train/<loss part>`, `lr`, `patches_per_s`, `epoch_seconds`, `epoch`,
`epochs_planned`) are plain constants below; `{split}/n_images` is the n of every interval on a split.

Inside the trainer a metrics dict is keyed by `ProbeKey`s and those constants (`MetricKey`); `metric_names`
turns it into names where it leaves (the reporter, metrics.jsonl, summary.json). `expected_metrics` says
which names a run of a config reports, and when; `format_probe_table` prints them as a table.

This module imports no torch: the CLI and the sweep driver read and print metrics without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, NamedTuple, cast, get_args

if TYPE_CHECKING:
    from bagssl_core.config import EvalConfig, TrainConfig

Split = Literal["val", "test"]
Probe = Literal["knn", "linear"]
Stat = Literal["top1", "top5"]
Bound = Literal["", "lo", "hi"]

SPLITS: tuple[Split, ...] = get_args(Split)
PROBES: tuple[Probe, ...] = get_args(Probe)
STATS: tuple[Stat, ...] = get_args(Stat)

# Reported after every epoch by the trainer (besides `train/<part>` for each part of the loss).
EPOCH = "epoch"
EPOCHS_PLANNED = "epochs_planned"  # the run's schedule.epochs, so a reader can tell a stopped run
TRAIN_LOSS = "train/loss"
LR = "lr"
PATCHES_PER_S = "patches_per_s"
# Where an epoch's wall time went, in seconds: this process's set-up before its first epoch (data, model,
# restoring a checkpoint; 0 on later epochs), the training steps, the probes (0 when none was due) and, on
# rank 0, writing the checkpoint (0 when none was due, and on the other ranks).
SETUP_SECONDS = "setup_seconds"
EPOCH_SECONDS = "epoch_seconds"
PROBE_SECONDS = "probe_seconds"
CHECKPOINT_SECONDS = "checkpoint_seconds"
EPOCH_METRICS = (
    EPOCH,
    EPOCHS_PLANNED,
    TRAIN_LOSS,
    LR,
    PATCHES_PER_S,
    SETUP_SECONDS,
    EPOCH_SECONDS,
    PROBE_SECONDS,
    CHECKPOINT_SECONDS,
)
# Wall-clock measurements: the only metrics an exact rerun or resume of a run may disagree on.
TIMING_METRICS = frozenset({PATCHES_PER_S, SETUP_SECONDS, EPOCH_SECONDS, PROBE_SECONDS, CHECKPOINT_SECONDS})
DIVERGED_AT_STEP = "diverged_at_step"  # the 1-based global step whose loss was not finite

WILSON_Z = 1.959963984540054  # two-sided 95%

_NAME = re.compile(
    r"^(?P<split>[a-z]+)/(?P<probe>[a-z]+)_(?P<stat>top\d+)(?:_(?P<bound>lo|hi))?"
    r"(?:/(?P<scheme>[a-z_]+))?(?::(?P<variant>.+))?$"
)


def train_part(part: str) -> str:
    """The epoch metric of one loss term, e.g. `train/invariance`."""
    return f"train/{part}"


def n_images(split: Split) -> str:
    """How many images a split's probes scored (the n of every interval on that split)."""
    return f"{split}/n_images"


@dataclass(frozen=True)
class ProbeKey:
    """One probe result: `split`, `probe`, `stat` of `scheme` under evaluation `variant` ("" = base)."""

    split: Split
    probe: Probe
    stat: Stat
    scheme: str
    variant: str = ""
    bound: Bound = ""

    def __str__(self) -> str:
        stat = f"{self.stat}_{self.bound}" if self.bound else self.stat
        suffix = f":{self.variant}" if self.variant else ""
        return f"{self.split}/{self.probe}_{stat}/{self.scheme}{suffix}"

    @classmethod
    def parse(cls, name: str) -> ProbeKey | None:
        """The key a probe metric name stands for; None for any other name (epoch metrics...)."""
        m = _NAME.match(name)
        if m is None or m["scheme"] is None or not _known(m):
            return None
        return cls(
            cast(Split, m["split"]),
            cast(Probe, m["probe"]),
            cast(Stat, m["stat"]),
            m["scheme"],
            m["variant"] or "",
            cast(Bound, m["bound"] or ""),
        )

    def with_bound(self, bound: Bound) -> ProbeKey:
        return replace(self, bound=bound)

    def in_split(self, split: Split) -> ProbeKey:
        return replace(self, split=split)


@dataclass(frozen=True)
class ProbeQuery:
    """A sweep objective: a probe statistic on one split, for one scheme or the best over all of them.

    `val/knn_top1/mean_emb` matches that key under every evaluation variant; `val/knn_top1` matches every
    scheme and variant. Interval bounds never match.
    """

    split: Split
    probe: Probe
    stat: Stat
    scheme: str | None = None

    def __str__(self) -> str:
        return f"{self.split}/{self.probe}_{self.stat}" + (f"/{self.scheme}" if self.scheme else "")

    @classmethod
    def parse(cls, name: str) -> ProbeQuery | None:
        """The query a metric name stands for; None when it names no probe statistic or has a variant."""
        m = _NAME.match(name)
        if m is None or m["bound"] or m["variant"] or not _known(m):
            return None
        return cls(cast(Split, m["split"]), cast(Probe, m["probe"]), cast(Stat, m["stat"]), m["scheme"])

    def matches(self, key: ProbeKey) -> bool:
        return (
            not key.bound
            and (key.split, key.probe, key.stat) == (self.split, self.probe, self.stat)
            and (self.scheme is None or key.scheme == self.scheme)
        )

    def best(
        self, metrics: Mapping[str, float], mode: Literal["max", "min"] = "max"
    ) -> tuple[ProbeKey, float] | None:
        """The best matching value in one report, and its key; ties go to the key that sorts first."""
        parsed = ((ProbeKey.parse(n), v) for n, v in metrics.items())
        found = {k: float(v) for k, v in parsed if k and self.matches(k)}
        if not found:
            return None
        key = best_key(found, mode)
        return key, found[key]


def best_key(values: Mapping[ProbeKey, float], mode: Literal["max", "min"]) -> ProbeKey:
    """The key of the best value (the largest for max, the smallest for min); ties go to the key whose
    name sorts first, so a pick never depends on the order results arrived in."""
    sign = 1.0 if mode == "max" else -1.0
    return max(sorted(values, key=str), key=lambda k: sign * values[k])


def _known(m: re.Match[str]) -> bool:
    return m["split"] in SPLITS and m["probe"] in PROBES and m["stat"] in STATS


def probe_keys(
    split: Split, probes: Iterable[Probe], schemes: Iterable[str], variant: str = "", bounds: bool = True
) -> list[ProbeKey]:
    """Every key one evaluation reports: each probe x statistic x scheme, with its interval bounds."""
    out = []
    for scheme in schemes:
        for probe in probes:
            for stat in STATS:
                key = ProbeKey(split, probe, stat, scheme, variant)
                out.append(key)
                if bounds:
                    out += [key.with_bound("lo"), key.with_bound("hi")]
    return out


def wilson_interval(accuracy_pct: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on n images, in percent.

    For p = correct / n: centre (p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²).
    Unlike the normal approximation it stays inside [0, 100] and is sensible at p = 0 or 1 and small n.
    """
    if n <= 0:
        raise ValueError(f"n: expected a positive number of images, got {n}")
    p = min(1.0, max(0.0, accuracy_pct / 100.0))
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # The bounds hold p exactly: at p = 0 or 1 the formula lands a rounding error inside it.
    return 100.0 * min(p, max(0.0, centre - half)), 100.0 * max(p, min(1.0, centre + half))


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (low, high) intervals share a point: the two accuracies are within noise."""
    return a[0] <= b[1] and b[0] <= a[1]


def with_intervals(accuracies: Mapping[ProbeKey, float], n: int) -> dict[ProbeKey, float]:
    """Each accuracy (percent, measured on n images) followed by the bounds of its 95% Wilson interval,
    keyed `key.with_bound("lo")` and `key.with_bound("hi")` (see `wilson_interval`)."""
    out: dict[ProbeKey, float] = {}
    for key, acc in accuracies.items():
        out[key] = acc
        out[key.with_bound("lo")], out[key.with_bound("hi")] = wilson_interval(acc, n)
    return out


# Reference points scored with the same probes on the same splits as a trained model (see
# bagssl_core.baselines): `baseline/{name}/{probe key}`, e.g. `baseline/raw_pixels/val/knn_top1/pixels`
# or `baseline/random_init/val/knn_top1/mean_emb`.
BASELINE_PREFIX = "baseline/"


def baseline_name(baseline: str, key: ProbeKey) -> str:
    """The metric name of one baseline's probe result."""
    if not baseline or "/" in baseline:
        raise ValueError(f"baseline: expected a name without '/', got {baseline!r}")
    return f"{BASELINE_PREFIX}{baseline}/{key}"


def parse_baseline(name: str) -> tuple[str, ProbeKey] | None:
    """(baseline, probe key) of a baseline metric name; None for any other name."""
    if not name.startswith(BASELINE_PREFIX):
        return None
    baseline, _, rest = name.removeprefix(BASELINE_PREFIX).partition("/")
    key = ProbeKey.parse(rest)
    return None if not baseline or key is None else (baseline, key)


# BagSSL's analyses (bagssl_core.analyses), scored on the validation split at the end of a run:
# `analysis/{analysis}/{stat}[_{bound}][/{at}]`, e.g.
#   analysis/bag_curve/knn_top1/n_4             kNN top-1 (%) with 4 grid patch embeddings averaged
#   analysis/bag_curve/knn_top1_lo/n_4          the low end of its 95% Wilson interval
#   analysis/whole_vs_mean/cos_matched/7px      mean cosine(whole image, mean of its own 7-px tiles)
#   analysis/whole_vs_mean/cos_mismatched_std/7px   ... std over images, against another image's tiles
#   analysis/locality/patch_knn_top1            an image's label from one patch's neighbours (%)
ANALYSIS_PREFIX = "analysis/"
# Where the figures go: the run directory's folder, and the MLflow child run's artifact folder.
ANALYSES_DIR = "analyses"
_ANALYSIS = re.compile(
    r"^analysis/(?P<analysis>[a-z_]+)/(?P<stat>[a-z0-9_]+?)(?:_(?P<bound>lo|hi))?(?:/(?P<at>[a-z0-9_.]+))?$"
)


@dataclass(frozen=True)
class AnalysisKey:
    """One number of an analysis: `stat` of `analysis` at a point `at` of its curve ("" = none).

    `at` is `n_{k}` on the bag curve (k patch embeddings averaged) and `{p}px` on whole vs mean (tiles of
    p pixels); the builders below make them, `n_patches` and `scale_px` read them back.
    """

    analysis: str
    stat: str
    at: str = ""
    bound: Bound = ""

    def __post_init__(self) -> None:
        for part in (self.analysis, self.stat):
            if not re.fullmatch(r"[a-z][a-z0-9_]*", part) or part.endswith(("_lo", "_hi")):
                raise ValueError(f"analysis key: expected a lower-case name, got {part!r}")
        if self.at and not re.fullmatch(r"[a-z0-9_.]+", self.at):
            raise ValueError(f"analysis key: expected a point like n_4 or 7px, got {self.at!r}")

    def __str__(self) -> str:
        stat = f"{self.stat}_{self.bound}" if self.bound else self.stat
        return f"{ANALYSIS_PREFIX}{self.analysis}/{stat}" + (f"/{self.at}" if self.at else "")

    @classmethod
    def parse(cls, name: str) -> AnalysisKey | None:
        """The key an analysis metric name stands for; None for any other name."""
        m = _ANALYSIS.match(name)
        if m is None:
            return None
        return cls(m["analysis"], m["stat"], m["at"] or "", cast(Bound, m["bound"] or ""))

    def with_bound(self, bound: Bound) -> AnalysisKey:
        return replace(self, bound=bound)

    @property
    def n_patches(self) -> int | None:
        """k of a bag-curve point `n_{k}`; None elsewhere."""
        m = re.fullmatch(r"n_(\d+)", self.at)
        return int(m[1]) if m else None

    @property
    def scale_px(self) -> int | None:
        """p of a whole-vs-mean point `{p}px`; None elsewhere."""
        m = re.fullmatch(r"(\d+)px", self.at)
        return int(m[1]) if m else None


def bag_curve_key(n: int, bound: Bound = "") -> AnalysisKey:
    """kNN top-1 on validation with `n` grid patch embeddings averaged per image (and bank image)."""
    return AnalysisKey("bag_curve", "knn_top1", f"n_{n}", bound)


def whole_vs_mean_key(stat: str, scale_px: int) -> AnalysisKey:
    """`cos_matched`, `cos_matched_std`, `cos_mismatched` or `cos_mismatched_std` at tiles of `scale_px`."""
    return AnalysisKey("whole_vs_mean", stat, f"{scale_px}px")


def with_analysis_interval(key: AnalysisKey, accuracy_pct: float, n: int) -> dict[AnalysisKey, float]:
    """An accuracy of an analysis followed by the bounds of its 95% Wilson interval over n images."""
    lo, hi = wilson_interval(accuracy_pct, n)
    return {key: accuracy_pct, key.with_bound("lo"): lo, key.with_bound("hi"): hi}


def bag_sizes(grid: int) -> list[int]:
    """The bag curve's points: 1, 2, 4, ... below `grid` (the grid patches of an image), then `grid`."""
    sizes = [1]
    while sizes[-1] * 2 < grid:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == grid else [*sizes, grid]


def analysis_keys(analyses: Iterable[str], grid: int, scales_px: Iterable[int]) -> list[AnalysisKey]:
    """Every key the analyses report, for an evaluation grid of `grid` patches per image and whole-vs-mean
    tiles of `scales_px` pixels."""
    keys: list[AnalysisKey] = []
    for analysis in analyses:
        if analysis == "bag_curve":
            for n in bag_sizes(grid):
                keys += [bag_curve_key(n, b) for b in ("", "lo", "hi")]
            keys += [AnalysisKey(analysis, "n_images"), AnalysisKey(analysis, "bank_images")]
        elif analysis == "whole_vs_mean":
            for px in dict.fromkeys(scales_px):
                stats = ("cos_matched", "cos_matched_std", "cos_mismatched", "cos_mismatched_std")
                keys += [whole_vs_mean_key(stat, px) for stat in stats]
            keys.append(AnalysisKey(analysis, "n_images"))
        elif analysis == "locality":
            top1 = AnalysisKey(analysis, "patch_knn_top1")
            keys += [top1, top1.with_bound("lo"), top1.with_bound("hi")]
            keys += [AnalysisKey(analysis, s) for s in ("n_images", "n_patches", "bank_patches")]
        else:
            raise ValueError(f"unknown analysis {analysis!r}")
    return keys


MetricKey = ProbeKey | AnalysisKey | str  # a probe or analysis result, or one of the plain names above


def metric_names(metrics: Mapping[MetricKey, float]) -> dict[str, float]:
    """The metrics as they leave the trainer: each key as its name (`str(key)`), each value a float."""
    return {str(k): float(v) for k, v in metrics.items()}


class ExpectedMetrics(NamedTuple):
    """The metric names a run reports.

    Attributes:
        per_epoch: in the report of every epoch: the epoch metrics, and on probing epochs (every
            `eval.every`-th, those in `eval.epochs` and the last: `train.probe_due`) the validation probes
            with their intervals and `val/n_images`.
        at_end: added to the last epoch's report of a finished run (and to summary.json): the test probes
            with their intervals and `test/n_images`, and the metrics of the analyses in eval.analyses.
    """

    per_epoch: frozenset[str]
    at_end: frozenset[str]


def expected_metrics(cfg: TrainConfig, variants: Mapping[str, EvalConfig] | None = None) -> ExpectedMetrics:
    """Every metric name a run of `cfg` reports, as the trainer builds them.

    Args:
        variants: evaluation variant name -> EvalConfig, as passed to `bagssl_core.train.train`; None is
            `{"": cfg.eval}` (the base evaluation, no variant suffix).
    """
    variants = {"": cfg.eval} if variants is None else variants
    # Imported here: losses imports torch (seconds), and sweep-spec validation must answer at once.
    from bagssl_core.losses import loss_parts

    epoch = {*EPOCH_METRICS, *(train_part(p) for p in loss_parts(cfg.loss.name))}

    def probes(split: Split) -> set[str]:
        keys = {n_images(split)}
        for name, ev in variants.items():
            keys |= {str(k) for k in probe_keys(split, ev.probes, ev.aggregation, name)}
        return keys

    at_end = probes("test")
    if cfg.eval.analyses:
        from bagssl_core.config import patch_pixels
        from bagssl_core.crops import grid_boxes

        grid = len(grid_boxes(cfg.image_size, cfg.eval_patch_px, cfg.eval_stride))
        scales = [patch_pixels(s, cfg.image_size) for s in cfg.eval.analysis.scales]
        at_end |= {str(k) for k in analysis_keys(cfg.eval.analyses, grid, scales)}
    return ExpectedMetrics(frozenset(epoch | probes("val")), frozenset(at_end))


def format_probe_table(metrics: Mapping[str, float]) -> str:
    """A plain-text table of probe metrics: one row per scheme (and variant), probe and statistic, one
    column per split (val, then test), each cell the accuracy with its 95% interval, `62.50 [59.1, 65.8]`.

    Metric names are read with `ProbeKey.parse`; other metrics (losses, epoch, ...) are ignored, a missing
    cell reads "-", and a split's header carries its `{split}/n_images` when present. The variant column
    appears only when some key has a variant. Rows keep the order in which they first appear.

    Args:
        metrics: metric name -> value, as reported (e.g. "val/knn_top1/mean_emb", "val/knn_top1_lo/mean_emb").

    Returns:
        The table, lines joined by newlines without a trailing one; "" when no probe metric is present.
    """
    cells: dict[tuple[str, str, str, str], dict[Split, dict[str, float]]] = {}
    for name, value in metrics.items():
        key = ProbeKey.parse(name)
        if key is not None:
            row = (key.scheme, key.variant, key.probe, key.stat)
            cells.setdefault(row, {}).setdefault(key.split, {})[key.bound] = value
    if not cells:
        return ""
    splits = [s for s in SPLITS if any(s in row for row in cells.values())]
    with_variant = any(variant for _, variant, _, _ in cells)

    def cell(found: dict[str, float] | None) -> str:
        if not found or "" not in found:
            return "-"
        if "lo" in found and "hi" in found:
            return f"{found['']:.2f} [{found['lo']:.1f}, {found['hi']:.1f}]"
        return f"{found['']:.2f}"

    def header(split: Split) -> str:
        n = metrics.get(n_images(split))
        return split if n is None else f"{split} (n={int(n)})"

    labels = ["scheme", *(["variant"] if with_variant else []), "probe", "stat"]
    lines = [[*labels, *(header(s) for s in splits)]]
    for (scheme, variant, probe, stat), by_split in cells.items():
        label = [scheme, *([variant or "base"] if with_variant else []), probe, stat]
        lines.append([*label, *(cell(by_split.get(s)) for s in splits)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    left = len(labels)
    return "\n".join(
        "  ".join(
            [c.ljust(w) for c, w in zip(line[:left], widths[:left], strict=True)]
            + [c.rjust(w) for c, w in zip(line[left:], widths[left:], strict=True)]
        ).rstrip()
        for line in lines
    )

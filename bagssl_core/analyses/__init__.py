"""BagSSL's own analyses of a trained backbone (Chen et al. 2022), each a few numbers and a figure.

- `bag_curve`: kNN accuracy against the number of patch embeddings averaged (1, 2, 4, ... the whole grid).
- `whole_vs_mean`: cosine of an image's whole-image embedding and the mean of its patch embeddings, per
  patch scale, beside the same cosine against another image's patches.
- `locality`: the nearest training patches of fixed query patches (an image grid), and the image label
  predicted from one patch's neighbours.

All read the backbone output h (before the projector, what the probes score), score the validation split
and draw every random choice from run.seed. `run_analyses` runs the ones asked for and writes
`analyses.json` and one PNG per analysis; `python -m bagssl_core analyze` and `train` (eval.analyses) call it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bagssl_core.analyses.bag_curve import bag_curve
from bagssl_core.analyses.common import AnalysisInputs, AnalysisResult
from bagssl_core.analyses.locality import locality
from bagssl_core.analyses.whole_vs_mean import whole_vs_mean
from bagssl_core.config import TrainConfig
from bagssl_core.data import ImageData
from bagssl_core.metrics import AnalysisKey
from bagssl_core.patches import channel_stats

log = logging.getLogger(__name__)

ANALYSES: dict[str, Callable[[AnalysisInputs], AnalysisResult]] = {
    "bag_curve": bag_curve,
    "whole_vs_mean": whole_vs_mean,
    "locality": locality,
}
RESULTS_FILE = "analyses.json"

__all__ = ["ANALYSES", "AnalysisInputs", "AnalysisReport", "AnalysisResult", "check_analyses", "run_analyses"]


@dataclass
class AnalysisReport:
    """What `run_analyses` found.

    Attributes:
        metrics: every analysis's scalar metrics (names: `bagssl_core.metrics.AnalysisKey`).
        figures: analysis name -> its PNG.
        text: the printable summary, one block per analysis.
        results: analysis name -> its full result (curves, per-image cosines, neighbours).
    """

    metrics: dict[AnalysisKey, float] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    text: str = ""
    results: dict[str, AnalysisResult] = field(default_factory=dict)


def check_analyses(names: Sequence[str]) -> None:
    """Raise ValueError unless every name is an analysis of `ANALYSES`."""
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {', '.join(unknown)}; expected any of {', '.join(ANALYSES)}")


def _kept_results(out_dir: Path, names: Sequence[str]) -> dict[str, float]:
    """The metrics an earlier `analyses.json` in out_dir holds for the analyses not run again now: their
    PNGs stay in the folder, so their numbers stay in the file beside them."""
    try:
        earlier = json.loads((out_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):  # none yet, or not ours to read: written anew
        return {}
    if not isinstance(earlier, dict):
        return {}
    kept = {}
    for name, value in earlier.items():
        key = AnalysisKey.parse(name)
        if key is not None and key.analysis not in names:
            kept[name] = value
    return kept


def _write_together(out_dir: Path, report: AnalysisReport, results_json: str) -> None:
    """Each figure and `analyses.json`, written under temporary names, then renamed into place together."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_FILE
    # ".tmp.png", not ".png.tmp": matplotlib picks the format from the suffix.
    staged = {name: (out_dir / f".{name}.tmp.png", path) for name, path in report.figures.items()}
    staged[RESULTS_FILE] = (out_dir / f".{RESULTS_FILE}.tmp", results)
    try:
        for name, (tmp, _) in staged.items():
            if name == RESULTS_FILE:
                tmp.write_text(results_json)
            else:
                report.results[name].plot(tmp)
        for tmp, final in staged.values():
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged.values():
            tmp.unlink(missing_ok=True)


def run_analyses(
    model: nn.Module,
    cfg: TrainConfig,
    train_data: ImageData,
    val_data: ImageData,
    device: torch.device,
    names: Sequence[str],
    out_dir: Path,
    autocast: bool = False,
) -> AnalysisReport:
    """Run each analysis of `names` on the (unwrapped) model in eval mode; write `out_dir/{name}.png` for
    each and `out_dir/analyses.json` (every metric by name; an earlier file's metrics of analyses not run now
    are kept, as their PNGs are). The model's train/eval mode is restored.

    The files are written once every analysis has run, each to a temporary name and then renamed over its
    own: an analysis can run for long (`eval.analysis.neighbours`, small patches), and a run killed or
    failing midway leaves `out_dir` as it was, never new PNGs beside an `analyses.json` of older ones."""
    check_analyses(names)
    inputs = AnalysisInputs(
        model, cfg, train_data, val_data, device, channel_stats(cfg.data.name, train_data.channels), autocast
    )
    report = AnalysisReport()
    blocks = []
    was_training = model.training
    model.eval()
    try:
        for name in names:
            began = time.perf_counter()
            result = ANALYSES[name](inputs)
            report.metrics.update(result.metrics())
            report.figures[name] = out_dir / f"{name}.png"
            report.results[name] = result
            blocks.append("\n".join(result.summary()))
            log.info("analysis %s: %.1f s", name, time.perf_counter() - began)
    finally:
        model.train(was_training)
    report.text = "\n\n".join(blocks)
    payload = _kept_results(out_dir, names) | {str(k): v for k, v in report.metrics.items()}
    _write_together(out_dir, report, json.dumps(payload, indent=2) + "\n")
    return report

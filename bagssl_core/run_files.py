"""A run directory's files, read without importing torch: its checkpoints, and its result once it has ended.

The CLI resolves a CHECKPOINT argument, and answers `train --resume` of a run that has ended, from here
before it imports the trainer: a wrong path is one message in a fraction of a second, and an ended run's
table comes at once, rather than after the seconds torch and torchvision take to import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bagssl_core.metrics import ANALYSES_DIR

CHECKPOINTS_DIR = "checkpoints"  # in a run directory: one epoch_XXXX/ per checkpoint kept
CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.json"  # in a checkpoint: the metrics reported for its epoch


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a run directory (its latest checkpoint), or a state.pt file."""
    p = Path(path)
    if p.is_file():
        if p.name != CHECKPOINT_FILE:  # the checkpoint is read back by its directory, as state.pt
            raise FileNotFoundError(
                f"{p}: not a checkpoint; expected a run directory, a checkpoint directory or its {CHECKPOINT_FILE}"
            )
        return p.parent
    if (p / CHECKPOINT_FILE).is_file():
        return p
    found = sorted((p / CHECKPOINTS_DIR).glob("epoch_*/" + CHECKPOINT_FILE))
    if not found:
        raise FileNotFoundError(
            f"{p}: no checkpoint here (expected {CHECKPOINT_FILE} or {CHECKPOINTS_DIR}/epoch_*/)"
        )
    return found[-1].parent


SUMMARY_FILE = "summary.json"  # written last, by rank 0, when a run ends
# The files a run directory holds beside checkpoints/: never to be replaced by another command's output.
RUN_DIR_FILES = ("config.yaml", "provenance.json", "metrics.jsonl", SUMMARY_FILE)


def run_owner(path: str | Path) -> str | None:
    """ "the checkpoint at DIR" when `path` is a checkpoint directory or lies inside one; "the run at DIR"
    when it is a run directory's own file or its checkpoints/ folder; else None. Outputs of `train`, `eval`
    and `baselines` must never land there: they would replace what a run wrote."""
    p = Path(path)
    for q in (p, *p.parents):
        if (q / CHECKPOINT_FILE).is_file():
            return f"the checkpoint at {q}"
    in_run = (p.parent / CHECKPOINTS_DIR).is_dir() or (p.parent / SUMMARY_FILE).is_file()
    if in_run and p.name in (*RUN_DIR_FILES, CHECKPOINTS_DIR):
        return f"the run at {p.parent}"
    return None


@dataclass
class RunResult:
    status: str  # "finished" | "diverged"
    epochs: int  # epochs completed
    # by name: the last validation probes and final epoch metrics, the test probes of a finished run
    # (+ DIVERGED_AT_STEP of a diverged one)
    metrics: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None
    # analysis name -> its PNG under out_dir/analyses/, written on rank 0 at the end of a finished run
    # whose eval.analyses asked for it (their metrics are in `metrics`)
    figures: dict[str, Path] = field(default_factory=dict)


def ended_run(out: Path) -> RunResult | None:
    """The result of the run in `out` if it has ended (its summary.json is written last), else None."""
    path = out / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    status, epochs = summary.pop("status"), summary.pop("epochs")
    figures = {p.stem: p for p in sorted((out / ANALYSES_DIR).glob("*.png"))}
    return RunResult(status=status, epochs=epochs, metrics=summary, out_dir=out, figures=figures)

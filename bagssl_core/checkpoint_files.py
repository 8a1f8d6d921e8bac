"""Where a run keeps its checkpoints, and finding one from a path, without importing torch.

The CLI resolves a CHECKPOINT argument here before it imports the trainer, so that a wrong path is one
message in a fraction of a second rather than after the seconds torch and torchvision take to import.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.json"  # in a checkpoint: the metrics reported for its epoch


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a run directory (its latest checkpoint), or a state.pt file."""
    p = Path(path)
    if p.is_file():
        return p.parent
    if (p / CHECKPOINT_FILE).is_file():
        return p
    found = sorted((p / "checkpoints").glob("epoch_*/" + CHECKPOINT_FILE))
    if not found:
        raise FileNotFoundError(
            f"{p}: no checkpoint here (expected {CHECKPOINT_FILE} or checkpoints/epoch_*/)"
        )
    return found[-1].parent

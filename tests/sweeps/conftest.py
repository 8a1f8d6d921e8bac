"""One real local Ray cluster for the whole session: sweeps under test join it with --address.

Starting Ray costs 5-14 s here and a second Ray on the machine confuses Train's placement-group
cleaner (docs/operations.md, "The dashboard"), so every Ray test shares this one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sweeps.ray_env import free_port


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port, dash = free_port(), free_port()
    # As a sweep's own local Ray: the dashboard pinned for Train's placement-group cleaner, and a
    # 'trial_slot' per core for the trials' own actors (docs/operations.md, "The dashboard", "Resources").
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    cmd = [
        ray_bin,
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--resources",
        json.dumps({"trial_slot": 2}),
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)


def tiny_spec(tmp_path: Path, name: str, **changes: object) -> Path:
    """A real sweep on real Fashion-MNIST images, small enough for 2 cores: 2 epochs of 4 steps.

    64 of the 192 training images are the validation split the sweep selects on: with a tenth of 128
    (13 images) the trials tie so often that ASHA finds none below its cutoff and prunes nothing.
    """
    spec = {
        "name": name,
        "base": {
            "data": {
                "name": "fashion_mnist",
                "train_subset": 192,
                "val_size": 64,
                "test_subset": 64,
                "batch_size": 32,
            },
            "patch": {"num": 2, "input_size": 14},
            "model": {"projector": [64, 64]},
            "schedule": {"epochs": 2, "warmup_epochs": 0.5},
            "eval": {"aggregation": ["mean_emb", "centre"], "grid_stride": 7, "every": 1, "linear_epochs": 2},
        },
        "space": {"patch.size": {"choice": [10, 14]}, "loss.inv_weight": {"loguniform": [5.0, 50.0]}},
        "search": {"algo": "optuna", "seed": 0, "n_startup_trials": 2},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "metric": "val/knn_top1/mean_emb",
        "mode": "max",
        "num_samples": 4,
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": name},
        "storage_path": str(tmp_path / "storage"),
        "failure": {"max_retries": 1},
    }
    spec.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cmd(spec: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sweeps.run", str(spec), *args]

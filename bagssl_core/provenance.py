"""Where a run came from: git commit and dirty flag, library versions, host."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions(
    names: tuple[str, ...] = ("torch", "torchvision", "numpy", "pydantic"),
) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def provenance(extra_packages: tuple[str, ...] = ()) -> dict[str, object]:
    """git commit (None outside a checkout), dirty flag, Python/library versions, host name."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": sys.version.split()[0],
        "host": platform.node(),
        **{f"version/{k}": v for k, v in package_versions(("torch", "torchvision", *extra_packages)).items()},
    }

"""Where a command will write, checked before the work whose results go there.

A run directory, a sweep's storage path, an analyses folder, an `--out` file: each is checked at the
start, creating nothing, so that a path that cannot be written (a file where a directory must go, no
permission, a read-only file system, a parent that cannot exist) is one message before any training or
probing, instead of a traceback afterwards that throws the computed results away. The check writes an
unnamed temporary file in the deepest directory that exists, rather than asking `os.access`, which says
yes to root on any path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bagssl_core.config import ConfigError
from bagssl_core.run_files import run_owner

_EXPECTED_DIR = "expected a directory this user can create and write"


def writable_dir(path: str | Path, what: str) -> Path:
    """Check that directory `path` exists, or can be created, and that this process can write there.

    Raises:
        ConfigError: naming `what` (the key or flag that gave the path), the path and why it cannot be.
    """
    refuse_empty_path(path, what, "a directory")
    p = Path(path)
    chain = [*reversed(p.parents), p]
    deepest = p
    try:
        in_the_way = next((q for q in chain if q.exists() and not q.is_dir()), None)
        if in_the_way is not None:
            raise ConfigError(
                f"{what}: cannot write to {p}: {in_the_way} is a file, not a directory; {_EXPECTED_DIR}"
            )
        deepest = [q for q in chain if q.is_dir()][-1]  # chain starts at "/" or "."
        with tempfile.TemporaryFile(dir=deepest):
            pass
    except OSError as err:  # no permission, a read-only file system, a name too long, ...
        where = "" if deepest == p else f" in {deepest}"
        raise ConfigError(
            f"{what}: cannot write to {p} ({err.strerror or err}{where}); {_EXPECTED_DIR}"
        ) from None
    return p


def writable_file(path: str | Path, what: str) -> Path:
    """Check that file `path` can be written later: its directory exists or can be created and is
    writable, and the path is neither a directory nor an existing file this process may not overwrite.

    Raises:
        ConfigError: naming `what`, the path and what was expected.
    """
    refuse_empty_path(path, what, "the path of a file to write")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what}: {p} is a directory; expected the path of a file to write")
    owner = run_owner(p)
    if owner is not None:
        raise ConfigError(f"{what}: {p} is part of {owner}; expected a path outside a run's own files")
    writable_dir(p.parent, what)
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(
            f"{what}: {p} exists and cannot be overwritten; expected a file this user can write"
        )
    return p


def refuse_empty_path(path: str | Path, what: str, expected: str) -> None:
    """An empty path given as a string (`--out ''`) would be the working directory: never what was meant."""
    if isinstance(path, str) and not path.strip():
        raise ConfigError(f"{what}: an empty path; expected {expected}")

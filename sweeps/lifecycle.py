"""A spec's sweeps under a storage path: their names, which one is the latest, and each one's state.

Running a spec again starts a new sweep beside the old ones; `--resume` continues the latest (or a named)
one. A sweep is a directory `storage_path/NAME`, where NAME is the spec's name for the first sweep and
`<spec name>-2`, `-3`, ... for the later ones (`--local` sweeps: `<spec name>_local`, `..._local-2`, so
they never mix with the Tune state of a Ray sweep). The first sweep keeps the plain name so that sweeps
started before this numbering existed are still found and resumed.

Each sweep directory holds `sweep.json`, written atomically by the driver: the spec it ran, its state
(`running`, `interrupted`, `finished`), the driver's pid and host, the trial count, where MLflow has
its runs and the Ray jobs of its drivers. A driver killed outright (kill -9, a lost machine) never writes
its last state, so a `running` sweep whose driver pid no longer exists on this host is shown as
`interrupted`; on another host its liveness cannot be checked, and the sweep is shown as `running` with
that host.

Every sweep's MLflow parent run also carries two hashes, `space_hash` (its search space) and `base_hash`
(its base config): a warm-started sweep (`search.warm_start`) learns only from earlier sweeps with both
equal, whose validation values measure the same thing over the same space.

This module imports neither Ray nor MLflow: `--dry-run` and `python -m sweeps.status` use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from bagssl_core.config import TrainConfig
    from sweeps.spec import SweepSpec

STATE_FILE = "sweep.json"
LOCAL_SUFFIX = "_local"
State = Literal["running", "interrupted", "finished"]


class SweepNotFound(ValueError):
    """No sweep to resume, or a named one that is not this spec's; phrased for the user."""


def sweep_base(spec_name: str, local: bool) -> str:
    """The name of a spec's first sweep; later ones add `-2`, `-3`, ..."""
    return spec_name + (LOCAL_SUFFIX if local else "")


def sweep_number(name: str, base: str) -> int | None:
    """1 for `base`, n for `base-n` (n >= 2), None for any other name."""
    if name == base:
        return 1
    m = re.fullmatch(re.escape(base) + r"-(\d+)", name)
    return int(m.group(1)) if m and int(m.group(1)) >= 2 else None


def sweep_name(base: str, number: int) -> str:
    return base if number == 1 else f"{base}-{number}"


@dataclass
class SweepState:
    """What `sweep.json` holds. `updated` changes at every write; `reason` says why it stopped early."""

    name: str
    spec: str
    local: bool
    state: State
    trials_total: int
    metric: str
    mode: str
    tracking_uri: str
    experiment: str
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started: str = field(default_factory=lambda: _now())
    updated: str = field(default_factory=lambda: _now())
    parent_run_id: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    # Every driver that ran this sweep on Ray, `<cluster session>/<job id>` (`cluster.driver_job`): a
    # resumed sweep releases what an earlier one left on the same cluster (`cluster.release_leftovers`).
    ray_jobs: list[str] = field(default_factory=list)

    def driver_alive(self) -> bool | None:
        """Whether the driver process still runs: None when it ran on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, owned by another user
            return True
        return True

    def shown_state(self) -> str:
        """The state to show: a `running` sweep whose driver is gone was interrupted (kill -9, a crash)."""
        if self.state != "running":
            return self.state
        alive = self.driver_alive()
        if alive is None:
            return f"running (on {self.host})"
        return "running" if alive else "interrupted"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_state(sweep_dir: Path) -> SweepState | None:
    """The sweep's `sweep.json`, or None when it has none (a sweep started by an older version)."""
    path = sweep_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    known = {f.name for f in fields(SweepState)}
    return SweepState(**{k: v for k, v in data.items() if k in known})


def write_state(sweep_dir: Path, current: SweepState, **changes: Any) -> SweepState:
    """Write `current` with `changes` to `sweep.json` atomically (a reader never sees half a file) and
    return what was written."""
    state = replace(current, **changes, updated=_now())
    fd, tmp = tempfile.mkstemp(prefix=".sweep-", suffix=".json", dir=sweep_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=1)
    os.replace(tmp, sweep_dir / STATE_FILE)
    return state


def _owned(sweep_dir: Path, spec_name: str, local: bool) -> bool:
    """Whether the directory is a sweep of this spec in this mode (by its state file; a directory without
    one, from before state files, only under the spec's plain first-sweep name)."""
    state = read_state(sweep_dir)
    if state is None:
        return sweep_dir.name == sweep_base(spec_name, local)
    return state.spec == spec_name and state.local == local


def spec_sweeps(storage: Path, spec_name: str, local: bool) -> list[Path]:
    """The spec's sweeps under storage, oldest first."""
    base = sweep_base(spec_name, local)
    found = []
    if storage.is_dir():
        for d in storage.iterdir():
            n = sweep_number(d.name, base)
            if n is not None and d.is_dir() and _owned(d, spec_name, local):
                found.append((n, d))
    return [d for _, d in sorted(found)]


def new_sweep_dir(storage: Path, spec_name: str, local: bool) -> Path:
    """Create and return the directory of a new sweep: the number after every name taken so far.

    `mkdir` without exist_ok claims the name, so two drivers started at once never share a sweep.
    """
    base = sweep_base(spec_name, local)
    storage.mkdir(parents=True, exist_ok=True)
    taken = [n for d in storage.iterdir() if (n := sweep_number(d.name, base)) is not None]
    number = max(taken, default=0) + 1
    while True:
        path = storage / sweep_name(base, number)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def next_sweep_name(taken: Iterable[str], spec_name: str, local: bool) -> str:
    """A new sweep's name among the names already taken (remote storage, where MLflow's parent runs
    list the sweeps: a directory there cannot be claimed as a local one can)."""
    base = sweep_base(spec_name, local)
    numbers = [n for t in taken if (n := sweep_number(t, base)) is not None]
    return sweep_name(base, max(numbers, default=0) + 1)


def latest_sweep_name(taken: Iterable[str], spec_name: str, local: bool) -> str | None:
    base = sweep_base(spec_name, local)
    numbered = [(n, t) for t in taken if (n := sweep_number(t, base)) is not None]
    return max(numbered)[1] if numbered else None


def sweep_to_resume(storage: Path, spec_name: str, local: bool, name: str | None, source: str) -> Path:
    """The sweep `--resume [NAME]` continues: the named one, else the spec's latest.

    Raises SweepNotFound when there is none, when NAME is another spec's (or the other mode's) sweep,
    or when its driver is still running on this host.
    """
    mode = "--local " if local else ""
    if name is None:
        sweeps = spec_sweeps(storage, spec_name, local)
        if not sweeps:
            base = sweep_base(spec_name, local)
            raise SweepNotFound(
                f"{source}: --resume: nothing to resume: no {mode}sweep of {spec_name!r} under {storage} "
                f"(expected {storage / base} or {base}-N); run without --resume to start one"
            )
        path = sweeps[-1]
    else:
        path = storage / name
        if not path.is_dir() or sweep_number(name, sweep_base(spec_name, local)) is None:
            known = ", ".join(d.name for d in spec_sweeps(storage, spec_name, local)) or "none"
            raise SweepNotFound(
                f"{source}: --resume {name}: not a {mode}sweep of {spec_name!r} under {storage}; "
                f"expected one of: {known}"
            )
        if not _owned(path, spec_name, local):
            state = read_state(path)
            other = f"spec {state.spec!r}{' --local' if state.local else ''}" if state else "another spec"
            raise SweepNotFound(f"{source}: --resume {name}: {path} is a sweep of {other}")
    state = read_state(path)
    if state is not None and state.shown_state() == "running":
        raise SweepNotFound(
            f"{source}: --resume: sweep {path.name!r} is still running (pid {state.pid} on {state.host}); "
            "stop it first (Ctrl-C), or start a new sweep without --resume"
        )
    return path


def all_sweeps(storage: Path) -> list[tuple[Path, SweepState | None]]:
    """Every sweep directory under storage with its state (None: started before state files, recognised
    by the Tune state or Optuna journal in it), by name."""
    out: list[tuple[Path, SweepState | None]] = []
    if not storage.is_dir():
        return out
    for d in sorted(p for p in storage.iterdir() if p.is_dir()):
        state = read_state(d)
        legacy = any(d.glob("experiment_state-*.json")) or (d / "optuna_journal.log").exists()
        if state is not None or legacy:
            out.append((d, state))
    return out


# --- which earlier sweeps ran the same experiment ---------------------------------------------------


def _digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def space_hash(spec: SweepSpec) -> str:
    """The hash of the spec's search space: every axis (training and evaluation-only) with its
    distribution kind and arguments, as canonical JSON. Key order in the YAML does not change it."""
    return _digest({key: {d.kind: list(d.args)} for key, d in spec.space.items()})


def base_hash(base: TrainConfig) -> str:
    """The hash of the base config every trial starts from, without the knobs that only say where a run
    executes (bagssl_core's RESUME_MAY_CHANGE): trials of two sweeps whose bases differ elsewhere (more
    epochs, another dataset) score different things, and a warm start must not mix them."""
    from bagssl_core.__main__ import RESUME_MAY_CHANGE
    from bagssl_core.config import flatten

    flat = flatten(base.model_dump(mode="json"))
    return _digest({k: v for k, v in flat.items() if k not in RESUME_MAY_CHANGE})

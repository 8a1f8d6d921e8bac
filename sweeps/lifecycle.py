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


class StateUnreadable(SweepNotFound):
    """A `sweep.json` that is there but holds no sweep state (cut short, edited, not a file).

    A SweepNotFound, so that `sweeps.run` refuses to resume such a sweep with its one-line message: its
    state can be neither trusted nor rewritten without losing what the file holds.
    """

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    @property
    def summary(self) -> str:
        """What is wrong, without what every sweep.json is expected to hold (a status row's note)."""
        return self.problem.removesuffix(f"; {_EXPECTED}")


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
        except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
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


# What each field of `sweep.json` must hold, checked on reading: a file edited by hand, or written by
# something else, must not become a state whose pid signals another process or whose URI is not a string.
# The fields with a fixed default may be missing (`ray_jobs` came later); the others were always written.
_OPTIONAL_FIELDS = {"parent_run_id", "exit_code", "reason", "ray_jobs"}
_STATES = ("running", "interrupted", "finished")
_MAX_PID = 2**31 - 1
_EXPECTED = "expected the JSON object a sweep's driver writes"


def _field_problem(key: str, value: Any) -> str | None:
    """What is wrong with one field's value, or None."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks: dict[str, tuple[bool, str]] = {
        "local": (isinstance(value, bool), "true or false"),
        "state": (value in _STATES, " or ".join(_STATES)),
        "mode": (value in ("max", "min"), "max or min"),
        "trials_total": (is_int(value) and value >= 0, "a count (an integer >= 0)"),
        "pid": (is_int(value) and 1 <= value <= _MAX_PID, "a process id (a positive integer)"),
        "exit_code": (value is None or is_int(value), "an integer or null"),
        "parent_run_id": (value is None or isinstance(value, str), "a string or null"),
        "reason": (value is None or isinstance(value, str), "a string or null"),
        "ray_jobs": (
            isinstance(value, list) and all(isinstance(j, str) for j in value),
            "a list of strings",
        ),
    }
    ok, expected = checks.get(key, (isinstance(value, str), "a string"))
    if ok:
        return None
    shown = json.dumps(value)
    return f"{key}: {shown if len(shown) <= 40 else shown[:37] + '...'}; expected {expected}"


def read_state(sweep_dir: Path) -> SweepState | None:
    """The sweep's `sweep.json`, or None when it has none (a sweep started by an older version).

    Raises StateUnreadable, naming the file and what is wrong, when it is there but holds no sweep state.
    """
    path = sweep_dir / STATE_FILE
    data = _load_json(path)
    if data is None:
        return None
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(data), "a number"
        )
        raise StateUnreadable(path, f"holds {kind}; {_EXPECTED}")
    # Keys this version does not know are left out: a newer version may have written them.
    known = [f.name for f in fields(SweepState)]
    missing = [k for k in known if k not in data and k not in _OPTIONAL_FIELDS]
    if missing:
        names = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise StateUnreadable(path, f"missing {names}; {_EXPECTED}")
    for key in known:
        if key in data and (problem := _field_problem(key, data[key])) is not None:
            raise StateUnreadable(path, problem)
    return SweepState(**{k: data[k] for k in known if k in data})


def _load_json(path: Path) -> Any:
    """The JSON value in the file, or None when there is no file; StateUnreadable when it cannot be read
    or parsed (a JSON `null` is refused here, so that None means no file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise StateUnreadable(path, "a directory; expected the JSON file a sweep's driver writes") from None
    except UnicodeDecodeError:
        raise StateUnreadable(path, f"not UTF-8 text; {_EXPECTED}") from None
    except OSError as err:
        raise StateUnreadable(path, f"cannot be read ({err.strerror or err}); {_EXPECTED}") from None
    if not text.strip():
        raise StateUnreadable(path, f"empty; {_EXPECTED}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise StateUnreadable(path, f"not valid JSON ({err}); {_EXPECTED}") from None
    except RecursionError:  # nested deeper than the parser goes
        raise StateUnreadable(path, f"not valid JSON (nested too deep); {_EXPECTED}") from None
    if data is None:
        raise StateUnreadable(path, f"holds null; {_EXPECTED}")
    return data


def write_state(sweep_dir: Path, current: SweepState, **changes: Any) -> SweepState:
    """Write `current` with `changes` to `sweep.json` atomically (a reader never sees half a file) and
    return what was written."""
    state = replace(current, **changes, updated=_now())
    fd, tmp = tempfile.mkstemp(prefix=".sweep-", suffix=".json", dir=sweep_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=1)
    os.replace(tmp, sweep_dir / STATE_FILE)
    return state


def _is_of(sweep_dir: Path, state: SweepState | None, spec_name: str, local: bool) -> bool:
    """Whether the directory is a sweep of this spec in this mode (by its state file; a directory without
    one, from before state files, only under the spec's plain first-sweep name)."""
    if state is None:
        return sweep_dir.name == sweep_base(spec_name, local)
    return state.spec == spec_name and state.local == local


def _owned(sweep_dir: Path, spec_name: str, local: bool) -> bool:
    """`_is_of` by the directory's state file; False when that file cannot be read, as whose sweep it is
    cannot be told."""
    try:
        return _is_of(sweep_dir, read_state(sweep_dir), spec_name, local)
    except StateUnreadable:
        return False


def _numbered(storage: Path, spec_name: str, local: bool) -> list[Path]:
    """The directories under storage named as the spec's sweeps in this mode, oldest first, whoever owns
    them (`s-3` may be spec `s`'s third sweep or spec `s-3`'s first)."""
    base = sweep_base(spec_name, local)
    found = []
    if storage.is_dir():
        for d in storage.iterdir():
            n = sweep_number(d.name, base)
            if n is not None and d.is_dir():
                found.append((n, d))
    return [d for _, d in sorted(found)]


def spec_sweeps(storage: Path, spec_name: str, local: bool) -> list[Path]:
    """The spec's sweeps under storage, oldest first; a sweep whose `sweep.json` cannot be read is left
    out."""
    return [d for d in _numbered(storage, spec_name, local) if _owned(d, spec_name, local)]


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
    when its driver is still running on this host, or when its `sweep.json` cannot be read (the file is
    left as it is: it is the only record of the sweep's state).
    """
    mode = "--local " if local else ""
    if name is None:
        found: tuple[Path, SweepState | None] | None = None
        # Newest first: the latest sweep is the one the user means, so an unreadable one there is an
        # error, not a reason to continue an older sweep instead.
        for d in reversed(_numbered(storage, spec_name, local)):
            try:
                candidate = read_state(d)
            except StateUnreadable as err:
                raise SweepNotFound(
                    f"{source}: --resume: the latest sweep, {d.name}, cannot be resumed: {err} "
                    "(--resume NAME continues another sweep)"
                ) from None
            if _is_of(d, candidate, spec_name, local):
                found = (d, candidate)
                break
        if found is None:
            base = sweep_base(spec_name, local)
            raise SweepNotFound(
                f"{source}: --resume: nothing to resume: no {mode}sweep of {spec_name!r} under {storage} "
                f"(expected {storage / base} or {base}-N); run without --resume to start one"
            )
        path, state = found
    else:
        path = storage / name
        if not path.is_dir() or sweep_number(name, sweep_base(spec_name, local)) is None:
            known = ", ".join(d.name for d in spec_sweeps(storage, spec_name, local)) or "none"
            raise SweepNotFound(
                f"{source}: --resume {name}: not a {mode}sweep of {spec_name!r} under {storage}; "
                f"expected one of: {known}"
            )
        try:
            state = read_state(path)
        except StateUnreadable as err:
            raise SweepNotFound(f"{source}: --resume {name}: cannot be resumed: {err}") from None
        if not _is_of(path, state, spec_name, local):
            other = f"spec {state.spec!r}{' --local' if state.local else ''}" if state else "another spec"
            raise SweepNotFound(f"{source}: --resume {name}: {path} is a sweep of {other}")
    if state is not None and state.shown_state() == "running":
        raise SweepNotFound(
            f"{source}: --resume: sweep {path.name!r} is still running (pid {state.pid} on {state.host}); "
            "stop it first (Ctrl-C), or start a new sweep without --resume"
        )
    return path


def all_sweeps(storage: Path) -> list[tuple[Path, SweepState | StateUnreadable | None]]:
    """Every sweep directory under storage with its state, by name: None for a sweep started before state
    files (recognised by the Tune state or Optuna journal in it), the error for a `sweep.json` that
    cannot be read."""
    out: list[tuple[Path, SweepState | StateUnreadable | None]] = []
    if not storage.is_dir():
        return out
    for d in sorted(p for p in storage.iterdir() if p.is_dir()):
        state: SweepState | StateUnreadable | None
        try:
            state = read_state(d)
        except StateUnreadable as err:
            state = err
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

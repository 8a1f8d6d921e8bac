"""`python -m sweeps.status [STORAGE_PATH] [--spec NAME]`: the sweeps under a storage path.

One line per sweep: its name (what `--resume NAME` takes), its spec, Ray or --local, its state, the
trials done out of the trials planned, and the best validation objective so far with its 95% interval.

The state comes from the sweep's `sweep.json` and whether its driver still runs (sweeps.lifecycle); the
trials and the best value from MLflow, where the sweep's parent run and its children are. A trial is
done when it ended (finished, stopped early by the scheduler, or failed); the best is picked as the
sweep's report picks it (`report.best_trial`: validation only, trials that ran all their epochs first).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from bagssl_core.arguments import Parser
from sweeps import lifecycle
from sweeps.lifecycle import SweepState

DEFAULT_STORAGE = "./sweeps_storage"
DONE = ("FINISHED", "KILLED", "FAILED")


@dataclass(frozen=True)
class Progress:
    """What MLflow says of a sweep's search trials: how many ended, and the best value so far."""

    done: int
    started: int
    best: str  # "72.50 [67.9, 76.6] (trial 3f2a_00001)", or "-"


def _store_problem(uri: str) -> str | None:
    """Why the store at `uri` is not opened, or None. Opening a sqlite URI creates the file, and MLflow
    creates its tables in an empty one: a status must leave a store that is gone, gone, and an empty file,
    empty. A server that does not answer is given a few seconds, not MLflow's minutes of retries."""
    if uri.startswith("sqlite:"):
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if db is None or not str(db) or "?" in uri:
            return f"not a sqlite:///path store: {uri}"
        if not db.exists():
            return f"store gone: {db}"
        if not db.is_file():
            return f"store not a file: {db}"
        if db.stat().st_size == 0:
            return f"store empty: {db}"
        from sweeps.results import sqlite_store_problem

        if sqlite_store_problem(db) is not None:
            return f"store not MLflow's: {db}"
    elif uri.startswith(("http://", "https://")):
        from sweeps.tracking import TrackingError, check_reachable

        try:
            check_reachable(uri, timeout_s=5.0)
        except TrackingError:
            return f"no answer from {uri}"
    return None


def progress(state: SweepState) -> Progress | str:
    """The sweep's trials from its MLflow parent run; else why they cannot be read, in a few words ("" when
    the sweep has no parent run yet)."""
    from mlflow.tracking import MlflowClient

    from sweeps.report import TrialOutcome, best_trial
    from sweeps.spec import Objective
    from sweeps.tracking import PARENT_TAG, TAG_ROLE, TAG_TRIAL

    if state.parent_run_id is None:
        return ""
    uri = state.tracking_uri
    if (problem := _store_problem(uri)) is not None:
        return problem
    # A status lists every sweep, and one sweep's store failing in any way (an unreadable file, a server
    # error, a store of a newer MLflow) must leave the others listed: any error is that row's note.
    try:
        client = MlflowClient(tracking_uri=uri)
        parent = client.get_run(state.parent_run_id)
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{state.parent_run_id}' and tags.`{TAG_ROLE}` = 'trial'",
            max_results=10000,
        )
        trials = [
            TrialOutcome(c.data.tags.get(TAG_TRIAL, c.info.run_id), {}, c.info.status, dict(c.data.metrics))
            for c in children
        ]
        ended = [t for t in trials if t.status in DONE]
        found = best_trial(ended, Objective.of(state.metric, state.mode))  # type: ignore[arg-type]
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        note = f"{type(err).__name__}: {first}" if first else type(err).__name__
        return f"MLflow: {note if len(note) <= 80 else note[:77] + '...'}"
    best = "-"
    if found is not None:
        t, s = found
        ci = f" [{s.val_ci[0]:.1f}, {s.val_ci[1]:.1f}]" if s.val_ci else ""
        pruned = "" if t.status == "FINISHED" else ", stopped early"
        best = f"{s.val:.2f}{ci} ({t.trial_id}{pruned})"
    return Progress(len(ended), len(trials), best)


def _may_be_of(name: str, spec: str) -> bool:
    """Whether a directory whose state cannot be read could be a sweep of the spec, by its name alone."""
    return any(lifecycle.sweep_number(name, lifecycle.sweep_base(spec, local)) for local in (False, True))


def status_lines(storage: Path, spec: str | None = None) -> list[str]:
    """The status table of the sweeps under storage (of one spec when given), a header first."""
    header = ["sweep", "spec", "mode", "state", "trials", "best val (95% CI)", "objective", "updated"]
    rows = []
    for d, state in lifecycle.all_sweeps(storage):
        if state is None:
            if spec is None or d.name == spec:
                rows.append([d.name, "?", "?", "unknown (no sweep.json: an older sweep)", "?", "?", "?", "-"])
            continue
        if isinstance(state, lifecycle.StateUnreadable):
            if spec is None or _may_be_of(d.name, spec):
                why = f"unreadable ({lifecycle.STATE_FILE}: {state.summary})"
                rows.append([d.name, "?", "?", why, "?", "?", "?", "-"])
            continue
        if spec is not None and state.spec != spec:
            continue
        p = progress(state)
        if isinstance(p, Progress):
            trials, best = f"{p.done}/{state.trials_total}", p.best
        else:
            trials, best = "?", f"? ({p})" if p else "?"
        rows.append(
            [
                d.name,
                state.spec,
                "local" if state.local else "ray",
                state.shown_state(),
                trials,
                best,
                f"{state.mode} {state.metric}",
                state.updated.replace("T", " "),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m sweeps.status", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "storage",
        nargs="?",
        default=DEFAULT_STORAGE,
        help=f"a spec's storage_path (default {DEFAULT_STORAGE})",
    )
    p.add_argument("--spec", default=None, help="only the sweeps of this spec name")
    args = p.parse_args(argv)
    if "://" in args.storage:
        print(
            f"error: {args.storage}: remote storage holds no sweep.json this command can list; its sweeps "
            "are the parent runs of the spec's MLflow experiment (tag bagssl.sweep)",
            file=sys.stderr,
        )
        return 2
    storage = Path(args.storage).expanduser().resolve()
    if not storage.is_dir():
        what = "a file" if storage.exists() else "no such directory"
        print(f"error: {storage}: {what}; expected a sweep spec's storage_path", file=sys.stderr)
        return 2
    # MLflow's HTTP client retries a failing server for minutes (7 times, backing off): a status waits
    # seconds for each sweep's store, and shows what it could not read as unknown.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    lines = status_lines(storage, args.spec)
    print("\n".join(lines) if len(lines) > 1 else f"no sweeps under {storage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

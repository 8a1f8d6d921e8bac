"""What must be settled before ray is imported or started: the environment it reads, the dashboard's port.

No Ray import in this module: Ray reads part of its environment at import, so this runs first. The
reasons are in docs/operations.md.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# Ray Train's switch for its preemption watcher, read by each Train controller from its trial's environment.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def prepare_ray_environment(address: str | None) -> None:
    """Set what Ray reads at import or start, for a sweep joining `address` (or RAY_ADDRESS, else local).

    Call before anything imports ray. Values the user set already are kept.
    """
    # Tune's newer console output ignores a ProgressReporter; the classic one shows our columns.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # The sweep's own Ray, on this machine alone: Train's preemption watcher (an actor and its process
        # at every worker-group start, polling every 5 s) reacts only to a cluster draining a node, which
        # cannot happen here (docs/operations.md, "Costs"). A joined cluster keeps its own setting.
        os.environ.setdefault(PREEMPTION_WATCHER, "0")
    if address and address != "auto" and "RAY_AUTH_MODE" not in os.environ and has_auth_token():
        # Ray turns token auth on by itself only for address="auto" (docs/operations.md, "Token
        # authentication"); the cluster would reject us with InvalidAuthToken.
        os.environ["RAY_AUTH_MODE"] = "token"


def has_auth_token() -> bool:
    """Whether this machine holds a Ray auth token, with which a head started here requires it."""
    return (
        bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1: where the dashboard of a Ray we start is pinned (docs/operations.md,
    "The dashboard")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

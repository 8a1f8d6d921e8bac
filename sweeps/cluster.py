"""Ray for a sweep: join a cluster or start a local one, and work out how many trials it holds at once.

Call `sweeps.ray_env.prepare_ray_environment` before importing this module: Ray reads part of its
settings at import. docs/operations.md explains each workaround here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from sweeps.ray_env import free_port
from sweeps.resources import trials_that_fit, worker_group_fits, worker_resources
from sweeps.spec import SpecError, SweepSpec

# The trainable's own actor on a cluster without a 'trial_slot' resource: a bundle must not be empty
# (docs/operations.md, "Resources").
_TRIAL_ACTOR_MEMORY = 64 * 2**20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """How a sweep's trials sit on the cluster.

    Attributes:
        trials_at_once: trials that run concurrently (the cluster's capacity, capped by max_concurrent).
        trial_bundle: the resources of each trial's own Tune actor, which only drives its TorchTrainer.
    """

    trials_at_once: int
    trial_bundle: dict[str, float]


def init_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS); else start a local Ray sized to this machine's cores."""
    # Messages name where the address came from: the flag, or the environment (as `ray job submit` sets it).
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_listening(address, given)
        try:
            ctx = ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SpecError(f"{given}: cannot join the Ray cluster at {address}: {err}") from None
        if cluster_auth_mode(ctx.dashboard_url) == "disabled" and driver_auth_mode() == "token":
            ray.shutdown()
            raise SpecError(
                f"{given}: the Ray cluster at {address} runs without token authentication, but this driver "
                "has it on (RAY_AUTH_MODE=token, set by you or, since this machine holds a Ray token in "
                "~/.ray/auth_token, by the sweep), so the cluster's processes could not call the driver back "
                "and every trial would fail at once; expected the same mode on both sides: run the sweep "
                "with RAY_AUTH_MODE=disabled, or restart the cluster on a machine that holds the token"
            )
        return
    # The dashboard serves the State API that Train's placement-group cleaner needs; the cleaner finds it by
    # auto-detection, which fails while another Ray runs on this machine, so its address is pinned in
    # every worker's environment (docs/operations.md, "The dashboard").
    port = free_port()
    # address="local": without it, ray.init joins whatever Ray was started last on this machine (a `ray
    # start` head, a test cluster) and then refuses num_cpus with a traceback (docs/operations.md).
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        resources={"trial_slot": os.cpu_count() or 1},
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


def _check_listening(address: str, given: str) -> None:
    """SpecError unless a HOST:PORT address takes a TCP connection within 5 s: `ray.init` keeps retrying an
    address where nothing listens for minutes, with no message. Other forms ("auto", ray://...) are Ray's
    to resolve."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        reason = (
            "no answer within 5 s"
            if isinstance(err, TimeoutError)
            else (getattr(err, "strerror", None) or err)
        )
        raise SpecError(
            f"{given}: nothing answers at {address} ({reason}); expected a Ray head's GCS address, as "
            "`ray start --head` prints it (HOST:6379 by default)"
        ) from None


def driver_auth_mode() -> str:
    """This process's Ray authentication mode, "token" or "disabled": Ray's own reading, which `ray.init`
    may have turned on by itself (docs/operations.md, "Token authentication")."""
    from ray._private.authentication.authentication_utils import get_authentication_mode_name
    from ray._raylet import get_authentication_mode  # type: ignore[attr-defined]  # compiled; its stub lacks it

    return get_authentication_mode_name(get_authentication_mode())


def cluster_auth_mode(dashboard_url: str | None) -> str | None:
    """The authentication mode a cluster's head runs with, "token" or "disabled", from its dashboard;
    None when it has no dashboard or does not say.

    Why it is asked: a cluster started before this machine held a token runs without authentication, and a
    driver that turned token auth on (docs/operations.md, "Token authentication") then rejects the
    cluster's own calls to it; the joined cluster is the only one that knows which mode it runs."""
    if not dashboard_url:
        return None
    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    try:
        with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=10) as resp:
            mode = json.load(resp).get("authentication_mode")
    except (OSError, ValueError, AttributeError):  # unreachable, or an answer without the field
        return None
    return mode if mode in ("token", "disabled") else None


def placement(spec: SweepSpec) -> Placement:
    """How many trials fit at once on the connected cluster; SpecError if a trial can never be placed."""
    r = spec.resources
    spread = r.placement == "spread"
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    if not worker_group_fits(nodes, r.workers_per_trial, worker_resources(r), spread):
        gpu = f", {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
        if spread:
            roomy = sum(worker_group_fits([n], 1, worker_resources(r)) for n in nodes)
            raise SpecError(
                f"resources.placement: spread puts each of a trial's {r.workers_per_trial} workers on its "
                f"own node, with {r.cpus_per_worker:g} CPU{gpu} free, and only {roomy} of the cluster's "
                f"{len(nodes)} node(s) have that room; expected placement: pack, fewer workers_per_trial, "
                "or more nodes"
            )
        raise SpecError(
            f"resources: a trial needs {r.workers_per_trial} worker(s) x ({r.cpus_per_worker:g} CPU{gpu}) "
            f"and can never be placed on this cluster ({total.get('CPU', 0):g} CPU, "
            f"{total.get('GPU', 0):g} GPU over {len(nodes)} node(s)); expected fewer workers_per_trial or "
            "smaller cpus_per_worker/gpus_per_worker"
        )
    fit = trials_that_fit(nodes, r.workers_per_trial, worker_resources(r), spread)
    if spec.max_concurrent:
        fit = min(fit, spec.max_concurrent)
    # A trial's own actor holds a 'trial_slot' (local Ray) so that it takes no CPU from its workers.
    bundle: dict[str, float] = (
        {"CPU": 0, "trial_slot": 1} if total.get("trial_slot") else {"CPU": 0, "memory": _TRIAL_ACTOR_MEMORY}
    )
    return Placement(trials_at_once=max(1, fit), trial_bundle=bundle)


def driver_job() -> str:
    """This driver's Ray job as `<cluster session>/<job id>`: job ids count from 1 again on every cluster,
    so the session name tells whose job an id is."""
    ctx = ray.get_runtime_context()
    return f"{ctx.get_session_name()}/{ctx.get_job_id()}"


def release_leftovers(earlier_jobs: Iterable[str]) -> list[str]:
    """Remove the placement groups that the earlier, dead drivers of a sweep (`driver_job` values) left
    alive on this cluster; return their ids.

    Ray Train can leak a trial's worker-group placement group when its driver stops while the trial's
    controller is starting the group: the controller dies before its placement-group cleaner is told to
    watch, and the group keeps the trial's CPUs forever. A resumed sweep on the same cluster then waits
    for resources that never come (docs/operations.md, "Resuming"). A placement group's id ends with the
    id of the job that created it; only a group of a job that is recorded as one of this sweep's drivers,
    on this very cluster, and that Ray knows is dead is removed: nothing of another user's.
    """
    session = ray.get_runtime_context().get_session_name()
    ours = {
        job_id for cluster, _, job_id in (job.partition("/") for job in earlier_jobs) if cluster == session
    }
    if not ours:
        return []
    # No public API lists jobs without the dashboard; the GCS job table is what `ray list jobs` reads.
    from ray._private.state import jobs

    dead = {j["JobID"] for j in jobs() if j.get("IsDead")} & ours
    removed = []
    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] != "REMOVED" and pg_id[-8:] in dead:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            removed.append(pg_id)
    if removed:
        log.warning(
            "released %d placement group(s) that this sweep's earlier driver (Ray job %s) left holding "
            "resources: %s",
            len(removed),
            ", ".join(sorted({pg_id[-8:] for pg_id in removed})),
            ", ".join(removed),
        )
    return removed


@contextlib.contextmanager
def ray_cluster(spec: SweepSpec, address: str | None) -> Iterator[Placement]:
    """Ray joined or started for this sweep, once a trial is known to fit; shut down (or left) on exit."""
    init_ray(address)
    # Tune saves its state on SIGINT but Ray's own SIGTERM handler (installed by ray.init) exits at once:
    # route SIGTERM through the graceful path so that --resume loses nothing (docs/operations.md, "Stopping").
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        yield placement(spec)
    finally:
        ray.shutdown()

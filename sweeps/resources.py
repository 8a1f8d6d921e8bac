"""What one Ray Train worker and one trial hold, and how many trials fit on a set of nodes.

Plain arithmetic, no Ray: `--dry-run` prints these numbers without importing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from sweeps.spec import ResourcesSpec

# Where a trial's worker group runs, in its reports (`trainable.worker_places`) and as tags of its MLflow run.
WORKER_TAG_PREFIX = "workers/"

# `resources.placement` -> the strategy of the placement group Ray Train reserves for a trial's workers.
# Spread is Ray's STRICT_SPREAD: plain SPREAD is best-effort and may still put two workers on one node,
# while a spec that asks for one worker per node is refused up front when the cluster has too few nodes.
PLACEMENT_STRATEGY = {"pack": "PACK", "spread": "STRICT_SPREAD"}


def worker_resources(r: ResourcesSpec) -> dict[str, float]:
    """One Ray Train worker's bundle: its CPUs, and its GPUs when it has any."""
    return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}


def trial_resources(r: ResourcesSpec) -> dict[str, float]:
    """What all workers of one trial hold together."""
    return {k: r.workers_per_trial * v for k, v in worker_resources(r).items()}


def ddp_backend(r: ResourcesSpec) -> Literal["nccl", "gloo"]:
    """The torch.distributed backend of a trial's workers: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if r.gpus_per_worker > 0 else "gloo"


def _has_room(node: Mapping[str, float], per_worker: Mapping[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in per_worker.items())


def _take(node: dict[str, float], per_worker: Mapping[str, float]) -> None:
    for key, v in per_worker.items():
        node[key] = node.get(key, 0) - v


def _place_group(
    free: list[dict[str, float]], workers: int, per_worker: Mapping[str, float], spread: bool
) -> bool:
    """Take one trial's worker bundles out of `free` (in place); False, and `free` unchanged, if they do not fit.

    Pack places the bundles first-fit, any number on a node (a bundle never spans two nodes). Spread needs
    `workers` distinct nodes with room, taken by most room first so that later trials still find some.
    """
    trial = [dict(n) for n in free]
    if spread:
        roomy = [n for n in trial if _has_room(n, per_worker)]
        if len(roomy) < workers:
            return False
        roomy.sort(key=lambda n: -min(n.get(k, 0) / v for k, v in per_worker.items()))
        for node in roomy[:workers]:
            _take(node, per_worker)
    else:
        for _ in range(workers):
            found = next((n for n in trial if _has_room(n, per_worker)), None)
            if found is None:
                return False
            _take(found, per_worker)
    free[:] = trial
    return True


def worker_group_fits(
    nodes: list[Mapping[str, float]], workers: int, per_worker: Mapping[str, float], spread: bool = False
) -> bool:
    """Whether one trial's `workers` bundles of `per_worker` can be placed on these nodes at all."""
    return _place_group([dict(n) for n in nodes], workers, per_worker, spread)


def trials_that_fit(
    nodes: list[Mapping[str, float]],
    workers: int,
    per_worker: Mapping[str, float],
    spread: bool = False,
    limit: int = 10_000,
) -> int:
    """How many trials' worker groups the nodes hold at once, up to `limit`: groups placed one after
    another until one no longer fits (a division of the cluster's totals would count spread trials on
    too few nodes)."""
    free = [dict(n) for n in nodes]
    count = 0
    while count < limit and _place_group(free, workers, per_worker, spread):
        count += 1
    return count


def baseline_resources(r: ResourcesSpec, nodes: list[Mapping[str, float]]) -> dict[str, float]:
    """What the Ray task that scores a sweep's baselines holds: one worker's GPUs, since it runs on one
    device, and the CPUs of the trial's whole worker group, as many as the roomiest node has (at least one
    worker's): on CPUs, its extraction runs as many torch threads as it holds."""
    roomiest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    cpus = max(r.cpus_per_worker, min(r.workers_per_trial * r.cpus_per_worker, roomiest))
    return {**worker_resources(r), "CPU": cpus}

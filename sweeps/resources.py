"""What one Ray Train worker and one trial hold, and whether a trial's workers fit on a set of nodes.

Plain arithmetic, no Ray: `--dry-run` prints these numbers without importing it.
"""

from __future__ import annotations

from collections.abc import Mapping

from sweeps.spec import ResourcesSpec


def worker_resources(r: ResourcesSpec) -> dict[str, float]:
    """One Ray Train worker's bundle: its CPUs, and its GPUs when it has any."""
    return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}


def trial_resources(r: ResourcesSpec) -> dict[str, float]:
    """What all workers of one trial hold together."""
    return {k: r.workers_per_trial * v for k, v in worker_resources(r).items()}


def worker_group_fits(
    nodes: list[Mapping[str, float]], workers: int, per_worker: Mapping[str, float]
) -> bool:
    """Whether `workers` bundles of `per_worker` can be packed onto these nodes (a bundle never spans two)."""
    free = [dict(n) for n in nodes]
    for _ in range(workers):
        node = next((n for n in free if all(n.get(k, 0) >= v for k, v in per_worker.items())), None)
        if node is None:
            return False
        for key, v in per_worker.items():
            node[key] -= v
    return True

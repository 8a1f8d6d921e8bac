"""How the suite's tests are shared between its parallel workers (pytest-xdist, `-n 2 --dist loadgroup` in
pyproject.toml).

Most of the suite's time is Ray and MLflow processes starting, so two workers on two cores finish it in
well under the time of one (docs/operations.md, "Costs"). A unit of work goes to one worker whole:

- every test on the 2-node cluster (`two_nodes`), and every test on the single-node one (`ray_address`):
  each cluster starts once for the suite, not once a worker, and stops after the last of its tests
  (tests/sweeps/conftest.py);
- every test of a module that holds module-scoped fixtures (a trained checkpoint, a finished sweep): built
  once, not once a worker;
- any other test alone.

Units are handed out longest first (a slow test counts as 10 fast ones), so that no long unit starts
last while the other worker idles. Without xdist (`-n 0`, a single test) nothing changes.

Both workers, the runs and sweeps they start and the Ray clusters they join share two cores, so torch's
OpenMP threads wait passively here as in the entry points (`bagssl_core.openmp`): set before any test
module imports torch, and inherited by every process the tests start. With libgomp's spinning default the
core tests alone took 337 s on this machine, 254 s passive.
"""

from __future__ import annotations

import pytest

from bagssl_core.openmp import prefer_passive_wait

prefer_passive_wait()

_SLOW_WEIGHT = 10  # a `slow` test (a real sweep or training) takes minutes, the others seconds


def _unit(item: pytest.Item) -> str:
    for cluster in ("two_nodes", "ray_address"):
        if cluster in item.fixturenames:
            return cluster
    defs = getattr(item, "_fixtureinfo", None)
    scopes = {d.scope for fds in (defs.name2fixturedefs.values() if defs else ()) for d in fds}
    if "module" in scopes:
        return item.nodeid.split("::", 1)[0]
    return item.nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist appends the group names to the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(_unit(item), []).append(item)

    def weight(unit: list[pytest.Item]) -> int:
        return sum(_SLOW_WEIGHT if i.get_closest_marker("slow") else 1 for i in unit)

    # sorted() is stable: ties keep the collection order, the same in every worker, as xdist requires.
    items[:] = [i for unit in sorted(units.values(), key=weight, reverse=True) for i in unit]
    for name, unit in units.items():
        if len(unit) > 1:
            for item in unit:
                item.add_marker(pytest.mark.xdist_group(name))

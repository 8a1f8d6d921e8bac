"""How torch's CPU threads wait between parallel regions: settled before torch is imported.

torch's wheels ship GNU OpenMP (libgomp). By default a libgomp thread that has finished its share of a
parallel region spins for a while (GOMP_SPINCOUNT, 300,000 turns) before it sleeps, on the bet that the
next region starts at once. That bet holds on cores the process has to itself. It fails where processes
share the cores, as they do here all the time: a sweep's trials and Ray's daemons on one node, a run
beside a test suite, DataLoader workers beside their trainer. The spinning thread then holds a core that
another process's thread needs, and that process's next barrier waits on a thread that is not running.

`bench/omp_wait.py` measured it on the project's 2-core machine (2026-11-27): two copies of the smoke
trial's work side by side, each with torch's 2 threads, took 43.4 s and 85.8 CPU-s with the default,
27.2 s and 53.4 CPU-s with passive waiting (`OMP_WAIT_POLICY=PASSIVE`: a thread sleeps as soon as it has
nothing to do), 1.6x; one copy alone took 15.8 s default, 15.0 s passive. libgomp reads the variable
once, when torch loads it, so this must run before the first `import torch` of the process; processes
started later (a local Ray's workers, a run's subprocesses) inherit it. A value the user set is kept.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_wait() -> None:
    """Make torch's OpenMP threads sleep, not spin, when idle, unless the environment already says."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")

"""`--local`: every trial of a spec, one after another in this process; the same trial code, no Ray."""

from __future__ import annotations

import itertools
import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bagssl_core.config import ConfigError
from bagssl_core.memory import MemoryExceeded
from bagssl_core.metrics import ANALYSES_DIR
from sweeps.report import TrialOutcome
from sweeps.space import tune_domain
from sweeps.spec import SweepSpec
from sweeps.tracking import TrialLogger
from sweeps.trainable import TrialPlan, run_trial

log = logging.getLogger(__name__)


def run_local(
    spec: SweepSpec, plan: TrialPlan, logger: TrialLogger, id_prefix: str = "local"
) -> list[TrialOutcome]:
    """Run every trial of the spec in turn, without pruning, logging each through `logger`.

    Parameters are drawn at random from the space (grid axes enumerated), seeded by search.seed. Trial ids
    are `<id_prefix>_00000`, ...: a sweep's refine runs take another prefix, so their ids stay unique.
    """
    rng = random.Random(spec.search.seed)
    for i, params in enumerate(local_trials(spec, rng)):
        trial_id = f"{id_prefix}_{i:05d}"
        logger.start(trial_id, f"{spec.name}_{trial_id}", params)

        def report(metrics: dict[str, float], ckpt: Path | None, tid: str = trial_id) -> None:
            logger.result(tid, metrics)

        print(f"trial {trial_id}: {json.dumps(params)}", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="bagssl_local_") as d:
                result = run_trial(plan, params, Path(d), report)
                # Its last report tells a diverged run from a finished one, as under Ray.
                logger.complete(trial_id, Path(d) / ANALYSES_DIR if result.figures else None)
        except MemoryExceeded as err:  # this trial's values on this machine: failed as under Ray
            log.error("trial %s failed: %s", trial_id, err)
            logger.error(trial_id, f"{type(err).__name__}: {err}")
            continue
        except ConfigError:  # a bad config is the spec's fault, not one trial's
            raise
        except Exception as err:  # a trial's failure is recorded; the sweep goes on
            log.exception("trial %s failed", trial_id)
            logger.error(trial_id, f"{type(err).__name__}: {err}")
            continue
    return [
        TrialOutcome(t, logger.params[t], st, logger.last_result.get(t, {}))
        for t, st in logger.statuses.items()
    ]


def local_trials(spec: SweepSpec, rng: random.Random) -> list[dict[str, Any]]:
    """num_samples draws of the training axes: every grid combination per draw, the rest sampled."""
    axes = spec.train_axes()
    grid = {k: list(d.args) for k, d in axes.items() if d.kind == "grid"}
    sampled = {k: tune_domain(d) for k, d in axes.items() if d.kind != "grid"}
    state = np.random.RandomState(rng.randrange(2**31))
    out = []
    for _ in range(spec.num_samples):
        for combo in itertools.product(*grid.values()) if grid else [()]:
            params = dict(zip(grid, combo, strict=True))
            for k, dom in sampled.items():
                v = dom.sample(random_state=state)
                params[k] = v.item() if hasattr(v, "item") else v
            out.append(params)
    return out

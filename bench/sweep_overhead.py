"""Benchmark: where a smoke trial's time goes under Ray, for 1 and 2 workers, and Ray against `--local`.

Issue 9 measured, before the sharded probes and the start-up cuts: smoke trial epochs trained about 9 s but
were reported about 34 s apart, and the smoke spec's 4 trials x 2 epochs, pruning off, took 416 s under Ray
(2 workers a trial) against 176 s run one after another by `--local`: 2.4x.

This runs the real sweep, `python -m sweeps.run search_spaces/smoke.yaml` with pruning off, three times, each
in a temporary directory with its own MLflow sqlite store and storage path:

1. under a local Ray, 2 workers a trial (1 CPU each), as the smoke spec says;
2. under a local Ray, 1 worker a trial, with the spec's own worker (1 CPU, 1 thread), `--samples-1w`
   trials: what adding the second worker gains is the 2-worker probe's speed-up. Two such trials fit the
   2 cores at once, so both runs keep the machine as busy;
3. `--local`: the same trials one after another in one process (2 threads).

Each trial's time is read back from MLflow, where the trainer logs every epoch's `setup_seconds`,
`epoch_seconds` (training steps), `probe_seconds` and `checkpoint_seconds`, and the trial run's start and
end. What the trial's wall time holds beyond those is "start-up & rest": under Ray the trial's actor, its
Train controller and worker group starting, reports and checkpoint uploads, tear-down.

Printed: a table of seconds per epoch by phase, for 1 and 2 workers and for `--local`; each trial's rest
split by when it falls (before its first epoch's work, between its reports, after its last report), from
when the driver got each report; the probing share of an epoch, the 2-worker probe's speed-up over the
1-worker one, the end-to-end times of runs 1 and 3 and their ratio, each beside the issue's goal; last, the
share of the 2-worker trials' wall time spent in training steps.

Run: `python bench/sweep_overhead.py [--samples N] [--samples-1w N] [--set KEY=VALUE ...]` on an otherwise
idle machine (about 20 min on 2 cores). No other Ray may run here meanwhile: the sweeps start their own.
`--set` changes the spec for all three sweeps, e.g. `--set base.eval.cpu_graph=false` for the probes'
eager extraction.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from bagssl_core.metrics import CHECKPOINT_SECONDS, EPOCH_SECONDS, PROBE_SECONDS, SETUP_SECONDS
from sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "smoke.yaml"
PHASES = (SETUP_SECONDS, EPOCH_SECONDS, PROBE_SECONDS, CHECKPOINT_SECONDS)
RESTS = (("start", 8), ("between", 9), ("end", 8))  # the parts of a trial's rest, and their column widths


@dataclass
class Trial:
    wall: float  # the trial run's end - start, seconds
    epochs: int
    phases: dict[str, float]  # phase metric -> seconds summed over the trial's epochs
    # The rest (wall - phases) by where it falls, from when the driver got each epoch's report (its MLflow
    # metrics' timestamp): before the first report's own work began (start-up: the trial's actor, its
    # Train controller and workers, the process group), between reports beyond their epochs' work
    # (the report barrier, checkpoint upload, the way to the driver), and after the last report (tear-down).
    start: float
    between: float
    end: float

    @property
    def rest(self) -> float:
        return self.wall - sum(self.phases.values())


@dataclass
class Sweep:
    label: str
    seconds: float  # the `sweeps.run` process, end to end
    trials: list[Trial]

    def per_epoch(self, phase: str) -> float:
        return statistics.mean(t.phases[phase] / t.epochs for t in self.trials)

    def rest_per_epoch(self) -> float:
        return statistics.mean(t.rest / t.epochs for t in self.trials)

    def rest_per_trial(self, part: str) -> float:
        """The mean seconds a trial spends in one part of its rest: "start", "between" or "end"."""
        return statistics.mean(getattr(t, part) for t in self.trials)

    def epoch_seconds(self) -> float:
        """A trial's wall time per epoch."""
        return statistics.mean(t.wall / t.epochs for t in self.trials)


def same_trials(samples: int) -> list[str]:
    """`--set` arguments under which every run trains the same configs: the spec's `choice` axes enumerated
    as grids (`search.algo: grid`, which Tune and `--local` both enumerate in full), `samples` trials in all.

    Otherwise Optuna (under Ray) and `--local`'s random draws pick different patch sizes, and a trial's
    probe costs what its patch size gives: 16 grid patches an image at 10 px (stride 7 on 28 px, the last
    one flush with the border), 9 at 14 px. Runs of this bench before 2026-11-28 compared different trials:
    one 2-worker trial of 4 probed about twice as long as the others. The continuous axes (loss weights)
    are still drawn: they do not change what a trial costs."""
    spec, _ = load_spec(SPEC)
    grids = {k: d.args for k, d in spec.space.items() if d.kind == "choice"}
    combos = math.prod(len(v) for v in grids.values())
    if samples % combos:
        sys.exit(f"expected a number of trials divisible by {combos}, the combinations of {sorted(grids)}")
    # The whole search mapping: Optuna's options (sampler, n_startup_trials) are refused under algo: grid.
    search = f"search={{algo: grid, seed: {spec.search.seed}}}"
    out = ["--set", search, "--set", f"num_samples={samples // combos}"]
    for key, values in grids.items():
        out += ["--set", f"space.{key}={{grid: {list(values)}}}"]
    return out


def run_sweep(label: str, samples: int, *args: str) -> Sweep:
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as d:
        db = Path(d) / "mlflow.db"
        cmd = [
            sys.executable,
            "-m",
            "sweeps.run",
            str(SPEC),
            *args,
            "--set",
            "scheduler.name=none",
            *same_trials(samples),
            "--set",
            f"tracking.uri=sqlite:///{db}",
            "--set",
            f"storage_path={d}/storage",
        ]
        print(f"# {label}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        # In the temporary directory: MLflow puts a sqlite store's artifacts under ./mlruns, which then go
        # with the store instead of piling up in the checkout.
        proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(
                f"{label}: the sweep failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
            )
        return Sweep(label, seconds, read_trials(f"sqlite:///{db}"))


def read_trials(uri: str) -> list[Trial]:
    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
    trials = []
    for r in client.search_runs([exp.experiment_id], "tags.`bagssl.role` = 'trial'"):
        # epoch -> phase -> seconds; each epoch's metrics are logged in one batch with one timestamp
        history = {p: {m.step: m for m in client.get_metric_history(r.info.run_id, p)} for p in PHASES}
        epochs = sorted(history[EPOCH_SECONDS])
        work = {e: sum(history[p][e].value for p in PHASES if e in history[p]) for e in epochs}
        got = {e: history[EPOCH_SECONDS][e].timestamp / 1000 for e in epochs}
        begin, finish = r.info.start_time / 1000, r.info.end_time / 1000
        trials.append(
            Trial(
                wall=finish - begin,
                epochs=len(epochs),
                phases={p: sum(m.value for m in history[p].values()) for p in PHASES},
                start=got[epochs[0]] - begin - work[epochs[0]],
                between=sum(got[b] - got[a] - work[b] for a, b in itertools.pairwise(epochs)),
                end=finish - got[epochs[-1]],
            )
        )
    assert trials, f"no trial run in {uri}"
    return trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4, help="trials of the 2-worker and --local sweeps")
    ap.add_argument("--samples-1w", type=int, default=2, help="trials of the 1-worker sweep")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the smoke spec in all three sweeps, as `sweeps.run --set` does, e.g. "
        "base.eval.cpu_graph=false",
    )
    args = ap.parse_args()
    sets = [arg for kv in args.set for arg in ("--set", kv)]

    two = run_sweep("Ray, 2 workers", args.samples, *sets)
    one = run_sweep(
        "Ray, 1 worker",
        args.samples_1w,
        *sets,
        "--set",
        "resources.workers_per_trial=1",
    )
    local = run_sweep("--local", args.samples, *sets, "--local")

    print()
    print(
        f"{'seconds per epoch':<18}{'trials':>7}{'setup':>8}{'train':>8}{'probe':>8}{'ckpt':>8}{'rest':>8}{'wall':>8}"
    )
    for s in (one, two, local):
        cells = [s.per_epoch(p) for p in PHASES] + [s.rest_per_epoch(), s.epoch_seconds()]
        print(f"{s.label:<18}{len(s.trials):>7}" + "".join(f"{c:>8.2f}" for c in cells))
    print(
        "(setup: data, model; rest: Ray's start-up of the trial and its workers, reports, checkpoint uploads)"
    )
    print()
    print(f"{'rest, s a trial':<18}{'start':>8}{'between':>9}{'end':>8}")
    for s in (one, two, local):
        print(f"{s.label:<18}" + "".join(f"{s.rest_per_trial(k):>{w}.2f}" for k, w in RESTS))
    print(
        "(start: run created to the first epoch's work; between: reports beyond their epochs' work; "
        "end: the last report to the run's end)"
    )
    print()
    print("each trial, seconds over its epochs:")
    for s in (one, two, local):
        for t in s.trials:
            cells = ", ".join(f"{p.removesuffix('_seconds')} {v:.1f}" for p, v in t.phases.items())
            print(f"  {s.label:<16} wall {t.wall:6.1f}, {t.epochs} epochs: {cells}, rest {t.rest:.1f}")
    print()
    probe_share = two.per_epoch(PROBE_SECONDS) / two.epoch_seconds()
    print(f"probing share of a 2-worker trial's epoch: {probe_share:.0%} (goal <= 25%)")
    speedup = one.per_epoch(PROBE_SECONDS) / two.per_epoch(PROBE_SECONDS)
    print(f"2-worker probe vs 1-worker: {speedup:.2f}x faster (goal >= 1.7x)")
    ratio = two.seconds / local.seconds
    print(
        f"smoke spec end to end, {args.samples} trials, pruning off: Ray {two.seconds:.0f} s, "
        f"--local {local.seconds:.0f} s: Ray/--local {ratio:.2f}x (goal <= 1.3x; issue 9 before: 2.4x)"
    )
    share = sum(t.phases[EPOCH_SECONDS] for t in two.trials) / sum(t.wall for t in two.trials)
    print(f"share of a 2-worker trial's wall time in training steps: {share:.0%}")


if __name__ == "__main__":
    main()

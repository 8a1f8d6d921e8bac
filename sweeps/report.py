"""A finished sweep: the trial table, the best trial, its config as YAML, and where MLflow has it all.

Every number that chooses is a validation number (`sweeps.spec.Objective`); the test value at the same
metric key is shown beside it and never compared. Each value carries its 95% Wilson interval as the
trainer reported it, and trials whose validation interval overlaps the best's are marked: the
validation set cannot tell them apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bagssl_core.config import ConfigError, config_to_yaml, merge_overrides, validate_config
from bagssl_core.metrics import DIVERGED_AT_STEP, EPOCH, EPOCHS_PLANNED, ProbeKey, intervals_overlap, n_images
from bagssl_core.outputs import refuse_empty_path, writable_dir
from bagssl_core.run_files import run_owner
from sweeps.space import trial_overrides, variant_values
from sweeps.spec import Objective, SweepSpec

Interval = tuple[float, float]


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    status: str  # FINISHED | KILLED | FAILED
    metrics: dict[str, float] = field(default_factory=dict)  # the trial's last report
    failure: str = ""  # a FAILED trial's reason, in one line, as its MLflow run's `bagssl.failure` tag


@dataclass(frozen=True)
class Score:
    """A trial's objective: the validation value at the key that won (None for an epoch metric) with its
    95% interval, and the test value at the same key with its interval (only a run that reached its end
    was scored on the test split)."""

    key: ProbeKey | None
    val: float
    val_ci: Interval | None = None
    test: float | None = None
    test_ci: Interval | None = None


def score(metrics: Mapping[str, float], objective: Objective) -> Score | None:
    """The objective of one report, with the intervals and the test value of its key; None when absent."""
    found = objective.best(metrics)
    if found is None:
        return None
    key, val = found
    if key is None:
        return Score(None, val)
    return key_score(metrics, key)


def key_score(metrics: Mapping[str, float], key: ProbeKey) -> Score:
    """The validation value at one key of a report with its interval, and the test value at the same key."""
    test = key.in_split("test")
    return Score(
        key, metrics[str(key)], _interval(metrics, key), metrics.get(str(test)), _interval(metrics, test)
    )


def _interval(metrics: Mapping[str, float], key: ProbeKey) -> Interval | None:
    lo, hi = metrics.get(str(key.with_bound("lo"))), metrics.get(str(key.with_bound("hi")))
    return None if lo is None or hi is None else (lo, hi)


def within_noise(best: Score, other: Score) -> bool:
    """Whether two validation intervals overlap: the validation set cannot tell the two values apart."""
    return (
        best.val_ci is not None and other.val_ci is not None and intervals_overlap(best.val_ci, other.val_ci)
    )


@dataclass(frozen=True)
class Refined:
    """A config of the search re-trained with new seeds (`sweeps.refine`).

    Attributes:
        trial: the search trial whose parameters were re-trained.
        seeds: the seeds of the runs, in order.
        runs: one outcome per seed.
        key: the validation key with the best mean over the seeds that finished (None: an epoch metric).
        val: (mean, sample standard deviation) of the validation objective at `key` (the deviation None
            below two seeds); None if no seed finished.
        test: the same for the test value at the same key, over the same seeds.
        n: the seeds that finished and count.
    """

    trial: TrialOutcome
    seeds: list[int]
    runs: list[TrialOutcome]
    key: ProbeKey | None
    val: tuple[float, float | None] | None
    test: tuple[float, float | None] | None
    n: int


@dataclass
class Report:
    """What a finished sweep tells the user and its MLflow parent run.

    Attributes:
        text: the console report.
        summary: trial counts, the best trial and what was selected (nested; numbers become metrics of the
            parent run, the rest tags, once flattened).
        artifacts: file name -> text, logged on the parent run (best_config.yaml, trials.txt, report.json).
    """

    text: str
    summary: dict[str, Any]
    artifacts: dict[str, str]


def trial_status(
    metrics: Mapping[str, Any], params: Mapping[str, Any], failed: bool, base_epochs: int
) -> str:
    """FAILED (an error, or the loss diverged), FINISHED (it ran the epochs it planned) or KILLED (the
    scheduler stopped it before).

    Args:
        metrics: the trial's last report.
        params: its sampled parameters (dotted TrainConfig paths).
        failed: whether it ended in an error.
        base_epochs: the base config's schedule.epochs.

    The epochs a trial planned: what the trainer reported (`epochs_planned`), else its own
    `schedule.epochs` when that is searched, else the base's.
    """
    if failed or DIVERGED_AT_STEP in metrics:
        return "FAILED"
    planned = metrics.get(EPOCHS_PLANNED, params.get("schedule.epochs", base_epochs))
    return "FINISHED" if metrics.get(EPOCH, 0) >= planned else "KILLED"


def ranked(trials: Iterable[TrialOutcome], objective: Objective) -> list[tuple[TrialOutcome, Score | None]]:
    """Every trial with its score, best validation value first; trials without the objective last."""
    scored = [(t, score(t.metrics, objective)) for t in trials]
    sign = -1.0 if objective.mode == "max" else 1.0
    return sorted(scored, key=lambda ts: (ts[1] is None, sign * ts[1].val if ts[1] else 0.0))


def best_trial(trials: Iterable[TrialOutcome], objective: Objective) -> tuple[TrialOutcome, Score] | None:
    """The trial whose last report has the best validation objective, among the trials that ran all their
    epochs when there are any: a pruned trial's score is from fewer epochs, never comparable to a final
    one. Failed trials are never picked."""
    scored = [(t, s) for t, s in ranked(trials, objective) if s is not None and t.status != "FAILED"]
    finished = [ts for ts in scored if ts[0].status == "FINISHED"]
    pool = finished or scored
    return pool[0] if pool else None


def best_config_yaml(
    spec: SweepSpec, base: Mapping[str, Any], params: Mapping[str, Any], key: ProbeKey | None
) -> str:
    """The selected config, for `bagssl_core train --config`: the trial's parameters, the winning evaluation
    variant's settings, and the winning scheme alone in eval.aggregation. Knobs that scheme ignores (a grid
    stride for `centre`) are left out, so the file loads back as it is."""
    tree = merge_overrides(base, trial_overrides(params))
    if key is None:
        return config_to_yaml(validate_config(tree, "best trial"))
    tree = merge_overrides(tree, trial_overrides(variant_values(spec, base).get(key.variant, {})))
    return config_to_yaml(
        validate_config({"eval": {"aggregation": [key.scheme]}}, "best trial", defaults=tree)
    )


def _cell(value: float | None, ci: Interval | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _spread(stats: tuple[float, float | None] | None) -> str:
    if stats is None:
        return "-"
    return f"{stats[0]:.2f}" + (" ± -" if stats[1] is None else f" ± {stats[1]:.2f}")


def _test_name(objective: Objective) -> str | None:
    """The column of the test values: the objective's statistic on the test split."""
    return None if objective.query is None else str(replace(objective.query, split="test"))


def format_table(trials: list[TrialOutcome], objective: Objective) -> str:
    """One row per trial, best validation value first: id, status, epochs run, a mark (`best`, or `~`
    within noise of it), the validation objective and the test value at the same key, each with its 95%
    interval, and the sampled parameters."""
    keys = sorted({k for t in trials for k in t.params})
    rows = ranked(trials, objective)
    best = best_trial(trials, objective)
    test_name = _test_name(objective)
    lines = []
    for t, s in rows:
        mark = ""
        if best is not None and s is not None and t.status != "FAILED":
            mark = "best" if t is best[0] else "~" if within_noise(best[1], s) else ""
        val = _cell(s.val, s.val_ci) if s else "-"
        test = [_cell(s.test, s.test_ci) if s else "-"] if test_name else []
        epochs = str(int(t.metrics.get(EPOCH, 0)))
        lines.append(
            [t.trial_id, t.status, epochs, mark, val, *test, *(_short(t.params.get(k)) for k in keys)]
        )
    header = [
        "trial",
        "status",
        "epochs",
        "vs best",
        objective.name,
        *([test_name] if test_name else []),
        *keys,
    ]
    return _columns(header, lines)


def failure_lines(trials: Iterable[TrialOutcome]) -> list[str]:
    """One line per FAILED trial that has a reason: why it failed."""
    return [f"trial {t.trial_id} failed: {t.failure}" for t in trials if t.status == "FAILED" and t.failure]


def format_refine_table(refined: list[Refined], objective: Objective) -> str:
    """One row per refined config, best mean first: the trial, its seeds and how many finished, mean ± sample
    standard deviation of the validation objective and of the test value at the same key, and that key."""
    test_name = _test_name(objective)
    header = ["trial", "run.seed", "finished", f"{objective.name} (mean ± sd)"]
    header += [f"{test_name} (mean ± sd)"] if test_name else []
    rows = []
    for r in rank_refined(refined, objective):
        test = [_spread(r.test)] if test_name else []
        key = [str(r.key) if r.key else "-"] if objective.query else []
        seeds = ",".join(map(str, r.seeds))
        rows.append([r.trial.trial_id, seeds, f"{r.n}/{len(r.runs)}", _spread(r.val), *test, *key])
    return _columns([*header, *(["key"] if objective.query else [])], rows)


def rank_refined(refined: Iterable[Refined], objective: Objective) -> list[Refined]:
    """Best validation mean first; configs with no finished seed last."""
    sign = -1.0 if objective.mode == "max" else 1.0
    return sorted(refined, key=lambda r: (r.val is None, sign * r.val[0] if r.val else 0.0))


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]
    ]
    return "\n".join(out)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _describe_key(key: ProbeKey | None) -> str:
    if key is None:
        return ""
    variant = f", variant {key.variant}" if key.variant else ""
    return f" at {key} (scheme {key.scheme}{variant})"


def write_report(
    spec: SweepSpec,
    base: Mapping[str, Any],
    trials: list[TrialOutcome],
    out_dir: Path | None,
    tracking_uri: str,
    parent_run_id: str,
    refined: list[Refined] | None = None,
) -> Report:
    """Print-ready text, MLflow summary/artifacts, and best_config.yaml, trials.txt, report.json under out_dir.

    The selected config is the search's best trial by its validation objective or, when the spec refines,
    the refined config with the best validation mean over its seeds. It carries the winning scheme and
    variant as config fields, and the summary names them (`selected`).

    Args:
        spec: the sweep.
        base: the spec's resolved base config tree, which every trial's parameters override.
        trials: every trial's outcome.
        out_dir: where the files go; None (remote storage) prints the config instead.
        tracking_uri: the MLflow store the sweep wrote to.
        parent_run_id: the sweep's parent run.
        refined: the refined configs (`sweeps.refine`), if the spec refines.
    """
    objective = spec.objective()
    table = format_table(trials, objective)
    counts = {s: sum(t.status == s for t in trials) for s in ("FINISHED", "KILLED", "FAILED")}
    lines = [
        f"sweep {spec.name}: {len(trials)} trial(s): "
        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n),
        table,
        *failure_lines(trials),
    ]
    summary: dict[str, Any] = {f"trials_{s.lower()}": n for s, n in counts.items()}
    details: dict[str, Any] = {
        "trials": [
            {
                "trial": t.trial_id,
                "status": t.status,
                **({"failure": t.failure} if t.failure else {}),
                "params": t.params,
                **score_fields(s),
            }
            for t, s in ranked(trials, objective)
        ]
    }
    selected: tuple[TrialOutcome, ProbeKey | None, str] | None = None
    best = best_trial(trials, objective)
    if best is None:
        lines.append("no trial reported the objective; no best config")
    else:
        t, s = best
        lines += _best_lines(t, s, trials, objective)
        summary.update({"best_trial": t.trial_id, **score_fields(s, prefix="best_")})
        summary["within_noise"] = _noise_count(t, s, trials, objective)
        selected = (t, s.key, f"best trial {t.trial_id}")
    if refined:
        lines += [
            f"refine: the top {len(refined)} config(s), each re-trained with {len(refined[0].seeds)} new "
            "seeds, every epoch, no pruning; mean ± sample standard deviation over the seeds that finished",
            format_refine_table(refined, objective),
        ]
        details["refined"] = [_refined_fields(r) for r in refined]
        done = [r for r in rank_refined(refined, objective) if r.val is not None]
        if done:
            summary["refine"] = {"trial": done[0].trial.trial_id, **_refined_fields(done[0], stats_only=True)}
            selected = (done[0].trial, done[0].key, f"trial {done[0].trial.trial_id} by its mean over seeds")
    artifacts = {"trials.txt": table + "\n"}
    if selected is not None:
        t, key, why = selected
        summary["selected"] = {"trial": t.trial_id, **({} if key is None else _selection(key))}
        artifacts["best_config.yaml"] = (
            f"# selected by sweep {spec.name}: {why}{_describe_key(key)}\n"
            + best_config_yaml(spec, base, t.params, key)
        )
    artifacts["report.json"] = json.dumps({**summary, **details}, indent=2) + "\n"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in artifacts.items():
            (out_dir / name).write_text(text)
    if selected is not None:
        why = selected[2]
        if out_dir is not None:
            path = out_dir / "best_config.yaml"
            lines.append(f"best config ({why}): {path}  (python -m bagssl_core train --config {path})")
        else:
            lines.append(f"best config ({why}):\n{artifacts['best_config.yaml']}")
    ui = (
        f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite") else tracking_uri
    )
    lines.append(
        f"MLflow: experiment {spec.tracking.experiment!r}, parent run {parent_run_id} at {tracking_uri}; open with: {ui}"
    )
    return Report("\n".join(lines), summary, artifacts)


def _selection(key: ProbeKey) -> dict[str, str]:
    return {"scheme": key.scheme, "variant": key.variant, "metric_key": str(key)}


def score_fields(s: Score | None, prefix: str = "") -> dict[str, Any]:
    """A score as flat JSON fields: `val`, `val_lo`, `val_hi`, `test`, `test_lo`, `test_hi`, `key`."""
    if s is None:
        return {}
    out: dict[str, Any] = {"val": s.val, "test": s.test}
    for name, ci in (("val", s.val_ci), ("test", s.test_ci)):
        if ci is not None:
            out.update({f"{name}_lo": ci[0], f"{name}_hi": ci[1]})
    if s.key is not None:
        out["key"] = str(s.key)
    return {prefix + k: v for k, v in out.items() if v is not None}


def _refined_fields(r: Refined, stats_only: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds_counted": r.n}
    for name, stats in (("val", r.val), ("test", r.test)):
        if stats is not None:
            out[f"{name}_mean"] = stats[0]
            if stats[1] is not None:
                out[f"{name}_std"] = stats[1]
    if r.key is not None:
        out["key"] = str(r.key)
    if not stats_only:
        out.update({"trial": r.trial.trial_id, "params": r.trial.params, "seeds": r.seeds})
        out["runs"] = [{"trial": x.trial_id, "status": x.status} for x in r.runs]
    return out


def _noise_count(best: TrialOutcome, s: Score, trials: Iterable[TrialOutcome], objective: Objective) -> int:
    """Other trials (not failed) whose validation interval overlaps the best's."""
    return sum(
        1
        for t, o in ranked(trials, objective)
        if t is not best and o is not None and t.status != "FAILED" and within_noise(s, o)
    )


def _best_lines(t: TrialOutcome, s: Score, trials: list[TrialOutcome], objective: Objective) -> list[str]:
    test = "" if s.test is None else f"; test {_cell(s.test, s.test_ci)} (shown, never used to choose)"
    lines = [
        f"best trial {t.trial_id}: {objective.name} = {_cell(s.val, s.val_ci)}{_describe_key(s.key)}{test}"
        f" with {t.params}"
    ]
    if s.val_ci is not None:
        n = _noise_count(t, s, trials, objective)
        images = t.metrics.get(n_images("val"))
        on = f"this validation set ({int(images)} images)" if images else "this validation set"
        lines.append(
            f"{n} other trial(s) within noise of it (~ under vs best): their 95% validation intervals overlap, so they are not "
            f"distinguishable on {on}"
        )
    return lines


# --- `python -m sweeps.report`: the report rebuilt from MLflow alone -------------------------------------


def default_out_dir(experiment: str, parent_id: str) -> Path:
    return Path("sweep_reports") / f"{experiment}_{parent_id[:8]}"


# What a report folder holds (`sweeps.report_html.build_report`): a folder holding anything else is not an
# earlier report, and rebuilding one there would delete its PNGs and log its other files on the parent run.
REPORT_FILES = ("report.html", "report.json")
REPORT_EXTRAS = ("*.png", "analyses")


def check_report_dir(out: str) -> None:
    """ConfigError unless `out` (--out) can take a report: a new or empty directory, or an earlier report's
    (both `REPORT_FILES` and nothing but `REPORT_EXTRAS` beside them), writable, and no run's own files."""
    refuse_empty_path(out, "--out", "the report's folder (or leave --out out)")
    path = Path(out)
    owner = run_owner(path)
    if owner is not None:
        raise ConfigError(f"--out: {out} is part of {owner}; expected a folder outside a run's own files")
    if path.is_dir():
        entries = sorted(path.iterdir())
        others = [
            e.name
            for e in entries
            if e.name not in REPORT_FILES and not any(e.match(pattern) for pattern in REPORT_EXTRAS)
        ]
        missing = [f for f in REPORT_FILES if not (path / f).is_file()]
        if entries and (others or missing):
            found = (
                f"holds files a report does not write ({', '.join(others[:5])})"
                if others
                else f"has no {' or '.join(missing)}, so it is not an earlier report"
            )
            raise ConfigError(
                f"--out: {out} {found}; expected a new or empty folder, or an earlier report's, which is replaced"
            )
    writable_dir(path, "--out")


def build_from_mlflow(
    uri: str, experiment: str, parent_id: str | None, out_dir: str | Path | None, what: str = "--tracking-uri"
) -> Path:
    """Read the sweep from the store, write report.html, its PNGs and report.json under out_dir (default
    `sweep_reports/<experiment>_<parent run id[:8]>`), log them under `report/` on the parent run, and
    return the path of report.html. Raises `sweeps.results.ResultsError` naming what was expected."""
    # Imported here: MLflow and matplotlib take seconds to import, and the sweep's own modules import this one.
    from sweeps.report_html import publish
    from sweeps.results import load_sweep

    results = load_sweep(uri, experiment, parent_id, what)
    built = publish(results, Path(out_dir) if out_dir else default_out_dir(experiment, results.parent_id))
    return built.html.resolve()


def main(argv: list[str] | None = None) -> int:
    import sys

    from bagssl_core.arguments import Parser

    p = Parser(
        prog="python -m sweeps.report",
        description="Rebuild a sweep's report (report.html, PNGs, report.json) from MLflow alone and log it "
        "on the sweep's parent run under report/.",
    )
    p.add_argument(
        "--experiment", required=True, help="the MLflow experiment of the sweep (spec tracking.experiment)"
    )
    p.add_argument(
        "--parent", default=None, help="the sweep's parent run id (default: the experiment's latest sweep)"
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder: new, empty, or an earlier report's, which is replaced (default: "
        "sweep_reports/<experiment>_<run id>)",
    )
    args = p.parse_args(argv)
    from sweeps.results import ResultsError
    from sweeps.tracking import resolve_uri, uri_source

    try:
        if args.out is not None:  # before MLflow is read and the figures drawn
            check_report_dir(args.out)
        what = uri_source(args.tracking_uri, "--tracking-uri")
        path = build_from_mlflow(resolve_uri(args.tracking_uri), args.experiment, args.parent, args.out, what)
    except (ResultsError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

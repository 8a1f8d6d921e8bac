"""A finished sweep: the trial table, the best trial, its config as YAML, and where MLflow has it all."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bagssl_core.config import config_to_yaml, merge_overrides, validate_config
from bagssl_core.metrics import DIVERGED_AT_STEP, EPOCH, EPOCHS_PLANNED
from sweeps.space import objective, scheme_of, trial_overrides, variant_of, variant_values
from sweeps.spec import SweepSpec


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    status: str  # FINISHED | KILLED | FAILED
    metrics: dict[str, float] = field(default_factory=dict)  # the trial's last report


@dataclass
class Report:
    """What a finished sweep tells the user and its MLflow parent run.

    Attributes:
        text: the console report.
        summary: trial counts and the best trial (its numbers become metrics of the parent run, the rest tags).
        artifacts: file name -> text, logged on the parent run.
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


def best_trial(
    trials: Iterable[TrialOutcome], metric: str, mode: str
) -> tuple[TrialOutcome, float, str] | None:
    """The trial whose last report has the best objective (failed trials excluded)."""
    scored = []
    for t in trials:
        if t.status == "FAILED":
            continue
        found = objective(t.metrics, metric, mode)
        if found is not None:
            scored.append((t, *found))
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda s: s[1])


def best_config_yaml(
    spec: SweepSpec, base: Mapping[str, Any], params: Mapping[str, Any], metric_key: str
) -> str:
    """The best trial's full TrainConfig for `bagssl_core train --config`: its parameters, the winning
    evaluation variant, and the winning scheme first in eval.aggregation."""
    overrides = trial_overrides(params)
    overrides.update(trial_overrides(variant_values(spec).get(variant_of(metric_key), {})))
    cfg = validate_config(merge_overrides(base, overrides), "best trial")
    scheme = scheme_of(metric_key)
    if scheme is not None:
        schemes = [scheme, *(s for s in cfg.eval.aggregation if s != scheme)]
        cfg = validate_config(
            merge_overrides(cfg.model_dump(mode="json"), {"eval.aggregation": schemes}), "best trial"
        )
    return config_to_yaml(cfg)


def format_table(trials: list[TrialOutcome], metric: str, mode: str) -> str:
    """One row per trial, best first: id, status, epochs run, the objective, the sampled parameters."""
    keys = sorted({k for t in trials for k in t.params})
    scored = []
    for t in trials:
        found = objective(t.metrics, metric, mode)
        score = None if found is None else found[0]
        row = [
            t.trial_id,
            t.status,
            str(int(t.metrics.get("epoch", 0))),
            "-" if score is None else f"{score:.2f}",
            *(_short(t.params.get(k)) for k in keys),
        ]
        scored.append((score, row))
    sign = -1 if mode == "max" else 1
    scored.sort(key=lambda s: (s[0] is None, sign * s[0] if s[0] is not None else 0.0))
    rows = [row for _, row in scored]
    header = ["trial", "status", "epochs", metric, *keys]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_report(
    spec: SweepSpec,
    base: Mapping[str, Any],
    trials: list[TrialOutcome],
    out_dir: Path | None,
    tracking_uri: str,
    parent_run_id: str,
) -> Report:
    """Print-ready text, MLflow summary/artifacts, and best_config.yaml + trials.txt under out_dir.

    Args:
        spec: the sweep.
        base: the spec's resolved base config tree, which every trial's parameters override.
        trials: every trial's outcome.
        out_dir: where best_config.yaml and trials.txt go; None (remote storage) prints the config instead.
        tracking_uri: the MLflow store the sweep wrote to.
        parent_run_id: the sweep's parent run.
    """
    table = format_table(trials, spec.metric, spec.mode)
    counts = {s: sum(t.status == s for t in trials) for s in ("FINISHED", "KILLED", "FAILED")}
    lines = [
        f"sweep {spec.name}: {len(trials)} trial(s): "
        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n),
        table,
    ]
    summary: dict[str, Any] = {f"trials_{s.lower()}": n for s, n in counts.items()}
    artifacts = {"trials.txt": table + "\n"}
    best = best_trial(trials, spec.metric, spec.mode)
    if best is None:
        lines.append("no trial reported the objective; no best config")
    else:
        t, value, key = best
        text = best_config_yaml(spec, base, t.params, key)
        artifacts["best_config.yaml"] = text
        summary.update({"best_value": value, "best_trial": t.trial_id, "best_metric_key": key})
        lines.append(f"best trial {t.trial_id}: {spec.metric} = {value:.4f} ({key}) with {t.params}")
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            best_path = out_dir / "best_config.yaml"
            best_path.write_text(text)
            (out_dir / "trials.txt").write_text(table + "\n")
            lines.append(f"best config: {best_path}  (python -m bagssl_core train --config {best_path})")
        else:
            lines.append("best config:\n" + text)
    ui = (
        f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite") else tracking_uri
    )
    lines.append(
        f"MLflow: experiment {spec.tracking.experiment!r}, parent run {parent_run_id} at {tracking_uri}; open with: {ui}"
    )
    return Report("\n".join(lines), summary, artifacts)

"""The sweep report from MLflow alone: report.html (self-contained: every figure embedded as a data: URI),
its PNGs and report.json in one folder, logged under `report/` on the sweep's parent run.

Sections, in the order a researcher reads them: the best trial against the baselines, the trial table,
the objective against each swept axis, parameter importance and the contour of the two most important
axes, the scheme × patch-size heat map, learning curves, accuracy against cost, and BagSSL's per-trial
analyses. A figure that cannot be drawn (no baselines logged, too few trials) is replaced by the reason,
in the page and in report.json.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bagssl_core.metrics import EPOCH_SECONDS, PATCHES_PER_S, ProbeKey
from sweeps.importance import Importance, build_study, param_importance, top_axes
from sweeps.plots import (
    Figure,
    axis_figure,
    baseline_scores,
    baselines_figure,
    contour_figure,
    cost_figure,
    heatmap_figure,
    importance_figure,
    learning_curves_figure,
)
from sweeps.refine import summarize
from sweeps.report import (
    Refined,
    Score,
    TrialOutcome,
    best_trial,
    failure_lines,
    format_refine_table,
    format_table,
    key_score,
    ranked,
    score,
    score_fields,
)
from sweeps.results import ResultsError, SweepResults, TrialRecord, download_artifact
from sweeps.spec import Objective

REPORT_DIR = "report"  # the parent run's artifact folder


@dataclass
class Section:
    """One part of the page: a title, sentences, a preformatted table, and figures (file, caption)."""

    title: str
    text: list[str] = field(default_factory=list)
    table: str | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)
    warning: bool = False


@dataclass(frozen=True)
class BuiltReport:
    html: Path
    json: Path
    pngs: list[Path]


class _Writer:
    """Saves figures under out_dir, puts each in its section (or the reason it is missing), and remembers
    them for report.json."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.plots: list[dict[str, str]] = []
        self.missing: dict[str, str] = {}

    def add(self, sec: Section, fig: Figure | None, name: str, caption: str, why_not: str) -> bool:
        if fig is None:
            self.missing[name] = why_not
            sec.text.append(f"Not drawn ({name}): {why_not}.")
            return False
        path = self.out_dir / f"{name}.png"
        fig.savefig(path, dpi=fig.dpi)
        _close(fig)
        self.plots.append({"file": path.name, "title": caption})
        sec.figures.append((path.name, caption))
        return True


def _close(fig: Any) -> None:
    """Figures made through pyplot (Optuna's contour) stay registered with it until closed."""
    import matplotlib.pyplot as plt

    plt.close(fig)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def mean_throughput(record: TrialRecord) -> float | None:
    values = [m[PATCHES_PER_S] for m in record.history.values() if PATCHES_PER_S in m]
    return statistics.fmean(values) if values else None


def wall_time(record: TrialRecord) -> float | None:
    """From the run's start to its end in MLflow, else the sum of its epochs' times."""
    if record.wall_s is not None:
        return record.wall_s
    epochs = [m[EPOCH_SECONDS] for m in record.history.values() if EPOCH_SECONDS in m]
    return sum(epochs) if epochs else None


def patch_px(record: TrialRecord) -> Any:
    """The training patch side in pixels (the trial's derived.patch_px param), else its patch.size."""
    return record.config.get("derived.patch_px", record.config.get("patch.size"))


def heatmap_cells(
    records: Sequence[TrialRecord], results: SweepResults
) -> dict[tuple[str, Any], list[Score]]:
    """(scheme[:variant], patch px) -> the scores of the finished runs: every scheme and evaluation variant
    at the objective's statistic, as each run's evaluation fan-out reported them on its own checkpoints."""
    query = results.spec.objective().query
    if query is None:
        return {}
    anyscheme = replace(query, scheme=None)
    cells: dict[tuple[str, Any], list[Score]] = {}
    for r in records:
        px = patch_px(r)
        if r.outcome.status != "FINISHED" or px is None:
            continue
        for name in r.outcome.metrics:
            k = ProbeKey.parse(name)
            if k is not None and anyscheme.matches(k):
                row = k.scheme + (f":{k.variant}" if k.variant else "")
                cells.setdefault((row, px), []).append(key_score(r.outcome.metrics, k))
    return cells


@dataclass
class _Context:
    """What every section reads: the sweep, its objective, baselines and best trial, and the writer."""

    results: SweepResults
    w: _Writer
    base: dict[str, Score]
    best: tuple[TrialOutcome, Score] | None

    @property
    def objective(self) -> Objective:
        return self.results.spec.objective()

    def search(self) -> list[TrialOutcome]:
        return [t.outcome for t in self.results.search()]


def build_report(results: SweepResults, out_dir: Path, client: MlflowClient | None = None) -> BuiltReport:
    """Write report.html, the PNGs and report.json under out_dir (an earlier report there is replaced)."""
    if out_dir.exists():
        for old in [*out_dir.glob("*.png"), out_dir / "report.html", out_dir / "report.json"]:
            old.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "analyses", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = results.spec.objective()
    search = [t.outcome for t in results.search()]
    ctx = _Context(
        results,
        _Writer(out_dir),
        baseline_scores(results.baselines, objective),
        best_trial(search, objective),
    )
    refined = _refined(results)
    imp = param_importance(results.spec, search)
    asec, analyses = _analyses(results, out_dir, client)
    sections = [
        _headline(ctx),
        _trials(ctx, refined),
        _axes(ctx),
        _importance(ctx, imp),
        _heatmap(ctx),
        _learning_curves(ctx),
        _cost(ctx),
        asec,
    ]
    everything = [r.outcome for r in results.trials]
    data = {
        "sweep": results.name,
        "experiment": results.experiment,
        "parent_run_id": results.parent_id,
        "status": results.status,
        "tracking_uri": results.tracking_uri,
        "objective": {"metric": objective.name, "mode": objective.mode, "split": "val"},
        "counts": {s: sum(t.status == s for t in everything) for s in ("FINISHED", "KILLED", "FAILED")},
        "best": None
        if ctx.best is None
        else {"trial": ctx.best[0].trial_id, "params": ctx.best[0].params, **score_fields(ctx.best[1])},
        "trials": [_trial_json(results, t, s) for t, s in ranked(everything, objective)],
        "importance": imp.as_json(),
        "baselines": {n: score_fields(b) for n, b in ctx.base.items()},
        "refined": [
            {"trial": r.trial.trial_id, "seeds": r.seeds, "finished": r.n, "val": r.val, "test": r.test}
            for r in refined
        ],
        "plots": ctx.w.plots,
        "not_drawn": ctx.w.missing,
        "analyses": analyses,
    }
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(results, sections, out_dir))
    return BuiltReport(html_path, json_path, sorted(out_dir.rglob("*.png")))


def _headline(ctx: _Context) -> Section:
    """The best trial and every baseline, in words, with a warning when a baseline beats the model."""
    sec = Section("Best trial and baselines")
    objective, best = ctx.objective, ctx.best
    if best is None:
        sec.text.append("No trial reported the objective.")
    else:
        t, s = best
        test = (
            ""
            if s.test is None
            else f"; test at the same key {_fmt(s.test, s.test_ci)} (shown, never used to choose)"
        )
        sec.text.append(
            f"Best trial {t.trial_id}: {objective.name} = {_fmt(s.val, s.val_ci)} (validation){test}; parameters {json.dumps(t.params)}."
        )
    for name, b in ctx.base.items():
        line = f"Baseline {name}: {_fmt(b.val, b.val_ci)} (validation)" + (
            "" if b.test is None else f", test {_fmt(b.test, b.test_ci)}"
        )
        if best is not None:
            line += " — " + _versus(name, b, best[1], objective.mode)
            sec.warning |= _beats(b, best[1], objective.mode)
        sec.text.append(line + ".")
    fig = baselines_figure((best[0].trial_id, best[1]) if best else None, ctx.base, objective)
    caption = "Best trial beside each baseline, validation and test, 95% Wilson intervals."
    ctx.w.add(
        sec,
        fig,
        "baselines",
        caption,
        "no baselines logged on the parent run (metrics baseline/<name>/<probe key>)",
    )
    return sec


def _trials(ctx: _Context, refined: list[Refined]) -> Section:
    search = ctx.search()
    sec = Section("Trials", table=format_table(search, ctx.objective))
    sec.text.append(
        f"{len(search)} search trial(s), best validation value first; '~' marks trials whose 95% validation "
        "interval overlaps the best's (not distinguishable on this validation set)."
    )
    sec.text += failure_lines(search)
    if refined:
        sec.text.append(
            "Refine: the best configs re-trained with new seeds; mean ± sample standard deviation over the seeds that finished."
        )
        sec.table = f"{sec.table}\n\n{format_refine_table(refined, ctx.objective)}"
    return sec


def _axes(ctx: _Context) -> Section:
    spec, objective = ctx.results.spec, ctx.objective
    sec = Section("The objective against each swept axis")
    sec.text.append(
        "Each point is one run with its 95% Wilson interval (hollow: stopped early); grey diamonds are the test "
        "value at the same key. For a discrete axis, the squares are the mean over the finished runs at that "
        "value ± one standard deviation (a single run: its own interval). Dashed lines and bands: baselines."
    )
    everything = [r.outcome for r in ctx.results.trials]
    for axis, d in spec.space.items():
        fig = axis_figure(spec, axis, everything, ctx.base)
        caption = f"{objective.name} against {axis} ({d.kind} {list(d.args)})."
        ctx.w.add(sec, fig, f"axis_{_slug(axis)}", caption, "no run reported the objective")
    return sec


def _importance(ctx: _Context, imp: Importance) -> Section:
    """fANOVA's shares (or why not), and the contour of the two most important training axes."""
    spec = ctx.results.spec
    sec = Section("Parameter importance")
    if imp.values is None:
        sec.text.append(f"Not computed: {imp.reason}.")
        ctx.w.missing["importance"] = imp.reason or ""
    else:
        sec.text.append(
            f"{imp.evaluator} over {imp.completed} completed search trials: each axis's share of the variance "
            "of the validation objective."
        )
        ctx.w.add(sec, importance_figure(imp), "importance", "Parameter importance.", "")
    pair = top_axes(imp, spec)
    fig = contour_figure(build_study(spec, ctx.search()), pair, spec) if len(pair) == 2 else None
    why = (
        "fewer than two training axes"
        if len(pair) < 2
        else "fewer than three completed trials, or one of the two axes took a single value in them"
    )
    order = (
        "the two most important axes"
        if imp.values
        else "the first two axes of the spec (importance not computed)"
    )
    caption = (
        f"{ctx.objective.name} over {' × '.join(pair)}, {order}; Optuna's contour of the completed trials."
    )
    ctx.w.add(sec, fig, "contour", caption, why)
    return sec


def _heatmap(ctx: _Context) -> Section:
    sec = Section("Aggregation scheme × patch size")
    query = ctx.objective.query
    label = str(replace(query, scheme=None)) if query else ctx.objective.name
    why = (
        "the objective is not a probe statistic"
        if query is None
        else "no finished run reported per-scheme values"
    )
    sec.text.append(
        "Every scheme is scored on the same checkpoints (evaluation-only fan-out, no retraining). Each cell: the "
        "mean over the finished runs of that patch size, with its interval (one run: 95% Wilson; several: ± 1 sd)."
    )
    fig = heatmap_figure(heatmap_cells(ctx.results.trials, ctx.results), label)
    ctx.w.add(
        sec,
        fig,
        "heatmap_scheme_patch",
        "Aggregation scheme (and evaluation variant) × training patch size.",
        why,
    )
    return sec


def _learning_curves(ctx: _Context) -> Section:
    sec = Section("Learning curves")
    fig = learning_curves_figure(
        [(r.outcome, r.history) for r in ctx.results.trials], ctx.objective, ctx.base
    )
    caption = "Validation objective per epoch, every run; dashed and ending in x: stopped early (pruned); dotted red: failed."
    ctx.w.add(sec, fig, "learning_curves", caption, "no run has a per-epoch history of the objective")
    return sec


def _cost(ctx: _Context) -> Section:
    sec = Section("Accuracy against cost")
    sec.text.append("Pareto front: the finished runs no other finished run beats on both accuracy and cost.")
    points = []
    for r in ctx.results.trials:
        s = score(r.outcome.metrics, ctx.objective)
        if s is not None and math.isfinite(s.val) and r.outcome.status != "FAILED":
            points.append((r.outcome, s, mean_throughput(r), wall_time(r)))
    caption = "Validation objective against throughput (patches/s) and trial wall time."
    ctx.w.add(
        sec,
        cost_figure(points, ctx.objective, ctx.base),
        "cost",
        caption,
        "no run reported throughput or time",
    )
    return sec


def _trial_json(results: SweepResults, t: TrialOutcome, s: Score | None) -> dict[str, Any]:
    rec = next(r for r in results.trials if r.outcome is t)
    out: dict[str, Any] = {
        "trial": t.trial_id,
        "run_id": rec.run_id,
        "role": rec.role,
        "status": t.status,
        "params": t.params,
    }
    if rec.refines:
        out["refines"] = rec.refines
    out.update(score_fields(s))
    out.update({"patches_per_s": mean_throughput(rec), "wall_s": wall_time(rec), "epochs": len(rec.history)})
    if rec.analyses:
        out["analyses"] = rec.analyses
    return out


def _refined(results: SweepResults) -> list[Refined]:
    """The refine runs grouped by the search trial they re-train (`sweeps.refine.summarize`)."""
    objective = results.spec.objective()
    by_id = {t.outcome.trial_id: t.outcome for t in results.search()}
    groups: dict[str, list[TrialOutcome]] = {}
    for r in results.refine_runs():
        if r.refines in by_id:
            groups.setdefault(r.refines, []).append(r.outcome)
    out = []
    for tid, runs in groups.items():
        seeds = [int(r.params.get("run.seed", 0)) for r in runs]
        out.append(summarize(by_id[tid], seeds, runs, objective))
    return out


def _analyses(
    results: SweepResults, out_dir: Path, client: MlflowClient | None
) -> tuple[Section, dict[str, Any]]:
    """Each trial's BagSSL analyses: its `analysis/...` metrics and its `analyses/*.png` figures."""
    sec = Section("BagSSL analyses per trial")
    found: dict[str, Any] = {}
    rows = []
    for r in results.trials:
        if not r.analyses and not r.analysis_pngs:
            continue
        files = []
        for path in r.analysis_pngs:
            if client is None:
                break
            local = download_artifact(client, r.run_id, path, out_dir / "analyses" / r.outcome.trial_id)
            rel = local.relative_to(out_dir)
            files.append(str(rel))
            sec.figures.append((str(rel), f"trial {r.outcome.trial_id}: {path}"))
        found[r.outcome.trial_id] = {"metrics": r.analyses, "images": files}
        rows += [f"{r.outcome.trial_id}  {k}  {v:.4g}" for k, v in sorted(r.analyses.items())]
    if not found:
        sec.text.append(
            "No trial logged analyses (metrics analysis/..., figures under the run's analyses/ artifacts)."
        )
    if rows:
        sec.table = "\n".join(rows)
    return sec, found


# --- text --------------------------------------------------------------------------------------------------


def _fmt(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _beats(b: Score, model: Score, mode: str) -> bool:
    return b.val >= model.val if mode == "max" else b.val <= model.val


def _versus(name: str, b: Score, model: Score, mode: str) -> str:
    overlap = (
        b.val_ci is not None
        and model.val_ci is not None
        and b.val_ci[0] <= model.val_ci[1]
        and model.val_ci[0] <= b.val_ci[1]
    )
    if overlap:
        return "within noise of the best trial (their 95% intervals overlap)"
    if _beats(b, model, mode):
        return f"BEATS the best trial: {name} scores better than the trained model"
    return "below the best trial"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.warn{background:#fff1f0;border-left:4px solid #d9363e;padding:.5em 1em}
.meta{color:#555;font-size:.9em}
"""


def render_html(results: SweepResults, sections: Sequence[Section], out_dir: Path) -> str:
    """The page, every image inlined (base64 PNG data: URIs), so the file alone is the report."""
    e = html.escape
    spec = results.spec
    counts = ", ".join(
        f"{sum(t.outcome.status == s for t in results.trials)} {s.lower()}"
        for s in ("FINISHED", "KILLED", "FAILED")
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sweep report: {e(results.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Sweep report: {e(results.name)}</h1>",
        f'<p class="meta">experiment {e(results.experiment)} · parent run {e(results.parent_id)} ({e(results.status)}) · {e(counts)} · objective: {e(spec.mode)} {e(spec.metric)} (validation; test shown beside, never used to choose) · store {e(results.tracking_uri)}</p>',
    ]
    for sec in sections:
        parts.append(f"<section><h2>{e(sec.title)}</h2>")
        for line in sec.text:
            cls = ' class="warn"' if sec.warning and "BEATS" in line else ""
            parts.append(f"<p{cls}>{e(line)}</p>")
        if sec.table:
            parts.append(f"<pre>{e(sec.table)}</pre>")
        for name, caption in sec.figures:
            data = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}"><figcaption>{e(caption)}</figcaption></figure>'
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def publish(results: SweepResults, out_dir: Path) -> BuiltReport:
    """Build the report under out_dir and log the folder as `report/` on the sweep's parent run.

    Raises:
        ResultsError: out_dir lies in the store's own artifact folders (the report would be logged into
            itself), or the store refused the upload (the report stays built under out_dir).
    """
    client = MlflowClient(tracking_uri=results.tracking_uri)
    artifacts = urlparse(client.get_run(results.parent_id).info.artifact_uri)
    if artifacts.scheme in ("", "file"):
        # <experiment's artifact location>/<run id>/artifacts: nothing under the experiment's folder is ours.
        experiment_dir = Path(artifacts.path).resolve().parents[1]
        if out_dir.resolve().is_relative_to(experiment_dir):
            raise ResultsError(
                f"--out: {out_dir} lies in the MLflow store's artifact folders ({experiment_dir}); expected a "
                "folder outside them (the report is logged there under report/)"
            )
    built = build_report(results, out_dir, client)
    try:
        client.log_artifacts(results.parent_id, str(out_dir), REPORT_DIR)
    except (OSError, MlflowException) as err:
        raise ResultsError(
            f"{results.tracking_uri}: the report is written at {out_dir}, but logging it on the parent run "
            f"{results.parent_id} failed ({type(err).__name__}: {str(err).splitlines()[0]}); expected an "
            "artifact store this user can write"
        ) from None
    return built

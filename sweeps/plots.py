"""The sweep report's figures (matplotlib, drawn off-screen): each function takes trials and returns a Figure.

Every accuracy drawn carries an interval: a single run's 95% Wilson interval as the trainer reported it
(`_lo`/`_hi`), or, where several runs share a point, their mean ± one sample standard deviation. The
objective is always the validation value; the test value at the same key is drawn beside it in grey and
never used to choose, rank or draw a front. Baselines (raw pixels, a random backbone), when the sweep
scored them, are drawn as horizontal bands on every plot of the objective.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # off-screen: reports are built on servers and in tests without a display

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bagssl_core.metrics import EPOCH, ProbeKey
from sweeps.report import Score, TrialOutcome, score
from sweeps.space import variant_values
from sweeps.spec import Objective, SweepSpec, coerce_value

if TYPE_CHECKING:
    import optuna

    from sweeps.importance import Importance

Interval = tuple[float, float]
VAL_COLOUR, TEST_COLOUR, KILLED_COLOUR, FAILED_COLOUR = "C0", "0.55", "C1", "C3"
BASELINE_COLOURS = ("C3", "C2", "C4", "C5", "C6")
DPI = 100


@dataclass(frozen=True)
class Estimate:
    """A value with its interval: one run's Wilson interval, or several runs' mean ± sample sd."""

    value: float
    interval: Interval | None
    n: int

    @classmethod
    def of(cls, scores: Sequence[Score], split: str = "val") -> Estimate | None:
        values = [(s.val, s.val_ci) if split == "val" else (s.test, s.test_ci) for s in scores]
        found = [(v, ci) for v, ci in values if v is not None and math.isfinite(v)]
        if not found:
            return None
        if len(found) == 1:
            return cls(found[0][0], found[0][1], 1)
        mean = statistics.fmean(v for v, _ in found)
        sd = statistics.stdev(v for v, _ in found)
        return cls(mean, (mean - sd, mean + sd), len(found))

    def yerr(self) -> list[list[float]]:
        return error_bar(self.value, self.interval)


def error_bar(value: float, interval: Interval | None) -> list[list[float]]:
    """Matplotlib's `yerr` of one value: its distance to each bound of its interval. Clipped at 0, because
    an interval read back from MLflow can miss its own point by a rounding error, and matplotlib refuses
    a negative length."""
    lo, hi = interval or (value, value)
    return [[max(0.0, value - lo)], [max(0.0, hi - value)]]


# --- data ------------------------------------------------------------------------------------------


def baseline_scores(
    baselines: Mapping[str, Mapping[ProbeKey, float]], objective: Objective
) -> dict[str, Score]:
    """Each baseline at the objective's statistic: at the objective's own scheme when the baseline has it
    (the random backbone has the trained model's schemes), else its best over its own schemes (raw
    pixels have only `pixels`); its validation value, interval, and test value at that key."""
    if objective.query is None:
        return {}
    anyscheme = Objective(objective.name, objective.mode, replace(objective.query, scheme=None))
    out = {}
    for name, values in sorted(baselines.items()):
        named = {str(k): v for k, v in values.items()}
        s = score(named, objective) or score(named, anyscheme)
        if s is not None:
            out[name] = s
    return out


def axis_value(t: TrialOutcome, axis: str) -> Any:
    return t.params.get(axis)


def eval_axis_scores(spec: SweepSpec, axis: str, t: TrialOutcome) -> dict[Any, Score]:
    """One trial's objective at each value of an evaluation-only axis: the best over the keys (schemes and
    variants) that value covers, scored on the same checkpoints."""
    objective = spec.objective()
    # The variants as the sweep named them: they depend on the base only through its eval options, which
    # a spec read back from MLflow carries inline (a `base.config` file stays with the spec's author).
    variants = variant_values(spec, {k: v for k, v in spec.base.items() if k != "config"})
    out: dict[Any, Score] = {}
    for value in spec.space[axis].args:

        def covers(k: ProbeKey, v: Any = value) -> bool:
            if axis == "eval.aggregation":
                return k.scheme in coerce_value(axis, v)
            return variants.get(k.variant, {}).get(axis) == v

        keep = {str(k) for k in objective.keys(t.metrics) if covers(k)}
        sub = {
            name: x
            for name, x in t.metrics.items()
            if (p := ProbeKey.parse(name)) is not None and str(p.with_bound("").in_split("val")) in keep
        }
        s = score(sub, objective) if sub else None
        if s is not None:
            out[_label(value)] = s
    return out


def _label(v: Any) -> Any:
    return "+".join(map(str, v)) if isinstance(v, list) else v


def pareto_front(
    points: Sequence[tuple[float, float]], maximize_x: bool, maximize_y: bool = True
) -> list[int]:
    """Indices of the points no other point beats on both coordinates, sorted by x."""
    sx, sy = (1 if maximize_x else -1), (1 if maximize_y else -1)
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            sx * ox >= sx * x and sy * oy >= sy * y and (sx * ox > sx * x or sy * oy > sy * y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# --- drawing helpers ----------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.2, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _draw_baselines(ax: Any, baselines: Mapping[str, Score], horizontal: bool = True) -> None:
    """A band (95% interval) and a line per baseline, labelled with its validation value."""
    for i, (name, s) in enumerate(baselines.items()):
        colour = BASELINE_COLOURS[i % len(BASELINE_COLOURS)]
        label = f"baseline {name}: {s.val:.1f}" + (
            f" [{s.val_ci[0]:.1f}, {s.val_ci[1]:.1f}]" if s.val_ci else ""
        )
        ax.axhline(s.val, color=colour, linestyle="--", linewidth=1.2, label=label)
        if s.val_ci:
            ax.axhspan(*s.val_ci, color=colour, alpha=0.10, linewidth=0)


def _errorbar(
    ax: Any, x: float, s: Score, colour: str, filled: bool, label: str | None = None, **kw: Any
) -> None:
    ax.errorbar(
        [x],
        [s.val],
        yerr=error_bar(s.val, s.val_ci),
        fmt="o",
        color=colour,
        mfc=colour if filled else "white",
        capsize=3,
        label=label,
        **kw,
    )


def _test_errorbar(ax: Any, x: float, s: Score, label: str | None = None) -> None:
    if s.test is None:
        return
    ax.errorbar(
        [x],
        [s.test],
        yerr=error_bar(s.test, s.test_ci),
        fmt="d",
        color=TEST_COLOUR,
        capsize=2,
        label=label,
        ms=4,
    )


def _dedupe_legend(ax: Any, **kw: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels, strict=True):
        seen.setdefault(lab, h)
    if seen:
        ax.legend(seen.values(), seen.keys(), fontsize=7, **kw)


def _numeric(values: Iterable[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


# --- figures ----------------------------------------------------------------------------------------------


def axis_points(
    spec: SweepSpec, axis: str, trials: Iterable[TrialOutcome]
) -> dict[Any, list[tuple[TrialOutcome, Score]]]:
    """Axis value -> (run, its validation objective) for every run that did not fail. A run gives one point
    on a training axis, and one per value on an evaluation-only axis (all scored on its own checkpoints)."""
    objective = spec.objective()
    out: dict[Any, list[tuple[TrialOutcome, Score]]] = {}
    for t in trials:
        if t.status == "FAILED":
            continue
        if axis in spec.eval_axes():
            for v, at_value in eval_axis_scores(spec, axis, t).items():
                out.setdefault(v, []).append((t, at_value))
            continue
        s = score(t.metrics, objective)
        v = axis_value(t, axis)
        if s is not None and v is not None and math.isfinite(s.val):
            out.setdefault(_label(v), []).append((t, s))
    return out


def axis_figure(
    spec: SweepSpec,
    axis: str,
    trials: Sequence[TrialOutcome],
    baselines: Mapping[str, Score] = {},
) -> Figure | None:
    """The validation objective against one swept axis; None when no trial reported it.

    Each run is a point with its Wilson interval (hollow: stopped early). A discrete axis gets, per value,
    the mean over the runs that finished with ± one standard deviation (or the one run's interval), joined
    by a line when the values are numbers; a log axis for a log-uniform one. The test value at the same key
    is the grey diamond beside each run.
    """
    objective = spec.objective()
    d = spec.space[axis]
    per_value = axis_points(spec, axis, trials)
    if not per_value:
        return None
    fig, ax = _figure()
    listed = [_label(v) for v in d.args] if d.discrete else sorted(per_value)
    categorical = d.discrete and not _numeric(listed)
    xs = {v: (i if categorical else v) for i, v in enumerate(listed)}
    span = (max(xs.values()) - min(xs.values())) if not categorical and len(xs) > 1 else 1.0
    # Runs at one value of a discrete axis sit side by side; a continuous axis needs no spreading.
    _draw_runs(ax, per_value, xs, 0.015 * span if d.discrete else 0.0)
    if d.discrete:
        _draw_means(ax, listed, per_value, xs, categorical)
        ax.set_xticks(list(xs.values()), [str(v) for v in listed], rotation=20 if categorical else 0)
    if d.kind == "loguniform":
        ax.set_xscale("log")
    _draw_baselines(ax, baselines)
    ax.set_xlabel(axis + (" (log scale)" if d.kind == "loguniform" else ""))
    ax.set_ylabel(f"{objective.name} (validation)")
    ax.set_title(f"{objective.name} against {axis}", fontsize=10)
    ax.grid(alpha=0.3)
    _dedupe_legend(ax, loc="best")
    return fig


def _draw_runs(
    ax: Any, per_value: Mapping[Any, list[tuple[TrialOutcome, Score]]], xs: Mapping[Any, Any], jitter: float
) -> None:
    for v, runs in per_value.items():
        for j, (t, s) in enumerate(runs):
            x = xs.get(v, v) + (j - (len(runs) - 1) / 2) * jitter
            killed = t.status != "FINISHED"
            label = "run (stopped early)" if killed else "run, 95% Wilson interval"
            _errorbar(ax, x, s, KILLED_COLOUR if killed else VAL_COLOUR, not killed, label, alpha=0.55, ms=5)
            _test_errorbar(ax, x + 0.4 * jitter, s, "test at the same key (not used to choose)")


def _draw_means(
    ax: Any,
    listed: Sequence[Any],
    per_value: Mapping[Any, list[tuple[TrialOutcome, Score]]],
    xs: Mapping[Any, Any],
    categorical: bool,
) -> None:
    """Per value: the finished runs' mean ± 1 sd (one run: its own interval), a line over numeric values,
    bars under categories."""
    means = []
    for v in listed:
        est = Estimate.of([s for t, s in per_value.get(v, []) if t.status == "FINISHED"])
        if est is not None:
            means.append((xs[v], est))
    if not means:
        return
    x, y = [m[0] for m in means], [m[1].value for m in means]
    if categorical:
        ax.bar(x, y, width=0.5, color=VAL_COLOUR, alpha=0.18)
    yerr = [[e.yerr()[0][0] for _, e in means], [e.yerr()[1][0] for _, e in means]]
    label = "mean of finished runs ± 1 sd (one run: its interval)"
    ax.errorbar(x, y, yerr=yerr, fmt="s" if categorical else "s-", color="C9", capsize=5, lw=2, label=label)


def learning_curves_figure(
    histories: Sequence[tuple[TrialOutcome, Mapping[int, Mapping[str, float]]]],
    objective: Objective,
    baselines: Mapping[str, Score] = {},
) -> Figure | None:
    """The validation objective per epoch of every run, with its Wilson band; runs stopped early dashed,
    ending in an x; failed runs dotted, in red."""
    fig, ax = _figure(7.5, 4.5)
    drawn = 0
    for t, history in histories:
        epochs, vals, los, his = [], [], [], []
        for step in sorted(history):
            s = score(history[step], objective)
            if s is None or not math.isfinite(s.val):
                continue
            epochs.append(history[step].get(EPOCH, step))
            vals.append(s.val)
            lo, hi = s.val_ci or (s.val, s.val)
            los.append(lo)
            his.append(hi)
        if not epochs:
            continue
        drawn += 1
        style = {"FINISHED": "-", "KILLED": "--", "FAILED": ":"}.get(t.status, "--")
        colour = FAILED_COLOUR if t.status == "FAILED" else None
        (line,) = ax.plot(
            epochs, vals, style, marker="o", ms=3, color=colour, label=f"{t.trial_id} ({t.status.lower()})"
        )
        ax.fill_between(epochs, los, his, color=line.get_color(), alpha=0.08, linewidth=0)
        if t.status != "FINISHED":
            ax.plot([epochs[-1]], [vals[-1]], "x", ms=9, mew=2, color=line.get_color())
    if not drawn:
        return None
    _draw_baselines(ax, baselines)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{objective.name} (validation)")
    ax.set_title("learning curves (dashed, x: stopped early; bands: 95% Wilson interval)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if drawn <= 16:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def importance_figure(importance: Importance) -> Figure | None:
    """Horizontal bars of each axis's share of the objective's variance; None when not computed."""
    if not importance.values:
        return None
    names = list(importance.values)[::-1]
    fig, ax = _figure(6.5, 0.6 + 0.45 * len(names))
    ax.barh(names, [importance.values[n] for n in names], color=VAL_COLOUR)
    for i, n in enumerate(names):
        ax.text(importance.values[n], i, f" {importance.values[n]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(f"share of the objective's variance ({importance.completed} completed trials)")
    ax.set_title("parameter importance: " + importance.evaluator, fontsize=9)
    return fig


def contour_values(trials: Iterable[optuna.trial.FrozenTrial], axis: str) -> set[str]:
    """The distinct values one parameter took in the trials."""
    return {repr(t.params[axis]) for t in trials if axis in t.params}


def contour_figure(study: optuna.Study, axes: Sequence[str], spec: SweepSpec) -> Figure | None:
    """The objective over the two most important axes: Optuna's own contour plot of the completed trials
    (log axes for log-uniform ones), with every trial as a point. None without two axes or three trials."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(axes) < 2 or len(done) < 3 or not all(len(contour_values(done, a)) > 1 for a in axes[:2]):
        return None  # Optuna draws empty axes when a parameter took a single value
    import warnings

    from optuna.visualization.matplotlib import plot_contour

    # rc_context: plot_contour switches matplotlib's global style to ggplot, which would recolour every
    # figure drawn after it; the context restores the settings on exit.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # plot_contour is marked experimental
        ax = plot_contour(study, params=list(axes[:2]), target_name=spec.metric)
    assert isinstance(ax, Axes)  # one axes for two parameters (a grid of them for more)
    fig = ax.get_figure()
    assert isinstance(fig, Figure)
    fig.set_size_inches(7.0, 5.0)
    fig.set_dpi(DPI)
    ax.set_title(f"{spec.metric} (validation) over {axes[0]} × {axes[1]}", fontsize=10)
    return fig


def heatmap_figure(
    cells: Mapping[tuple[str, float | int], Sequence[Score]], objective_label: str
) -> Figure | None:
    """Aggregation scheme (and evaluation variant) × patch size: each cell the mean over the finished runs
    of that patch size of the scheme's validation value, written with its interval; one training run
    gives every scheme, so each column compares schemes on the same checkpoints."""
    if not cells:
        return None
    rows = sorted({r for r, _ in cells})
    cols = sorted({c for _, c in cells})
    import numpy as np

    grid = np.full((len(rows), len(cols)), np.nan)
    text: dict[tuple[int, int], str] = {}
    for (r, c), scores in cells.items():
        est = Estimate.of(scores)
        if est is None:
            continue
        i, j = rows.index(r), cols.index(c)
        grid[i, j] = est.value
        ci = f"\n[{est.interval[0]:.1f}, {est.interval[1]:.1f}]" if est.interval else ""
        text[i, j] = f"{est.value:.1f}{ci}" + (f"\nn={est.n}" if est.n > 1 else "")
    fig, ax = _figure(max(5.5, 1.6 + 1.3 * len(cols)), 1.2 + 0.55 * len(rows) + 0.6)
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.grid(False)
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), s in text.items():
        ax.text(j, i, s, ha="center", va="center", fontsize=7, color="white" if grid[i, j] < mid else "black")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("patch size (pixels)")
    ax.set_ylabel("aggregation scheme[:variant]")
    ax.set_title(f"{objective_label} (validation): scheme × patch size", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def cost_figure(
    points: Sequence[tuple[TrialOutcome, Score, float | None, float | None]],
    objective: Objective,
    baselines: Mapping[str, Score] = {},
) -> Figure | None:
    """Accuracy against cost: throughput (patches/s, higher is cheaper) and trial wall time. Each run with
    its interval; the Pareto front of the finished runs (no other finished run is both more accurate and
    cheaper) joined in a line. Runs stopped early are hollow and stay off the front: their accuracy is
    from fewer epochs."""
    usable = [p for p in points if p[2] is not None or p[3] is not None]
    if not usable:
        return None
    fig, axes = _figure(11.0, 4.2, ncols=2)
    for ax, idx, label, maximize in (
        (axes[0], 0, "throughput (patches/s, mean over epochs)", True),
        (axes[1], 1, "trial wall time (s)", False),
    ):
        pts = [(t, s, float(x)) for t, s, *costs in usable if (x := costs[idx]) is not None]
        for t, s, x in pts:
            killed = t.status != "FINISHED"
            _errorbar(
                ax,
                float(x),
                s,
                KILLED_COLOUR if killed else VAL_COLOUR,
                not killed,
                "stopped early" if killed else "finished run",
                ms=5,
            )
            ax.annotate(
                t.trial_id.split("_")[-1],
                (float(x), s.val),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        done = [(float(x), s.val) for t, s, x in pts if t.status == "FINISHED"]
        front = pareto_front(done, maximize_x=maximize, maximize_y=objective.mode == "max")
        if front:
            ax.plot(
                [done[i][0] for i in front],
                [done[i][1] for i in front],
                "-",
                color="C2",
                lw=2,
                alpha=0.7,
                label="Pareto front",
            )
        _draw_baselines(ax, baselines)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{objective.name} (validation)")
        ax.grid(alpha=0.3)
        _dedupe_legend(ax, loc="best")
    fig.suptitle("accuracy against cost", fontsize=10)
    return fig


def baselines_figure(
    best: tuple[str, Score] | None, baselines: Mapping[str, Score], objective: Objective
) -> Figure | None:
    """The best trial beside each baseline, validation and test, each with its 95% interval: whether raw
    pixels or a random backbone beat the trained model shows at a glance."""
    if not baselines:
        return None
    entries = ([(f"best trial {best[0]}", best[1])] if best else []) + [(n, s) for n, s in baselines.items()]
    fig, ax = _figure(max(5.5, 1.8 + 1.4 * len(entries)), 4.0)
    width = 0.38
    for i, (_, s) in enumerate(entries):
        colour = (
            VAL_COLOUR
            if i == 0 and best
            else BASELINE_COLOURS[(i - (1 if best else 0)) % len(BASELINE_COLOURS)]
        )
        ax.bar(
            i - width / 2,
            s.val,
            width,
            color=colour,
            yerr=error_bar(s.val, s.val_ci),
            capsize=4,
            label="validation" if i == 0 else None,
        )
        ax.text(i - width / 2, s.val, f"{s.val:.1f}", ha="center", va="bottom", fontsize=7)
        if s.test is not None:
            ax.bar(
                i + width / 2,
                s.test,
                width,
                color=TEST_COLOUR,
                yerr=error_bar(s.test, s.test_ci),
                capsize=4,
                label="test (same key)" if i == 0 else None,
            )
            ax.text(i + width / 2, s.test, f"{s.test:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(entries)), [n for n, _ in entries], rotation=10, fontsize=8)
    ax.set_ylabel((objective.query and f"{replace(objective.query, scheme=None)}") or objective.name)
    ax.set_title("the model against its baselines (same probes, same splits; 95% intervals)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return fig

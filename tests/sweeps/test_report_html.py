"""The sweep report: figures, importance and the HTML page, on synthetic trials (fast) and rebuilt from a real
MLflow store after a real smoke sweep, rendered in headless Chromium (slow)."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from bagssl_core.metrics import ProbeKey, baseline_name, n_images, wilson_interval
from sweeps.importance import build_study, param_importance
from sweeps.plots import (
    axis_figure,
    baseline_scores,
    baselines_figure,
    contour_figure,
    cost_figure,
    heatmap_figure,
    learning_curves_figure,
    pareto_front,
)
from sweeps.report import Score, TrialOutcome, key_score
from sweeps.report_html import build_report, heatmap_cells
from sweeps.results import SweepResults, TrialRecord, baselines, parse_param
from sweeps.spec import SweepSpec

N_VAL = 500
SCHEMES = ("mean_emb", "centre")


def make_spec(**changes: object) -> SweepSpec:
    tree: dict = {
        "name": "synthetic",
        "space": {
            "patch.size": {"choice": [8, 12, 16]},
            "loss.inv_weight": {"loguniform": [5.0, 50.0]},
            "eval.aggregation": {"choice": list(SCHEMES)},
        },
        "metric": "val/knn_top1/mean_emb",
        "mode": "max",
    }
    tree.update(changes)
    return SweepSpec.model_validate(tree)


def probe_metrics(values: dict[str, float], split: str = "val") -> dict[str, float]:
    """A trainer report: each scheme's kNN top-1 with its Wilson bounds on one split."""
    out: dict[str, float] = {n_images(split): N_VAL}  # type: ignore[arg-type]
    for scheme, v in values.items():
        k = ProbeKey(split, "knn", "top1", scheme)  # type: ignore[arg-type]
        lo, hi = wilson_interval(v, N_VAL)
        out.update({str(k): v, str(k.with_bound("lo")): lo, str(k.with_bound("hi")): hi})
    return out


def synthetic_trials(n: int, seed: int = 0, epochs: int = 3) -> list[TrialRecord]:
    """Trials whose accuracy depends on the patch size alone (12 best), plus a little noise; every fifth
    trial stopped early after one epoch."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.choice([8, 12, 16])
        inv = 5.0 * 10 ** rng.random()
        base = {8: 50.0, 12: 70.0, 16: 60.0}[size] + rng.gauss(0, 0.5)
        killed = i % 5 == 4
        last = 1 if killed else epochs
        history = {}
        for e in range(1, last + 1):
            v = base - 5.0 * (epochs - e)
            history[e] = {
                "epoch": e,
                "patches_per_s": 1000.0 / size + rng.random(),
                **probe_metrics({"mean_emb": v, "centre": v - 8}),
            }
        final = dict(history[last])
        if not killed:
            final.update(probe_metrics({"mean_emb": base - 1, "centre": base - 9}, "test"))
        t = TrialOutcome(
            f"t_{i:05d}",
            {"patch.size": size, "loss.inv_weight": inv},
            "KILLED" if killed else "FINISHED",
            final,
        )
        config = {"patch.size": size, "derived.patch_px": size, "loss.inv_weight": inv}
        out.append(TrialRecord(t, f"run{i}", "trial", None, config, history, 10.0 * size + i))
    return out


BASELINES = {
    "raw_pixels": {
        ProbeKey("val", "knn", "top1", "pixels"): 79.0,
        ProbeKey("val", "knn", "top1", "pixels", bound="lo"): 75.0,
        ProbeKey("val", "knn", "top1", "pixels", bound="hi"): 82.0,
        ProbeKey("test", "knn", "top1", "pixels"): 78.0,
    },
    "random_init": {
        ProbeKey("val", "knn", "top1", "mean_emb"): 40.0,
        ProbeKey("val", "knn", "top1", "centre"): 45.0,
    },
}


def test_importance_finds_the_axis_that_decides_the_objective() -> None:
    spec = make_spec()
    imp = param_importance(spec, [t.outcome for t in synthetic_trials(30)])
    assert imp.values is not None and imp.reason is None
    assert next(iter(imp.values)) == "patch.size" and imp.values["patch.size"] > 0.8
    assert imp.completed == 24  # the 6 stopped early are PRUNED: fANOVA reads completed trials only
    assert abs(sum(imp.values.values()) - 1.0) < 1e-6


def test_importance_with_too_few_trials_says_so_instead_of_a_number() -> None:
    imp = param_importance(make_spec(), [t.outcome for t in synthetic_trials(5)])
    assert imp.values is None and imp.reason is not None and "too few trials: 4 completed" in imp.reason
    one_axis = make_spec(space={"patch.size": {"choice": [8, 12, 16]}})
    assert "one training axis" in (
        param_importance(one_axis, [t.outcome for t in synthetic_trials(30)]).reason or ""
    )


def test_study_holds_the_spec_distributions_and_states() -> None:
    import optuna

    study = build_study(make_spec(), [t.outcome for t in synthetic_trials(10)])
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == 2 and len(states) == 10
    dist = study.trials[0].distributions
    assert dist["loss.inv_weight"].log and dist["patch.size"].choices == (8, 12, 16)
    assert "eval.aggregation" not in dist  # an evaluation-only axis is never a trial parameter


def test_contour_needs_two_values_of_each_axis() -> None:
    spec = make_spec()
    trials = [t.outcome for t in synthetic_trials(10)]
    fig = contour_figure(build_study(spec, trials), ["patch.size", "loss.inv_weight"], spec)
    assert fig is not None and fig.axes[0].get_xscale() == "log"  # loss.inv_weight, log-uniform, on x
    same = [TrialOutcome(t.trial_id, {**t.params, "patch.size": 12}, t.status, t.metrics) for t in trials]
    assert contour_figure(build_study(spec, same), ["patch.size", "loss.inv_weight"], spec) is None


def test_params_read_back_from_mlflow_strings_are_the_values_the_sweep_set() -> None:
    for value in (10, 1e-05, 0.3, 37.207821878117365, True, None, "mean_emb", ["mean_emb", "centre"]):
        text = json.dumps(value) if isinstance(value, list) else str(value)  # as sweeps.tracking logs it
        assert parse_param(text) == value and type(parse_param(text)) is type(value), text


def test_pareto_front() -> None:
    pts = [(1.0, 50.0), (2.0, 60.0), (3.0, 55.0), (4.0, 40.0), (2.0, 45.0)]
    assert pareto_front(pts, maximize_x=True) == [1, 2, 3]  # (2, 45) and (1, 50) are beaten by (2, 60)
    assert pareto_front(pts, maximize_x=False) == [0, 1]  # least time: (1, 50) and (2, 60)


def test_baselines_score_at_the_objective_scheme_else_their_own() -> None:
    """The random backbone is scored at the objective's scheme (mean_emb: 40), not at its best one (centre:
    45), which would compare it with the trained model on another scheme; raw pixels have only `pixels`."""
    parsed = baselines(
        {baseline_name(n, k): v for n, vals in BASELINES.items() for k, v in vals.items()}
        | {"trials_finished": 3}
    )
    assert parsed == BASELINES
    scores = baseline_scores(parsed, make_spec().objective())
    assert scores["raw_pixels"].val == 79.0 and scores["raw_pixels"].val_ci == (75.0, 82.0)
    assert scores["raw_pixels"].test == 78.0
    assert scores["random_init"].val == 40.0 and scores["random_init"].key.scheme == "mean_emb"  # type: ignore[union-attr]


def test_baselines_figure_draws_a_perfect_or_null_score_whose_interval_misses_it_by_rounding() -> None:
    """A tiny validation set can score 0% or 100%; an interval read back from a store a hair inside the
    value must still draw (matplotlib refuses a negative error bar)."""
    spec = make_spec()
    perfect = Score(None, 100.0, (72.24, 99.99999999999999), 0.0, (2.7e-15, 35.4))
    fig = baselines_figure(("t0", perfect), {"raw_pixels": perfect}, spec.objective())
    assert fig is not None and len(fig.axes[0].patches) == 4


def test_axis_figures_log_axis_for_loguniform_and_intervals_on_every_point() -> None:
    spec = make_spec()
    trials = [t.outcome for t in synthetic_trials(12)]
    fig = axis_figure(spec, "loss.inv_weight", trials)
    assert fig is not None and fig.axes[0].get_xscale() == "log"
    fig = axis_figure(spec, "patch.size", trials, baseline_scores(BASELINES, spec.objective()))
    assert fig is not None
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.get_xticklabels()] == ["8", "12", "16"]
    labels = ax.get_legend_handles_labels()[1]
    assert any(lab.startswith("baseline raw_pixels: 79.0") for lab in labels)
    assert any("mean of finished runs" in lab for lab in labels)
    # Every run has an error bar: the errorbar containers carry one vertical segment per point.
    bars = [c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
    assert len(bars) >= 12
    fig = axis_figure(spec, "eval.aggregation", trials)
    assert fig is not None and [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(SCHEMES)


def test_heatmap_cells_average_finished_runs_per_scheme_and_patch_size() -> None:
    spec = make_spec()
    records = synthetic_trials(15)
    results = SweepResults("e", "p", "synthetic", spec, "FINISHED", records, {}, "sqlite:///x.db")
    cells = heatmap_cells(records, results)
    assert {r for r, _ in cells} == set(SCHEMES)
    finished_12 = [r for r in records if r.outcome.status == "FINISHED" and r.config["patch.size"] == 12]
    assert len(cells["mean_emb", 12]) == len(finished_12)
    assert cells["mean_emb", 12][0] == key_score(
        finished_12[0].outcome.metrics, ProbeKey("val", "knn", "top1", "mean_emb")
    )
    fig = heatmap_figure(cells, "val/knn_top1")
    assert fig is not None
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(re.match(r"\d+\.\d\n\[\d+\.\d, \d+\.\d\]", t) for t in texts)  # value with its interval


def test_learning_curves_mark_runs_stopped_early() -> None:
    records = synthetic_trials(5)
    fig = learning_curves_figure([(r.outcome, r.history) for r in records], make_spec().objective())
    assert fig is not None
    ax = fig.axes[0]
    styles = {
        line.get_label(): line.get_linestyle() for line in ax.get_lines() if line.get_label().startswith("t_")
    }
    assert styles["t_00004 (killed)"] == "--" and styles["t_00000 (finished)"] == "-"
    assert any(line.get_marker() == "x" for line in ax.get_lines())


def test_cost_figure_draws_a_front_of_finished_runs() -> None:
    spec = make_spec()
    records = synthetic_trials(10)
    from sweeps.report import score
    from sweeps.report_html import mean_throughput, wall_time

    points = [
        (r.outcome, s, mean_throughput(r), wall_time(r))
        for r in records
        if (s := score(r.outcome.metrics, spec.objective()))
    ]
    fig = cost_figure(points, spec.objective())
    assert fig is not None and len(fig.axes) == 2
    assert all("Pareto front" in ax.get_legend_handles_labels()[1] for ax in fig.axes)


def decode_data_uris(page: str) -> list[np.ndarray]:
    uris = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    return [mpimg.imread(io.BytesIO(base64.b64decode(u)), format="png") for u in uris]


def test_build_report_on_synthetic_trials(tmp_path: Path) -> None:
    spec = make_spec()
    records = synthetic_trials(20)
    records[0].analyses = {"analysis/whole_vs_mean/cosine": 0.93}
    records[1].outcome.status, records[1].outcome.failure = "FAILED", "no room for the trial's workers"
    results = SweepResults(
        "exp", "parent123", "synthetic", spec, "FINISHED", records, BASELINES, "sqlite:///x.db"
    )
    built = build_report(results, tmp_path / "r")
    assert "<p>trial t_00001 failed: no room for the trial&#x27;s workers</p>" in built.html.read_text()
    data = json.loads(built.json.read_text())
    files = {p["file"] for p in data["plots"]}
    assert {
        "baselines.png",
        "axis_patch_size.png",
        "axis_loss_inv_weight.png",
        "axis_eval_aggregation.png",
    } <= files
    assert {
        "importance.png",
        "contour.png",
        "heatmap_scheme_patch.png",
        "learning_curves.png",
        "cost.png",
    } <= files
    assert data["importance"]["values"] and next(iter(data["importance"]["values"])) == "patch.size"
    assert data["analyses"] == {"t_00000": {"metrics": {"analysis/whole_vs_mean/cosine": 0.93}, "images": []}}
    assert data["baselines"]["raw_pixels"]["val"] == 79.0
    page = built.html.read_text()
    assert "BEATS the best trial: raw_pixels" in page  # raw pixels (79) above the best trial (~70)
    images = decode_data_uris(page)
    assert len(images) == len(files)
    for name in files:
        img = mpimg.imread(tmp_path / "r" / name)
        assert img.shape[0] > 100 and img.std() > 0.01


# --- a real sweep, reported from MLflow alone ----------------------------------------------------------------


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


IMG_CHECK = """<script>
window.addEventListener("load", () => {
  const sizes = Array.from(document.images).map(i => i.complete ? i.naturalWidth + "x" + i.naturalHeight : "0x0");
  const out = document.createElement("pre");
  out.id = "img-check";
  out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script></body>"""


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def log_analyses_and_baselines(uri: str, experiment: str) -> tuple[str, str]:
    """What the baselines and the analyses write (their own helpers, not merged yet): baseline metrics on the
    parent, an `analysis/` metric and an `analyses/` PNG on the first child. Returns (parent, child) run ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    parent = client.search_runs([exp.experiment_id], "tags.`bagssl.role` = 'sweep'")[0].info.run_id
    child = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", order_by=["start_time ASC"]
    )[0].info.run_id
    key = ProbeKey("val", "knn", "top1", "pixels")
    for k, v in (
        (key, 99.0),
        (key.with_bound("lo"), 97.0),
        (key.with_bound("hi"), 99.9),
        (key.in_split("test"), 98.0),
    ):
        client.log_metric(parent, baseline_name("raw_pixels", k), v)
    client.log_metric(child, "analysis/whole_vs_mean/cosine", 0.91)
    fig = __import__("matplotlib.figure", fromlist=["Figure"]).Figure(figsize=(3, 2))
    fig.subplots().plot([1, 2, 4], [30, 40, 45], "o-")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    client.log_image(child, mpimg.imread(io.BytesIO(buf.getvalue()), format="png"), "analyses/bag_curve.png")
    return parent, child


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs Debian's package)")
def test_report_of_a_real_sweep_rebuilt_from_mlflow_renders_in_chromium(tmp_path: Path) -> None:
    from tests.sweeps.conftest import sweep_cmd, tiny_spec

    # search.seed 1 draws patch sizes 10, 14, 10 (`sweeps.local.local_trials`): both axes vary, so the
    # contour and the heat map's two columns are drawn.
    search = {"algo": "optuna", "seed": 1, "n_startup_trials": 2}
    spec = tiny_spec(tmp_path, "report_e2e", num_samples=3, scheduler={"name": "none"}, search=search)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # One epoch: the learning curves need only a history, and 2 cores shared by other work are slow.
    proc = run(sweep_cmd(spec, "--local", "--set", "base.schedule.epochs=1"), tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The sweep's own report, built from MLflow at its end.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("sweep report: "))
    own = Path(line.split()[2])
    assert own == tmp_path / "storage" / "report_e2e_local" / "report" / "report.html" and own.is_file()

    parent, _child = log_analyses_and_baselines(uri, "report_e2e")
    out = tmp_path / "rebuilt"
    cmd = [
        sys.executable,
        "-m",
        "sweeps.report",
        "--experiment",
        "report_e2e",
        "--tracking-uri",
        uri,
        "--out",
        str(out),
    ]
    proc = run(cmd, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html_path = Path(proc.stdout.strip().splitlines()[-1])
    assert html_path == (out / "report.html").resolve()

    data = json.loads((out / "report.json").read_text())
    assert data["parent_run_id"] == parent and data["objective"]["metric"] == "val/knn_top1/mean_emb"
    assert len(data["trials"]) == 3 and all(t["status"] == "FINISHED" for t in data["trials"])
    assert all(
        "val_lo" in t and "test" in t and t["patches_per_s"] > 0 and t["wall_s"] > 0 for t in data["trials"]
    )
    assert "too few trials: 3 completed" in data["importance"]["reason"]
    assert data["baselines"]["raw_pixels"]["val"] == 99.0
    files = {p["file"] for p in data["plots"]}
    assert {"baselines.png", "axis_patch_size.png", "axis_loss_inv_weight.png", "contour.png"} <= files
    assert {"heatmap_scheme_patch.png", "learning_curves.png", "cost.png"} <= files
    assert data["analyses"][data["trials"][0]["trial"]] or any(a["images"] for a in data["analyses"].values())
    images = [i for a in data["analyses"].values() for i in a["images"]]
    assert images == ["analyses/local_00000/bag_curve.png"]
    for png in [*files, *images]:
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 50 and img.std() > 0.01, png

    # Again into the same folder: an earlier report is replaced. Into the store's own artifact folders: refused
    # before anything is written there.
    before = {p.name for p in out.iterdir()}
    assert run(cmd, tmp_path, timeout=600).returncode == 0
    assert {p.name for p in out.iterdir()} == before
    from mlflow.tracking import MlflowClient

    artifacts = Path(MlflowClient(tracking_uri=uri).get_run(parent).info.artifact_uri.removeprefix("file://"))
    inside = [*cmd[:-1], str(artifacts / "mine")]
    refused = run(inside, tmp_path, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert refused.stderr.startswith(
        f"error: --out: {artifacts / 'mine'} lies in the MLflow store's artifact"
    )
    assert not (artifacts / "mine").exists()
    # A store that refuses the upload (a file where the parent's report/ folder goes): one line, and the
    # report stays built where it was asked for.
    (artifacts / "report").rename(tmp_path / "logged_report")
    (artifacts / "report").write_text("in the way\n")
    refused = run([*cmd[:-1], str(tmp_path / "unlogged")], tmp_path, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert (
        f"the report is written at {tmp_path / 'unlogged'}, but logging it on the parent run"
        in refused.stderr
    )
    assert (tmp_path / "unlogged" / "report.html").is_file()
    (artifacts / "report").unlink()
    (tmp_path / "logged_report").rename(artifacts / "report")

    page = html_path.read_text()
    assert "BEATS the best trial: raw_pixels" in page
    assert 'src="file:' not in page and 'src="/' not in page  # self-contained
    assert len(decode_data_uris(page)) == len(files) + len(images)

    # The page in a real browser: every image decodes, and the page is not blank.
    check = out / "check.html"
    check.write_text(page.replace("</body>", IMG_CHECK))
    dom = chromium("--dump-dom", check.as_uri())
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(sizes) == len(files) + len(images) and all(int(s.split("x")[0]) > 0 for s in sizes), sizes
    shot = out / "screenshot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,3000", html_path.as_uri())
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    assert (
        len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50
    )  # text and figures, not one colour

    # The same files are on the parent run, under report/.
    logged = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent, "report")}
    assert {"report/report.html", "report/report.json", "report/cost.png"} <= logged


@pytest.mark.parametrize(
    ("env", "flag", "named"),
    [("junk://x", None, "MLFLOW_TRACKING_URI"), (None, "junk://x", "--tracking-uri"), (None, None, None)],
    ids=["environment", "flag", "default"],
)
def test_report_names_where_its_store_uri_came_from(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: str | None,
    flag: str | None,
    named: str | None,
) -> None:
    from sweeps.report import main

    monkeypatch.chdir(tmp_path)  # the default store, sqlite:///mlflow.db, is not there
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert main(["--experiment", "x", *(["--tracking-uri", flag] if flag else [])]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    if named is None:
        assert line.startswith("error: --tracking-uri (default): sqlite:///mlflow.db: no such file")
    else:
        assert line.startswith(f"error: {named}: junk://x: unsupported scheme 'junk'")
    assert not (tmp_path / "mlflow.db").exists()


def test_report_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    from sweeps.report import main

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("plain")
    run_id = client.create_run(exp).info.run_id
    capsys.readouterr()  # MLflow's own log lines from creating the store
    cases = [
        (["--experiment", "nope", "--tracking-uri", uri], "no experiment 'nope'"),
        (["--experiment", "plain", "--tracking-uri", uri], "holds no sweep"),
        (["--experiment", "plain", "--parent", run_id, "--tracking-uri", uri], "is not a sweep"),
        (["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/missing.db"], "no such file"),
        (["--experiment", "x", "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow server"),
        # checked before the store is read: a sweep's figures are never drawn for nothing
        (
            ["--experiment", "plain", "--tracking-uri", uri, "--out", f"{tmp_path}/a_file/report"],
            f"--out: cannot write to {tmp_path}/a_file/report: {tmp_path}/a_file is a file, not a directory",
        ),
        (["--experiment", "plain", "--tracking-uri", uri, "--out", ""], "--out: an empty path"),
        # files that are not MLflow stores stay as they were: MLflow would have created its tables in them
        (
            ["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/empty.db"],
            f"--tracking-uri: sqlite:///{tmp_path}/empty.db: an empty file, not an MLflow store",
        ),
        (
            ["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/app.db"],
            f"--tracking-uri: sqlite:///{tmp_path}/app.db: {tmp_path}/app.db is another application's SQLite "
            "database (tables: notes)",
        ),
        # a folder that is not an earlier report: rebuilding there would delete its PNGs and log the rest
        (
            ["--experiment", "plain", "--tracking-uri", uri, "--out", f"{tmp_path}/mine"],
            f"--out: {tmp_path}/mine holds files a report does not write (notes.txt)",
        ),
        (
            ["--experiment", "plain", "--tracking-uri", uri, "--out", f"{tmp_path}/pictures"],
            f"--out: {tmp_path}/pictures has no report.html or report.json, so it is not an earlier report",
        ),
        (
            ["--experiment", "plain", "--tracking-uri", uri, "--out", f"{tmp_path}/run/checkpoints"],
            f"--out: {tmp_path}/run/checkpoints is part of the run at {tmp_path}/run",
        ),
    ]
    (tmp_path / "a_file").write_text("kept\n")
    (tmp_path / "empty.db").write_bytes(b"")
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        conn.execute("CREATE TABLE notes (text)")
        conn.commit()
    app_db = (tmp_path / "app.db").read_bytes()
    (tmp_path / "mine").mkdir()
    for name in ("holiday.png", "notes.txt", "report.json"):
        (tmp_path / "mine" / name).write_text(name)
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "holiday.png").write_text("kept")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "summary.json").write_text("{}")
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (args, err)
    assert not (tmp_path / "missing.db").exists()  # a wrong path never creates an empty store
    assert (tmp_path / "a_file").read_text() == "kept\n"
    assert sorted(p.read_text() for p in (tmp_path / "mine").iterdir()) == [
        "holiday.png",
        "notes.txt",
        "report.json",
    ]
    assert (tmp_path / "pictures" / "holiday.png").read_text() == "kept"
    assert (tmp_path / "empty.db").read_bytes() == b"" and (tmp_path / "app.db").read_bytes() == app_db

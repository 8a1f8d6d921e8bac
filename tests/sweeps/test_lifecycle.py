"""A spec's sweeps: each run a new sweep, --resume the latest or a named one, their states, warm start.

The end-to-end part runs real --local sweeps (real Fashion-MNIST, a real MLflow sqlite store); the rest
uses real sweep directories and `sweep.json` files, and a real Optuna journal.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from sweeps import lifecycle
from sweeps.lifecycle import SweepNotFound, SweepState
from sweeps.spec import load_spec
from sweeps.status import main as status_main
from sweeps.status import status_lines
from tests.sweeps.conftest import sweep_cmd, tiny_spec

ROOT = Path(__file__).resolve().parents[2]
ONE_EPOCH = ("--set", "base.schedule.epochs=1")


def _state(name: str, **changes: object) -> SweepState:
    fields: dict[str, object] = {
        "name": name,
        "spec": "s",
        "local": False,
        "state": "finished",
        "trials_total": 2,
        "metric": "val/knn_top1/mean_emb",
        "mode": "max",
        "tracking_uri": "sqlite:////nowhere/mlflow.db",
        "experiment": "e",
    }
    return SweepState(**{**fields, **changes})  # type: ignore[arg-type]


def _make(storage: Path, name: str, **changes: object) -> Path:
    d = storage / name
    d.mkdir(parents=True)
    lifecycle.write_state(d, _state(name, **changes))
    return d


# --- naming, the latest sweep, states (real directories and state files) ------------------------------


def test_new_sweeps_are_numbered_after_every_name_taken(tmp_path: Path) -> None:
    first = lifecycle.new_sweep_dir(tmp_path, "s", local=False)
    second = lifecycle.new_sweep_dir(tmp_path, "s", local=False)
    local = lifecycle.new_sweep_dir(tmp_path, "s", local=True)
    assert [first.name, second.name, local.name] == ["s", "s-2", "s_local"]
    (tmp_path / "s-7").mkdir()  # a name taken by anything is never reused, nor one below it
    assert lifecycle.new_sweep_dir(tmp_path, "s", local=False).name == "s-8"


def test_resume_picks_the_latest_sweep_of_the_spec_and_mode(tmp_path: Path) -> None:
    _make(tmp_path, "s")
    _make(tmp_path, "s-2")
    _make(tmp_path, "s-3", spec="s-3")  # spec `s-3`'s first sweep, not a sweep of `s`
    _make(tmp_path, "s_local", local=True)
    assert lifecycle.sweep_to_resume(tmp_path, "s", False, None, "spec.yaml").name == "s-2"
    assert lifecycle.sweep_to_resume(tmp_path, "s", True, None, "spec.yaml").name == "s_local"
    assert lifecycle.sweep_to_resume(tmp_path, "s", False, "s", "spec.yaml").name == "s"
    with pytest.raises(SweepNotFound, match="is a sweep of spec 's-3'"):
        lifecycle.sweep_to_resume(tmp_path, "s", False, "s-3", "spec.yaml")
    with pytest.raises(SweepNotFound, match="expected one of: s, s-2"):
        lifecycle.sweep_to_resume(tmp_path, "s", False, "s_local", "spec.yaml")
    with pytest.raises(SweepNotFound, match="no sweep of 'other'"):
        lifecycle.sweep_to_resume(tmp_path, "other", False, None, "spec.yaml")


def test_a_sweep_whose_driver_runs_is_not_resumed_and_a_dead_driver_means_interrupted(tmp_path: Path) -> None:
    _make(tmp_path, "s", state="running", pid=os.getpid())
    with pytest.raises(SweepNotFound, match=f"still running \\(pid {os.getpid()}"):
        lifecycle.sweep_to_resume(tmp_path, "s", False, None, "spec.yaml")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has exited and was reaped
    _make(tmp_path, "s-2", state="running", pid=gone.pid)
    state = lifecycle.read_state(tmp_path / "s-2")
    assert state is not None and state.shown_state() == "interrupted"
    assert lifecycle.sweep_to_resume(tmp_path, "s", False, None, "spec.yaml").name == "s-2"
    other_host = _state("x", state="running", host="another-machine")
    assert other_host.shown_state() == "running (on another-machine)"


def test_state_is_written_whole_and_read_back(tmp_path: Path) -> None:
    d = _make(tmp_path, "s", parent_run_id="abc")
    before = lifecycle.read_state(d)
    assert before is not None
    after = lifecycle.write_state(d, before, state="interrupted", reason="Ctrl-C or SIGTERM")
    assert lifecycle.read_state(d) == after
    assert after.parent_run_id == "abc" and after.started == before.started
    assert [p.name for p in d.iterdir()] == [lifecycle.STATE_FILE]  # no temporary file left behind


def test_status_of_a_path_that_holds_no_sweeps_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_file").write_text("")
    for path, what in ((tmp_path / "missing", "no such directory"), (tmp_path / "a_file", "a file")):
        assert status_main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {path}: {what}; expected a sweep spec's storage_path\n"


def test_space_hash_is_the_space_not_its_order_and_base_hash_ignores_where_a_run_executes(
    tmp_path: Path,
) -> None:
    for sub in "abc":
        (tmp_path / sub).mkdir()
    a = tiny_spec(tmp_path / "a", "h")
    b = tiny_spec(
        tmp_path / "b",
        "h",
        space={"loss.inv_weight": {"loguniform": [5.0, 50.0]}, "patch.size": {"choice": [10, 14]}},
    )
    c = tiny_spec(tmp_path / "c", "h", space={"patch.size": {"choice": [10, 12]}})
    (sa, ba), (sb, _), (sc, _) = (load_spec(p) for p in (a, b, c))
    assert lifecycle.space_hash(sa) == lifecycle.space_hash(sb) != lifecycle.space_hash(sc)
    elsewhere = load_spec(a, ["base.data.root=/elsewhere", "base.run.threads=1"])[1]
    assert lifecycle.base_hash(ba) == lifecycle.base_hash(elsewhere)
    longer = load_spec(a, ["base.schedule.epochs=5"])[1]
    assert lifecycle.base_hash(ba) != lifecycle.base_hash(longer)


# --- end to end: real --local sweeps ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """The same tiny spec run twice, then `--resume`d: the store, the spec and the three outputs."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    spec = tiny_spec(tmp, "twice", num_samples=1)
    outs = []
    for extra in ((), (), ("--resume",)):
        proc = subprocess.run(
            sweep_cmd(spec, "--local", *ONE_EPOCH, *extra),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
    return tmp, spec, outs


@pytest.mark.slow
def test_running_a_spec_twice_gives_two_sweeps_and_resume_continues_the_latest(
    two_sweeps: tuple[Path, Path, list[str]],
) -> None:
    tmp, spec_path, (first, second, resumed) = two_sweeps
    storage = tmp / "storage"
    assert "sweep twice_local: new" in first
    assert "sweep twice_local-2: new" in second
    assert "sweep twice_local-2: resuming" in resumed
    assert sorted(p.name for p in storage.iterdir()) == ["twice_local", "twice_local-2"]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("twice")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.data.tags["bagssl.sweep"]: r for r in runs if r.data.tags.get("bagssl.role") == "sweep"}
    # One parent run per sweep; the resumed sweep reopened its own, and its trial kept one child run.
    assert set(parents) == {str(storage / "twice_local"), str(storage / "twice_local-2")}
    latest = parents[str(storage / "twice_local-2")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest.info.run_id]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    spec, base = load_spec(spec_path, ONE_EPOCH[1:])
    for p in parents.values():
        assert p.info.status == "FINISHED"
        assert p.data.tags["bagssl.spec"] == "twice"
        assert p.data.tags["bagssl.space_hash"] == lifecycle.space_hash(spec)
        assert p.data.tags["bagssl.base_hash"] == lifecycle.base_hash(base)
    states = [lifecycle.read_state(storage / n) for n in ("twice_local", "twice_local-2")]
    assert [(s.state, s.exit_code, s.parent_run_id) for s in states if s] == [
        ("finished", 0, parents[str(storage / "twice_local")].info.run_id),
        ("finished", 0, latest.info.run_id),
    ]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_status_lists_each_sweep_with_its_state_trials_and_best(
    two_sweeps: tuple[Path, Path, list[str]],
) -> None:
    tmp, _, _ = two_sweeps
    storage = tmp / "storage"
    lines = status_lines(storage)
    assert lines[0].split()[:5] == ["sweep", "spec", "mode", "state", "trials"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"twice_local", "twice_local-2"}
    for row in rows.values():
        cells = row.split()
        assert cells[1:5] == ["twice", "local", "finished", "1/1"]
        assert float(cells[5]) >= 0 and cells[6].startswith("[")  # the value and its 95% interval
    # A sweep whose driver died without saying so is shown as interrupted.
    state = lifecycle.read_state(storage / "twice_local")
    assert state is not None
    gone = subprocess.Popen(["true"])
    gone.wait()
    lifecycle.write_state(storage / "twice_local", state, state="running", pid=gone.pid)
    assert status_lines(storage, spec="twice")[1].split()[3] == "interrupted"
    lifecycle.write_state(storage / "twice_local", state)


@pytest.mark.slow
def test_warm_start_seeds_the_new_study_with_the_earlier_finished_trials(
    two_sweeps: tuple[Path, Path, list[str]],
) -> None:
    from sweeps.searcher import warm_start_trials
    from sweeps.space import param_space
    from sweeps.tracking import MlflowTracker
    from sweeps.tuner import search_algorithm

    tmp, spec_path, _ = two_sweeps
    spec, base = load_spec(spec_path, ["search.warm_start=true", "base.schedule.epochs=1"])
    sweep = tmp / "storage" / "twice"  # the Ray sweep that would start next
    tracker = MlflowTracker(f"sqlite:///{tmp}/mlflow.db", "twice", sweep_key=str(sweep))
    earlier = tracker.earlier_finished_trials(lifecycle.space_hash(spec), lifecycle.base_hash(base))
    assert len(earlier) == 2  # the one trial of each --local sweep
    assert tracker.earlier_finished_trials("another-space", lifecycle.base_hash(base)) == []
    warm = warm_start_trials(spec, earlier)
    assert len(warm) == 2
    searcher = search_algorithm(spec, 1, str(sweep), 1, warm)
    searcher.set_search_properties(spec.metric, spec.mode, param_space(spec))  # as Tune does at start
    from sweeps.searcher import journal_storage

    study = optuna.load_study(study_name=spec.name, storage=journal_storage(str(sweep)))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # Each earlier trial as it was: its sampled values (read back from MLflow's strings) and its
    # validation objective, the value it reported under the spec's metric.
    assert sorted(
        (t.params["patch.size"], str(t.params["loss.inv_weight"]), t.value) for t in trials
    ) == sorted(
        (int(params["trial.patch.size"]), params["trial.loss.inv_weight"], metrics[spec.metric])
        for _, params, metrics in earlier
    )
    assert isinstance(trials[0].distributions["loss.inv_weight"], optuna.distributions.FloatDistribution)

"""A spec's sweeps: each run a new sweep, --resume the latest or a named one, their states, warm start.

The end-to-end part runs real --local sweeps (real Fashion-MNIST, a real MLflow sqlite store); the rest
uses real sweep directories and `sweep.json` files, and a real Optuna journal.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from sweeps import lifecycle
from sweeps.lifecycle import StateUnreadable, SweepNotFound, SweepState
from sweeps.run import EXIT_BAD_INPUT, storage_root
from sweeps.run import main as run_main
from sweeps.spec import SpecError, load_spec
from sweeps.status import main as status_main
from sweeps.status import status_lines
from tests.sweeps.conftest import empty_mlflow_store, sweep_cmd, tiny_spec

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


# --- a sweep.json that cannot be read (real files, as a crash, a full disk or a hand edit leave them) ---


def _good_state(name: str) -> dict[str, object]:
    return asdict(_state(name))


ANY_STATE = "; expected the JSON object a sweep's driver writes"
# case -> what is written at sweep.json (None: a directory there), and the problem the message names
CORRUPT: dict[str, tuple[bytes | None, str]] = {
    "empty": (b"", "empty" + ANY_STATE),
    "invalid_json": (
        b'{"name": "s-2", "spec": ',
        "not valid JSON (Expecting value: line 1 column 25 (char 24))" + ANY_STATE,
    ),
    "a_list": (b"[1, 2]", "holds a list" + ANY_STATE),
    "json_null": (b"null", "holds null" + ANY_STATE),
    "missing_fields": (
        json.dumps({k: v for k, v in _good_state("s-2").items() if k not in ("spec", "pid")}).encode(),
        "missing spec, pid" + ANY_STATE,
    ),
    "pid_not_a_number": (
        json.dumps({**_good_state("s-2"), "pid": "abc"}).encode(),
        'pid: "abc"; expected a process id (a positive integer)',
    ),
    "pid_negative": (
        json.dumps({**_good_state("s-2"), "pid": -1}).encode(),
        "pid: -1; expected a process id (a positive integer)",
    ),
    "tracking_uri_null": (
        json.dumps({**_good_state("s-2"), "tracking_uri": None}).encode(),
        "tracking_uri: null; expected a string",
    ),
    "local_not_a_bool": (
        json.dumps({**_good_state("s-2"), "local": "no"}).encode(),
        'local: "no"; expected true or false',
    ),
    "unknown_state": (
        json.dumps({**_good_state("s-2"), "state": "paused"}).encode(),
        'state: "paused"; expected running or interrupted or finished',
    ),
    "not_utf8": (b"\xff\xfe{}", "not UTF-8 text" + ANY_STATE),
    "a_directory": (None, "a directory; expected the JSON file a sweep's driver writes"),
}


def _corrupt(sweep_dir: Path, case: str) -> Path:
    """A sweep directory whose sweep.json holds the case; the path of that sweep.json."""
    content, _ = CORRUPT[case]
    sweep_dir.mkdir(parents=True)
    state_file = sweep_dir / lifecycle.STATE_FILE
    if content is None:
        state_file.mkdir()
        (state_file / "kept").write_text("kept\n")
    else:
        state_file.write_bytes(content)
    return state_file


def _summary(problem: str) -> str:
    """A status row's note: the problem without what every sweep.json is expected to hold."""
    return problem.removesuffix(ANY_STATE)


def _contents(path: Path) -> object:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes()


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_an_unreadable_sweep_json_is_listed_as_unreadable_and_never_resumed(
    tmp_path: Path, case: str
) -> None:
    _make(tmp_path, "s")
    state_file = _corrupt(tmp_path / "s-2", case)
    before = _contents(state_file)
    problem = CORRUPT[case][1]

    with pytest.raises(StateUnreadable) as unreadable:
        lifecycle.read_state(tmp_path / "s-2")
    assert str(unreadable.value).startswith(f"{state_file}: {problem}")

    # The status lists both sweeps, the unreadable one with why.
    rows = {line.split()[0]: line for line in status_lines(tmp_path)[1:]}
    assert set(rows) == {"s", "s-2"}
    assert rows["s"].split()[1:4] == ["s", "ray", "finished"]
    assert f"unreadable (sweep.json: {_summary(problem)})" in rows["s-2"]
    assert status_lines(tmp_path, spec="s")[1:] == status_lines(tmp_path)[1:]
    assert status_lines(tmp_path, spec="other")[1:] == []

    # Resuming it, by name or as the latest, is refused with one message naming the file.
    with pytest.raises(SweepNotFound) as named:
        lifecycle.sweep_to_resume(tmp_path, "s", False, "s-2", "spec.yaml")
    assert str(named.value).startswith(f"spec.yaml: --resume s-2: cannot be resumed: {state_file}: {problem}")
    with pytest.raises(SweepNotFound) as latest:
        lifecycle.sweep_to_resume(tmp_path, "s", False, None, "spec.yaml")
    assert str(latest.value).startswith(
        f"spec.yaml: --resume: the latest sweep, s-2, cannot be resumed: {state_file}: {problem}"
    )
    assert "\n" not in str(named.value) + str(latest.value)
    # Whose sweep it is cannot be told: it is not listed as the spec's, and the next sweep goes after it.
    assert lifecycle.spec_sweeps(tmp_path, "s", False) == [tmp_path / "s"]
    assert lifecycle.new_sweep_dir(tmp_path, "s", False).name == "s-3"
    assert _contents(state_file) == before  # left as it was


def test_an_unreadable_older_sweep_does_not_stop_resuming_the_latest(tmp_path: Path) -> None:
    state_file = _corrupt(tmp_path / "s", "invalid_json")
    _make(tmp_path, "s-2", state="interrupted")
    assert lifecycle.sweep_to_resume(tmp_path, "s", False, None, "spec.yaml").name == "s-2"
    with pytest.raises(SweepNotFound, match=r"expected one of: s-2$"):
        lifecycle.sweep_to_resume(tmp_path, "s", False, "s-9", "spec.yaml")
    assert state_file.read_bytes() == CORRUPT["invalid_json"][0]


@pytest.mark.parametrize("case", ["empty", "pid_not_a_number", "a_directory"])
def test_cli_resume_and_status_of_a_sweep_whose_sweep_json_is_unreadable(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m sweeps.run SPEC --resume [NAME]` refuses, in one line naming the file, and writes nothing;
    `python -m sweeps.status` lists the sweep as unreadable beside the others and exits 0."""
    spec = tiny_spec(tmp_path, "c")
    capsys.readouterr()  # MLflow's log of the template store tiny_spec may create: not the run's output
    storage = tmp_path / "storage"
    _make(storage, "c_local", spec="c", local=True)
    state_file = _corrupt(storage / "c_local-2", case)
    before = _contents(state_file)
    problem = CORRUPT[case][1]
    for resume in (["--resume", "c_local-2"], ["--resume"]):
        assert run_main([str(spec), "--local", *resume]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{state_file}: {problem}" in err
        assert "Traceback" not in err
    assert _contents(state_file) == before
    assert sorted(p.name for p in storage.iterdir()) == ["c_local", "c_local-2"]  # no new sweep either
    good = lifecycle.read_state(storage / "c_local")
    assert good is not None and good.state == "finished"  # the other sweep untouched too

    proc = subprocess.run(
        [sys.executable, "-m", "sweeps.status", str(storage)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"c_local", "c_local-2"}
    assert f"unreadable (sweep.json: {_summary(problem)})" in rows["c_local-2"]
    assert _contents(state_file) == before


# --- status when a sweep's MLflow store cannot be read (real stores and files) --------------------------


def test_status_shows_a_sweep_whose_store_cannot_be_read_as_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "notes.txt").write_text("not a database\n")
    (tmp_path / "empty.db").write_bytes(b"")
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        conn.execute("CREATE TABLE notes (text)")
        conn.commit()
    empty_mlflow_store(tmp_path / "mlflow.db")  # a real store, without the sweep's parent run
    stores = {
        "a-dir": (f"sqlite:///{tmp_path / 'a_dir'}", f"store not a file: {tmp_path / 'a_dir'}"),
        "b-gone": (f"sqlite:///{tmp_path / 'gone.db'}", f"store gone: {tmp_path / 'gone.db'}"),
        "c-empty": (f"sqlite:///{tmp_path / 'empty.db'}", f"store empty: {tmp_path / 'empty.db'}"),
        "d-not-sqlite": (
            f"sqlite:///{tmp_path / 'notes.txt'}",
            f"store not MLflow's: {tmp_path / 'notes.txt'}",
        ),
        # another application's database: MLflow would have added its tables beside the application's
        "d2-foreign": (f"sqlite:///{tmp_path / 'app.db'}", f"store not MLflow's: {tmp_path / 'app.db'}"),
        "e-no-run": (f"sqlite:///{tmp_path / 'mlflow.db'}", "MLflow: MlflowException: "),
        "f-bogus": ("bogus://x", "MLflow: UnsupportedModelRegistryStoreURIException: "),
        "g-no-server": ("http://127.0.0.1:9", "no answer from http://127.0.0.1:9"),
        "h-in-memory": ("sqlite://", "not a sqlite:///path store: sqlite://"),
    }
    for name, (uri, _) in stores.items():
        _make(storage, name, spec=name, tracking_uri=uri, parent_run_id="0123456789abcdef")
    _make(storage, "i-no-run-yet", spec="i-no-run-yet")  # no parent run yet: unknown, with nothing to say
    # Beside them, a sweep whose store answers: its row is whole. Two trials ended, one still runs.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("ok")
    parent = client.create_run(exp, tags={"bagssl.role": "sweep"}).info.run_id
    for i, value in enumerate([0.7, 0.8, None]):
        tags = {"mlflow.parentRunId": parent, "bagssl.role": "trial", "bagssl.trial_id": f"t_{i}"}
        run = client.create_run(exp, tags=tags).info.run_id
        if value is not None:
            client.log_metric(run, "val/knn_top1/mean_emb", value, step=1)
            client.set_terminated(run, "FINISHED")
    _make(
        storage, "0-ok", spec="0-ok", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", parent_run_id=parent
    )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()  # MLflow's log of creating the template store: not the status's output

    assert status_main([str(storage)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {*stores, "i-no-run-yet", "0-ok"}
    assert rows["0-ok"].split()[1:7] == ["0-ok", "ray", "finished", "2/2", "0.80", "(t_1)"]
    for name, (_, note) in stores.items():
        assert rows[name].split()[1:5] == [name, "ray", "finished", "?"], rows[name]
        assert f"? ({note}" in rows[name], rows[name]
    assert rows["i-no-run-yet"].split()[4:6] == ["?", "?"]
    # Nothing was created or changed: no store where one was gone, no tables in the empty file.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / "gone.db").exists()


# --- storage_path -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("storage_path", "message"),
    [
        (
            "",
            "storage_path: '' is empty; expected a directory (default ./sweeps_storage) or a URI such as "
            "s3://bucket/path",
        ),
        ("s3://", "storage_path: s3://: no bucket after s3://; expected s3://BUCKET[/PATH]"),
        ("s3:///sweeps", "storage_path: s3:///sweeps: no bucket after s3://; expected s3://BUCKET[/PATH]"),
        ("gs:////", "storage_path: gs:////: no bucket after gs://; expected gs://BUCKET[/PATH]"),
        ("file:///", "storage_path: file:///: no path after file://; expected file:///PATH"),
        (
            "://sweeps",
            "storage_path: ://sweeps: no scheme before ://; expected a URI such as s3://bucket/path",
        ),
    ],
)
def test_a_storage_path_naming_no_place_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    storage_path: str,
    message: str,
) -> None:
    """Before, `s3://` became the local directory `./s3:` and `''` the working directory itself."""
    spec = tiny_spec(tmp_path, "p")
    capsys.readouterr()  # MLflow's log of the template store tiny_spec may create: not the run's output
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run_main([str(spec), "--local", "--set", f"storage_path={storage_path}"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(work.iterdir()) == []  # nothing made where the driver runs
    with pytest.raises(SpecError, match=r"^storage_path: "):
        storage_root(load_spec(spec, [f"storage_path={storage_path}"])[0])


def test_a_storage_path_naming_a_place_is_kept(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "p")
    for given, root in [
        ("s3://bucket/", "s3://bucket"),
        ("s3://bucket/sweeps//", "s3://bucket/sweeps"),
        ("file:///tmp/sweeps", "file:///tmp/sweeps"),
        (str(tmp_path / "here"), str(tmp_path / "here")),
    ]:
        assert storage_root(load_spec(spec, [f"storage_path={given}"])[0]) == root


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


def _local_sweep(spec: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m sweeps.run SPEC --local` for one epoch, with `args`, as a user runs it."""
    return subprocess.run(
        sweep_cmd(spec, "--local", *ONE_EPOCH, *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """The same tiny spec run twice, then `--resume`d: the store, the spec and the three outputs."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    spec = tiny_spec(tmp, "twice", num_samples=1)
    outs = []
    for extra in ((), (), ("--resume",)):
        proc = _local_sweep(spec, *extra)
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
def test_resume_refuses_a_spec_other_than_the_one_the_sweep_ran(
    two_sweeps: tuple[Path, Path, list[str]],
) -> None:
    """Another objective or trial count would mix two sweeps under one parent run: refused before anything
    is written, each differing key named; a knob of how patiently trials run may change."""
    tmp, spec, _ = two_sweeps
    state_file = tmp / "storage" / "twice_local-2" / lifecycle.STATE_FILE
    before = state_file.read_bytes()
    changed = ("--set", "num_samples=2", "--set", "metric=train/loss", "--set", "mode=min")
    proc = _local_sweep(spec, "--resume", *changed, "--set", "failure.max_retries=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(
        f"error: {spec}: --resume twice_local-2: the sweep ran another spec: metric: sweep has "
        "val/knn_top1/mean_emb, given train/loss; mode: sweep has max, given min; num_samples: sweep has 1, "
        "given 2; expected the sweep's own spec"
    ), line
    assert "failure" not in line.partition("expected")[0]
    assert state_file.read_bytes() == before


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

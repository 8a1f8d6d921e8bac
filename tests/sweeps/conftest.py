"""Real Ray clusters on this machine for the sweeps under test, which join them with --address.

`ray_address`: a single-node Ray, which every test asking for it shares. Starting Ray costs 5-14 s here and
a second Ray on the machine confuses Train's placement-group cleaner unless its dashboard is pinned
(docs/operations.md, "The dashboard").

`two_nodes`: a head and a second node that joins it, both started with `ray start` as on a real
cluster, each with its own temp dir, ports and a resource naming it; for the multi-node and fault tests
(a fault test that loses the second node starts it again). `spread_sweep`: the one sweep that two of those
tests read, the multi-node test and the Train-worker fault, run once for both.

Each cluster starts for the first test that asks for it and stops as soon as the next test does not:
an idle Ray node's daemons take about 6% of a core here, and its log monitor more as its log files pile
up (docs/operations.md, "Costs"). tests/conftest.py sends each cluster's tests to one test worker, one
after another, so the suite starts each once.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sweeps.ray_env import PREEMPTION_WATCHER, free_port, has_auth_token

ROOT = Path(__file__).resolve().parents[2]


def ensure_ray_token() -> None:
    """Give this machine a Ray auth token before any cluster of the session starts, as the first local
    `ray.init` on it would (`ray get-auth-token --generate`; nothing is done where one exists).

    Why: a head started without a token runs without authentication, and the first sweep that starts its own
    Ray creates the token, after which every driver joining that head turns token auth on and is cut off
    from it (docs/operations.md, "Token authentication"). With the token there first, every cluster and
    driver of the session uses it; the mixed case is tested on its own
    (test_ray_sweep.py::test_a_cluster_without_token_auth_joined_by_a_driver_with_it_is_refused_at_start)."""
    # Under a lock: the suite's parallel workers (tests/conftest.py) may both find no token at once, and two
    # generations would leave the clusters of the one that wrote first holding a token that is no longer
    # the machine's.
    with open(Path(tempfile.gettempdir()) / "bagssl-tests-ray-token.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not has_auth_token():
            subprocess.run(
                [_ray_bin(), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120
            )


# A shared cluster's fixture name -> what it gives the tests, and how to stop it.
_RUNNING: dict[str, tuple[Any, Callable[[], None]]] = {}


def _shared(name: str, start: Callable[[], tuple[Any, Callable[[], None]]]) -> Any:
    """The running cluster of fixture `name`, started (`start()`) if none runs."""
    if name not in _RUNNING:
        _RUNNING[name] = start()
    return _RUNNING[name][0]


def _stop_unused(nextitem: pytest.Item | None) -> None:
    for name in list(_RUNNING):
        if nextitem is None or name not in nextitem.fixturenames:
            _RUNNING.pop(name)[1]()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop each shared cluster that the next test does not use. Under xdist `nextitem` is None whenever a
    worker has no further test queued, as when pytest tears down its session fixtures there too."""
    _stop_unused(nextitem)


def pytest_sessionfinish(session: pytest.Session) -> None:
    _stop_unused(None)  # an interrupted session stops its clusters too


@pytest.fixture
def ray_address() -> str:
    return _shared("ray_address", _start_single_node)


def _start_single_node() -> tuple[str, Callable[[], None]]:
    ensure_ray_token()
    port, dash = free_port(), free_port()
    # Short, because Ray's unix sockets live under it (at most 107 bytes a path); its own, so that only this
    # cluster's processes are stopped at the end: `ray stop` would stop every Ray on the machine, a
    # parallel test worker's too.
    temp_dir = Path(tempfile.mkdtemp(prefix="bgr", dir="/tmp"))
    # As a sweep's own local Ray: the dashboard pinned for Train's placement-group cleaner, and a
    # 'trial_slot' per core for the trials' own actors (docs/operations.md, "The dashboard", "Resources").
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", {"head": temp_dir}, temp_dir, env)
    try:
        start_node(
            env,
            temp_dir,
            "head",
            {"trial_slot": 2},
            24000,
            "--head",
            f"--port={port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            cpus=2,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster.address, cluster.stop


def _ray_bin() -> str:
    return shutil.which("ray") or str(Path(sys.executable).parent / "ray")


@dataclass
class LocalCluster:
    """A Ray cluster on this machine, each node a `ray start` with its own temp dir: the head, and for the
    multi-node tests `node2`.

    Attributes:
        address: the GCS address a sweep joins (--address).
        dashboard: the head's dashboard (`ray job submit --address`, the State API).
        temp_dirs: node name -> the node's Ray temp dir, which every one of its daemons names on its
            command line: how the node's own processes are told apart from any other Ray's.
        root: the directory that holds the temp dirs, removed by `stop`.
    """

    address: str
    dashboard: str
    temp_dirs: dict[str, Path]
    root: Path
    env: dict[str, str]  # for a client of this cluster (`ray job submit`, `ray list`)
    node_ids: dict[str, str] = field(default_factory=dict)  # node name -> Ray node id

    def node_pids(self, node: str) -> set[int]:
        """The node's Ray daemons (raylet, GCS, dashboard, agents...) and every process under them."""
        procs = _processes()
        mark = str(self.temp_dirs[node])
        # Not this process nor those above it: a test's own command line may name the temp dir too.
        mine, pid = set(), os.getpid()
        while pid in procs and pid not in mine:
            mine.add(pid)
            pid = procs[pid][0]
        found = {pid for pid, (_, cmdline) in procs.items() if mark in cmdline} - mine
        while True:  # add children until none is new: Ray's workers are the raylet's children
            more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
            if not more:
                return found
            found |= more

    def start_second_node(self) -> None:
        """`ray start` the second node, joined to the head (again, after `kill_node`: a new node id)."""
        start_node(self.env, self.temp_dirs["node2"], "node2", {}, 22000, f"--address={self.address}")
        # The node killed before may still be listed ALIVE until the GCS's health check marks it DEAD.
        self.node_ids = _node_ids(
            self.dashboard, self.env, gone=set(self.node_ids.values()) - {self.node_ids.get("head")}
        )

    def stop(self) -> None:
        """Kill every node, the head last, and remove their temp dirs. This cluster's processes only, by
        their pids: `ray stop` would stop every Ray on the machine, a parallel test worker's too."""
        for node in reversed(self.temp_dirs):
            self.kill_node(node)
        shutil.rmtree(self.root, ignore_errors=True)

    def kill_node(self, node: str) -> None:
        """SIGKILL every process of the node, as when its machine dies; the other node stays up."""
        pids = self.node_pids(node)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and pids & set(_processes()):
            time.sleep(0.2)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process, from /proc (psutil is not a dependency)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        # `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after the last ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":  # a zombie is dead already, only not yet reaped
            out[int(d.name)] = (int(ppid), cmdline)
    return out


def start_node(
    env: dict[str, str],
    temp_dir: Path,
    name: str,
    resources: dict[str, float],
    worker_ports: int,
    *args: str,
    cpus: int = 1,
) -> None:
    """`ray start` one node: `cpus` CPUs, `resources`, and a resource `node_<name>` that pins work to it.

    Ports a second Ray on this machine would also want are picked free; its workers bind ports from a
    range of its own, `worker_ports` and the 999 above (Ray's default range is the same for every node).

    Two of Ray's background services that no test reads are left off, where a user's cluster keeps them
    (their cost here: docs/operations.md, "Costs"):
    - the log monitor, which streams the workers' output to the drivers' consoles: the tests read what
      the sweeps write (MLflow, the storage path, Tune's results), never a worker's console;
    - Train's preemption watcher (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`, inherited by every Train
      controller of the node), an actor and its process per worker-group start, which reacts only to a
      node being drained, never done here: the fault tests kill processes and nodes outright.
    """
    lo = worker_ports
    cmd = [
        _ray_bin(),
        "start",
        *args,
        f"--num-cpus={cpus}",
        "--resources",
        json.dumps({**resources, f"node_{name}": 1}),
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 999}",
        "--disable-usage-stats",
        "--include-log-monitor=false",
    ]
    env = {**env, PREEMPTION_WATCHER: "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"ray start of {name} failed:\n{proc.stderr[-3000:]}"


def _node_ids(dashboard: str, env: dict[str, str], gone: Collection[str] = ()) -> dict[str, str]:
    """Node name -> Ray node id, from the State API (`ray list nodes`, in a process of its own: Ray reads
    its auth mode once, at import), by the `node_<name>` resource of each live node.

    A node SIGKILLed a moment ago stays ALIVE in the GCS until its health checks time out, beside the node
    started in its place under the same name; `gone` names such ids, and the listing is polled until every
    name has exactly one live node that is not among them.
    """
    cmd = [_ray_bin(), "list", "nodes", f"--address={dashboard}", "--detail", "--format=json"]
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ids: dict[str, set[str]] = {}
        for n in json.loads(proc.stdout):
            if n["state"] != "ALIVE" or n["node_id"] in gone:  # a node killed earlier stays listed, DEAD
                continue
            for k in n["resources_total"]:
                if k.startswith("node_"):
                    ids.setdefault(k[len("node_") :], set()).add(n["node_id"])
        if set(ids) == {"head", "node2"} and all(len(v) == 1 for v in ids.values()):
            return {name: next(iter(v)) for name, v in ids.items()}
        assert time.time() < deadline, f"live nodes by name, after 120 s: {ids}"
        time.sleep(1)


@pytest.fixture
def two_nodes() -> LocalCluster:
    return _shared("two_nodes", _start_two_nodes)


def _start_two_nodes() -> tuple[LocalCluster, Callable[[], None]]:
    ensure_ray_token()
    port, dash, client = free_port(), free_port(), free_port()
    # Short, because Ray's unix sockets live under it (at most 107 bytes a path).
    root = Path(tempfile.mkdtemp(prefix="bgr", dir="/tmp"))
    dirs = {"head": root / "head", "node2": root / "node2"}
    # The placement-group cleaner's State API, pinned for the workers of both nodes (docs/operations.md,
    # "The dashboard").
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    # The head turns token auth on by itself when this machine has a token; a node joining an explicit
    # address must be told (docs/operations.md, "Token authentication").
    join_env = {**env, "RAY_AUTH_MODE": "token"} if has_auth_token() and "RAY_AUTH_MODE" not in env else env
    cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", dirs, root, join_env)
    try:
        start_node(
            env,
            dirs["head"],
            "head",
            # The trials' own actors, and so their Train controllers (placed on the node of the actor that
            # starts them), stay on the head: losing the second node loses workers, never a whole trial.
            {"trial_slot": 2},
            21000,
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={client}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
        )
        cluster.start_second_node()
    except BaseException:
        cluster.stop()
        raise
    return cluster, cluster.stop


@dataclass
class SpreadSweep:
    """The sweep that the multi-node test and the worker-fault test both read, run once for the two.

    Submitted with `ray job submit --working-dir .` as the README says, to the 2-node cluster: two trials
    of one config and one seed (a grid of one point, run twice), each with 2 workers placed `spread`, one
    at a time. After the first trial's first epoch, its Train worker on the second node was SIGKILLed; the
    second trial ran uninterrupted, the first one's twin.

    Attributes:
        root: holds the spec, the MLflow store (`mlflow.db`) and the storage path (`storage/spread`).
        returncode, output: what `ray job submit` exited with and printed (the job's own output).
        node_ids: the cluster's node name -> Ray node id while the sweep ran (a later test may replace
            the second node).
        victim_trial: the Tune trial id of the interrupted trial.
        victim_pid: the pid of the worker killed.
    """

    root: Path
    returncode: int
    output: str
    node_ids: dict[str, str]
    victim_trial: str
    victim_pid: int


@pytest.fixture(scope="session")
def spread_sweep(tmp_path_factory: pytest.TempPathFactory) -> SpreadSweep:
    """Run `SpreadSweep` on the 2-node cluster, for the first test that asks for it. Each such test also
    asks for `two_nodes`, which keeps the cluster up while they run and sends them to its test worker."""
    cluster = _shared("two_nodes", _start_two_nodes)
    root = tmp_path_factory.mktemp("spread")
    spec = tiny_spec(
        root,
        "spread",
        num_samples=2,
        search={"algo": "grid"},
        space={"loss.inv_weight": {"grid": [25.0]}},
        scheduler={"name": "none"},
        resources={"workers_per_trial": 2, "cpus_per_worker": 1, "placement": "spread"},
    )
    job = f"bagssl-tests-spread-{os.getpid()}"
    cmd = [
        *(_ray_bin(), "job", "submit", f"--address={cluster.dashboard}", f"--submission-id={job}"),
        *("--working-dir", ".", "--", "python", "-m", "sweeps.run", str(spec)),
    ]
    log = root / "job.log"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True
    )
    try:
        rows = wait_for(
            "a trial's first epoch",
            lambda: {t: r for t, r in trial_rows(root / "mlflow.db").items() if r == ("RUNNING", 1)},
            proc,
        )
        (victim_trial,) = rows
        # Tune's actor and the Train controller sit on the head; on the second node only the workers.
        procs = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in cluster.node_pids("node2")}
        (victim,) = [pid for pid, cmdline in procs.items() if b"RayTrainWorker" in cmdline]
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:  # the job outlives its client: stop it, or it runs on into the next tests
            proc.kill()
            stop = [_ray_bin(), "job", "stop", f"--address={cluster.dashboard}", job]
            with contextlib.suppress(subprocess.TimeoutExpired):  # the failure that got here matters more
                subprocess.run(stop, env=cluster.env, capture_output=True, timeout=120)
    return SpreadSweep(root, code, log.read_text(), dict(cluster.node_ids), victim_trial, victim)


def trial_rows(db: Path) -> dict[str, tuple[str, int]]:
    """trial id -> (MLflow status, last epoch logged) of a sweep's trial runs, read while the sweep runs."""
    rows = store_rows(
        db,
        "SELECT t.value, r.status, (SELECT MAX(m.step) FROM metrics m "
        "  WHERE m.run_uuid = r.run_uuid AND m.key = 'epoch') "
        "FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'bagssl.trial_id' "
        "JOIN tags role ON role.run_uuid = r.run_uuid AND role.key = 'bagssl.role' "
        "AND role.value = 'trial'",
    )
    return {tid: (status, int(epoch or 0)) for tid, status, epoch in rows}


def wait_for(what: str, ready: Callable[[], Any], proc: subprocess.Popen, timeout: float = 600) -> Any:
    """Poll `ready()` each second until it returns something true, and return that; fail when `proc` (the
    sweep) ends first or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = ready()
        if found:
            return found
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before {what}"
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def store_rows(db: Path, query: str, *params: str) -> list[tuple[Any, ...]]:
    """The rows of `query` on the sweep's sqlite MLflow store, read-only and straight from the file while
    the sweep writes it: opening it with MLflow would race with the sweep creating its tables. No rows
    while the store or its tables do not exist yet, or while it is locked for a moment."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(query, params).fetchall()
    except sqlite3.OperationalError:
        return []


def sweep_runs(tmp_path: Path, experiment: str, role: str = "trial") -> tuple[list[Any], list[Any]]:
    """The sweep's parent runs and its children of one role (trial, or refine), from the sqlite store of
    `tiny_spec` under `tmp_path`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("bagssl.role") == "sweep"]
    return parents, [r for r in runs if r.data.tags.get("bagssl.role") == role]


def checkpoint_mtimes(run_dir: Path) -> dict[str, int]:
    """A Train run's checkpoint directories and their modification times (ns): unchanged after a resume
    means not trained again."""
    return {p.name: p.stat().st_mtime_ns for p in run_dir.glob("checkpoint_*")}


_EMPTY_STORE: list[Path] = []  # the session's empty MLflow store, made on first use


def empty_mlflow_store(db: Path) -> None:
    """Put an empty MLflow sqlite store at `db`, a copy of one MLflow created once for the session.

    MLflow creates a new sqlite store by running every one of its schema migrations: 3 to 7 s of CPU here,
    which each sweep under test would otherwise pay before its first trial. The copy is the real thing, a
    store at MLflow's current schema with its Default experiment. Creating a store from nothing stays
    tested where the store is the subject (tests/sweeps/test_tracking.py). An existing `db` is left as it
    is."""
    if db.exists():
        return
    if not _EMPTY_STORE:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="mlflow-empty-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()
        atexit.register(shutil.rmtree, template.parent, True)
        _EMPTY_STORE.append(template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], db)


def tiny_spec(tmp_path: Path, name: str, **changes: object) -> Path:
    """A real sweep on real Fashion-MNIST images, small enough for 2 cores: 2 epochs of 4 steps.

    The ImageNet-stem resnet18 by default: on 14-px patches it downsamples at once and probes 3x faster than
    the default resnet18_cifar, and these tests check the sweep machinery, not accuracy.

    64 of the 192 training images are the validation split the sweep selects on: with a tenth of 128
    (13 images) the trials tie so often that ASHA finds none below its cutoff and prunes nothing.

    No baselines (seconds of a sweep's start, before its first trial): `baselines=True` turns them on, as
    the end-to-end test does to check them.

    Its sqlite MLflow store starts as a copy of an empty one (`empty_mlflow_store`).
    """
    spec = {
        "name": name,
        "base": {
            "data": {
                "name": "fashion_mnist",
                "train_subset": 192,
                "val_size": 64,
                "test_subset": 64,
                "batch_size": 32,
            },
            "patch": {"num": 2, "input_size": 14},
            "model": {"backbone": "resnet18", "projector": [64, 64]},
            "schedule": {"epochs": 2, "warmup_epochs": 0.5},
            "eval": {"aggregation": ["mean_emb", "centre"], "grid_stride": 7, "every": 1, "linear_epochs": 2},
        },
        "space": {"patch.size": {"choice": [10, 14]}, "loss.inv_weight": {"loguniform": [5.0, 50.0]}},
        "search": {"algo": "optuna", "seed": 0, "n_startup_trials": 2},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "metric": "val/knn_top1/mean_emb",
        "mode": "max",
        "num_samples": 4,
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": name},
        "storage_path": str(tmp_path / "storage"),
        "failure": {"max_retries": 1},
        "baselines": False,
    }
    spec.update(changes)
    if "tracking" not in changes:
        empty_mlflow_store(tmp_path / "mlflow.db")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cmd(spec: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sweeps.run", str(spec), *args]


def tune_results(exp_dir: Path, trial_id: str = "") -> dict[str, list[dict]]:
    """Tune trial id -> every result Tune recorded for that trial, in order, read from the result.json
    files under the sweep's storage path (`exp_dir`); only the trials whose directory names `trial_id`
    when one is given. A trial that has reported nothing yet is left out."""
    out = {}
    for f in sorted(exp_dir.glob(f"*{trial_id}*/result.json")):
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        if lines:
            out[lines[0]["trial_id"]] = lines
    return out

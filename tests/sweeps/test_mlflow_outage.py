"""Fault: the MLflow server stops mid-sweep. A real `mlflow server` process, stopped with SIGKILL while a
real `--local` sweep trains on real images.

Lost when it comes back in time: nothing. The sweep holds its writes while the server does not answer,
training goes on, and the writes land in order once it answers again: every epoch of every trial once.
Lost when it does not come back: the writes held at the end, which the sweep names in one message as it
stops with exit code 3; what the server had stored before it stopped is all there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps.ray_env import free_port
from tests.sweeps.conftest import empty_mlflow_store, sweep_cmd, tiny_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Server:
    """`mlflow server` on a sqlite store and a port of its own, which can be killed and started again."""

    def __init__(self, root: Path):
        self.db = root / "mlflow.db"
        empty_mlflow_store(self.db)
        self.artifacts = root / "artifacts"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # Without MLflow's job runner (on by default since MLflow 3.x: a runner and seven huey consumer
        # processes for its GenAI jobs, each importing MLflow): tracking never uses it, and it made each
        # start cost about 60 s of CPU here instead of about 12 (docs/operations.md, "MLflow stopped
        # mid-sweep").
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # A session of its own: the server's workers die with it.
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
        )
        _wait_for("the MLflow server", self.answers, timeout=180)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def _one_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("mlflow_server"))  # a start costs 10-30 s: one for the module
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def server(_one_server: Server) -> Server:
    """The module's server, running (a test before may have left it stopped); each test its experiment."""
    if not _one_server.answers():
        _one_server.start()
    return _one_server


def _wait_for(what: str, ready: Callable[[], object], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def _epochs_logged(db: Path, experiment: str) -> int:
    """Epoch values in the store, read from its sqlite file (the server may be down)."""
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], "tags.`bagssl.role` = 'trial'")
    return sum(len(client.get_metric_history(r.info.run_id, "epoch")) for r in runs)


def _sweep_through_outage(
    spec: Path, server: Server, experiment: str, meanwhile: Callable[[Path], None] = lambda log: None
) -> tuple[int, str]:
    """Run a `--local` sweep, stop the server once the first epoch is stored, then `meanwhile(log)`; wait
    for the sweep to end. Returns its exit code and output."""
    log = spec.parent / "sweep.log"
    proc = subprocess.Popen(
        sweep_cmd(spec, "--local"), cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for("the first epoch in MLflow", lambda: _epochs_logged(server.db, experiment) >= 1)
        server.kill()
        meanwhile(log)
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log.read_text()


def _return_after_a_while(server: Server) -> Callable[[Path], None]:
    def meanwhile(log: Path) -> None:
        _wait_for("the sweep holding its writes", lambda: "does not answer" in log.read_text())
        time.sleep(10)  # more of the sweep's events meet the stopped server
        server.start()

    return meanwhile


def test_writes_held_while_the_server_is_down_land_once_it_answers(tmp_path: Path, server: Server) -> None:
    spec = tiny_spec(tmp_path, "outage", num_samples=2, tracking={"uri": server.uri, "experiment": "outage"})
    code, out = _sweep_through_outage(spec, server, "outage", _return_after_a_while(server))
    assert code == 0, out[-3000:]
    assert "MLflow answers again: every held write was sent" in out
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("outage")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bagssl.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("bagssl.role") == "trial"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:  # every epoch once, its probes with it
        for key in ("epoch", "train/loss", "val/knn_top1/mean_emb"):
            steps = [m.step for m in client.get_metric_history(c.info.run_id, key)]
            assert sorted(steps) == [1, 2], (c.info.run_name, key, steps)
        assert "test/knn_top1/mean_emb" in c.data.metrics


def test_a_server_that_never_returns_stops_the_sweep_with_one_message(tmp_path: Path, server: Server) -> None:
    tracking = {"uri": server.uri, "experiment": "gone", "outage_wait_s": 5}
    spec = tiny_spec(tmp_path, "gone", num_samples=1, tracking=tracking)
    code, out = _sweep_through_outage(spec, server, "gone")
    assert code == 3, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert str(spec) in errors[0] and "tracking.outage_wait_s=5 s" in errors[0]
    assert "trial local_00000: epoch 2" in errors[0] and "continue with:" in errors[0]
    # What the server stored before it stopped is intact: the first epoch.
    assert _epochs_logged(server.db, "gone") == 1

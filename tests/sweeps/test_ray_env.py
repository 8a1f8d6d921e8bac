"""sweeps.ray_env: the environment a sweep settles before Ray is imported or started."""

from __future__ import annotations

import os

import pytest

from sweeps.ray_env import prepare_ray_environment

WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@pytest.fixture(autouse=True)
def _own_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the environment, without what prepare_ray_environment sets or reads, for the test alone:
    what it sets must not reach the Ray clusters that later tests of this worker start."""
    names = {WATCHER, "RAY_AIR_NEW_OUTPUT", "RAY_ADDRESS"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["RAY_AUTH_MODE"] = "disabled"  # the token check stays out of these tests
    monkeypatch.setattr(os, "environ", env)


def test_the_sweeps_own_ray_runs_without_the_preemption_watcher() -> None:
    """A local Ray's workers inherit this environment at ray.init, and no node of it is ever drained."""
    prepare_ray_environment(None)
    assert os.environ[WATCHER] == "0"


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "ray://head:10001", "auto"])
def test_a_joined_cluster_keeps_its_own_preemption_watcher(address: str) -> None:
    prepare_ray_environment(address)
    assert WATCHER not in os.environ


def test_a_joined_cluster_named_by_ray_address_keeps_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    prepare_ray_environment(None)
    assert WATCHER not in os.environ


def test_the_users_own_setting_is_kept() -> None:
    os.environ[WATCHER] = "1"
    prepare_ray_environment(None)
    assert os.environ[WATCHER] == "1"

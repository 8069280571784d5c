"""The launcher's OpenMP setting for workers whose thread teams share cores (server/launcher.py)."""

from __future__ import annotations

import pytest

from configs.loader import load_config
from server.launcher import SHARED_CORES_SPINCOUNT, openmp_env


@pytest.fixture(autouse=True)
def no_user_setting(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)


def test_teams_on_shared_cores_spin_briefly():
    """sd on the default config: two 2-thread teams on cores [0, 1]. Catches the setting lost
    (each idle team's threads then spin on the cores the other worker is using)."""
    assert openmp_env(load_config(speculation__mode="sd")) == {"GOMP_SPINCOUNT": SHARED_CORES_SPINCOUNT}


@pytest.mark.parametrize("mode", ["ar", "lookup", "amusd"])
def test_workers_apart_or_alone_keep_the_default_spin(mode):
    """ar/lookup run no draft worker; amusd (not borrowing) pins the workers to a core each,
    one thread: a team that spins there hurts nobody, and a shorter spin would only slow its passes."""
    assert openmp_env(load_config(speculation__mode=mode, placement__amusd__borrow_draft_cores=False)) == {}


def test_a_target_borrowing_the_drafts_core_spins_briefly():
    """amusd on the default config: the target's team widens onto the draft's core in steps
    without drafts. Catches the borrowed core left to a pool thread spinning after a wide
    step, while the draft wants it back."""
    assert load_config().placement_for("amusd").borrow_draft_cores
    assert openmp_env(load_config(speculation__mode="amusd")) == {"GOMP_SPINCOUNT": SHARED_CORES_SPINCOUNT}


def test_single_threads_on_shared_cores_need_no_setting():
    config = load_config(
        speculation__mode="sd", placement__sd__target__threads=1, placement__sd__draft__threads=1
    )
    assert openmp_env(config) == {}


@pytest.mark.parametrize("name", ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_the_users_own_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "PASSIVE" if name == "OMP_WAIT_POLICY" else "5")
    assert openmp_env(load_config(speculation__mode="sd")) == {}

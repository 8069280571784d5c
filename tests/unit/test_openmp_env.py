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
    """ar/lookup run no draft worker; amusd pins the workers to a core each, one thread: a
    team that spins there hurts nobody, and a shorter spin would only slow its passes. That
    holds with the target borrowing the draft's core (the default): narrowing re-pins its pool
    thread onto the target's own core, so it never spins on the lent one (measured, amusd, 16
    clients without drafts: 365 tok/s with the short spin, 382 and 442 without; ar 437; with
    drafts, session 21: 213 and 215 against 333 and 284), though its spin there slows a narrow
    pass right after a wide one (server/launcher.py)."""
    assert load_config().placement_for("amusd").borrow_draft_cores
    assert openmp_env(load_config(speculation__mode=mode)) == {}


def test_single_threads_on_shared_cores_need_no_setting():
    config = load_config(
        speculation__mode="sd", placement__sd__target__threads=1, placement__sd__draft__threads=1
    )
    assert openmp_env(config) == {}


@pytest.mark.parametrize("name", ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_the_users_own_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "PASSIVE" if name == "OMP_WAIT_POLICY" else "5")
    assert openmp_env(load_config(speculation__mode="sd")) == {}

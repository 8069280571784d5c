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


@pytest.mark.parametrize("mode", ["ar", "lookup"])
def test_workers_alone_keep_the_default_spin(mode):
    """ar/lookup run no draft worker: a team that spins hurts nobody, and a shorter spin would
    only slow its passes."""
    assert openmp_env(load_config(speculation__mode=mode)) == {}


def test_a_target_that_borrows_the_drafts_core_spins_briefly():
    """amusd (a core each, the target borrowing the draft's in steps without drafts). Catches the
    setting lost there: after a wide step the target's idle pool thread, re-pinned onto its own
    core, spun against the next narrow pass (a 1-row pass of the Qwen target 36-60 ms where it
    takes 31-35)."""
    assert load_config().placement_for("amusd").borrow_draft_cores
    assert openmp_env(load_config(speculation__mode="amusd")) == {"GOMP_SPINCOUNT": SHARED_CORES_SPINCOUNT}


def test_workers_on_cores_apart_keep_the_default_spin():
    """amusd without borrowing: each worker's team on its own core spins where nobody else runs."""
    config = load_config(speculation__mode="amusd", placement__amusd__borrow_draft_cores=False)
    assert openmp_env(config) == {}


def test_single_threads_on_shared_cores_need_no_setting():
    config = load_config(
        speculation__mode="sd", placement__sd__target__threads=1, placement__sd__draft__threads=1
    )
    assert openmp_env(config) == {}


@pytest.mark.parametrize("name", ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_the_users_own_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "PASSIVE" if name == "OMP_WAIT_POLICY" else "5")
    assert openmp_env(load_config(speculation__mode="sd")) == {}

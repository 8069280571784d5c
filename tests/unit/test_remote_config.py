"""Config and command line of workers run apart (`tandem worker`, `--external`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.loader import ConfigError, load_config
from server.cli import _parser, check_split, config_from_args

REMOTE = Path(__file__).resolve().parents[2] / "configs" / "remote-draft.yaml"


def test_bind_addresses_default_to_the_connect_address():
    """Catches: a process binding the address its peers connect to when a
    separate bind address is given (a host name it cannot bind), or binding
    nothing when none is given."""
    config = load_config(REMOTE, addresses__bind={"draft": "tcp://0.0.0.0:5557"})
    assert config.addresses.bind_of("draft") == "tcp://0.0.0.0:5557"
    assert config.addresses.bind_of("server") == config.addresses.server == "tcp://127.0.0.1:5555"
    filled = load_config(REMOTE, addresses__verify="").with_addresses()
    assert filled.addresses.verify.startswith("ipc://") and filled.addresses.draft == "tcp://127.0.0.1:5557"


def test_bad_addresses_and_curve_settings_are_refused():
    """Catches: a typo'd transport reaching ZeroMQ (an obscure error at bind time),
    and CURVE turned on without a key file (silently unauthenticated)."""
    with pytest.raises(ConfigError, match="addresses.draft"):
        load_config(REMOTE, addresses__draft="draft-box:5557")
    with pytest.raises(ConfigError, match="addresses.bind.server"):
        load_config(REMOTE, addresses__bind={"server": "0.0.0.0:5555"})
    with pytest.raises(ConfigError, match="curve.key_file"):
        load_config(REMOTE, curve__key_file="")
    with pytest.raises(ConfigError, match="heartbeat_timeout_s"):
        load_config(REMOTE, server__heartbeat_timeout_s=0)


def test_split_roles_need_a_mode_with_them_and_addresses():
    """Catches: `--external draft` in a mode without a draft (waiting forever for
    a worker that has nothing to do) and a worker started without the addresses
    to find its peers (it would bind a private ipc:// socket nobody reaches)."""
    args = _parser().parse_args(["serve", "--config", str(REMOTE), "--external", "draft", "--mode", "ar"])
    with pytest.raises(ConfigError, match="mode ar has no draft worker"):
        check_split(config_from_args(args), args.external)
    args = _parser().parse_args(["worker", "--role", "draft", "--config", str(REMOTE), "--set", "addresses.verify="])
    with pytest.raises(ConfigError, match="addresses.verify"):
        check_split(config_from_args(args), [args.role])
    args = _parser().parse_args(["worker", "--role", "verify", "--config", str(REMOTE), "--mode", "amusd"])
    config = config_from_args(args)
    check_split(config, [args.role])
    assert config.speculation.mode == "amusd" and config.curve.enabled and config.curve.create_missing

"""Config loading: the shipped files load; bad keys and values are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.loader import ConfigError, config_from_dict, config_to_dict, load_config, parse_setting

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model_name
    assert config.placement_for(config.speculation.mode).target.device


def test_default_is_the_embedded_self_speculative_pair():
    config = load_config()
    assert config.target.path == config.draft.path == "embedded:smollm2-135m-instruct"
    assert (config.target.dtype, config.target.quantization) == ("auto", "none")
    assert config.draft.quantization == "gguf"


def test_overrides_and_round_trip_through_json():
    config = load_config(speculation__mode="ar", server__port=9001, target__dtype="float32")
    assert (config.speculation.mode, config.server.port, config.target.dtype) == ("ar", 9001, "float32")
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_addresses_are_filled_with_private_ipc_sockets():
    config = load_config().with_addresses()
    addresses = {config.addresses.server, config.addresses.verify, config.addresses.draft}
    assert len(addresses) == 3 and all(a.startswith("ipc://") for a in addresses)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nbogus: 1\n", "unknown key(s) ['bogus']"),
        ("model_name: x\ntarget: {path: a}\n", "draft: required"),
        ("model_name: x\ntarget: {path: a, dtype: int3}\ndraft: {path: a}\n", "target.dtype"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a, quantization: int2}\n", "draft.quantization"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nspeculation: {mode: turbo}\n", "speculation.mode"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nspeculation: {num_draft_tokens: many}\n", "expected an integer"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nspeculation: {num_draft_tokens: 0}\n", "num_draft_tokens"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nspeculation: {adaptive: sometimes}\n", "speculation.adaptive"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nplacement: {sd: {target: {device: tpu}}}\n", "placement.sd.target.device"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nplacement: {default: {draft: {cores: [999]}}}\n", "placement.default.draft.cores"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nscheduler: {max_running_requests: 0}\n", "max_running_requests"),
        ("- just\n- a list\n", "mapping"),
        ("model_name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert message in str(info.value)


def test_command_line_settings_are_dotted_yaml():
    settings = dict(
        parse_setting(text)
        for text in (
            "speculation.max_run_ahead=16",
            "placement.amusd.draft={device: cpu, cores: [1], threads: 1}",
            "easyspec.calibration=never",
            "speculation.adaptive=false",
        )
    )
    config = load_config(**settings)
    assert config.speculation.max_run_ahead == 16
    assert config.speculation.adaptive is False and load_config().speculation.adaptive is True
    assert config.placement_for("amusd").draft.cores == (1,)
    assert config.easyspec.calibration == "never"


@pytest.mark.parametrize(
    "text,message",
    [
        ("max_run_ahead", "section.key=value"),
        ("=3", "section.key=value"),
        ("speculation..mode=sd", "section.key=value"),
        ("speculation.max_run_ahead=[1", "not valid YAML"),
    ],
)
def test_bad_command_line_settings_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_setting(text)


@pytest.mark.parametrize(
    "text,message",
    [("speculation.warp_speed=9", "warp_speed"), ("model_name.x=1", "model_name is not a section")],
)
def test_settings_for_unknown_or_scalar_keys_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(**dict([parse_setting(text)]))


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_serve_flags_and_settings_combine():
    from server.cli import _parser, config_from_args

    args = _parser().parse_args(
        ["serve", "--mode", "amusd", "--num-draft-tokens", "6",
         "--set", "speculation.num_draft_tokens=2", "--set", "speculation.max_run_ahead=16"]
    )
    config = config_from_args(args)
    assert config.speculation.mode == "amusd"
    assert config.speculation.num_draft_tokens == 6  # the dedicated flag wins
    assert config.speculation.max_run_ahead == 16


def test_the_old_engine_section_is_read_as_scheduler(tmp_path, caplog):
    """Catches a rename that breaks users' configs written before `engine:` became `scheduler:`."""
    old = tmp_path / "old.yaml"
    old.write_text("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nengine: {max_running_requests: 3}\n")
    assert load_config(old).scheduler.max_running_requests == 3
    assert "now called 'scheduler'" in caplog.text
    both = tmp_path / "both.yaml"
    both.write_text(old.read_text() + "scheduler: {max_running_requests: 2}\n")
    with pytest.raises(ConfigError, match="keep only 'scheduler'"):
        load_config(both)


def test_serving_options_from_config_and_flags(tmp_path):
    """server.served_model_name / allowed_origins / access_log come from the config,
    and the flags win. Catches: a flag that never reaches the config, a config key
    the loader refuses, the model_name not being the default served name."""
    from server.cli import _parser, config_from_args

    default = load_config()
    assert default.served_model_names == (default.model_name,)
    assert default.server.allowed_origins == () and default.server.access_log is False
    path = tmp_path / "c.yaml"
    path.write_text("model_name: m\ntarget: {path: t}\ndraft: {path: d}\nserver:\n"
                    "  served_model_name: [main, other]\n  allowed_origins: ['http://a.example']\n  access_log: true\n")
    from_file = config_from_args(_parser().parse_args(["serve", "--config", str(path)]))
    assert from_file.served_model_names == ("main", "other")
    assert from_file.server.allowed_origins == ("http://a.example",) and from_file.server.access_log is True
    flagged = config_from_args(_parser().parse_args([
        "serve", "--config", str(path), "--served-model-name", "x", "--allowed-origins", "*", "--no-access-log"]))
    assert flagged.served_model_names == ("x",)
    assert flagged.server.allowed_origins == ("*",) and flagged.server.access_log is False
    with pytest.raises(ConfigError, match="served_model_name"):
        load_config(server__served_model_name=[""])


def test_worker_command_line_builds_a_config():
    """Catches config_from_args reading a flag only `tandem serve` has (e.g. --served-model-name):
    `tandem worker` then dies with AttributeError before loading anything."""
    from server.cli import _parser, config_from_args

    args = _parser().parse_args(["worker", "--role", "draft", "--mode", "amusd", "--set", "scheduler.max_model_len=64"])
    config = config_from_args(args)
    assert (config.speculation.mode, config.scheduler.max_model_len) == ("amusd", 64)


@pytest.mark.parametrize(
    "mode,placement,message",
    [
        ("sd", {}, "only for a mode whose draft runs beside the target"),
        ("easyspec", {}, "only for a mode whose draft runs beside the target"),
        ("amusd", {"target": {"device": "cuda:0"}}, "a CPU target and draft"),
        ("amusd", {"draft": {"device": "cpu"}}, "pinned to cores"),
        ("amusd", {"borrow_max_share": 0}, "borrow_max_share: must be above 0"),
    ],
)
def test_borrowing_the_drafts_cores_needs_a_cpu_draft_beside_the_target(mode, placement, message):
    """placement.<mode>.borrow_draft_cores: catches a setting accepted where it cannot act (a
    synchronous mode's workers take turns already; a GPU or unpinned worker has no cores to lend;
    a share no pass can be under)."""
    roles = {"target": {"device": "cpu", "cores": [1]}, "draft": {"device": "cpu", "cores": [0]}, **placement}
    with pytest.raises(ConfigError, match=message):
        load_config(**{f"placement__{mode}": {**roles, "borrow_draft_cores": True}})

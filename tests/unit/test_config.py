"""Config loading: the shipped files load; bad keys and values are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.loader import ConfigError, config_from_dict, config_to_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model_name
    assert config.placement_for(config.speculation.mode).target.device


def test_default_is_the_embedded_self_speculative_pair():
    config = load_config()
    assert config.target.path == config.draft.path == "embedded:smollm2-135m-instruct"
    assert (config.target.dtype, config.target.quantization) == ("bfloat16", "none")
    assert config.draft.quantization == "int4"


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
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nplacement: {sd: {target: {device: tpu}}}\n", "placement.sd.target.device"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nplacement: {default: {draft: {cores: [999]}}}\n", "placement.default.draft.cores"),
        ("model_name: x\ntarget: {path: a}\ndraft: {path: a}\nengine: {max_running_requests: 0}\n", "max_running_requests"),
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


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")

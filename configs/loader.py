"""Load a YAML config into frozen dataclasses, refusing unknown or bad keys.

Every error names the offending key, so a typo in a config is a clear message
at start-up, not a surprise later.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from configs.choices import CALIBRATION_POLICIES, CHANNELS, DTYPES, QUANTIZATIONS, VARIANTS
from configs.modes import MODE_NAMES, MODES, Mode, mode_of

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


ADDRESS_SCHEMES = ("tcp://", "ipc://")  # ZeroMQ transports the workers may use


@dataclass(frozen=True)
class ModelConfig:
    # a Hugging Face model directory, a .gguf file, or "embedded:smollm2-135m-instruct"
    path: str
    dtype: str = "auto"  # workers/model/dtypes.py
    quantization: str = "none"
    # draft only: 0 = full vocabulary; N = an output head over the first N token ids plus the
    # added tokens (FR-Spec: a cheaper draft, still lossless; see workers/model/loader.py)
    head_vocab: int = 0


@dataclass(frozen=True)
class DevicePlacement:
    device: str = "cpu"  # "cpu" or "cuda:N"
    cores: tuple[int, ...] = ()  # CPU cores to pin to; () = no pinning
    threads: int = 0  # torch threads; 0 = one per pinned core (or torch's default)


@dataclass(frozen=True)
class RolePlacement:
    # one device, or (in a config) a list of devices: a tensor-parallel target over them,
    # rank 0 first; a list is stored as `target` (rank 0) + `target_ranks` (the others)
    target: DevicePlacement = DevicePlacement()
    draft: DevicePlacement = DevicePlacement()
    # easyspec modes: the devices of the draft's other layer-parallel ranks
    # (`draft` is rank 0); D = 1 + len(draft_ranks)
    draft_ranks: tuple[DevicePlacement, ...] = ()
    target_ranks: tuple[DevicePlacement, ...] = ()  # the tensor-parallel target's ranks 1..R-1
    # a mode whose draft runs beside the target (amusd), each on cores of its own: the target's
    # passes also take the draft's cores in steps where no request drafts (the draft idles)
    borrow_draft_cores: bool = False
    # ... only where the start-up probe times a pass on both teams at under this share of one
    # on the target's own cores (workers.shell.BorrowedCores.probe); a large value borrows
    # wherever the two give the same bits
    borrow_max_share: float = 1.0

    @property
    def targets(self) -> tuple[DevicePlacement, ...]:
        """The target's devices, rank 0 first (one: no tensor parallelism)."""
        return (self.target, *self.target_ranks)


@dataclass(frozen=True)
class RendezvousConfig:
    """Where a rank group's ranks meet when some run elsewhere, e.g. on another host
    (torch.distributed's TCPStore, served by rank 0; workers/ranks/rendezvous.py).
    Empty: every rank is spawned by rank 0 on its host."""

    address: str = ""  # tcp://HOST:PORT: where every rank reaches rank 0's store
    bind: str = ""  # tcp://IP:PORT: where rank 0 listens (0.0.0.0: every interface); "" = address
    # ranks rank 0 does not spawn: each started on its host with
    # `tandem worker --role verify-rank|draft-rank --rank N --config FILE`
    external_ranks: tuple[int, ...] = ()

    @property
    def bind_address(self) -> str:
        return self.bind or self.address

    def check(self, section: str, channel: str) -> None:
        where = f"{section}.rendezvous"
        for key, value in (("address", self.address), ("bind", self.bind)):
            if value and not re.fullmatch(r"tcp://[^/\s]+:\d{1,5}", value):
                raise ConfigError(f"{where}.{key}: expected tcp://HOST:PORT, got {value!r}")
        if self.bind and not self.address:
            raise ConfigError(f"{where}.bind: needs {where}.address (where the other ranks reach it)")
        if self.external_ranks and not self.address:
            raise ConfigError(f"{where}.external_ranks: needs {where}.address (tcp://HOST:PORT of rank 0)")
        if any(r < 1 for r in self.external_ranks) or len(set(self.external_ranks)) < len(self.external_ranks):
            raise ConfigError(f"{where}.external_ranks: distinct ranks >= 1 (rank 0 is the worker), got {list(self.external_ranks)}")
        if self.address and channel == "shm":
            raise ConfigError(f"{section}.channel: shm cannot reach ranks on other hosts; use gloo, nccl or auto")


@dataclass(frozen=True)
class EasySpecConfig:
    """Layer-parallel drafting (modes with a layer-parallel draft); see workers/easyspec.

    The one definition: the `easyspec` section of a config, and what the draft
    worker builds its LayerParallelDraftModel from (workers.easyspec.plan_of
    derives the layer plan).
    """

    sequential_head: int = 4  # first layers that stay sequential
    sequential_tail: int = 4  # last layers that stay sequential
    groups: tuple[tuple[int, ...], ...] = ()  # an explicit layer plan; () = derived from head/tail
    variant: str = "full"  # one of VARIANTS: "full" (whole layers in parallel) or "attention" (attentions only)
    calibration: str = "every_round"  # one of CALIBRATION_POLICIES
    channel: str = "auto"  # one of CHANNELS: the hidden-state exchange
    split_head: bool = True  # each rank computes a vocabulary slice of the logits
    timeout_s: float = 60.0  # a rank silent this long during a pass is declared dead
    rendezvous: RendezvousConfig = RendezvousConfig()  # draft ranks on other hosts

    def __post_init__(self):
        self.rendezvous.check("easyspec", self.channel)
        for key, value, valid in (
            ("variant", self.variant, VARIANTS),
            ("calibration", self.calibration, CALIBRATION_POLICIES),
            ("channel", self.channel, CHANNELS),
        ):
            if value not in valid:
                raise ConfigError(f"easyspec.{key}: {value!r} is not one of {', '.join(valid)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"easyspec.timeout_s: must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class TensorParallelConfig:
    """A target over several devices (`placement.<mode>.target` a list); see workers/tensor_parallel.py."""

    channel: str = "auto"  # one of CHANNELS: the all-reduces ("auto": shared memory on CPU, gloo across hosts, NCCL on CUDA)
    timeout_s: float = 60.0  # a rank silent this long during a pass is declared dead
    rendezvous: RendezvousConfig = RendezvousConfig()  # target ranks on other hosts

    def __post_init__(self):
        self.rendezvous.check("tensor_parallel", self.channel)
        if self.channel not in CHANNELS:
            raise ConfigError(f"tensor_parallel.channel: {self.channel!r} is not one of {', '.join(CHANNELS)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"tensor_parallel.timeout_s: must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class SpeculationConfig:
    mode: str = "sd"
    num_draft_tokens: int = 4  # sd: drafts per round; amusd: the most one verification takes
    max_run_ahead: int = 8  # amusd: the most drafts the draft holds past the verified prefix
    # a draft that does not answer in time is skipped: the round runs target-only
    draft_timeout_s: float = 30.0
    # mode lookup: the longest and shortest n-gram of the request's last tokens looked up
    # in its earlier tokens (vLLM's names); a match proposes what followed it
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # each step chooses the drafts per request (0..num_draft_tokens) from measured acceptance
    # and pass costs (workers/engine/speculation_policy.py); False: always num_draft_tokens
    adaptive: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int = 2048  # prompt + generated tokens, per request
    max_running_requests: int = 4  # KV cache slots per worker
    max_waiting_requests: int = 64
    max_batch_size: int = 0  # requests in one model pass (0: all running ones)
    max_tokens_per_step: int = 0  # tokens in one target pass, a soft bound: whole rounds (0: no limit)
    prefill_chunk_tokens: int = 512  # a prompt is prefilled in chunks of this many tokens, mixed into decode steps
    prefix_caching: bool = True  # reuse the KV of a prompt prefix another request computed (at chunk boundaries)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # seconds to wait for the workers' ready handshake (first start converts the model)
    startup_timeout_s: float = 600.0
    # on SIGTERM/Ctrl-C: stop accepting, let running requests finish this long, then stop
    shutdown_grace_s: float = 30.0
    # a dead worker is restarted after this delay, doubling (up to 30 s) while it keeps dying
    restart_delay_s: float = 1.0
    # the names the `model` field may give; the first is the one /v1/models and responses
    # show. () = just model_name
    served_model_name: tuple[str, ...] = ()
    # browser origins allowed by CORS, e.g. ["http://localhost:3000"] or ["*"]; () = no CORS
    allowed_origins: tuple[str, ...] = ()
    # uvicorn's access log: one line per HTTP request (with its X-Request-Id) on stderr
    access_log: bool = False
    # an external worker (`tandem serve --external ROLE`) silent this long is taken as gone;
    # every worker sends a heartbeat each second (server.external)
    heartbeat_timeout_s: float = 5.0


ROLE_ADDRESSES = ("server", "verify", "draft")  # the processes that bind an inbox


@dataclass(frozen=True)
class BindAddresses:
    """Where each process binds its own inbox when that differs from where the
    others reach it (a server binds tcp://0.0.0.0:5555, its peers connect to
    tcp://server-host:5555). Empty = its address in `addresses`."""

    server: str = ""
    verify: str = ""
    draft: str = ""


@dataclass(frozen=True)
class AddressConfig:
    # where the others reach each process's inbox (the connect address);
    # empty = an ipc:// socket in a fresh temporary directory
    server: str = ""
    verify: str = ""
    draft: str = ""
    bind: BindAddresses = BindAddresses()

    def bind_of(self, process: str) -> str:
        """The address `process` (one of ROLE_ADDRESSES) binds its inbox at."""
        return getattr(self.bind, process) or getattr(self, process)


@dataclass(frozen=True)
class CurveConfig:
    """CURVE authentication and encryption of every ZeroMQ socket (protocol/curve.py)."""

    enabled: bool = False
    # the deployment's key pair, zmq.auth's NAME.key_secret (`tandem keys` writes it);
    # every host holds a copy. `~` is expanded; a relative path is from the working directory
    key_file: str = ""
    # public key files (NAME.key) of further peers that may connect; the pair's own always may
    authorized_keys: tuple[str, ...] = ()
    # make the pair at key_file on first use when it is absent (one host, or a shared volume)
    create_missing: bool = False


@dataclass(frozen=True)
class Config:
    model_name: str
    target: ModelConfig
    draft: ModelConfig
    speculation: SpeculationConfig = SpeculationConfig()
    # per mode; "default" applies to modes without their own entry
    placement: Mapping[str, RolePlacement] = field(default_factory=lambda: {"default": RolePlacement()})
    scheduler: SchedulerConfig = SchedulerConfig()
    server: ServerConfig = ServerConfig()
    addresses: AddressConfig = AddressConfig()
    curve: CurveConfig = CurveConfig()
    easyspec: EasySpecConfig = EasySpecConfig()
    tensor_parallel: TensorParallelConfig = TensorParallelConfig()

    @property
    def mode(self) -> Mode:
        """The row of the mode table for speculation.mode."""
        return mode_of(self.speculation.mode)

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """What the `model` field may name: server.served_model_name, else model_name."""
        return self.server.served_model_name or (self.model_name,)

    @property
    def placement_of_mode(self) -> RolePlacement:
        """Where the roles of speculation.mode run."""
        return self.placement_for(self.speculation.mode)

    @property
    def draft_catches_up(self) -> bool:
        """Whether the draft, with nothing to draft, feeds the verified tokens of requests told
        to run none ahead: only beside the target on cores of its own (a synchronous draft's
        pass would run during the target's; a borrowed core is the target's then)."""
        return self.mode.drafts and not self.mode.synchronous and not self.placement_of_mode.borrow_draft_cores

    def placement_for(self, mode: str) -> RolePlacement:
        return self.placement.get(mode) or self.placement.get("default") or RolePlacement()

    def with_addresses(self) -> "Config":
        """Fill empty addresses with ipc:// sockets in a private temp directory."""
        if all((self.addresses.server, self.addresses.verify, self.addresses.draft)):
            return self
        root = tempfile.mkdtemp(prefix="tandem-")
        filled = dataclasses.replace(
            self.addresses,
            server=self.addresses.server or f"ipc://{root}/server.sock",
            verify=self.addresses.verify or f"ipc://{root}/verify.sock",
            draft=self.addresses.draft or f"ipc://{root}/draft.sock",
        )
        return dataclasses.replace(self, addresses=filled)


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """Read `path` (default: configs/default.yaml) and apply dotted overrides.

    Overrides use double underscores for nesting: load_config(speculation__mode="ar").
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split("__")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parents[: depth + 1])} is not a section: cannot set {dotted.replace('__', '.')}")
        node[leaf] = value
    _rename_sections(raw)
    _target_lists(raw)
    config = _build(Config, raw, "")
    _validate(config)
    return config


# Sections that had another name in earlier releases: old -> new.
RENAMED_SECTIONS = {"engine": "scheduler"}


def _rename_sections(raw: dict) -> None:
    """Read an old section name as its new one (with a warning); both at once is an error."""
    for old, new in RENAMED_SECTIONS.items():
        if old not in raw:
            continue
        if new in raw:
            raise ConfigError(f"{old}: renamed {new!r}, and the config has both; keep only {new!r}")
        log.warning("config section %r is now called %r; rename it in your config", old, new)
        raw[new] = raw.pop(old)


def _target_lists(raw: dict) -> None:
    """`placement.<mode>.target` as a list of devices -> target (rank 0) + target_ranks."""
    placement = raw.get("placement")
    if not isinstance(placement, dict):
        return
    for mode, roles in placement.items():
        if not isinstance(roles, dict) or not isinstance(roles.get("target"), list):
            continue
        devices = roles["target"]
        if not devices:
            raise ConfigError(f"placement.{mode}.target: an empty list; give one device or several")
        if "target_ranks" in roles:
            raise ConfigError(f"placement.{mode}: a list of target devices and target_ranks; give the list only")
        roles["target"], roles["target_ranks"] = devices[0], devices[1:]


def parse_setting(text: str) -> tuple[str, Any]:
    """'speculation.max_run_ahead=16' -> ('speculation__max_run_ahead', 16), the
    value read as YAML (so numbers, lists and mappings work), for load_config."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"a setting must look like section.key=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"the value of {key} is not valid YAML: {exc}") from None
    return key.replace(".", "__"), parsed


def config_to_dict(config: Config) -> dict:
    """Plain data for passing a config to a worker process."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data, "")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required")
            continue
        kwargs[f.name] = _coerce(hints[f.name], raw[f.name], key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (collections.abc.Mapping, dict):
        _, value_type = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping")
        return {k: _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:  # tuple[X, ...]: a YAML list of X
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _validate_target_devices(config: Config, mode: str, roles: RolePlacement) -> None:
    """A tensor-parallel target: devices of one kind, each GPU once, a quantization it can split."""
    devices = [p.device for p in roles.targets]
    if len(devices) < 2:
        return
    where = f"placement.{mode}.target"
    if len({d.split(":")[0] for d in devices}) > 1:
        raise ConfigError(f"{where}: a tensor-parallel target runs on devices of one kind, got {devices}")
    gpus = [d for d in devices if d != "cpu"]
    if len(set(gpus)) < len(gpus):
        raise ConfigError(f"{where}: each rank needs a GPU of its own, got {devices}")
    if config.target.quantization == "int8":
        raise ConfigError(
            f"{where}: a tensor-parallel target cannot be quantized int8 (its per-row scales span the "
            "whole input row, which row-parallel layers split); use none, int4 or gguf"
        )


def _validate_borrowing(mode: str, roles: RolePlacement) -> None:
    """borrow_draft_cores: a CPU target and draft on cores of their own, in a mode whose draft runs
    beside the target as one process. (Where the draft's cores are all the target's too there
    is nothing to borrow, and the verify worker does not.)"""
    if roles.borrow_max_share <= 0:
        raise ConfigError(f"placement.{mode}.borrow_max_share: must be above 0, got {roles.borrow_max_share}")
    if not roles.borrow_draft_cores:
        return
    where = f"placement.{mode}.borrow_draft_cores"
    row = MODES.get(mode)
    if row is None or not row.drafts or row.synchronous or row.layer_parallel_draft:
        raise ConfigError(f"{where}: only for a mode whose draft runs beside the target (amusd), not {mode!r}")
    if roles.target_ranks or any(p.device != "cpu" or not p.cores for p in (roles.target, roles.draft)):
        raise ConfigError(f"{where}: needs a CPU target and draft (one process each) pinned to cores")


def _validate_external_ranks(config: Config, mode: str, roles: RolePlacement) -> None:
    """External ranks must be ranks of the groups this mode's placement makes."""
    for section, world, devices in (
        ("tensor_parallel", len(roles.targets), "target"),
        ("easyspec", 1 + len(roles.draft_ranks), "draft + draft_ranks"),
    ):
        external = getattr(config, section).rendezvous.external_ranks
        if world > 1 and external and max(external) >= world:
            raise ConfigError(
                f"{section}.rendezvous.external_ranks: {list(external)}, but placement.{mode}.{devices} "
                f"makes a group of {world} ranks (0..{world - 1})"
            )


def _validate(config: Config) -> None:
    speculation = config.speculation
    if speculation.mode not in MODE_NAMES:
        raise ConfigError(f"speculation.mode: {speculation.mode!r} is not one of {', '.join(MODE_NAMES)}")
    if not 1 <= speculation.num_draft_tokens <= 64:
        raise ConfigError(f"speculation.num_draft_tokens: must be in 1..64, got {speculation.num_draft_tokens}")
    if not 1 <= speculation.max_run_ahead <= 256:
        raise ConfigError(f"speculation.max_run_ahead: must be in 1..256, got {speculation.max_run_ahead}")
    if speculation.draft_timeout_s <= 0:
        raise ConfigError("speculation.draft_timeout_s: must be positive")
    if not 1 <= speculation.prompt_lookup_min <= speculation.prompt_lookup_max:
        raise ConfigError(
            "speculation.prompt_lookup_min/max: need 1 <= min <= max, got "
            f"{speculation.prompt_lookup_min}, {speculation.prompt_lookup_max}"
        )
    for role in ("target", "draft"):
        model: ModelConfig = getattr(config, role)
        if model.dtype not in DTYPES:
            raise ConfigError(f"{role}.dtype: {model.dtype!r} is not one of {', '.join(DTYPES)}")
        if model.head_vocab < 0 or (role == "target" and model.head_vocab):
            raise ConfigError(f"{role}.head_vocab: only the draft may have a reduced head (N > 0); got {model.head_vocab}")
        if model.quantization not in QUANTIZATIONS:
            raise ConfigError(f"{role}.quantization: {model.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    for mode, roles in config.placement.items():
        if mode != "default" and mode not in MODE_NAMES:
            raise ConfigError(f"placement.{mode}: not a mode (modes: default, {', '.join(MODE_NAMES)})")
        _validate_target_devices(config, mode, roles)
        _validate_external_ranks(config, mode, roles)
        _validate_borrowing(mode, roles)
        for role, placement in [("target", roles.target), ("draft", roles.draft)] + [
            (f"draft_ranks[{i}]", p) for i, p in enumerate(roles.draft_ranks)
        ] + [(f"target[{i}]", p) for i, p in enumerate(roles.target_ranks, start=1)]:
            where = f"placement.{mode}.{role}"
            if placement.device != "cpu" and not placement.device.startswith("cuda"):
                raise ConfigError(f"{where}.device: expected 'cpu' or 'cuda:N', got {placement.device!r}")
            if placement.threads < 0:
                raise ConfigError(f"{where}.threads: must be >= 0")
            available = os.cpu_count() or 1
            bad = [c for c in placement.cores if not 0 <= c < available]
            if bad:
                raise ConfigError(f"{where}.cores: {bad} not on this machine (it has cores 0..{available - 1})")
    scheduler = config.scheduler
    if scheduler.max_model_len < 16:
        raise ConfigError("scheduler.max_model_len: must be at least 16")
    if scheduler.max_running_requests < 1:
        raise ConfigError("scheduler.max_running_requests: must be at least 1")
    if scheduler.max_waiting_requests < 0:
        raise ConfigError("scheduler.max_waiting_requests: must be >= 0")
    if any(not name for name in config.server.served_model_name):
        raise ConfigError("server.served_model_name: names must not be empty")
    for name in ("max_batch_size", "max_tokens_per_step"):
        if getattr(scheduler, name) < 0:
            raise ConfigError(f"scheduler.{name}: must be >= 0 (0: no limit)")
    if scheduler.prefill_chunk_tokens < 1:
        raise ConfigError("scheduler.prefill_chunk_tokens: must be at least 1")
    if not 0 < config.server.port < 65536:
        raise ConfigError(f"server.port: {config.server.port} is not a TCP port")
    if config.server.heartbeat_timeout_s <= 0:
        raise ConfigError("server.heartbeat_timeout_s: must be positive")
    for where, value in [(f"addresses.{p}", getattr(config.addresses, p)) for p in ROLE_ADDRESSES] + [
        (f"addresses.bind.{p}", getattr(config.addresses.bind, p)) for p in ROLE_ADDRESSES
    ]:
        if value and not value.startswith(ADDRESS_SCHEMES):
            raise ConfigError(f"{where}: expected an address starting with {' or '.join(ADDRESS_SCHEMES)}, got {value!r}")
    if config.curve.enabled and not config.curve.key_file:
        raise ConfigError("curve.key_file: required when curve.enabled (write a pair with `tandem keys`)")

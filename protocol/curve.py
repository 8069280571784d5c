"""CURVE on the ZeroMQ sockets: encryption and authentication between hosts.

One key pair per deployment (`tandem keys` writes it; every host of the
deployment holds a copy, named by the config's `curve.key_file`). Every bound
inbox is a CURVE server with that pair; every connecting outbox is a CURVE
client with that pair and the inbox's public key. A ZAP handler
(pyzmq's ThreadAuthenticator, one per ZeroMQ context) admits only clients
whose public key is the deployment's own or one of `curve.authorized_keys`;
any other peer is refused during the handshake (it can send nothing and
receive nothing) and logged at WARNING with its address and key.

Key files are zmq.auth's certificate files: NAME.key holds the public key,
NAME.key_secret both keys.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("tandem.curve")

# the ZAP domain of every Tandem inbox (ZeroMQ only asks the ZAP handler about
# sockets that name a domain or use a security mechanism)
ZAP_DOMAIN = "tandem"


@dataclass(frozen=True)
class CurveKeys:
    """This process's key pair and the client keys its inboxes admit (z85 bytes)."""

    public: bytes
    secret: bytes
    authorized: frozenset[bytes]


def write_key_pair(secret_file: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new pair at SECRET_FILE (NAME.key_secret, mode 0600) and NAME.key beside it.

    Refuses to overwrite an existing secret file. Safe against a concurrent
    writer (two processes starting at once): the secret file appears whole,
    by a hard link that fails if it exists.
    """
    secret_file = Path(secret_file).expanduser()
    if not secret_file.name.endswith(".key_secret"):
        raise ValueError(f"a secret key file must end in .key_secret, got {secret_file}")
    name = secret_file.name[: -len(".key_secret")]
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=secret_file.parent) as scratch:
        public_tmp, secret_tmp = zmq.auth.create_certificates(scratch, name)
        os.chmod(secret_tmp, 0o600)
        os.link(secret_tmp, secret_file)  # FileExistsError if it is there already
        public_file = secret_file.with_name(f"{name}.key")
        os.replace(public_tmp, public_file)
    return public_file, secret_file


def ensure_key_pair(secret_file: str | os.PathLike) -> bool:
    """Make the pair at secret_file unless it exists; True if this call made it."""
    try:
        write_key_pair(secret_file)
    except FileExistsError:
        return False
    return True


def load_keys(secret_file: str | os.PathLike, authorized_files: tuple[str, ...] = ()) -> CurveKeys:
    """The pair at secret_file; its public key and those of authorized_files may connect."""
    secret_file = Path(secret_file).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE key pair {secret_file}: {exc}") from None
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (give the .key_secret file)")
    authorized = {public}
    for file in authorized_files:
        try:
            authorized.add(zmq.auth.load_certificate(Path(file).expanduser())[0])
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the authorized public key {file}: {exc}") from None
    return CurveKeys(public, secret, frozenset(authorized))


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, which admits `keys.authorized` and logs every refusal."""

    def __init__(self, context: zmq.Context, keys: CurveKeys):
        super().__init__(context, log=logging.getLogger("tandem.curve.zap"))
        self._keys = keys
        self._peer = "?"
        self.refused = 0
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # frames: version, request id, domain, address, identity, mechanism, credentials...
        self._peer = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._keys.authorized:
            return True
        self.refused += 1
        log.warning(
            "refused a ZeroMQ peer at %s: its CURVE key %s is not authorized (pid %d)",
            self._peer, key.decode(errors="replace"), os.getpid(),
        )
        return False


_authenticators: dict[int, _Authenticator] = {}
_lock = threading.Lock()


def _authenticator(context: zmq.Context, keys: CurveKeys) -> _Authenticator:
    """The one ZAP handler of `context` (a context's sockets share its inproc ZAP endpoint)."""
    with _lock:
        auth = _authenticators.get(context.underlying)
        if auth is None:
            auth = _Authenticator(context, keys)
            auth.start()
            _authenticators[context.underlying] = auth
        return auth


def curve_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make a socket that will bind a CURVE server admitting only keys.authorized."""
    _authenticator(socket.context, keys)
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def curve_client(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make a socket that will connect a CURVE client of an inbox holding keys' pair."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.public


def keys_for(curve) -> CurveKeys | None:
    """The keys a config's `curve` section names (configs.loader.CurveConfig), made first
    if absent and `create_missing`; None when CURVE is off. ValueError says what is wrong."""
    if not curve.enabled:
        return None
    path = Path(curve.key_file).expanduser()
    if not path.exists():
        if not curve.create_missing:
            raise ValueError(
                f"the CURVE key pair {path} does not exist: write one with `tandem keys --out {path}` "
                "and copy it to every host of the deployment"
            )
        if ensure_key_pair(path):
            log.warning("made a new CURVE key pair at %s (copy it to the other hosts of this deployment)", path)
    return load_keys(path, curve.authorized_keys)

"""A peer without the deployment's key pair, for the CURVE tests (run it in a
network namespace): it binds the draft worker's inbox address with a pair of its
own and pushes draft WorkerReady messages to the server's inbox, knowing the
server's public key (public keys are no secret). It prints, as JSON, its public
key and how many messages reached it; with CURVE working, none do.

    python -m tests.impostor --bind tcp://0.0.0.0:PORT --server tcp://HOST:PORT \
        --server-key FILE.key --seconds 8
"""

from __future__ import annotations

import argparse
import json
import time

import zmq
import zmq.auth

from protocol.codec import encode
from protocol.messages import WorkerReady


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--server-key", required=True, help="the deployment's public key file")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    public, secret = zmq.curve_keypair()
    server_key, _ = zmq.auth.load_certificate(args.server_key)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.curve_secretkey, inbox.curve_publickey, inbox.curve_server = secret, public, True
    inbox.bind(args.bind)
    outbox = context.socket(zmq.PUSH)
    outbox.curve_secretkey, outbox.curve_publickey, outbox.curve_serverkey = secret, public, server_key
    outbox.connect(args.server)
    hello = WorkerReady("draft", 4242, "impostor", 49152, 512, mode="sd", instance="impostor")
    received = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            outbox.send_multipart(encode(hello), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        while inbox.poll(200):
            inbox.recv_multipart()
            received += 1
    print(json.dumps({"public": public.decode(), "received": received}), flush=True)
    context.destroy(linger=0)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Build the CPU image and check that it serves and stops, with and without an
# init (`docker run --init`, what compose's `init: true` does), and that a draft
# worker in a second container (`tandem worker --role draft`) serves a server
# container started with `--external draft` over tcp:// with CURVE
# (configs/remote-draft.yaml, the key pair made on first use on a shared volume).
# Not part of `make test`: it takes minutes (8.5 min to build on a 2-core box
# with the vfs storage driver) and needs a Docker daemon and the package registries.
#
#   sudo docker/check-cpu-image.sh        (or: sudo make check-image)
#
# It starts a private dockerd (vfs storage driver, its own socket and data under
# $WORK) unless DOCKER_HOST is set, and stops it at the end. Knobs:
#   BASE=python:3.11-slim   the base image (the default); BASE=debootstrap
#                           makes a Debian bookworm one (Python 3.11) from
#                           Debian's packages, for a host that cannot pull
#                           from Docker Hub
#   WHEELS=/opt/wheels      a folder holding the torch 2.13.0 CPU wheel, served
#                           on 127.0.0.1 to the build instead of PyTorch's index
#   WORK=/tmp/tandem-docker where the daemon, the base root fs and logs go
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/tandem-docker}
BASE=${BASE:-python:3.11-slim}
PORT=${PORT:-18731}
mkdir -p "$WORK"
pids=()
cleanup() {
    docker rm -f tandem-cpu-check tandem-remote-server tandem-remote-draft >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install $2" >&2; exit 2; }; }
need docker docker.io
if [ -z "${DOCKER_HOST:-}" ]; then
    need dockerd docker.io
    export DOCKER_HOST="unix://$WORK/docker.sock"
    dockerd --storage-driver vfs --data-root "$WORK/root" --exec-root "$WORK/exec" -H "$DOCKER_HOST" \
        --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null || { echo "dockerd did not start: see $WORK/dockerd.log" >&2; exit 1; }
fi

if [ "$BASE" = debootstrap ]; then
    need debootstrap debootstrap
    BASE=tandem-local/debian-python:3.11
    if ! docker image inspect "$BASE" >/dev/null 2>&1; then
        [ -d "$WORK/rootfs" ] || debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" http://deb.debian.org/debian
        rm -f "$WORK"/rootfs/var/cache/apt/archives/*.deb
        # this host's trusted CAs (a TLS-intercepting proxy's, if any), kept through update-ca-certificates
        cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/"
        cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
        tar -C "$WORK/rootfs" -c . | docker import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' - "$BASE"
    fi
fi

build_args=(--build-arg "BASE=$BASE")
if [ -n "${WHEELS:-}" ]; then
    python3 -m http.server 18765 --bind 127.0.0.1 --directory "$WHEELS" >"$WORK/wheels.log" 2>&1 &
    pids+=($!)
    build_args+=(--build-arg "TORCH_PIP_ARGS=--find-links http://127.0.0.1:18765/")
fi
start=$(date +%s)
DOCKER_BUILDKIT=0 docker build --network host -f docker/Dockerfile.cpu -t tandem-cpu "${build_args[@]}" . >"$WORK/build.log" 2>&1 \
    || { tail -20 "$WORK/build.log"; echo "build failed: $WORK/build.log" >&2; exit 1; }
echo "built tandem-cpu in $(($(date +%s) - start)) s ($(docker image inspect -f '{{.Size}}' tandem-cpu | numfmt --to=iec))"

docker volume create tandem-cache-check >/dev/null
docker volume create tandem-keys-check >/dev/null
serves() {  # $1: label, $2: container, $3: python check of the completion (r); healthy and a completion
    local label=$1 name=$2 assertion=$3 t0; t0=$(date +%s)
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || break
        sleep 0.5
    done
    if ! curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then
        docker logs "$name" 2>&1 | tail -5
        echo "FAIL $label: not healthy" >&2; exit 1
    fi
    echo "$label: healthy after $(($(date +%s) - t0)) s"
    local body='{"model":"SmolLM2-135M-Instruct","prompt":"The capital of France is","max_tokens":12,"temperature":0}'
    curl -sf -m 120 "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$body" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); assert r['usage']['completion_tokens']==12, r; $assertion; print('  completion:', repr(r['choices'][0]['text']), r.get('speculation'))"
}
stops() {  # $1: label, $2: container; docker stop ends it with exit code 0
    local label=$1 name=$2 t0; t0=$(date +%s)
    docker stop -t 30 "$name" >/dev/null
    local code; code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
    echo "  docker stop $name: $(($(date +%s) - t0)) s, exit code $code"
    [ "$code" = 0 ] || { docker logs "$name" 2>&1 | tail -5; echo "FAIL $label: exit code $code" >&2; exit 1; }
    docker rm "$name" >/dev/null
}
check() {  # $1: label, then extra `docker run` arguments
    local label=$1; shift
    docker run -d --name tandem-cpu-check --network host "$@" -v tandem-cache-check:/cache tandem-cpu \
        --config configs/default.yaml --host 127.0.0.1 --port "$PORT" >/dev/null
    serves "$label" tandem-cpu-check "None"
    stops "$label" tandem-cpu-check
}
check_remote() {  # the server in one container, the draft worker in another
    local label="draft worker in its own container (--external draft, tcp://, CURVE)"
    local keys=(-v tandem-keys-check:/root/.config/tandem -v tandem-cache-check:/cache)
    docker run -d --name tandem-remote-server --network host --init "${keys[@]}" tandem-cpu \
        --config configs/remote-draft.yaml --external draft --mode sd --host 127.0.0.1 --port "$PORT" >/dev/null
    docker run -d --name tandem-remote-draft --network host --init "${keys[@]}" --entrypoint tandem tandem-cpu \
        worker --role draft --config configs/remote-draft.yaml --mode sd >/dev/null
    serves "$label" tandem-remote-server "assert r['speculation']['num_draft_tokens'] > 0, r"
    stops "$label" tandem-remote-draft
    stops "$label" tandem-remote-server
}
check "with --init (compose: init: true)" --init
check "without an init (the launcher is PID 1)"
check_remote
docker volume rm tandem-cache-check tandem-keys-check >/dev/null
echo "OK"

#!/usr/bin/env bash
# Install and start what tests/test_deploy_compose.py needs on a Debian machine, as root:
#   deploy/ci/setup-docker.sh          # apt-get install docker.io debootstrap docker-compose (only what is
#                                      # missing); start dockerd in the background unless an engine answers
#   deploy/ci/setup-docker.sh stop     # stop the dockerd this script started (by the PID it recorded)
#
# Idempotent. Where it cannot do its job (not root, no apt-get, dockerd refuses to start) it says why and
# exits 0: the compose test then skips with its own reason. It never stops an engine it did not start.
set -uo pipefail

PIDFILE=/run/atkd-dockerd.pid
LOG=/var/log/atkd-dockerd.log

say() { echo "setup-docker: $*" >&2; }

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

if [[ "${1:-}" == "stop" ]]; then
    if [[ -f "$PIDFILE" ]]; then
        pid=$(cat "$PIDFILE")
        # Only the dockerd recorded here: a stale file may name a PID reused by another process.
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
            kill -TERM "$pid"
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            say "stopped dockerd (pid $pid)"
        fi
        rm -f "$PIDFILE"
    fi
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    say "not root: nothing installed or started"
    exit 0
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null; then
        say "no apt-get: cannot install ${missing[*]}"
        exit 0
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { say "apt-get failed: ${missing[*]} not installed"; exit 0; }
fi

if engine_answers; then
    say "a Docker engine already answers"
    exit 0
fi
if ! command -v dockerd >/dev/null; then
    say "no dockerd to start"
    exit 0
fi
# containerd comes with docker.io; dockerd starts its own when none runs.
setsid dockerd >"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"
for _ in $(seq 60); do
    if engine_answers; then
        say "dockerd started (pid $(cat "$PIDFILE"), log $LOG)"
        exit 0
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
    sleep 1
done
say "dockerd did not come up (see $LOG); the compose test will skip"
kill -TERM "$(cat "$PIDFILE")" 2>/dev/null
rm -f "$PIDFILE"
exit 0

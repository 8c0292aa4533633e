#!/usr/bin/env bash
# Build a minimal Debian bookworm base image locally, for hosts that cannot pull one from a registry:
#   deploy/docker/build-base.sh [NAME]       # default NAME: atkd-base:bookworm; needs root and debootstrap
#
# bookworm's python3 is 3.11, the Python the wheelhouse is built for (build-wheelhouse.sh). The image holds
# python3 + venv (the Dockerfile makes a virtual environment), wget (KubeRay's default probes of Ray pods
# call it) and nothing else beyond debootstrap's minbase. The mirror is the one apt uses on this host
# (override with MIRROR=...). Takes about 100 s; an existing NAME is left alone.
set -euo pipefail

NAME=${1:-atkd-base:bookworm}
if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "build-base: $NAME exists"
    exit 0
fi

# The first Debian archive (not -security) named in apt's sources, deb822 or one-line format.
detect_mirror() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ {print $2} /^deb / {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' |
        grep -E '/debian/?$' | head -n1 || true
}
MIRROR=${MIRROR:-$(detect_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

ROOT=$(mktemp -d /tmp/atkd-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "build-base: debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,wget bookworm "$ROOT" "$MIRROR" >/dev/null
# Nothing at run time reads these; apt's lists and caches would only go stale in the image.
rm -rf "$ROOT"/usr/share/{doc,man,info,locale}/* "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* \
    "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/log/*
tar -C "$ROOT" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$NAME" >/dev/null
echo "build-base: $NAME ($(docker image inspect -f '{{.Size}}' "$NAME" | numfmt --to=iec))"

#!/usr/bin/env bash
# Build the images from a wheelhouse made on this host (the build itself reaches no package index):
#   deploy/docker/build-images.sh [--tag TAG] [--ray]
#
#   atkd-teacher:TAG   entry point `atkd-teacher`, HEALTHCHECK through the gRPC health service
#   atkd-student:TAG   entry point `atkd-student`
#   atkd-ray:TAG       (--ray) the project with its [ray] extra, for the KubeRay RayService (no entry point:
#                      KubeRay starts `ray start` itself)
#
# Environment:
#   BASE_IMAGE  image to build on (default atkd-base:bookworm, made by build-base.sh when missing). It must
#               provide python3 with the venv module, of the Python version the wheelhouse is built for.
#   PYTHON      interpreter whose pip builds the wheelhouse (default python3); its version must be the
#               base image's. Extra pip options (e.g. PIP_EXTRA_INDEX_URL for CUDA torch wheels) pass through.
#
# The wheelhouse (deploy/docker/wheelhouse/, git-ignored) holds requirements/ (the project's requirements, read
# from its wheel), deps/ and extras/ (their wheels, rebuilt only when they change) and project/ (the project's
# own wheel, rebuilt every time).
set -euo pipefail

TAG=latest
RAY=0
while (($#)); do
    case $1 in
        --tag) TAG=$2; shift 2 ;;
        --ray) RAY=1; shift ;;
        *) echo "usage: $0 [--tag TAG] [--ray]" >&2; exit 2 ;;
    esac
done
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
BASE_IMAGE=${BASE_IMAGE:-atkd-base:bookworm}
WHEELS=$HERE/wheelhouse

if [[ $BASE_IMAGE == atkd-base:bookworm ]]; then
    "$HERE/build-base.sh" "$BASE_IMAGE"
fi

# The project's wheel, then its requirements read from the wheel's metadata (base and [ray] extra).
rm -rf "$WHEELS/project"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS/project" "$REPO"
"$PYTHON" - "$WHEELS/project"/*.whl "$WHEELS/requirements" <<'EOF'
import sys, zipfile
from email.parser import Parser
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as zf:
    meta = Parser().parsestr(zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode())
base, ray = [], []
for req in meta.get_all("Requires-Dist") or []:
    spec, _, marker = req.partition(";")
    if not marker:
        base.append(spec.strip())
    elif "extra == \"ray\"" in marker.replace("'", '"'):
        ray.append(spec.strip())
out.mkdir(exist_ok=True)
(out / "base.txt").write_text("\n".join(base) + "\n")
(out / "ray.txt").write_text("\n".join(ray) + "\n")
EOF

# Wheels of the requirements (torch comes from the host's pip configuration): deps/ for the base ones,
# extras/ for the [ray] extra's. Each is rebuilt only when its list changed since it was last completed;
# extras/ is kept when --ray is not given, so that images with and without it share their cached layers.
wheels() {  # wheels FOLDER REQUIREMENTS...
    local folder=$WHEELS/$1 stamp=$WHEELS/.$1.complete wanted requirements=()
    wanted=$(cat "${@:2}")
    for file in "${@:2}"; do requirements+=(-r "$file"); done
    mkdir -p "$folder"
    if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
        rm -f "$stamp"
        "$PYTHON" -m pip wheel --quiet --wheel-dir "$folder" --find-links "$WHEELS/deps" "${requirements[@]}"
        echo "$wanted" >"$stamp"
    fi
}
wheels deps "$WHEELS/requirements/base.txt"
if ((RAY)); then
    wheels extras "$WHEELS/requirements/ray.txt"
else
    mkdir -p "$WHEELS/extras"
fi

# Without the buildx plugin the docker CLI (23+) refuses BuildKit; the Dockerfile works with both builders.
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
build() {  # build TARGET NAME [ARGS...]
    docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --target "$1" --tag "$2:$TAG" "${@:3}" "$HERE"
    echo "build-images: $2:$TAG ($(docker image inspect -f '{{.Size}}' "$2:$TAG" | numfmt --to=iec))"
}
build teacher atkd-teacher
build student atkd-student
if ((RAY)); then
    build runtime atkd-ray --build-arg EXTRAS=ray
fi

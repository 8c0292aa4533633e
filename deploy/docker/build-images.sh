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
# The wheelhouse (deploy/docker/wheelhouse/, git-ignored) holds deps/ (the project's runtime requirements,
# rebuilt only when they change) and project/ (the project's own wheel, rebuilt every time).
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

# Wheels of every requirement (torch comes from the host's pip configuration). Skipped when the
# requirements are those the deps/ folder was last completed for.
wanted=$(cat "$WHEELS/requirements/base.txt"; ((RAY)) && cat "$WHEELS/requirements/ray.txt" || true)
if [[ ! -f $WHEELS/deps/.complete || $(cat "$WHEELS/deps/.complete") != "$wanted" ]]; then
    rm -f "$WHEELS/deps/.complete"
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELS/deps" -r "$WHEELS/requirements/base.txt" \
        $( ((RAY)) && echo -r "$WHEELS/requirements/ray.txt")
    echo "$wanted" >"$WHEELS/deps/.complete"
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

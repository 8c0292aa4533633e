"""The compose deployment: both files validate, the CPU file is the GPU file minus its GPUs, and the CPU file
really runs: images built from a host wheelhouse, two teachers healthy, two students distilling from both.

The slow test needs a Docker engine and Debian's docker-compose (deploy/ci/setup-docker.sh installs and starts
them) and skips with the reason where there is none. It also provides the helpers the Kubernetes replay in
test_deploy_k8s.py uses (engine check, images, tiny demo assets).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GPU_FILE = REPO / "docker-compose.yml"
CPU_FILE = REPO / "docker-compose.cpu.yml"
DOCS = REPO / "docs" / "deploy.md"
HEALTH_PROBE = REPO / "deploy" / "docker" / "health_probe.py"
IMAGE_TAG = "dev"  # also the tag of the cpu-dev Kubernetes overlay
COMPOSE = shutil.which("docker-compose")


# --- helpers shared with test_deploy_k8s.py ---------------------------------------------------------------


def run(command: list[str], *, timeout: float = 120, env: dict | None = None, check: bool = True,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; on failure raise with the output in the message."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


@functools.cache
def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no docker CLI (deploy/ci/setup-docker.sh installs docker.io)"
    probe = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=30)
    if probe.returncode != 0:
        return f"no Docker engine answers (deploy/ci/setup-docker.sh starts one): {probe.stderr.strip()[:300]}"
    return None


@functools.cache
def build_images() -> str:
    """Build atkd-teacher:dev and atkd-student:dev from this checkout; returns the tag. Makes the debootstrap
    base image first when it is missing (root and debootstrap needed; skips otherwise)."""
    if run(["docker", "image", "inspect", "atkd-base:bookworm"], check=False).returncode != 0:
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip("the base image atkd-base:bookworm is missing and cannot be built here (needs root and "
                        "debootstrap: deploy/ci/setup-docker.sh)")
    run([str(REPO / "deploy" / "docker" / "build-images.sh"), "--tag", IMAGE_TAG], timeout=1800,
        env={"PYTHON": sys.executable})
    return IMAGE_TAG


def demo_assets(pytestconfig: pytest.Config, out: Path) -> Path:
    """``atkd-demo --prepare-only``: the tiny teacher, student init and text, readable by the containers' user.
    The demo's own cache, kept in pytest's cache directory across runs, makes repeats take seconds."""
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    cache = cache.mkdir("atkd-demo") if cache else out.with_name("atkd-demo-cache")
    demo = Path(sys.executable).with_name("atkd-demo")
    run([str(demo), "--source", "excerpt", "--teacher-steps", "20", "--prepare-only", str(out)], timeout=600,
        env={"ATKD_CACHE": str(cache)})
    # Containers run as uid 10001; save_pretrained writes weights as 0600.
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


def client_tokens(metrics_text: str) -> dict[str, float]:
    """``atkd_teacher_client_tokens_total`` by client id, from a /metrics page."""
    pattern = re.compile(r'^atkd_teacher_client_tokens_total\{client="([^"]+)"\} (\S+)$', re.MULTILINE)
    return {client: float(value) for client, value in pattern.findall(metrics_text)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- fast: the files themselves ------------------------------------------------------------------------------

needs_compose = pytest.mark.skipif(COMPOSE is None, reason="no docker-compose (deploy/ci/setup-docker.sh installs it)")


def compose_config(path: Path, env: dict | None = None) -> dict:
    """The file as docker-compose resolves it (`docker-compose config`: variables, anchors, defaults); raises
    with compose's message when it rejects the file."""
    return yaml.safe_load(run([COMPOSE, "-f", str(path), "config"], env=env).stdout)


@needs_compose
@pytest.mark.parametrize("path", [GPU_FILE, CPU_FILE], ids=lambda p: p.name)
def test_compose_file_validates(path):
    config = compose_config(path)
    teachers = {name for name in config["services"] if name.startswith("teacher")}
    students = set(config["services"]) - teachers
    assert len(teachers) >= 2 and len(students) >= 2
    for name in students:  # every student waits for every teacher to be healthy
        assert config["services"][name]["depends_on"] == {t: {"condition": "service_healthy"} for t in teachers}
    for name in teachers:
        assert config["services"][name]["healthcheck"]["test"][:2] == ["CMD", "atkd-health-probe"]


@needs_compose
@pytest.mark.parametrize(("typo", "message"), [
    (("    ports: [", "    portz: ["), "Unsupported config option for services.teacher-0: 'portz'"),
    (("  healthcheck:", "  healthchek:"), "Unsupported config option for services.teacher-1: 'healthchek'"),  # anchor
])
def test_compose_rejects_a_bad_file(tmp_path, typo, message):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(GPU_FILE.read_text().replace(*typo, 1))
    with pytest.raises(AssertionError, match=re.escape(message)):
        compose_config(broken)


@needs_compose
def test_gpu_file_reserves_one_gpu_per_service():
    services = compose_config(GPU_FILE)["services"]
    gpus = []
    for service in services.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)) == len(services)


@needs_compose
def test_cpu_file_is_the_gpu_file_without_gpus():
    """The files may differ only in the GPU reservations and in which config file is mounted."""
    gpu, cpu = compose_config(GPU_FILE), compose_config(CPU_FILE)
    for service in gpu["services"].values():
        service.pop("deploy")
        service["volumes"] = [v.replace("compose/teacher.yaml:", "compose/teacher-cpu.yaml:")
                              .replace("compose/train.yaml:", "compose/train-cpu.yaml:") for v in service["volumes"]]
    assert gpu == cpu


def test_every_variable_is_documented():
    """Compose variables, the images' build arguments and environment, and the build scripts' environment."""
    docs = DOCS.read_text()
    names = set()
    for path in (GPU_FILE, CPU_FILE):
        names |= set(re.findall(r"\$\{(\w+)", path.read_text()))
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    names |= set(re.findall(r"^ARG (\w+)", dockerfile, re.MULTILINE))
    names |= set(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=", dockerfile, re.MULTILINE)) - {"PATH"}
    names |= {"BASE_IMAGE", "PYTHON", "MIRROR"}  # build-images.sh, build-base.sh
    assert names >= {"ATKD_TAG", "ATKD_ASSETS", "ATKD_TOKEN_FILE", "HF_HUB_OFFLINE", "EXTRAS"}
    missing = sorted(name for name in names if f"`{name}`" not in docs)
    assert not missing, f"not documented in docs/deploy.md: {missing}"


# --- slow: the CPU file, really up ---------------------------------------------------------------------------


@pytest.mark.slow
@needs_compose
def test_cpu_compose_up(tmp_path, pytestconfig):
    if problem := engine_problem():
        pytest.skip(problem)
    tag = build_images()
    assets = demo_assets(pytestconfig, tmp_path / "assets")
    token = tmp_path / "token"
    token.write_text("compose-test-token\n")
    token.chmod(0o644)
    ports = {name: free_port() for name in ("ATKD_TEACHER0_GRPC_PORT", "ATKD_TEACHER1_GRPC_PORT",
                                              "ATKD_TEACHER0_HTTP_PORT", "ATKD_TEACHER1_HTTP_PORT")}
    env = {"ATKD_TAG": tag, "ATKD_ASSETS": str(assets), "ATKD_TOKEN_FILE": str(token),
           **{name: str(port) for name, port in ports.items()}}
    project = f"atkdtest{os.getpid()}"
    compose = [COMPOSE, "-p", project, "-f", str(CPU_FILE)]
    try:
        # `up -d` returns once the students are started, i.e. after both teachers reported healthy.
        run([*compose, "up", "-d"], env=env, timeout=600)
        students = ["student-a", "student-b"]
        deadline = time.monotonic() + 600
        while True:
            states = {s: container_state(project, s) for s in students}
            if all(state["Status"] == "exited" for state in states.values()):
                break
            assert time.monotonic() < deadline, f"students still running after 10 min: {states}"
            time.sleep(2)
        logs = run([*compose, "logs", "--no-color"], env=env).stdout
        assert all(state["ExitCode"] == 0 for state in states.values()), logs[-8000:]
        for student in students:  # the job's summary line: every step done, a final model
            summary = json.loads(next(line.split("| ", 1)[1] for line in logs.splitlines()
                                      if line.startswith(f"{student}_1") and '"step"' in line))
            assert summary["final"] == f"/checkpoints/{student}/final" and not summary["stopped_early"]

        for index in (0, 1):
            assert container_state(project, f"teacher-{index}")["Health"]["Status"] == "healthy"
            # The published gRPC port answers the health service from the host.
            run([sys.executable, str(HEALTH_PROBE), f"127.0.0.1:{ports[f'ATKD_TEACHER{index}_GRPC_PORT']}"])
            # Each teacher computed tokens for both students: they share both replicas.
            url = f"http://127.0.0.1:{ports[f'ATKD_TEACHER{index}_HTTP_PORT']}/metrics"
            tokens = client_tokens(urllib.request.urlopen(url, timeout=10).read().decode())
            assert {"student-a-rank0", "student-b-rank0"} <= set(tokens), tokens
            assert all(value > 0 for value in tokens.values())

        # Checkpoints in the named volume, written by the non-root user.
        listing = run(["docker", "run", "--rm", "-v", f"{project}_checkpoints:/checkpoints:ro", "--entrypoint",
                       "ls", f"atkd-student:{tag}", "/checkpoints/student-a/final", "/checkpoints/student-b/final"])
        assert listing.stdout.count("model.safetensors") == 2

        # SIGTERM reaches the teacher, which drains and exits 0 well within stop_grace_period.
        start = time.monotonic()
        run([*compose, "stop", "teacher-0"], env=env)
        assert time.monotonic() - start < 30
        assert container_state(project, "teacher-0")["ExitCode"] == 0
        assert "atkd-teacher stopped" in run([*compose, "logs", "teacher-0"], env=env).stdout
    finally:
        run([*compose, "down", "--volumes", "--remove-orphans", "--timeout", "60"], env=env, check=False,
            timeout=300)


def container_state(project: str, service: str) -> dict:
    """`docker inspect`'s State of the service's (first) container."""
    return json.loads(run(["docker", "inspect", "--format", "{{json .State}}", f"{project}_{service}_1"]).stdout)

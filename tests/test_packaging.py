"""The distribution as a user gets it: one `atkd` namespace in the wheel, the data it needs inside, and
the installed CLIs working from a directory outside the checkout next to proto-plus (which owns `proto`).

The wheel is built from this checkout and installed into a fresh virtual environment whose dependencies
come from the test run's own environment through a path entry (so nothing is downloaded, and the
editable install of the checkout is not visible there: a ``.pth`` line adds a directory to ``sys.path``
without running that directory's own ``.pth`` hooks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.teacher_harness import wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(ROOT)], check=True, cwd=out)
    (path,) = out.glob("atkd_distill-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; returns its bin directory."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, cwd=env_dir)
    # Only now the dependencies: had the test environment been visible during the install, pip would have
    # replaced its (editable) atkd-distill there with the wheel.
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir / "bin"


def test_the_wheel_holds_one_top_level_package_and_the_data_it_runs_on(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"atkd", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for shipped in ("atkd/student/data/shakespeare_excerpt.txt", "atkd/proto/teacher.proto",
                    "atkd/proto/teacher_pb2.py", "atkd/services/teacher/server.py", "atkd/student/trainer/cli.py"):
        assert shipped in names
    assert "atkd/__init__.py" not in names  # a namespace: other distributions may add atkd.* packages
    assert not [name for name in names if name.startswith("atkd/") and "/tests/" in name]


def test_installed_clis_run_outside_the_checkout_beside_proto_plus(installed, tiny_model_dir, tmp_path):
    python = str(installed / "python")
    probe = ("import json, proto, atkd.proto.teacher_pb2 as pb, atkd.student.data.corpus as corpus; "
             "print(json.dumps([proto.__file__, hasattr(proto, 'Message'), pb.__file__, "
             "corpus.EXCERPT_PATH.is_file()]))")
    found = json.loads(subprocess.run([python, "-c", probe], cwd=tmp_path, check=True, capture_output=True,
                                      text=True).stdout)
    proto_file, is_proto_plus, stubs, excerpt = found
    assert is_proto_plus and "site-packages" in proto_file  # `proto` is still proto-plus's
    assert stubs.startswith(str(installed.parent)) and excerpt  # atkd comes from the wheel, with its data
    for cli in ("atkd-teacher", "atkd-student", "atkd-demo"):
        subprocess.run([str(installed / cli), "--help"], cwd=tmp_path, check=True, capture_output=True)

    ready_file = tmp_path / "ready.json"
    server = subprocess.Popen([str(installed / "atkd-teacher"), "serve", "--model", str(tiny_model_dir), "--port",
                               "0", "--http-port", "0", "--threads", "1", "--ready-file", str(ready_file)],
                              cwd=tmp_path, stderr=subprocess.DEVNULL)
    try:
        wait_until(ready_file.is_file, timeout=60, what="the installed teacher to serve")
        port = json.loads(ready_file.read_text())["grpc_port"]
        check = ("import sys; from atkd.student.client import TeacherClient; "
                 "print(TeacherClient(sys.argv[1]).info().vocab_size)")
        vocab = subprocess.run([python, "-c", check, f"127.0.0.1:{port}"], cwd=tmp_path, check=True,
                               capture_output=True, text=True).stdout
        assert int(vocab) > 0
        server.terminate()
        assert server.wait(30) == 0
    finally:
        server.kill()

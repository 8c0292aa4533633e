"""Generate the Python stubs of ``proto/teacher.proto`` with grpcio-tools (the committed stubs come from here).

    python -m atkd.proto.generate            # rewrite proto/teacher_pb2.py and proto/teacher_pb2_grpc.py
    python -m atkd.proto.generate --out DIR  # write them into DIR instead (the sync test does this)

The stubs import as ``atkd.proto.teacher_pb2``: protoc derives a generated module's imports from the
.proto file's path under its include root, so it runs on a copy at ``<tmp>/atkd/proto/teacher.proto``
and the gRPC module imports ``from atkd.proto import teacher_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO = HERE / "teacher.proto"
IMPORT_PATH = Path("atkd/proto")
GENERATED = ("teacher_pb2.py", "teacher_pb2_grpc.py")


def generate(out: Path = HERE) -> list[Path]:
    """Run protoc on :data:`PROTO`; returns the paths of the generated files in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / IMPORT_PATH).mkdir(parents=True)
        shutil.copy(PROTO, root / IMPORT_PATH / PROTO.name)
        args = ["protoc", f"-I{root}", f"--python_out={root}", f"--grpc_python_out={root}",
                str(root / IMPORT_PATH / PROTO.name)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        for name in GENERATED:
            shutil.copy(root / IMPORT_PATH / name, out / name)
    return [out / name for name in GENERATED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write the *_pb2*.py files to")
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()

"""Generate the Python stubs of ``proto/teacher.proto`` with grpcio-tools (the committed stubs come from here).

    python -m proto.generate            # rewrite proto/teacher_pb2.py and proto/teacher_pb2_grpc.py
    python -m proto.generate --out DIR  # write them under DIR/proto/ instead (the sync test does this)

protoc runs with the repository root as include path on ``proto/teacher.proto``, so the gRPC module
imports ``from proto import teacher_pb2`` and the stubs import as ``proto.teacher_pb2``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto/teacher.proto"
GENERATED = ("proto/teacher_pb2.py", "proto/teacher_pb2_grpc.py")


def generate(out: Path = ROOT) -> list[Path]:
    """Run protoc on :data:`PROTO`; returns the paths of the generated files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out / name for name in GENERATED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write proto/*_pb2*.py under")
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()

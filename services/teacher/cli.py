"""``atkd-teacher``: the teacher replica's command line.

    atkd-teacher serve --model DIR [--config teacher.yaml] [--port 50051 --http-port 8080 ...]
    atkd-teacher serve --backend ray --model DIR ...    # the same replica as a Ray Serve app on a local Ray

Every field of :class:`~atkd.services.teacher.config.TeacherConfig` is a flag (``max_batch_tokens`` ->
``--max-batch-tokens``) and a key of the YAML file given with ``--config``; flags override the file.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from .config import TeacherConfig
from .server import run


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; a flag not given leaves the field to the YAML file or the default."""
    for name, field in TeacherConfig.model_fields.items():
        kind = field.annotation
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        options: dict = {"type": kind}
        if kind is bool:
            options = {"type": _boolean, "metavar": "{true,false}"}
        if typing.get_origin(kind) is typing.Literal:
            options = {"choices": typing.get_args(kind)}
        if field.is_required():
            note = " (required)"
        else:
            note = "" if field.default is None else f" (default: {field.default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                            help=f"{field.description}{note}", **options)


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_config(argv: Sequence[str] | None = None) -> TeacherConfig:
    """The config of ``atkd-teacher serve ARGS``: defaults, then ``--config FILE``, then flags."""
    return parse_args(argv)[0]


def parse_args(argv: Sequence[str] | None = None) -> tuple[TeacherConfig, str]:
    """(config, backend) of ``atkd-teacher serve ARGS``."""
    parser = argparse.ArgumentParser(prog="atkd-teacher", description="ATKD teacher logit service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over gRPC (and HTTP for probes and metrics)")
    serve.add_argument("--config", type=Path, help="YAML file of options (keys as the flags, with underscores)")
    serve.add_argument("--backend", choices=("grpc", "ray"), default="grpc",
                       help="grpc: this process serves gRPC and HTTP; ray: a local Ray runs the replica as a Ray "
                            "Serve app behind Serve's gRPC proxy on --port and HTTP proxy on --http-port "
                            "(default: grpc)")
    add_config_flags(serve)
    args = vars(parser.parse_args(argv))
    args.pop("command")
    backend = args.pop("backend")
    try:
        return TeacherConfig.load(args.pop("config"), **args), backend
    except ValidationError as error:  # one line per problem, without pydantic's URLs
        serve.error("; ".join(f"{'.'.join(map(str, problem['loc'])) or 'config'}: {problem['msg']}"
                              for problem in error.errors()))


def main(argv: Sequence[str] | None = None) -> None:
    config, backend = parse_args(argv)
    if backend == "ray":
        from .ray_app import run as run_on_ray  # imports Ray: only this backend pays for it

        run_on_ray(config)
    else:
        run(config)


if __name__ == "__main__":
    main()

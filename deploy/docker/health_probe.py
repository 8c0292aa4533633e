#!/opt/atkd/bin/python3
"""``atkd-health-probe [HOST:PORT]``: exit 0 when the teacher's gRPC health service answers SERVING.

Asks ``grpc.health.v1.Health/Check`` for the whole server (service ``""``) at HOST:PORT (default
127.0.0.1:50051) over plaintext gRPC, with a 3 s deadline; exits 1 with the reason on stderr otherwise
(not yet loaded, draining after SIGTERM, nothing listening). The images' HEALTHCHECK and the compose
file run it; Kubernetes uses its native gRPC probe instead. No grpc_health_probe binary is needed: the
health stubs come with grpcio-health-checking, a dependency of the project.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "127.0.0.1:50051"
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as error:
        print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if reply.status != SERVING:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The teacher as a Ray Serve application: a real local Ray serving the tiny Llama through Serve's gRPC proxy."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.metadata import APPLICATION_KEY, CLIENT_ID_KEY
from atkd.services.teacher.config import TeacherConfig
from atkd.student.client import ScoreBatch, TeacherClient, TeacherError
from atkd.student.demo.teacher_process import teacher_process
from tests.teacher_harness import http_get, reference_signals
from tests.test_teacher_server import SEQUENCES, TOLERANCE, assert_matches_reference, request

with warnings.catch_warnings():  # Ray 2.60's own models use pydantic features deprecated since pydantic 2.0
    warnings.simplefilter("ignore", DeprecationWarning)
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from atkd.services.teacher.ray_app import (
        APP_NAME,
        GRPC_SERVICER_FUNCTIONS,
        ROUTE_PREFIX,
        application,
        build_app,
        free_port,
    )

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
#: The options of conftest's ``serve_teacher`` replicas, so that the two backends can be compared.
OPTIONS = dict(top_k_max=64, max_tail_samples=8, max_batch_tokens=1024)


@dataclass
class ServeTeacher:
    address: str
    handle: serve.handle.DeploymentHandle

    def stub(self, client: str = "test") -> tuple[pb_grpc.TeacherStub, tuple]:
        metadata = ((CLIENT_ID_KEY, client), (APPLICATION_KEY, APP_NAME))
        return pb_grpc.TeacherStub(grpc.insecure_channel(self.address)), metadata

    def replica_stats(self, replicas: int) -> dict[str, dict]:
        """Each replica's :meth:`TeacherReplica.stats`, asking through the handle until ``replicas`` answered."""
        seen: dict[str, dict] = {}
        for _ in range(200):
            stats = self.handle.stats.remote().result(timeout_s=30)
            seen[stats["replica"]] = stats
            if len(seen) == replicas:
                return seen
        raise AssertionError(f"only {len(seen)} of {replicas} replicas answered")


@pytest.fixture(scope="module")
def ray_teacher(tiny_model_dir):
    """Two replicas of the tiny Llama (1 torch thread each) behind Serve's gRPC proxy on a free port."""
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), pythonpath]))  # for Ray's processes
    ray.init(address="local", num_cpus=2, object_store_memory=128 << 20, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        port = free_port("127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": free_port("127.0.0.1")},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        config = TeacherConfig(model=tiny_model_dir, threads=1, **OPTIONS)
        handle = serve.run(application(config, num_replicas=2), name=APP_NAME, route_prefix=ROUTE_PREFIX)
        yield ServeTeacher(f"127.0.0.1:{port}", handle)
        serve.shutdown()
    finally:
        ray.shutdown()
        if pythonpath is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = pythonpath


def test_serve_config_file_is_valid_and_builds_the_app():
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text()))
    assert config.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    (app,) = config.applications
    assert (app.name, app.route_prefix, app.import_path) == (APP_NAME, ROUTE_PREFIX,
                                                             "atkd.services.teacher.ray_app:build_app")
    (deployment,) = app.deployments
    assert deployment.ray_actor_options.num_gpus == 1 and deployment.autoscaling_config["max_replicas"] > 1
    assert deployment.name == "Teacher"
    assert isinstance(build_app(app.args), serve.Application)  # what Serve does with import_path and args
    with pytest.raises(ValueError, match="max_batch_token"):
        build_app({**app.args, "max_batch_token": 1})


def test_cli_ray_backend_serves_and_stops_on_sigterm(tiny_model_dir, tiny_tokenizer):
    """``atkd-teacher serve --backend ray``: its own local Ray; the log line names the ports; SIGTERM stops it."""
    with teacher_process(tiny_model_dir, extra_args=["--backend", "ray", "--threads", "1"]) as teacher:
        with TeacherClient(teacher.address, tokenizer=tiny_tokenizer, application=APP_NAME) as client:
            assert client.score([list(range(30))], top_k=4).target_logprob.shape == (1, 30)
        assert http_get(teacher.http_port, "/-/healthz")[0] == 200
        assert teacher.stop(60) == 0
        assert any("atkd-teacher stopped" in line for line in teacher.log)


def test_student_client_gets_the_plain_servers_signal_through_serve(ray_teacher, serve_teacher, tiny_model_dir,
                                                                     tiny_tokenizer):
    plain = serve_teacher()
    mask = torch.ones(len(SEQUENCES), 40, dtype=torch.bool)
    mask[0, :10] = False
    options = dict(score_mask=mask, top_k=16, temperature=1.5)
    with TeacherClient(ray_teacher.address, tokenizer=tiny_tokenizer, application=APP_NAME) as client, \
            TeacherClient(plain.address, tokenizer=tiny_tokenizer) as plain_client:
        assert client.check() == plain_client.check()
        through_serve, direct = client.score(SEQUENCES, **options), plain_client.score(SEQUENCES, **options)
        streamed = list(client.score_stream([ScoreBatch.of(SEQUENCES, score_mask=mask)] * 3, in_flight=2, top_k=16,
                                            temperature=1.5))
    references = reference_signals(tiny_model_dir, SEQUENCES, 16, temperature=1.5)
    for signal in (through_serve, *streamed):
        assert_matches_reference(signal, ScoreBatch.of(SEQUENCES, score_mask=mask), references, "fp16")
        for name in ("target_logprob", "tail_logprob", "entropy", "uncertainty"):
            torch.testing.assert_close(getattr(signal, name), getattr(direct, name), atol=TOLERANCE["fp16"][name],
                                       rtol=1e-4, msg=name)


def test_both_replicas_serve_traffic(ray_teacher):
    before = ray_teacher.replica_stats(2)
    generator = torch.Generator().manual_seed(0)
    work = [torch.randint(0, 512, (2, 24), generator=generator) for _ in range(24)]
    with TeacherClient(ray_teacher.address, application=APP_NAME) as client, ThreadPoolExecutor(6) as pool:
        signals = list(pool.map(lambda ids: client.score(ids, top_k=4), work))
    assert all(signal.topk_ids.shape == (2, 24, 4) for signal in signals)
    after = ray_teacher.replica_stats(2)
    served = {replica: stats["answered"].get("Score/OK", 0) - before[replica]["answered"].get("Score/OK", 0)
              for replica, stats in after.items()}
    assert sum(served.values()) == len(work)
    assert min(served.values()) > 0, served
    assert len({stats["pid"] for stats in after.values()}) == 2


@pytest.mark.parametrize("fields", [dict(sequences=[[1, 512]]), dict(top_k=65), dict(sequences=[[1, 2], []])],
                         ids=["token-out-of-range", "top_k-too-large", "empty-sequence"])
def test_bad_request_gets_the_plain_servers_status(ray_teacher, serve_teacher, fields):
    plain = serve_teacher()
    direct = pb_grpc.TeacherStub(grpc.insecure_channel(plain.address))
    through_serve, metadata = ray_teacher.stub()
    failures = []
    for teacher, call_metadata in ((direct, ()), (through_serve, metadata)):
        with pytest.raises(grpc.RpcError) as failure:
            teacher.Score(request(**fields), metadata=call_metadata, timeout=30)
        failures.append((failure.value.code(), failure.value.details()))
    assert failures[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert failures[1] == failures[0]
    # on a stream the error comes back in its response and the stream goes on, as on the plain server
    responses = {response.id: response for response in through_serve.ScoreStream(
        iter([request(request_id="bad", **fields), request(request_id="good")]), metadata=metadata, timeout=30)}
    assert (responses["bad"].error.code, responses["bad"].error.message) == (failures[0][0].value[0], failures[0][1])
    assert responses["good"].signal.num_positions == 3


def test_student_client_raises_the_status_as_teacher_error(ray_teacher):
    with TeacherClient(ray_teacher.address, application=APP_NAME) as client, pytest.raises(TeacherError) as failure:
        client.score([[1, 600]], top_k=4)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_ids[1] = 600 is outside the vocabulary [0, 512)" in failure.value.message


def test_bearer_token_is_checked_in_the_replica(ray_teacher, tiny_model_dir, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    config = TeacherConfig(model=tiny_model_dir, threads=1, auth_token_file=tmp_path / "token", **OPTIONS)
    # no CPU left for a third replica in this 2-CPU Ray: it takes none (1 torch thread, an idle test)
    app = application(config, name="TeacherWithAuth", ray_actor_options={"num_cpus": 0})
    serve.run(app, name="with-auth", route_prefix="/with-auth")
    try:
        for token in (None, "wrong"):
            with TeacherClient(ray_teacher.address, token=token, application="with-auth") as client, \
                    pytest.raises(TeacherError) as failure:
                client.info()
            assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in failure.value.message
        with TeacherClient(ray_teacher.address, token="s3cret", application="with-auth") as client:
            assert client.score([[1, 2, 3]], top_k=2).topk_ids.shape == (1, 3, 2)
    finally:
        serve.delete("with-auth")


def test_generate_through_serve_streams_the_plain_servers_tokens(ray_teacher, serve_teacher):
    """Generate is served by the replica's method of that name: a seeded request gives the plain server's tokens,
    and a bad one the plain server's INVALID_ARGUMENT."""
    from atkd.proto import teacher_pb2 as pb

    plain = serve_teacher()
    request = pb.GenerateRequest(id="g", prompt_ids=SEQUENCES[0][:6] + SEQUENCES[1][:4], prompt_lengths=[6, 4],
                                 max_new_tokens=8, temperature=1.3, seed=11, ignore_stop=True)
    stub, metadata = ray_teacher.stub()
    through_serve = sorted(stub.Generate(request, metadata=metadata, timeout=60), key=lambda r: r.index)
    with grpc.insecure_channel(plain.address) as channel:
        direct = sorted(pb_grpc.TeacherStub(channel).Generate(request, timeout=60), key=lambda r: r.index)
    assert [list(r.token_ids) for r in through_serve] == [list(r.token_ids) for r in direct]
    assert [len(r.token_ids) for r in direct] == [8, 8]
    request.top_p = 2.0
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, metadata=metadata, timeout=60))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in raised.value.details()

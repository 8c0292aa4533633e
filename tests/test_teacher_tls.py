"""TLS on the gRPC side with certificates made here (a throwaway CA signs the server's and a client's):
TLS clients served, plaintext clients refused, and with ``tls_client_ca`` (mTLS) clients without a
certificate of that CA refused."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.student.client import TeacherClient, TeacherError
from atkd.student.client.channel import open_channel

x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package makes the test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _issue(subject: str, issuer: tuple | None, directory: Path, *, ca: bool = False) -> tuple:
    """A P-256 key and a one-day certificate for ``subject`` (self-signed when ``issuer`` is None); both
    written as PEM to ``directory`` (``<subject>.pem``, ``<subject>.key``). Returns (key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{subject}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{subject}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key, certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem, server.pem/.key and client.pem/.key signed by the CA, and rogue.pem/.key self-signed."""
    directory = tmp_path_factory.mktemp("pki")
    ca = _issue("ca", None, directory, ca=True)
    _issue("server", ca, directory)
    _issue("client", ca, directory)
    _issue("rogue", None, directory)
    return directory


def test_tls_serves_tls_clients_and_refuses_plaintext(serve_teacher, pki):
    server = serve_teacher(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with TeacherClient(server.address, tls_root_cert=pki / "ca.pem") as client:
        assert client.score([[1, 2, 3]], top_k=2).topk_ids.shape == (1, 3, 2)
    with TeacherClient(server.address, timeout=5) as plaintext, pytest.raises(TeacherError) as failure:
        plaintext.info()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_wants_a_client_certificate_of_its_ca(serve_teacher, pki):
    server = serve_teacher(tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem")

    def info(client_cert) -> grpc.StatusCode | int:
        channel = open_channel(server.address, tls_root_cert=pki / "ca.pem", tls_client_cert=client_cert)
        try:
            return pb_grpc.TeacherStub(channel).Info(pb.InfoRequest(), timeout=5).vocab_size
        except grpc.RpcError as error:
            return error.code()
        finally:
            channel.close()

    assert info((pki / "client.pem", pki / "client.key")) == 512
    assert info(None) == grpc.StatusCode.UNAVAILABLE
    assert info((pki / "rogue.pem", pki / "rogue.key")) == grpc.StatusCode.UNAVAILABLE

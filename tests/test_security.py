"""TLS, mutual TLS and bearer tokens: clients without a valid certificate or token are refused.
Raw queries and user ids never reach the logs at INFO or above."""

from __future__ import annotations

import logging

import grpc
import pytest
import trustme
from conftest import ServerThread, server_settings

from bundlerec import TLS, BundleRecError, Client


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("client.bundlerec.test")
    rogue = trustme.CA().issue_cert("rogue.example")
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server_cert.private_key_pem.write_to_path(str(paths["key"]))
    for blob in server_cert.cert_chain_pems:
        blob.write_to_path(str(paths["cert"]), append=True)
    return ca, paths, client_cert, rogue


def tls_for(ca, cert=None) -> TLS:
    if cert is None:
        return TLS(root_certificates=ca.cert_pem.bytes())
    chain = b"".join(p.bytes() for p in cert.cert_chain_pems)
    return TLS(root_certificates=ca.cert_pem.bytes(), private_key=cert.private_key_pem.bytes(), certificate_chain=chain)


def test_tls(tiny_artifact, pki):
    ca, paths, _, _ = pki
    srv = ServerThread(server_settings(tiny_artifact, tls_cert=paths["cert"], tls_key=paths["key"])).start()
    target = f"localhost:{srv.app.port}"
    try:
        with Client(target, tls=tls_for(ca), timeout=5) as c:
            assert c.search("soda", 2)
        with Client(target, timeout=2, retry=None) as plain, pytest.raises(BundleRecError) as info:  # the refusal itself
            plain.search("soda", 2)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with Client(target, tls=TLS(root_certificates=trustme.CA().cert_pem.bytes()), timeout=2, retry=None) as wrong_ca, pytest.raises(BundleRecError):
            wrong_ca.search("soda", 2)
    finally:
        srv.stop()


def test_mutual_tls_requires_a_client_certificate(tiny_artifact, pki):
    ca, paths, client_cert, rogue = pki
    srv = ServerThread(server_settings(tiny_artifact, tls_cert=paths["cert"], tls_key=paths["key"], tls_client_ca=paths["ca"])).start()
    target = f"localhost:{srv.app.port}"
    try:
        with Client(target, tls=tls_for(ca, client_cert), timeout=5) as c:
            assert c.search("soda", 2)
        for tls in (tls_for(ca), tls_for(ca, rogue)):  # no client certificate; one from another CA
            with Client(target, tls=tls, timeout=2, retry=None) as c, pytest.raises(BundleRecError) as info:
                c.search("soda", 2)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_bearer_token(tiny_artifact, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    srv = ServerThread(server_settings(tiny_artifact, auth_token_file=token_file)).start()
    try:
        with Client(srv.target, token="s3cret-token") as c:
            assert c.search("soda", 2)
            assert list(c.recommend("soda", max_bundles=1))
        for token in (None, "wrong", "s3cret-token-but-longer"):
            with Client(srv.target, token=token) as c:
                with pytest.raises(BundleRecError) as info:
                    c.search("soda", 2)
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(BundleRecError) as info:
                    list(c.recommend("soda"))
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"  # policy: health is exempt for probes
    finally:
        srv.stop()


def test_logs_never_hold_raw_queries_or_user_ids(tiny_artifact, caplog):
    secret_query, secret_user = "zanzibar-quince-preserve", "user-8675309"
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="bundlerec_server"):
        srv = ServerThread(server_settings(tiny_artifact)).start()
        try:
            with Client(srv.target) as c:
                list(c.recommend(secret_query, user_id=secret_user))
                c.search(secret_query, 3)
                with pytest.raises(BundleRecError):
                    list(c.recommend(secret_query, user_id="bad user!"))
        finally:
            srv.stop()
    info_and_above = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info_and_above, "the server logs at INFO"
    assert not [m for m in info_and_above if secret_query in m or secret_user in m]

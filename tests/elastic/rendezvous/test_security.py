"""Mutual TLS (without a client certificate we fail clearly, with one a round forms) and etcd
user/password authentication."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from elastic.rendezvous import EtcdAuthError, EtcdTlsError, connect, create_handler
from tests.elastic.rendezvous.conftest import etcd_config, form_round
from tests.support.etcd import EtcdFactory, enable_auth, make_tls_files


def test_tls_client_certificate_is_required_and_sufficient(
    etcd_factory: EtcdFactory, tmp_path: Path, run_id: str
) -> None:
    tls = make_tls_files(tmp_path / "pki")
    server = etcd_factory(tls=tls)

    no_cert = etcd_config(server, tls_ca=tls.ca, connect_timeout_seconds=2.0)
    with pytest.raises(EtcdTlsError, match=server.endpoint) as refused:
        connect(no_cert)
    assert "TLS" in str(refused.value) and "CERTIFICATE" in str(refused.value).upper()
    # Through torch's interface the same error is also torch's type (torchrun's agent).
    with pytest.raises(RendezvousConnectionError, match=server.endpoint) as via_torch:
        create_handler(no_cert, run_id=run_id, min_nodes=1, max_nodes=1)
    assert isinstance(via_torch.value, EtcdTlsError)

    with_cert = etcd_config(server, tls_ca=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key)
    handlers = [
        create_handler(
            with_cert,
            run_id=run_id,
            min_nodes=2,
            max_nodes=2,
            local_addr="127.0.0.1",
            last_call_timeout_seconds=0.5,
        )
        for _ in range(2)
    ]
    try:
        assert sorted(form_round(handlers)) == [(0, 2), (1, 2)]  # type: ignore[type-var]
    finally:
        for handler in handlers:
            handler.shutdown()


def test_user_password_auth_is_enforced_and_survives_a_restart(
    etcd_factory: EtcdFactory, run_id: str
) -> None:
    server = etcd_factory()
    enable_auth(server, "s3cret")
    key = f"/test/{run_id}/k"
    insecure = {"allow_insecure_auth": True}  # the test server speaks plain http

    for wrong in ({"user": "root", "password": "nope", **insecure}, {}):
        with pytest.raises(EtcdAuthError, match=server.endpoint):
            refused = connect(etcd_config(server, **wrong))  # status needs no auth, put does
            try:
                refused.put(key, b"v")
            finally:
                refused.close()

    client = connect(etcd_config(server, user="root", password="s3cret", **insecure))
    try:
        client.put(key, b"before")
        server.restart()  # etcd forgets auth tokens; the client re-authenticates
        client.put(key, b"after")
        stored = client.get(key)
        assert stored is not None and stored.value == b"after"
    finally:
        client.close()

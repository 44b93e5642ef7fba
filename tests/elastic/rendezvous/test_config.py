"""EtcdConfig validation and torchrun's --rdzv-endpoint / --rdzv-conf parsing."""

from __future__ import annotations

import re
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousParameters

from elastic.config import ConfigError, build
from elastic.rendezvous import EtcdConfig
from elastic.rendezvous.config import parse_endpoint
from elastic.rendezvous.torchrun import config_from_params, handler_factory


def test_defaults_are_valid_and_documented_values() -> None:
    config = EtcdConfig()
    assert config.endpoints == () and config.key_prefix == "/elasticd"
    assert config.ttl_seconds == 10.0 and config.lease_ttl == 10


def test_build_from_yaml_mapping_turns_lists_into_tuples() -> None:
    config = build(EtcdConfig, {"endpoints": ["a:2379", "https://b:2380"], "ttl_seconds": 3})
    assert config.endpoints == ("a:2379", "https://b:2380")
    assert config.uses_tls


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"endpoints": ["host:notaport"]}, "endpoints[0]"),
        ({"key_prefix": "elasticd"}, "key_prefix"),
        ({"key_prefix": "/elasticd/"}, "key_prefix"),
        ({"ttl_seconds": 0.5}, "ttl_seconds"),
        ({"connect_timeout_seconds": 0}, "connect_timeout_seconds"),
        ({"tls_cert": "/c.pem"}, "tls_cert"),
        ({"user": "root"}, "user"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_values_name_the_key(mapping: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"etcd.{key}")):
        build(EtcdConfig, mapping, path="etcd.")


def test_parse_endpoint_accepts_schemes_ipv6_and_default_port() -> None:
    assert parse_endpoint("10.0.0.1:2379").netloc == "10.0.0.1:2379"
    assert parse_endpoint("https://etcd").port == 2379
    assert parse_endpoint("https://etcd").scheme == "https"
    assert parse_endpoint("[::1]:23790").host == "::1"


def params(endpoint: str, **conf: Any) -> RendezvousParameters:
    return RendezvousParameters("etcd3", endpoint, "job", 1, 2, **conf)


def test_rdzv_endpoint_takes_several_comma_separated_endpoints() -> None:
    config = config_from_params(params("a:2379, b:2379", timeout=900))
    assert config.endpoints == ("a:2379", "b:2379")


def test_rdzv_conf_options_map_onto_the_config() -> None:
    config = config_from_params(
        params(
            "a:2379",
            key_prefix="/jobs",
            ttl_seconds="60",
            tls_ca="/ca.pem",
            tls_cert="/c.pem",
            tls_key="/k.pem",
            user="u",
            password="p",
            connect_timeout_seconds="2.5",
        )
    )
    assert (config.key_prefix, config.state_ttl_seconds) == ("/jobs", 60.0)
    assert (config.tls_ca, config.tls_cert, config.tls_key) == ("/ca.pem", "/c.pem", "/k.pem")
    assert (config.user, config.password, config.connect_timeout_seconds) == ("u", "p", 2.5)


@pytest.mark.parametrize(
    ("endpoint", "conf", "message"),
    [
        ("", {}, "rdzv-endpoint"),
        ("a:2379", {"ttl_secs": "5"}, "unknown rdzv_conf option"),
        ("a:2379", {"connect_timeout_seconds": "soon"}, "connect_timeout_seconds"),
        ("a:2379", {"key_prefix": "nope"}, "key_prefix"),
    ],
)
def test_bad_torchrun_options_are_value_errors(
    endpoint: str, conf: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_params(params(endpoint, **conf))


def test_handler_factory_returns_a_creator() -> None:
    creator = handler_factory()
    assert callable(creator)
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        creator(params(""))

"""The group's etcd records: round trips, and every kind of bad value is one RecordError line."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from elastic.rendezvous.errors import EtcdStateError
from elastic.rendezvous.records import (
    AbortRecord,
    JoinRecord,
    RecordError,
    RoundRecord,
    decode_abort,
    decode_join,
    decode_node,
    decode_round,
    encode_node,
)

ROUND_KEY = "/elasticd/run/group/round"
JOIN_KEY = "/elasticd/run/joins/00000003/node-a"
ABORT_KEY = "/elasticd/run/group/abort/00000003"
NODE_KEY = "/elasticd/run/group/nodes/node-a"

CLOSED = RoundRecord(
    round=3,
    state="closed",
    opener="node-b",
    min_nodes=2,
    max_nodes=4,
    participants=("node-a", "node-b", "node-c"),
    master_addr="10.0.0.1",
    master_port=29500,
)


def raw(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def open_fields(**overrides: Any) -> dict[str, Any]:
    fields = {"v": 1, "round": 3, "state": "open", "opener": "node-b", "min_nodes": 2}
    return {**fields, "max_nodes": 4, **overrides}


def closed_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(CLOSED.to_bytes())
    fields.update(overrides)
    return fields


def assert_one_line_error(excinfo: pytest.ExceptionInfo[RecordError], key: str) -> str:
    message = str(excinfo.value)
    assert excinfo.value.key == key
    assert message.startswith(f"etcd key {key}: ")
    assert len(message.splitlines()) == 1
    return message


# ---------------------------------------------------------------------------- round trips
def test_a_closed_round_survives_a_round_trip() -> None:
    assert decode_round(ROUND_KEY, CLOSED.to_bytes()) == CLOSED
    assert CLOSED.rank_of("node-a") == 0 and CLOSED.rank_of("node-c") == 2
    assert CLOSED.rank_of("node-z") is None


def test_an_open_round_round_trips_without_participants_or_master() -> None:
    opened = RoundRecord(round=1, state="open", opener="node-a", min_nodes=1, max_nodes=1)
    assert set(json.loads(opened.to_bytes())) == {
        "v",
        "round",
        "state",
        "opener",
        "min_nodes",
        "max_nodes",
    }
    assert decode_round(ROUND_KEY, opened.to_bytes()) == opened
    assert not opened.closed


def test_join_abort_and_node_records_round_trip() -> None:
    join = JoinRecord(name="node-a", addr="host-a.example", port=29500)
    assert decode_join(JOIN_KEY, join.to_bytes()) == join
    abort = AbortRecord(node="node-a", detail="worker exited 1")
    assert decode_abort(ABORT_KEY, abort.to_bytes()) == abort
    info = {"state": "active", "addr": "h", "gpus": 8}
    assert decode_node(NODE_KEY, encode_node(info)) == info
    assert decode_node(NODE_KEY, encode_node({**info, "v": 7})) == info  # v is ours to write


def test_an_abort_detail_is_cut_to_what_the_reader_accepts() -> None:
    abort = AbortRecord(node="node-a", detail="x" * 5000)
    assert decode_abort(ABORT_KEY, abort.to_bytes()).detail == "x" * 2000


def test_records_are_versioned_compact_json() -> None:
    assert CLOSED.to_bytes().startswith(b"{") and b" " not in CLOSED.to_bytes()
    assert json.loads(CLOSED.to_bytes())["v"] == 1


# ---------------------------------------------------------------------------- bad values
NOT_RECORDS = [
    pytest.param(b"garbage", "not JSON", id="not-json"),
    pytest.param(b"\xff\xfe\x00", "not JSON", id="not-utf8"),
    pytest.param(b"", "not JSON", id="empty"),
    pytest.param(b"[" * 100_000, "not JSON", id="nested-deeper-than-the-parser"),
    pytest.param(pickle.dumps({"state": "active"}), "not JSON", id="pickle"),
    pytest.param(b"[1, 2]", "a JSON list, not an object", id="json-list"),
    pytest.param(b'"round"', "a JSON str, not an object", id="json-string"),
    pytest.param(b"null", "a JSON NoneType, not an object", id="json-null"),
    pytest.param(b'{"state": "active"}', "version None", id="no-version"),
    pytest.param(b'{"v": 2, "state": "active"}', "version 2", id="version-2"),
    pytest.param(b'{"v": "1", "state": "active"}', "version '1'", id="version-string"),
    pytest.param(b'{"v": true, "state": "active"}', "version True", id="version-true"),
    pytest.param(b'{"v": 1.0, "state": "active"}', "version 1.0", id="version-float"),
]


@pytest.mark.parametrize(
    "decode,key",
    [
        (decode_round, ROUND_KEY),
        (decode_join, JOIN_KEY),
        (decode_abort, ABORT_KEY),
        (decode_node, NODE_KEY),
    ],
)
@pytest.mark.parametrize("value,problem", NOT_RECORDS)
def test_a_value_that_is_not_a_versioned_json_object_is_refused_naming_the_key(
    decode: Any, key: str, value: bytes, problem: str
) -> None:
    with pytest.raises(RecordError) as excinfo:
        decode(key, value)
    assert problem in assert_one_line_error(excinfo, key)


def test_record_errors_are_state_errors_that_torch_callers_catch_through_the_handler() -> None:
    from torch.distributed.elastic.rendezvous.api import RendezvousStateError

    from elastic.rendezvous.torch_errors import torch_errors

    with pytest.raises(RendezvousStateError) as raised, torch_errors():
        decode_round(ROUND_KEY, b"garbage")
    assert isinstance(raised.value, RecordError) and issubclass(RecordError, EtcdStateError)


BAD_ROUNDS = [
    pytest.param(closed_fields(extra=1), "unknown field(s) extra", id="unknown-field"),
    pytest.param(
        {k: v for k, v in closed_fields().items() if k != "master_port"},
        "missing field(s) master_port",
        id="missing-field",
    ),
    pytest.param(closed_fields(round="3"), "round='3' is not valid", id="round-string"),
    pytest.param(closed_fields(round=0), "round=0 is not valid", id="round-zero"),
    pytest.param(closed_fields(round=True), "round=True is not valid", id="round-bool"),
    pytest.param(open_fields(state="done"), "state='done' is not valid", id="state-unknown"),
    pytest.param(open_fields(state=["closed"]), "state=['closed'] is not valid", id="state-list"),
    pytest.param(closed_fields(opener="a b"), "opener='a b' is not valid", id="opener-space"),
    pytest.param(closed_fields(opener=""), "opener='' is not valid", id="opener-empty"),
    pytest.param(closed_fields(min_nodes=1.5), "min_nodes=1.5 is not valid", id="min-float"),
    pytest.param(closed_fields(max_nodes=None), "max_nodes=None is not valid", id="max-null"),
    pytest.param(closed_fields(min_nodes=5), "min_nodes 5 > max_nodes 4", id="min-over-max"),
    pytest.param(closed_fields(master_port=0), "master_port=0 is not valid", id="port-zero"),
    pytest.param(closed_fields(master_port=70000), "master_port=70000", id="port-too-big"),
    pytest.param(closed_fields(master_port="29500"), "master_port='29500'", id="port-string"),
    pytest.param(closed_fields(master_addr=""), "master_addr='' is not valid", id="addr-empty"),
    pytest.param(closed_fields(master_addr="a\nb"), "master_addr='a\\nb'", id="addr-newline"),
    pytest.param(closed_fields(participants=[]), "participants=[] is not valid", id="no-members"),
    pytest.param(closed_fields(participants="node-a"), "participants='node-a'", id="members-str"),
    pytest.param(
        closed_fields(participants=["node-b", "node-a"]), "not sorted and unique", id="unsorted"
    ),
    pytest.param(
        closed_fields(participants=["node-a", "node-a", "node-b"]),
        "not sorted and unique",
        id="duplicate",
    ),
    pytest.param(
        closed_fields(participants=["node-a", 7]), "holds a name that is not valid", id="int-name"
    ),
    pytest.param(closed_fields(participants=["node-a", ["node-b"]]), "not valid", id="nested-name"),
    pytest.param(
        closed_fields(participants=["a", "b", "c", "d", "e"]),
        "5 participants > max_nodes",
        id="more-than-max",
    ),
    pytest.param(
        {**{k: v for k, v in closed_fields().items() if k != "master_addr"}, "state": "open"},
        "unknown field(s) master_port, participants",
        id="open-with-members",
    ),
]


@pytest.mark.parametrize("fields,problem", BAD_ROUNDS)
def test_a_round_record_that_is_not_valid_is_refused_naming_the_key(
    fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(RecordError) as excinfo:
        decode_round(ROUND_KEY, json.dumps(fields).encode())
    assert problem in assert_one_line_error(excinfo, ROUND_KEY)


BAD_JOINS = [
    pytest.param(raw(v=1, name="node-b", addr="h", port=1), "does not match", id="other-name"),
    pytest.param(raw(v=1, name="node", addr="h", port=1), "does not match", id="name-prefix"),
    pytest.param(raw(v=1, name="node-a", addr="h"), "missing field(s) port", id="no-port"),
    pytest.param(raw(v=1, name="node-a", addr="h", port=1, x=1), "unknown field(s) x", id="x"),
    pytest.param(raw(v=1, name="node-a", addr="h", port=-1), "port=-1 is not valid", id="port"),
    pytest.param(raw(v=1, name="node-a", addr=7, port=1), "addr=7 is not valid", id="addr-int"),
    pytest.param(raw(v=1, name="../x", addr="h", port=1), "name='../x' is not valid", id="path"),
    pytest.param(raw(v=1, name="nöde", addr="h", port=1), "is not valid", id="non-ascii"),
]


@pytest.mark.parametrize("value,problem", BAD_JOINS)
def test_a_join_record_that_is_not_valid_is_refused_naming_the_key(
    value: bytes, problem: str
) -> None:
    with pytest.raises(RecordError) as excinfo:
        decode_join(JOIN_KEY, value)
    assert problem in assert_one_line_error(excinfo, JOIN_KEY)


BAD_ABORTS = [
    pytest.param(raw(v=1, node="node-a"), "missing field(s) detail", id="no-detail"),
    pytest.param(raw(v=1, node="node-a", detail="d", rank=0), "unknown field(s) rank", id="x"),
    pytest.param(raw(v=1, node=None, detail="d"), "node=None is not valid", id="node-null"),
    pytest.param(raw(v=1, node="node-a", detail="x" * 2001), "is not valid", id="too-long"),
    pytest.param(raw(v=1, node="node-a", detail=["d"]), "detail=['d']", id="detail-list"),
]


@pytest.mark.parametrize("value,problem", BAD_ABORTS)
def test_an_abort_record_that_is_not_valid_is_refused_naming_the_key(
    value: bytes, problem: str
) -> None:
    with pytest.raises(RecordError) as excinfo:
        decode_abort(ABORT_KEY, value)
    assert problem in assert_one_line_error(excinfo, ABORT_KEY)


@pytest.mark.parametrize(
    "state",
    [None, "running", "ACTIVE", 1, True, [], ["active"], {"active": 1}],
    ids=repr,
)
def test_a_node_record_with_a_state_that_is_not_known_is_refused(state: Any) -> None:
    value = raw(v=1, state=state) if state is not None else raw(v=1, addr="h")
    with pytest.raises(RecordError) as excinfo:
        decode_node(NODE_KEY, value)
    assert "is not one of" in assert_one_line_error(excinfo, NODE_KEY)


def test_a_node_record_carries_any_extra_status_fields() -> None:
    info = decode_node(NODE_KEY, raw(v=1, state="waiting", step=12, nested={"a": [1]}))
    assert info == {"state": "waiting", "step": 12, "nested": {"a": [1]}}


def test_line_breaks_in_a_key_or_a_field_name_are_escaped_into_one_line() -> None:
    key = "/elasticd/run/group/nodes/evil\nkey\u2028x"
    with pytest.raises(RecordError) as excinfo:
        decode_round(key, json.dumps(closed_fields(**{"a\nb\rc": 1})).encode())
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1
    assert "evil\\nkey\\u2028x" in message and "a\\nb\\rc" in message
    assert excinfo.value.key == key  # the key itself is kept as read

"""Foreign and malformed values under a run's keys, written with ``etcdctl`` into a real etcd.

Whatever lands there (not JSON, another version, unknown fields, participants that do not match,
a pickle built to run code): the reader logs one line naming the key, never executes it, never
stops watching, and sees the next valid value. A bad round record counts as no round (the next
opener overwrites it); a bad abort still aborts the round its key names.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from elastic import jsonlog
from elastic.rendezvous import KeyValueClient, RunKeys, connect
from elastic.rendezvous import rounds as rounds_module
from elastic.rendezvous import view as view_module
from elastic.rendezvous import watching as watching_module
from elastic.rendezvous.records import AbortRecord, RoundRecord, encode, encode_node
from elastic.rendezvous.rounds import JoinSettings, RoundJoiner
from elastic.rendezvous.run_store import validate_control
from elastic.rendezvous.view import GroupView, Snapshot
from tests.elastic.rendezvous.conftest import etcd_config
from tests.support.etcd import EtcdServer, etcd_binary

WAIT_SECONDS = 10.0
PREFIX = "/elasticd-bad"
LogEntries = list[MutableMapping[str, Any]]


class Payload:
    """Unpickling this creates ``path``: proof that something executed a value it read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


class Etcdctl:
    """``etcdctl`` (v3 API) next to the test's etcd binary; values go through stdin, as bytes."""

    def __init__(self, server: EtcdServer) -> None:
        self.binary = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
        self.endpoint = server.endpoint

    def put(self, key: str, value: bytes) -> None:
        self._run(["put", key], value)

    def _run(self, args: list[str], stdin: bytes = b"") -> None:
        env = {**os.environ, "ETCDCTL_API": "3"}
        cmd = [self.binary, f"--endpoints={self.endpoint}", *args]
        done = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=30)
        assert done.returncode == 0, done.stderr.decode(errors="replace")


@pytest.fixture
def etcdctl(etcd_server: EtcdServer) -> Etcdctl:
    return Etcdctl(etcd_server)


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogEntries]:
    """Every structlog event of the test, from any thread (the watch threads log).

    The modules' loggers were bound at import, to whatever processors structlog had then (an
    earlier test may have configured JSON output since): rebind them inside the capture."""
    with capture_logs() as captured:
        for module in (rounds_module, view_module, watching_module):
            monkeypatch.setattr(module, "log", jsonlog.get(module.__name__))
        yield captured


@pytest.fixture
def kv(etcd_server: EtcdServer) -> Iterator[KeyValueClient]:
    client = connect(etcd_config(etcd_server))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def keys(run_id: str) -> RunKeys:
    return RunKeys(PREFIX, run_id)


@pytest.fixture
def view(kv: KeyValueClient, keys: RunKeys) -> Iterator[GroupView]:
    group_view = GroupView(kv, keys, check_control=validate_control).start()
    try:
        yield group_view
    finally:
        group_view.close()


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "executed"
    yield path
    assert not path.exists(), "a value read from etcd was unpickled"


def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_SECONDS} s"
        time.sleep(0.01)


def ignored(logs: LogEntries, key: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("key") == key and e["event"] == "etcd_value_ignored"]


def settled(view: GroupView, predicate: Callable[[Snapshot], bool]) -> Snapshot:
    snap = view.wait_for(predicate, WAIT_SECONDS)
    assert snap is not None, f"not within {WAIT_SECONDS} s: {view.snapshot}"
    return snap


def closed_round(round_: int, *participants: str) -> RoundRecord:
    return RoundRecord(
        round=round_,
        state="closed",
        opener=participants[0],
        min_nodes=1,
        max_nodes=4,
        participants=participants,
        master_addr="10.0.0.1",
        master_port=29500,
    )


# --------------------------------------------------------------- every key of group/, every kind
VALID: dict[str, bytes] = {
    "round": closed_round(2, "node-a", "node-b").to_bytes(),
    "control": encode({"paused": True, "seq": 1}),
    "node": encode_node({"state": "active", "addr": "h"}),
    "abort": AbortRecord(node="node-a", detail="exit 1").to_bytes(),
}


def with_fields(kind: str, **changes: Any) -> bytes:
    return json.dumps({**json.loads(VALID[kind]), **changes}).encode()


def bad_values(kind: str) -> list[Any]:
    values = [
        pytest.param(b"not json {", id="not-json"),
        pytest.param(b"\xff\x00\xfe", id="binary"),
        pytest.param(b"[" * 100_000, id="nested-past-the-parser"),
        pytest.param(with_fields(kind, v=2), id="version-2"),
        pytest.param(with_fields(kind, v=None), id="no-version"),
        pytest.param("pickle", id="pickle"),
        pytest.param(
            with_fields(kind, state="rebooting")
            if kind == "node"
            else with_fields(kind, reboot=True),
            id="foreign-field",
        ),
    ]
    if kind == "round":
        values += [
            pytest.param(with_fields(kind, participants=["node-b", "node-a"]), id="unsorted"),
            pytest.param(with_fields(kind, participants=["node-a", "node-a"]), id="duplicate"),
            pytest.param(with_fields(kind, participants=["a", "b", "c", "d", "e"]), id="over-max"),
        ]
    if kind == "node":
        values.append(pytest.param(with_fields(kind, state=["active"]), id="unhashable-state"))
    if kind == "control":
        values.append(pytest.param(with_fields(kind, seq="7"), id="seq-string"))
        values.append(pytest.param(with_fields(kind, scale={"min_nodes": 3}), id="bad-scale"))
    return values


def key_of(keys: RunKeys, kind: str) -> str:
    return {
        "round": keys.round,
        "control": keys.control,
        "node": keys.node("node-a"),
        "abort": keys.abort(2),
    }[kind]


def read_as(snap: Snapshot, kind: str) -> Any:
    """What the view makes of the value under ``kind``'s key."""
    if kind == "round":
        return snap.round
    if kind == "control":
        return dict(snap.control)
    if kind == "node":
        return snap.nodes.get("node-a")
    return snap.aborts.get(2)


def good(snap: Snapshot, kind: str) -> bool:
    """The view reads a valid record under ``kind``'s key (an unreadable abort is not one)."""
    reading = read_as(snap, kind)
    return bool(reading) and not (kind == "abort" and reading.node == "?")


BadValueCheck = Callable[[str, Any], None]


@pytest.fixture
def check_bad_value(
    etcdctl: Etcdctl,
    kv: KeyValueClient,
    keys: RunKeys,
    view: GroupView,
    logs: LogEntries,
    marker: Path,
) -> BadValueCheck:
    """``check(kind, value)``: etcdctl writes ``value`` (``"pickle"``: a payload that would
    create ``marker``) under ``kind``'s key; one log line, a safe reading, then a valid value
    written after it is seen."""

    def check(kind: str, value: Any) -> None:
        key = key_of(keys, kind)
        etcdctl.put(key, pickle.dumps(Payload(marker)) if value == "pickle" else value)
        eventually(lambda: bool(ignored(logs, key)), f"a log line naming {key}")
        [entry] = ignored(logs, key)
        assert entry["error"].startswith(f"etcd key {key}: ") and "\n" not in entry["error"]
        assert len(json.dumps(dict(entry)).splitlines()) == 1

        snap, reading = view.snapshot, read_as(view.snapshot, kind)
        if kind == "abort":  # still an abort of round 2: stopping is the safe reading
            assert isinstance(reading, AbortRecord) and reading.node == "?"
            assert key in reading.detail
        elif kind == "round":  # no round; the bad value's revision is the opener's CAS token
            stored = kv.get(key)
            assert reading is None and stored is not None
            assert snap.round_revision == stored.mod_revision
        else:
            assert not reading

        etcdctl.put(key, VALID[kind])  # the watch goes on: the next valid value is seen
        settled(view, lambda s: good(s, kind))
        assert len(ignored(logs, key)) == 1

    return check


@pytest.mark.parametrize("value", bad_values("round"))
def test_a_bad_round_record_is_logged_once_and_read_as_no_round(
    value: Any, check_bad_value: BadValueCheck
) -> None:
    check_bad_value("round", value)


@pytest.mark.parametrize("value", bad_values("control"))
def test_a_bad_control_document_is_logged_once_and_read_as_empty(
    value: Any, check_bad_value: BadValueCheck
) -> None:
    check_bad_value("control", value)


@pytest.mark.parametrize("value", bad_values("node"))
def test_a_bad_node_record_is_logged_once_and_not_counted_as_a_node(
    value: Any, check_bad_value: BadValueCheck
) -> None:
    check_bad_value("node", value)


@pytest.mark.parametrize("value", bad_values("abort"))
def test_a_bad_abort_is_logged_once_and_still_aborts_its_round(
    value: Any, check_bad_value: BadValueCheck
) -> None:
    check_bad_value("abort", value)


# --------------------------------------------------------------- readings over time
def test_a_bad_control_document_replaces_a_good_one_with_empty(
    etcdctl: Etcdctl, keys: RunKeys, view: GroupView, logs: LogEntries
) -> None:
    etcdctl.put(keys.control, VALID["control"])
    settled(view, lambda s: bool(s.control))
    etcdctl.put(keys.control, with_fields("control", paused="yes"))
    settled(view, lambda s: not s.control)  # the same reading a re-list gives
    assert len(ignored(logs, keys.control)) == 1


def test_a_bad_node_record_keeps_the_nodes_last_good_record(
    etcdctl: Etcdctl, keys: RunKeys, view: GroupView, logs: LogEntries
) -> None:
    etcdctl.put(keys.node("node-a"), VALID["node"])
    settled(view, lambda s: "node-a" in s.nodes)
    etcdctl.put(keys.node("node-a"), b"garbage")
    eventually(lambda: bool(ignored(logs, keys.node("node-a"))), "the log line")
    assert view.snapshot.nodes["node-a"] == {"state": "active", "addr": "h"}


def test_an_abort_key_that_names_no_round_is_logged_and_ignored(
    etcdctl: Etcdctl, keys: RunKeys, view: GroupView, logs: LogEntries
) -> None:
    key = keys.aborts + "latest"
    etcdctl.put(key, VALID["abort"])
    eventually(lambda: bool(ignored(logs, key)), "the log line")
    etcdctl.put(keys.abort(3), VALID["abort"])
    assert dict(settled(view, lambda s: bool(s.aborts)).aborts) == {
        3: AbortRecord(node="node-a", detail="exit 1")
    }


def test_a_key_with_a_line_break_is_logged_as_one_line(
    etcdctl: Etcdctl, keys: RunKeys, view: GroupView, logs: LogEntries
) -> None:
    key = keys.nodes + "evil\nnode"
    etcdctl.put(key, b"garbage")
    eventually(lambda: bool(ignored(logs, key)), "the log line")
    [entry] = ignored(logs, key)
    assert len(entry["error"].splitlines()) == 1 and "evil\\nnode" in entry["error"]
    assert len(json.dumps(dict(entry)).splitlines()) == 1


# --------------------------------------------------------------- the protocol over bad values
def joiner(kv: KeyValueClient, keys: RunKeys, view: GroupView, name: str) -> RoundJoiner:
    lease = kv.grant_lease(30)
    kv.put(keys.node(name), encode_node({"state": "active"}), lease_id=lease)
    return RoundJoiner(
        kv,
        keys,
        view,
        name=name,
        addr=f"{name}.example",
        lease_id=lambda: lease,
        port=lambda: 29500,
        expected=lambda snap: set(snap.nodes),
    )


def join_together(
    joiners: list[RoundJoiner], settings: JoinSettings, *, after_round: int
) -> list[RoundRecord | None]:
    results: list[RoundRecord | None] = [None] * len(joiners)

    def run(index: int) -> None:
        results[index] = joiners[index].join(settings, after_round=after_round)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(joiners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    assert not any(t.is_alive() for t in threads), "a join did not return in time"
    return results


def test_the_next_opener_overwrites_a_bad_round_record(
    etcdctl: Etcdctl,
    kv: KeyValueClient,
    keys: RunKeys,
    view: GroupView,
    logs: LogEntries,
    marker: Path,
) -> None:
    etcdctl.put(keys.round, closed_round(3, "node-a", "node-b").to_bytes())
    settled(view, lambda s: s.highest_round == 3)
    etcdctl.put(keys.round, pickle.dumps(Payload(marker)))
    settled(view, lambda s: s.round is None)

    both = [joiner(kv, keys, view, "node-a"), joiner(kv, keys, view, "node-b")]
    settings = JoinSettings(min_nodes=2, max_nodes=2, last_call_seconds=60, timeout_seconds=10)
    results = join_together(both, settings, after_round=3)
    assert results == [results[0], results[0]] and results[0] is not None
    assert (results[0].round, results[0].participants) == (4, ("node-a", "node-b"))
    stored = kv.get(keys.round)
    assert stored is not None and stored.value == results[0].to_bytes()


def test_the_opener_ignores_join_records_it_cannot_read(
    etcdctl: Etcdctl,
    kv: KeyValueClient,
    keys: RunKeys,
    view: GroupView,
    logs: LogEntries,
    marker: Path,
) -> None:
    foreign = {
        keys.joins(1) + "node-x": pickle.dumps(Payload(marker)),
        keys.joins(1) + "node-y": b'{"v":1,"name":"node-a","addr":"h","port":1}',  # not its key
        keys.joins(1) + "node-z": b'{"v":2,"name":"node-z","addr":"h","port":1}',
    }
    for key, value in foreign.items():
        etcdctl.put(key, value)
    settings = JoinSettings(min_nodes=1, max_nodes=2, last_call_seconds=0.2, timeout_seconds=10)
    [record] = join_together([joiner(kv, keys, view, "node-a")], settings, after_round=0)
    assert record is not None and record.participants == ("node-a",)
    assert all(len(ignored(logs, key)) == 1 for key in foreign)

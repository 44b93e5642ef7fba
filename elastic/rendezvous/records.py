"""The values the group keeps in etcd: versioned JSON records, validated on every read.

Nothing read from etcd is unpickled: every value under a run's keys is a JSON object with
``"v": 1`` and exactly the fields below. ``decode_*`` raises :class:`RecordError` (one line naming
the key and what is wrong) for anything else: not JSON, another version, a missing, unknown or
ill-typed field, a participant list that is not sorted and unique. Readers log it and ignore the
value (a foreign round record is treated as no round; a foreign abort still aborts its round).

Records (keys in ``keys.RunKeys``):

- :class:`RoundRecord` (``group/round``): the latest round. ``open``: nodes join it, ``opener``
  closes it. ``closed``: ``participants`` in rank order (sorted names) and the rank-0 node's
  address and port (``master_addr``, ``master_port``), the bounds it formed under.
- :class:`JoinRecord` (``joins/<round>/<name>``, under the joiner's lease): one put per node
  and round; where the node can be reached (``addr``) and the port it would serve the round's
  store on as rank 0 (``port``).
- :class:`AbortRecord` (``group/abort/<round>``): a node's workers failed in that round.
- node records (``group/nodes/<node>``, under the node lease): the daemon's published state
  (:func:`decode_node`); only a few fields are required, the daemon's status fields ride along.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from elastic.rendezvous.errors import EtcdStateError

VERSION = 1
MAX_PARTICIPANTS = 65536
NAME_MAX_CHARS = 253
RoundState = Literal["open", "closed"]


class RecordError(EtcdStateError):
    """A value under the run's keys is not a record this version wrote (one line, names the key)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(_one_line(f"etcd key {key}: {problem}; ignored"))
        self.key = key


def _one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (a key or a field name
    read from etcd may hold them; the message must stay one log line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(value: Any, limit_chars: int = 80) -> str:
    """A value read from etcd, for a message: its repr, cut (a value may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit_chars else text[: limit_chars - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    ok = isinstance(value, str) and 0 < len(value) <= NAME_MAX_CHARS
    return ok and all(c.isalnum() or c in "_.-" for c in value) and value.isascii()


def encode(fields: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **fields}, sort_keys=True, separators=(",", ":")).encode()


def load(key: str, value: bytes) -> dict[str, Any]:
    """The JSON object at ``key`` with ``v == 1`` (``v`` removed); RecordError otherwise."""
    try:
        data = json.loads(value)
    # RecursionError: nesting deeper than the parser's stack (e.g. b"[" * 100_000).
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RecordError(key, "not JSON") from None
    if not isinstance(data, dict):
        raise RecordError(key, f"a JSON {type(data).__name__}, not an object")
    version = data.pop("v", None)
    if not _is_int(version) or version != VERSION:  # true == 1 and 1.0 == 1 in Python
        raise RecordError(key, f"version {_short(version)}, this daemon reads version {VERSION}")
    return data


def _check_fields(key: str, data: Mapping[str, Any], types: Mapping[str, Any]) -> None:
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise RecordError(key, f"unknown field(s) {', '.join(unknown)}")
    missing = sorted(set(types) - set(data))
    if missing:
        raise RecordError(key, f"missing field(s) {', '.join(missing)}")
    for name, check in types.items():
        if not check(data[name]):
            raise RecordError(key, f"{name}={_short(data[name])} is not valid")


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _port(value: Any) -> bool:
    return _is_int(value) and 0 < value < 65536


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _address(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable()


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    round: int
    state: RoundState
    opener: str
    min_nodes: int
    max_nodes: int
    participants: tuple[str, ...] = ()  # rank order; closed rounds only
    master_addr: str = ""
    master_port: int = 0

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def rank_of(self, name: str) -> int | None:
        return self.participants.index(name) if name in self.participants else None

    def to_bytes(self) -> bytes:
        fields: dict[str, Any] = {
            "round": self.round,
            "state": self.state,
            "opener": self.opener,
            "min_nodes": self.min_nodes,
            "max_nodes": self.max_nodes,
        }
        if self.closed:
            fields.update(
                participants=list(self.participants),
                master_addr=self.master_addr,
                master_port=self.master_port,
            )
        return encode(fields)


_ROUND_OPEN = {
    "round": _positive_int,
    "state": lambda v: v in ("open", "closed"),
    "opener": _is_name,
    "min_nodes": _positive_int,
    "max_nodes": _positive_int,
}
_ROUND_CLOSED = {
    **_ROUND_OPEN,
    "participants": lambda v: isinstance(v, list) and 0 < len(v) <= MAX_PARTICIPANTS,
    "master_addr": _address,
    "master_port": _port,
}


def decode_round(key: str, value: bytes) -> RoundRecord:
    data = load(key, value)
    closed = data.get("state") == "closed"
    _check_fields(key, data, _ROUND_CLOSED if closed else _ROUND_OPEN)
    if data["min_nodes"] > data["max_nodes"]:
        raise RecordError(key, f"min_nodes {data['min_nodes']} > max_nodes {data['max_nodes']}")
    participants = tuple(data.get("participants", ()))
    if closed:
        if not all(_is_name(p) for p in participants):
            raise RecordError(key, "participants holds a name that is not valid")
        if list(participants) != sorted(set(participants)):
            raise RecordError(key, "participants are not sorted and unique (ranks follow order)")
        if len(participants) > data["max_nodes"]:
            raise RecordError(key, f"{len(participants)} participants > max_nodes")
    return RoundRecord(
        round=data["round"],
        state=data["state"],
        opener=data["opener"],
        min_nodes=data["min_nodes"],
        max_nodes=data["max_nodes"],
        participants=participants,
        master_addr=data.get("master_addr", ""),
        master_port=data.get("master_port", 0),
    )


@dataclasses.dataclass(frozen=True)
class JoinRecord:
    name: str
    addr: str
    port: int

    def to_bytes(self) -> bytes:
        return encode({"name": self.name, "addr": self.addr, "port": self.port})


_JOIN = {"name": _is_name, "addr": _address, "port": _port}


def decode_join(key: str, value: bytes) -> JoinRecord:
    data = load(key, value)
    _check_fields(key, data, _JOIN)
    if not key.endswith("/" + data["name"]):
        raise RecordError(key, f"name {_short(data['name'])} does not match the key")
    return JoinRecord(name=data["name"], addr=data["addr"], port=data["port"])


@dataclasses.dataclass(frozen=True)
class AbortRecord:
    node: str
    detail: str

    def to_bytes(self) -> bytes:
        return encode({"node": self.node, "detail": self.detail[:2000]})


_ABORT = {"node": _is_name, "detail": lambda v: isinstance(v, str) and len(v) <= 2000}


def decode_abort(key: str, value: bytes) -> AbortRecord:
    data = load(key, value)
    _check_fields(key, data, _ABORT)
    return AbortRecord(node=data["node"], detail=data["detail"])


NODE_STATES = frozenset(
    {"starting", "active", "waiting", "draining", "stopped", "failed", "diverged"}
)


def decode_node(key: str, value: bytes) -> dict[str, Any]:
    """A node record: ``state`` one of NODE_STATES, plus the daemon's status fields."""
    data = load(key, value)
    state = data.get("state")
    if not isinstance(state, str) or state not in NODE_STATES:  # a list is unhashable
        raise RecordError(
            key, f"state={_short(data.get('state'))} is not one of {sorted(NODE_STATES)}"
        )
    return data


def encode_node(info: Mapping[str, Any]) -> bytes:
    return encode({k: v for k, v in info.items() if k != "v"})

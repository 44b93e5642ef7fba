"""``RunStore``: a run's status, control requests and bounded event log in etcd (JSON values).

The daemon writes status and events and executes control requests; ``elasticctl`` reads status,
node records, the latest round record and events, and writes control requests. Keys are in
``keys.RunKeys``.

Control document (``get_control()``), every key optional::

    {"scale": {"min_nodes": 2, "max_nodes": 4},   # new node bounds for the next round
     "paused": true,                              # stop at the next step boundary / resume
     "rewind": {"to_step": 1200},                 # one-shot: rewind to a checkpoint <= step
     "seq": 7}                                    # bumped by every put_control

``put_control(update)`` merges ``update`` into the document in one compare-and-set (``None``
removes a key), so concurrent writers never lose each other's requests. One-shot requests
(``rewind``) are removed by the daemon that executed them (``put_control({"rewind": None})``).

The event log keeps the newest ``max_events`` entries: each ``append_event`` is one transaction
that bumps ``event_seq``, writes ``events/<seq>`` and deletes everything older than the window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from elastic.rendezvous import records
from elastic.rendezvous.errors import EtcdRequestError, EtcdStateError
from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import DeleteRange, KeyValue, KeyValueClient, Op, Put
from elastic.rendezvous.watching import PrefixWatch

DEFAULT_KEY_PREFIX = "/elasticd"
DEFAULT_MAX_EVENTS = 1000
_MAX_CAS_ATTEMPTS = 100


def _encode(value: Mapping[str, Any]) -> bytes:
    return records.encode(value)


def _decode(kv: KeyValue) -> dict[str, Any]:
    return records.load(kv.key, kv.value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_control(update: Mapping[str, Any]) -> None:
    """ValueError naming the key for anything but the documented control requests."""
    for key, value in update.items():
        if value is None:
            continue
        if key == "scale":
            ok = isinstance(value, Mapping) and set(value) == {"min_nodes", "max_nodes"}
            ok = ok and _is_int(value["min_nodes"]) and _is_int(value["max_nodes"])
            ok = ok and 1 <= value["min_nodes"] <= value["max_nodes"]
            if not ok:
                raise ValueError(f"control.scale={value!r}: needs 1 <= min_nodes <= max_nodes")
        elif key == "paused":
            if not isinstance(value, bool):
                raise ValueError(f"control.paused={value!r}: must be true or false")
        elif key == "rewind":
            ok = isinstance(value, Mapping) and set(value) == {"to_step"}
            if not (ok and _is_int(value["to_step"]) and value["to_step"] >= 0):
                raise ValueError(f"control.rewind={value!r}: needs {{to_step: int >= 0}}")
        else:
            raise ValueError(f"unknown control key 'control.{key}'")


class RunStore:
    """Status, control and events of one run; see the module docstring."""

    def __init__(
        self,
        kv: KeyValueClient,
        *,
        run_id: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        max_events: int = DEFAULT_MAX_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events={max_events!r}: must be >= 1")
        self._kv = kv
        self._keys = RunKeys(key_prefix, run_id)
        self._max_events = max_events
        self._clock = clock

    @property
    def keys(self) -> RunKeys:
        return self._keys

    # -- status ------------------------------------------------------------------------------

    def put_status(self, status: Mapping[str, Any]) -> None:
        self._kv.put(self._keys.status, _encode(status))

    def get_status(self) -> dict[str, Any] | None:
        kv = self._kv.get(self._keys.status)
        return None if kv is None else _decode(kv)

    def members(self) -> dict[str, dict[str, Any]]:
        """Live nodes' records (``group/nodes/``), one read; unreadable ones are skipped."""
        kvs, _ = self._kv.get_prefix(self._keys.nodes)
        out: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            try:
                out[kv.key[len(self._keys.nodes) :]] = records.decode_node(kv.key, kv.value)
            except EtcdStateError:
                continue
        return out

    def latest_round(self) -> records.RoundRecord | None:
        """The group's latest round record (``group/round``), open or closed; one read."""
        kv = self._kv.get(self._keys.round)
        return None if kv is None else records.decode_round(kv.key, kv.value)

    # -- control -----------------------------------------------------------------------------

    def get_control(self) -> dict[str, Any]:
        kv = self._kv.get(self._keys.control)
        return {} if kv is None else _decode(kv)

    def put_control(self, update: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``update`` (``None`` deletes a key) atomically; return the new document."""
        validate_control({k: v for k, v in update.items() if k != "seq"})
        key = self._keys.control
        for _ in range(_MAX_CAS_ATTEMPTS):
            current = self._kv.get(key)
            document = {} if current is None else _decode(current)
            for name, value in update.items():
                if name == "seq":
                    continue
                if value is None:
                    document.pop(name, None)
                else:
                    document[name] = value
            document["seq"] = int(document.get("seq", 0)) + 1
            expected = 0 if current is None else current.mod_revision
            result = self._kv.commit(
                key, expected_mod_revision=expected, ops=[Put(key, _encode(document))]
            )
            if result.succeeded:
                return document
        raise EtcdRequestError(f"{key}: {_MAX_CAS_ATTEMPTS} concurrent updates in a row")

    def watch_control(self, on_change: Callable[[dict[str, Any]], None]) -> PrefixWatch:
        """Call ``on_change(document)`` now and after every change (also across outages).

        Close the returned watch to stop. The key is watched as a prefix of one key.
        """
        key = self._keys.control

        def snapshot(kvs: list[KeyValue]) -> None:
            mine = [kv for kv in kvs if kv.key == key]
            on_change(_decode(mine[0]) if mine else {})

        def events(events: list[Any]) -> None:
            last = [e for e in events if e.key == key][-1:]
            for event in last:
                on_change({} if event.kind == "delete" else records.load(key, event.value))

        return PrefixWatch(self._kv, key, on_snapshot=snapshot, on_events=events).start()

    # -- events ------------------------------------------------------------------------------

    def append_event(self, event: Mapping[str, Any]) -> int:
        """Append ``event`` (``seq`` and, unless given, ``ts`` are added); return its seq."""
        counter = self._keys.event_seq
        for _ in range(_MAX_CAS_ATTEMPTS):
            current = self._kv.get(counter)
            seq = 1 if current is None else int(current.value) + 1
            record = {"ts": round(self._clock(), 3), **event, "seq": seq}
            ops: list[Op] = [
                Put(counter, str(seq).encode()),
                Put(self._keys.event(seq), _encode(record)),
            ]
            oldest_kept = seq - self._max_events + 1
            if oldest_kept > 1:
                ops.append(DeleteRange(self._keys.events, self._keys.event(oldest_kept)))
            expected = 0 if current is None else current.mod_revision
            if self._kv.commit(counter, expected_mod_revision=expected, ops=ops).succeeded:
                return seq
        raise EtcdRequestError(f"{counter}: {_MAX_CAS_ATTEMPTS} concurrent appends in a row")

    def last_event_seq(self) -> int:
        """The seq of the newest event (0: none yet); one read of the counter."""
        kv = self._kv.get(self._keys.event_seq)
        return 0 if kv is None else int(kv.value)

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first."""
        kvs, _ = self._kv.get_prefix(self._keys.events)
        return [_decode(kv) for kv in kvs[-limit:]] if limit > 0 else []

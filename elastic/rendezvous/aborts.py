"""Round aborts: "stop your workers now", from the node whose workers failed to every other.

A crashed worker breaks the whole group's collectives; without this the other nodes would only
notice through a collective timeout (minutes). The failing node writes
``<prefix>/<run_id>/rounds/<round>/abort`` (JSON: node, detail); every daemon polls the key of
its current round. The node of group rank 0 purges the keys of earlier rounds when a round
forms, so at most a few stay behind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from elastic.rendezvous.keys import RunKeys
from elastic.rendezvous.kv import KeyValueClient


class RoundAborts:
    def __init__(self, kv: KeyValueClient, *, run_id: str, key_prefix: str) -> None:
        self._kv = kv
        self._keys = RunKeys(key_prefix, run_id)

    def key(self, round_id: int) -> str:
        return f"{self._keys.root}rounds/{round_id:08d}/abort"

    def announce(self, round_id: int, info: Mapping[str, Any]) -> None:
        self._kv.put(self.key(round_id), json.dumps(dict(info), sort_keys=True).encode())

    def get(self, round_id: int) -> dict[str, Any] | None:
        kv = self._kv.get(self.key(round_id))
        if kv is None:
            return None
        data = json.loads(kv.value)
        return data if isinstance(data, dict) else {"detail": str(data)}

    def purge_before(self, round_id: int) -> int:
        """Drop the abort keys of rounds before ``round_id`` (called by a round's rank 0)."""
        return self._kv.delete_range(
            f"{self._keys.root}rounds/", self.key(round_id).rsplit("/", 1)[0]
        )

"""The etcd key layout of one run; every key this package touches is built here.

::

    <key_prefix>/<run_id>/rdzv/state                 torch rendezvous state (pickle), state lease
    <key_prefix>/<run_id>/rdzv/store/r<round:08d>/K  c10d store of one round, state lease
    <key_prefix>/<run_id>/nodes/<node_id>            node info (JSON), node lease
    <key_prefix>/<run_id>/status                     run status (JSON)
    <key_prefix>/<run_id>/control                    control requests (JSON)
    <key_prefix>/<run_id>/event_seq                  last event sequence number
    <key_prefix>/<run_id>/events/<seq:016d>          bounded event log (JSON)

Rounds are zero-padded so that "every round before N" is one key range.
"""

from __future__ import annotations

import dataclasses

from elastic.rendezvous.config import check_name


@dataclasses.dataclass(frozen=True)
class RunKeys:
    key_prefix: str
    run_id: str

    def __post_init__(self) -> None:
        check_name("run_id", self.run_id)

    @property
    def root(self) -> str:
        return f"{self.key_prefix}/{self.run_id}/"

    @property
    def state(self) -> str:
        return f"{self.root}rdzv/state"

    @property
    def store_root(self) -> str:
        return f"{self.root}rdzv/store/"

    def store(self, round_: int) -> str:
        return f"{self.store_root}r{round_:08d}/"

    @property
    def nodes(self) -> str:
        return f"{self.root}nodes/"

    def node(self, node_id: str) -> str:
        check_name("node_id", node_id)
        return f"{self.nodes}{node_id}"

    @property
    def status(self) -> str:
        return f"{self.root}status"

    @property
    def control(self) -> str:
        return f"{self.root}control"

    @property
    def event_seq(self) -> str:
        return f"{self.root}event_seq"

    @property
    def events(self) -> str:
        return f"{self.root}events/"

    def event(self, seq: int) -> str:
        return f"{self.events}{seq:016d}"

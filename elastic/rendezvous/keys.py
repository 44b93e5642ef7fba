"""The etcd key layout of one run; every key this package touches is built here.

::

    <key_prefix>/<run_id>/group/round                the latest round (records.RoundRecord)
    <key_prefix>/<run_id>/group/control              control requests (JSON)
    <key_prefix>/<run_id>/group/abort/<round:08d>    a round's abort (records.AbortRecord)
    <key_prefix>/<run_id>/group/nodes/<node_id>      node record (JSON), node lease
    <key_prefix>/<run_id>/joins/<round:08d>/<name>   one per participant (records.JoinRecord)
    <key_prefix>/<run_id>/store/<round:08d>/K        c10d store of one round (torchrun's agent)
    <key_prefix>/<run_id>/status                     run status (JSON), written by rank 0
    <key_prefix>/<run_id>/event_seq                  last event sequence number
    <key_prefix>/<run_id>/events/<seq:016d>          bounded event log (JSON)

Every daemon watches ``group/`` (one prefix watch: rounds, control, aborts, nodes); only a
round's opener watches its ``joins/`` (N keys per round must not fan out to N watchers).
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
    def group(self) -> str:
        return f"{self.root}group/"

    @property
    def round(self) -> str:
        return f"{self.group}round"

    @property
    def aborts(self) -> str:
        return f"{self.group}abort/"

    def abort(self, round_: int) -> str:
        return f"{self.aborts}{round_:08d}"

    @property
    def joins_root(self) -> str:
        return f"{self.root}joins/"

    def joins(self, round_: int) -> str:
        return f"{self.joins_root}{round_:08d}/"

    @property
    def store_root(self) -> str:
        return f"{self.root}store/"

    def store(self, round_: int) -> str:
        return f"{self.store_root}{round_:08d}/"

    @property
    def nodes(self) -> str:
        return f"{self.group}nodes/"

    def node(self, node_id: str) -> str:
        check_name("node_id", node_id)
        return f"{self.nodes}{node_id}"

    @property
    def status(self) -> str:
        return f"{self.root}status"

    @property
    def control(self) -> str:
        return f"{self.group}control"

    @property
    def event_seq(self) -> str:
        return f"{self.root}event_seq"

    @property
    def events(self) -> str:
        return f"{self.root}events/"

    def event(self, seq: int) -> str:
        return f"{self.events}{seq:016d}"

"""What the supervisor keeps account of besides its decisions, and where it reports it.

- :class:`GoodputAccount`: the node's goodput ledger (``daemon/goodput.py``, pure) fed with
  lifecycle states, heartbeat phases and round ends, exported as metrics and ``goodput`` lines;
- :class:`StragglerAccount`: this node's straggler verdict (``daemon/stragglers.py``, pure)
  from its workers' compute times and the other nodes' published ones, reported as metrics and
  ``straggler`` events; whether the node should drain itself is the caller's to act on.

Both only observe: neither stops workers nor changes the group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from daemon.goodput import Badput, Ledger, activity_of_phases, activity_of_state
from daemon.lifecycle import TERMINAL, State
from daemon.metrics import NodeMetrics
from daemon.policy import Reason
from daemon.stragglers import StragglersConfig, StragglerWatch, peer_values
from elastic.protocol import Heartbeat

# Where the training time since a round's last step went when the round ended this way.
_LOST_TO = {
    Reason.HANG: Badput.HANG_TIMEOUT,
    Reason.CRASH: Badput.RECOMPUTE,
    Reason.NODE_LOST: Badput.RECOMPUTE,
}


class GoodputAccount:
    """The ledger, fed by the supervisor; every change goes to the metrics at once."""

    def __init__(
        self,
        *,
        started_seconds: float,
        max_nodes: int,
        metrics: NodeMetrics,
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = Ledger(started_seconds=started_seconds, max_nodes=max_nodes)
        self._max_nodes = max_nodes
        self._metrics = metrics
        self._log = log
        self._clock = clock

    def state(self, state: State, *, nodes: int | None) -> None:
        """The lifecycle moved to ``state``; a terminal state stops the wall clock."""
        now = self._clock()
        if state in TERMINAL:
            self.ledger.stop(now)
        elif state is State.RUNNING:
            self.ledger.start_round(now, nodes=nodes or self._max_nodes)
        else:
            self.ledger.observe(now, activity_of_state(state))
        self._export(log=state in TERMINAL)

    def tick(self, beats: Mapping[int, Heartbeat], *, step: int, nodes: int) -> None:
        phases = {beat.phase for beat in beats.values()}
        self.ledger.observe(self._clock(), activity_of_phases(phases), step=step, nodes=nodes)
        self._export()

    def round_end(self, reason: Reason | None) -> None:
        lost_to = _LOST_TO.get(reason) if reason is not None else None
        self.ledger.end_round(self._clock(), lost_to=lost_to)
        self._export(log=True)

    def summary_json(self) -> dict[str, Any]:
        """The summary now, stamped with the Unix time it holds for (readers extrapolate from
        it with its ``rates``: ``ops/goodput.py``)."""
        return {**self.ledger.summary(self._clock()).to_json(), "as_of_unix": round(time.time(), 3)}

    def _export(self, *, log: bool = False) -> None:
        summary = self.ledger.summary(self._clock())
        self._metrics.set_goodput(
            wall_seconds=summary.wall_seconds,
            productive_seconds=summary.productive_seconds,
            badput_seconds={kind.value: s for kind, s in summary.badput_seconds.items()},
        )
        if log:  # elasticctl report reads the newest of these lines
            self._log.info("goodput", **summary.to_json())


class StragglerAccount:
    """Score this node's step compute time against the other nodes' of its round; a change of
    verdict is an event (log line and the run's event log)."""

    def __init__(
        self,
        config: StragglersConfig,
        *,
        node: str,
        metrics: NodeMetrics,
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.watch = StragglerWatch(config)
        self._node = node
        self._metrics = metrics
        self._log = log
        self._clock = clock

    @property
    def compute_seconds(self) -> float | None:
        """This node's published value (its slowest rank's recent median)."""
        return self.watch.compute_seconds

    def update(
        self,
        beats: Mapping[int, Heartbeat],
        *,
        members: Mapping[str, Mapping[str, Any]],
        round_id: int,
        last_step: int,
    ) -> dict[str, Any] | None:
        """The event record when the verdict changed (None otherwise); ``record["drain"]``:
        the node became a straggler and ``stragglers.drain`` asks it to leave."""
        if not self.config.enabled:
            return None
        others = peer_values(members, node=self._node, round_id=round_id)
        verdict = self.watch.update(beats, others=others, round_id=round_id, now=self._clock())
        s = verdict.score
        self._metrics.set_straggler(
            compute_seconds=self.watch.compute_seconds,
            ratio=s.ratio if s is not None else None,
            straggler=verdict.straggler,
            became=verdict.changed and verdict.straggler,
        )
        if not verdict.changed:
            return None
        record: dict[str, Any] = {
            "straggler": verdict.straggler,
            "round": round_id,
            "last_step": last_step,
            "slow_seconds": round(verdict.slow_seconds, 3),
            "drain": verdict.straggler and self.config.drain,
        }
        if s is not None:
            record.update(
                compute_seconds=round(s.own_seconds, 6),
                reference_seconds=round(s.reference_seconds, 6),
                ratio=round(s.ratio, 3),
                robust_z=None if s.robust_z is None else round(s.robust_z, 2),
                nodes=s.num_nodes,
            )
        (self._log.warning if verdict.straggler else self._log.info)("straggler", **record)
        return record

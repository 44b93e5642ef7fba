"""The per-node supervisor: join a round, run workers, watch them, decide, repeat.

One instance per node (``elasticd run``). The loop is deliberately flat:

    while not terminal:
        assignment = group.join()           # a rendezvous round over etcd v3
        workers = start(assignment)         # nproc_per_node x `worker.command`
        decision = monitor(workers)         # exits, heartbeats, output, peers, leases, signals
        apply(decision)                     # restart / regroup / drain / done / fail

Every decision comes from :func:`daemon.policy.decide`; this module applies it. Workers are
stopped at once on any failure (no waiting for a collective timeout): a crash anywhere is
published under the round's abort key, which every daemon polls on each tick.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon import identity, lifecycle
from daemon.accounts import GoodputAccount, StragglerAccount
from daemon.config import DaemonConfig, resolved_path, write_resolved
from daemon.embedded_etcd import EmbeddedEtcd, etcd_dir
from daemon.goodput import process_age_seconds
from daemon.group import Group, GroupUnavailable
from daemon.http import StatusServer
from daemon.lifecycle import State
from daemon.metrics import NodeMetrics
from daemon.netif import socket_ifname_env
from daemon.policy import Decision, Kind, Observation, Reason, RestartBudget, decide
from daemon.stragglers import STATUS_KEY
from daemon.workers import (
    LOG_TAIL_LINES,
    RoundAssignment,
    StandbyPool,
    WorkerGroup,
    read_error_file,
    worker_env,
)
from elastic import jsonlog
from elastic.channel import DaemonChannel
from elastic.config import ConfigError, to_dict
from elastic.protocol import (
    CLEAN_EXITS,
    SLOW_PHASES,
    Action,
    Env,
    Event,
    ExitCode,
    Heartbeat,
    Phase,
)
from elastic.rendezvous import NodeIdTaken

# Worker events that also go to the run's event log in etcd (elasticctl events; paused,
# resumed, rewind and rewind_refused also tell `elasticctl ... --wait` a request was applied).
_EVENT_LOG = frozenset(
    {
        Event.REWIND,
        Event.REWIND_REFUSED,
        Event.DIVERGED,
        Event.DIVERGENCE,
        Event.CHECKPOINT_COMMIT,
        Event.DRAIN,
        Event.PAUSED,
        Event.RESUMED,
    }
)
# Fields of the newest step line that the run status carries (elasticctl status); absent ones
# are left out. Only global rank 0 writes step lines: its node's status has them.
TRAIN_FIELDS = ("loss", "tokens_per_s", "step_seconds", "total_steps")


class Supervisor:
    def __init__(
        self,
        config: DaemonConfig,
        document: Mapping[str, Any],
        *,
        node_id: str | None,
        environ: Mapping[str, str],
    ) -> None:
        self.config = config
        self.document = dict(document)
        self.node = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.environ = dict(environ)
        self.log = jsonlog.get("daemon")
        jsonlog.bind(node=self.node)
        self.metrics = NodeMetrics(run_id=config.run_id, node=self.node)
        self.state = State.STARTING
        self.budget = RestartBudget(
            max_restarts=config.watchdog.max_restarts,
            window_seconds=config.watchdog.restart_window_seconds,
        )
        self.terminate = threading.Event()
        # Set by a signal or a worker's exit: the monitor acts at once instead of at its next
        # poll tick (a crash's recovery starts the moment the worker's output ends).
        self.wake = threading.Event()
        self.restart_count = 0
        self.last_step = 0
        self.detail = ""
        self.last_failure: dict[str, Any] | None = None  # the newest failed worker's report
        self.train: dict[str, Any] | None = None  # the newest step line's TRAIN_FIELDS
        self.stragglers = StragglerAccount(
            config.stragglers, node=self.node, metrics=self.metrics, log=self.log
        )
        self.drain_reason = "SIGTERM"  # why this node drains ("straggler": it drains itself)
        # Wall time counts from the process's start: imports are start-up time too.
        self.goodput = GoodputAccount(
            started_seconds=time.monotonic() - process_age_seconds(),
            max_nodes=config.nodes.max,
            metrics=self.metrics,
            log=self.log,
        )
        self.fingerprint = identity.fingerprint(to_dict(config))  # defaults filled in
        # (control seq, step) of an operator's restart of a diverged run, until it trains.
        self.restart_request: tuple[int, int] | None = None
        # Once: nodes.address does not change while the daemon runs.
        self._ifname_env = socket_ifname_env(
            config.nodes.address, {**self.environ, **config.worker.env}
        )
        self._etcd: EmbeddedEtcd | None = None
        self._http: StatusServer | None = None
        self.group: Group | None = None

    # ----------------------------------------------------------------- lifecycle
    def transition(self, target: State, **fields: Any) -> None:
        previous = self.state
        self.state = lifecycle.next_state(self.state, target)
        if previous is self.state:
            return
        self.metrics.set_state(self.state.value)
        self.log.info("state", state=self.state.value, previous=previous.value, **fields)
        self.goodput.state(self.state, nodes=fields.get("nodes"))
        if self.group is not None:
            self.group.event(
                {"event": "state", "state": self.state.value, "previous": previous.value, **fields}
            )
            self._publish_status()

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "node": self.node,
            "state": self.state.value,
            "last_step": self.last_step,
            "restarts": self.restart_count,
            "detail": self.detail,
            "goodput": self.goodput.summary_json(),
            identity.FINGERPRINT_KEY: self.fingerprint,
        }
        if self.last_failure is not None:
            status["last_failure"] = self.last_failure
        if self.stragglers.compute_seconds is not None:
            status[STATUS_KEY] = round(self.stragglers.compute_seconds, 6)
        if self.train is not None:
            status["train"] = self.train
        return status

    def _publish_status(self) -> None:
        if self.group is not None:
            self.group.publish_node_status(self.status())

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop_requested())
        signal.signal(signal.SIGINT, lambda *_: self._stop_requested())
        try:
            return self._run()
        finally:
            self._shutdown()

    def _stop_requested(self) -> None:
        self.terminate.set()
        self.wake.set()

    def _run(self) -> int:
        write_resolved(self.config, self.document)
        self.config_path = resolved_path(self.config)
        self.pool = StandbyPool(
            worker=self.config.worker,
            config_path=self.config_path,
            base_env=self.environ,
            size=self.config.nproc_per_node * self.config.watchdog.standby_rounds,
        )
        self.pool.fill()  # warm while etcd starts and the first round forms
        self._start_http()
        endpoints = self._etcd_endpoints()
        self.group = Group(
            self.config,
            node=self.node,
            endpoints=endpoints,
            metrics=self.metrics,
            wake=self.wake.set,
        )
        try:
            self.group.register(self.status())
        except (ConfigError, NodeIdTaken) as exc:
            # One line, exit 2: a second daemon with a live node's id, or another job's config.
            self.detail = str(exc)
            self.log.error("refused", reason=self.detail)
            print(f"elasticd: refused: {exc}", file=sys.stderr)
            return ExitCode.CONFIG
        # Join with warm workers: a running group drains as soon as this node is on the wait
        # list, and its pause must not include this node's imports.
        self.pool.wait_ready(
            self.config.nproc_per_node,
            timeout_seconds=self.config.watchdog.startup_timeout_seconds,
            should_stop=self.terminate.is_set,
        )
        self.transition(State.JOINING)
        while True:
            if self.terminate.is_set():
                self.transition(State.DRAINING, reason="signal before a round")
                self.transition(State.STOPPED)
                return ExitCode.OK
            code = self._identity_lost()
            if code is not None:
                return code
            assignment = self._join()
            if assignment is None:
                continue
            code = self._run_round(assignment)
            if code is not None:
                return code

    def _identity_lost(self) -> int | None:
        """Exit 2 when this node's id was taken by another daemon while its lease had expired
        (the keep-alive stopped rather than fight): two daemons must never share an id."""
        assert self.group is not None
        if not self.group.lease.taken:
            return None
        self.detail = (
            f"node id {self.node!r} was taken by another daemon while this node's lease had expired"
        )
        self.transition(State.FAILED, reason=self.detail)
        print(f"elasticd: refused: {self.detail}", file=sys.stderr)
        return ExitCode.CONFIG

    def _start_http(self) -> None:
        m = self.config.metrics
        self._http = StatusServer(
            bind=m.bind,
            port=m.port,
            registry=self.metrics.registry,
            status=self.status,
            ready=lambda: self.state is State.RUNNING,
        )
        self._http.start()
        self.log.info("http", bind=m.bind, port=self._http.port)

    def _etcd_endpoints(self) -> tuple[str, ...]:
        if self.config.etcd.endpoints:
            return tuple(self.config.etcd.endpoints)
        self._etcd = EmbeddedEtcd(etcd_dir(Path(self.config.run_dir)))
        self._etcd.start()
        self.log.info("embedded_etcd", endpoint=self._etcd.endpoint)
        return (self._etcd.endpoint,)

    def _shutdown(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        if self.group is not None:
            self.group.close()
        if self._http is not None:
            self._http.close()
        if self._etcd is not None:
            self._etcd.stop()

    # ----------------------------------------------------------------- rounds
    def _join(self) -> RoundAssignment | None:
        assert self.group is not None
        started = time.monotonic()
        try:
            assignment = self.group.join(
                restart_count=self.restart_count, should_stop=self.terminate.is_set
            )
        except GroupUnavailable as exc:
            self.detail = str(exc)
            self.transition(State.WAITING, reason=str(exc))
            self.terminate.wait(1.0)
            if not self.terminate.is_set():
                self.transition(State.JOINING)
            return None
        if assignment is None:
            return None
        self.metrics.observe_round(time.monotonic() - started)
        self.metrics.set_group(
            nodes=assignment.num_nodes,
            world_size=assignment.world_size,
            min_nodes=self.config.nodes.min,
            max_nodes=self.config.nodes.max,
        )
        return assignment

    def _run_round(self, assignment: RoundAssignment) -> int | None:
        # Per node too: run_dir may be on a shared file system (and is, in tests).
        worker_dir = (
            Path(self.config.run_dir) / "workers" / self.node / f"round-{assignment.round_id}"
        )
        channel = DaemonChannel(worker_dir)
        workers = self._start_workers(assignment, worker_dir)
        self.transition(
            State.RUNNING,
            round=assignment.round_id,
            group_rank=assignment.group_rank,
            nodes=assignment.num_nodes,
            world_size=assignment.world_size,
        )
        decision = self._monitor(workers, channel, assignment)
        return self._apply(decision, workers, worker_dir, assignment)

    def _start_workers(self, assignment: RoundAssignment, worker_dir: Path) -> WorkerGroup:
        envs = [
            worker_env(
                self.environ,
                assignment,
                local_rank=i,
                run_id=self.config.run_id,
                node=self.node,
                worker_dir=worker_dir,
                config_path=self.config_path,
                extra=self._worker_extra_env(),
            )
            for i in range(assignment.nproc_per_node)
        ]
        self.log.info(
            "workers_start",
            round=assignment.round_id,
            world_size=assignment.world_size,
            master=f"{assignment.master_addr}:{assignment.master_port}",
        )
        workers = WorkerGroup(
            pool=self.pool,
            envs=envs,
            node=self.node,
            on_line=self._on_worker_line,
            on_exit=lambda _rank: self.wake.set(),
        )
        self.log.info("workers_started", round=assignment.round_id, pids=workers.pids)
        return workers

    def _worker_extra_env(self) -> dict[str, str]:
        """``worker.env``, the interface of ``nodes.address`` for gloo/NCCL (unless the job
        sets one), and an operator's restart step for the round after ``diverged``."""
        env = {**self._ifname_env, **self.config.worker.env}
        if self.restart_request is not None:
            env[Env.RESTORE_STEP] = str(self.restart_request[1])
        return env

    def _on_worker_line(self, local_rank: int, record: dict[str, Any]) -> None:
        self.metrics.on_worker_line(record)
        if record.get("event") == Event.STEP:
            self.last_step = int(record.get("step", self.last_step))
            self.train = train_summary(record, now_unix=time.time())
        elif self.group is not None and record.get("event") in _EVENT_LOG:
            self.group.event({k: v for k, v in record.items() if k != "ts"})

    def _monitor(
        self, workers: WorkerGroup, channel: DaemonChannel, assignment: RoundAssignment
    ) -> Decision:
        assert self.group is not None
        wd = self.config.watchdog
        progress = _Progress(time.time(), world_size=assignment.world_size)
        self.metrics.set_hosts_rank0(assignment.group_rank == 0)
        draining = regroup = pool_filled = False
        while True:
            self.wake.clear()  # before looking: a wake-up from here on is not lost
            if self.terminate.is_set() and not draining:
                draining = True
                self.transition(State.DRAINING, reason=self.drain_reason)
                channel.send(Action.DRAIN)
                drain_deadline = time.monotonic() + self.config.drain.timeout_seconds
            if not draining and not regroup and self.group.regroup_wanted(assignment):
                regroup = True
                self.log.info("regroup", reason="membership change", round=assignment.round_id)
                channel.send(Action.DRAIN)
            self._relay_control(channel)
            now = time.time()
            beats = channel.heartbeats()
            self._watch_stragglers(beats, assignment)
            progress.update(beats, now)
            self.goodput.tick(beats, step=progress.step, nodes=assignment.num_nodes)
            if progress.training(now, blind_after_seconds=wd.timeout_seconds) and not pool_filled:
                self.pool.fill()  # training runs: warm the next round's workers now
                pool_filled = True
            if self.restart_request is not None and progress.trained_a_step:
                self.group.clear_restart(self.restart_request[0])
                self.restart_request = None  # trained from it: later rounds resume as usual
            self.last_step = max(self.last_step, progress.step)
            self.metrics.set_progress(progress.step)
            self.metrics.set_node_rate(
                step_seconds=progress.step_seconds,
                tokens_per_second=progress.tokens_per_second(assignment.nproc_per_node),
                heartbeat_age_seconds=progress.oldest_beat_age(beats, now),
            )
            self.metrics.set_worker_memory(b.peak_memory_bytes for b in beats.values())
            self.group.set_status(self.status())
            obs = Observation(
                exit_codes=_exit_codes(workers, assignment.nproc_per_node),
                last_progress_unix=progress.last_change,
                now_unix=now,
                hang_timeout_seconds=(
                    wd.startup_timeout_seconds if progress.slow_phase else wd.timeout_seconds
                ),
                heartbeats_seen=progress.heartbeats_seen,
                silent_seconds=workers.silent_seconds(time.monotonic()),
                silence_timeout_seconds=self.config.worker.silence_timeout_seconds,
                draining=draining,
                regroup=regroup,
                peer_failed=self.group.peer_failed(assignment),
                node_lost=self.group.member_lost(assignment),
                fenced=self.group.fenced(assignment),
            )
            decision = decide(obs)
            if decision.kind is not Kind.CONTINUE:
                self.goodput.round_end(decision.reason)
                return decision
            if draining and time.monotonic() > drain_deadline:
                return Decision(Kind.DRAINED, Reason.DRAIN, detail="drain timeout")
            if progress.paused:
                progress.last_change = now  # a paused group is alive, not hung
            self.wake.wait(wd.poll_seconds)

    def _watch_stragglers(
        self, beats: Mapping[int, Heartbeat], assignment: RoundAssignment
    ) -> None:
        """A change of this node's straggler verdict goes to the run's event log; with
        ``stragglers.drain`` a new straggler leaves as on SIGTERM (checkpoint first)."""
        assert self.group is not None
        record = self.stragglers.update(
            beats,
            members=self.group.members(),
            round_id=assignment.round_id,
            last_step=self.last_step,
        )
        if record is None:
            return
        self.group.event({"event": "straggler", **record})
        if record["drain"]:
            self.drain_reason = "straggler"
            self._stop_requested()

    def _relay_control(self, channel: DaemonChannel) -> None:
        assert self.group is not None
        for request in self.group.take_control():
            channel.send(request["action"], to_step=request.get("to_step"))
            self.log.info("control", **request)

    def _apply(
        self,
        decision: Decision,
        workers: WorkerGroup,
        worker_dir: Path,
        assignment: RoundAssignment,
    ) -> int | None:
        assert self.group is not None
        fenced = self.group.fenced(assignment)
        if decision.kind is Kind.RESTART and (decision.reason is Reason.CRASH or fenced):
            # A fenced node's lease is back at once, so its peers see no node leave: without
            # the abort they would wait for a collective or start-up timeout.
            self.group.announce_failure(assignment, decision.detail)
        # Before stop(): what exited on its own, not what our SIGTERM ended.
        failed = [e for e in workers.poll() if e.returncode not in CLEAN_EXITS]
        workers.stop()
        if failed:
            self.last_failure = workers.failure(failed[0])
        self._log_exits(workers, worker_dir, assignment)
        self.log.info(
            "round_end",
            decision=decision.kind.value,
            reason=decision.reason.value if decision.reason else None,
            detail=decision.detail,
            round=assignment.round_id,
        )
        if self.state is State.DRAINING:
            # Leaving anyway: whatever else happened meanwhile (a peer lost, a crash) is the
            # remaining group's to recover from its newest committed checkpoint.
            self.transition(State.STOPPED, reason="drained", detail=decision.detail)
            self.group.leave()
            return ExitCode.OK
        if decision.kind is Kind.DONE:
            self.transition(State.STOPPED, reason="training finished")
            self.group.mark_run("done")
            return ExitCode.OK
        if decision.kind is Kind.DRAINED:
            self.transition(State.STOPPED, reason="drained")
            self.group.leave()
            return ExitCode.OK
        if decision.kind is Kind.CONFIG_ERROR:
            self.detail = decision.detail
            self.transition(State.FAILED, reason=decision.detail)
            return ExitCode.CONFIG
        if decision.kind is Kind.DIVERGED:
            self.detail = decision.detail
            seq = self.group.control_seq()  # a rewind requested from now on brings it back
            self.transition(State.DIVERGED, reason=decision.detail)
            self.group.mark_run("diverged")
            return self._await_operator(after_seq=seq)
        return self._restart(decision)

    def _log_exits(
        self, workers: WorkerGroup, worker_dir: Path, assignment: RoundAssignment
    ) -> None:
        for e in workers.poll():
            if e.returncode == ExitCode.OK:
                continue
            self.log.warning(
                "worker_exit",
                local_rank=e.local_rank,
                returncode=e.returncode,
                signal=e.signal_name,
                cause=read_error_file(worker_dir, e.local_rank),
                output_tail=workers.tail(e.local_rank)[-LOG_TAIL_LINES:],
                round=assignment.round_id,
            )

    def _restart(self, decision: Decision) -> int | None:
        reason = decision.reason or Reason.CRASH
        self.metrics.count_restart(reason.value)
        counted = reason in (Reason.CRASH, Reason.HANG)
        if counted and not self.budget.allow(time.monotonic()):
            wd = self.config.watchdog
            self.detail = (
                f"crash loop: more than {wd.max_restarts} restarts in "
                f"{wd.restart_window_seconds:g} s"
            )
            self.transition(State.FAILED, reason=self.detail)
            assert self.group is not None
            self.group.mark_run("failed")
            return self._linger(ExitCode.FAILED)
        self.restart_count += 1
        self.log.info(
            "restart", reason=reason.value, detail=decision.detail, restart_count=self.restart_count
        )
        self.transition(State.JOINING, reason=reason.value)
        return None

    def _await_operator(self, *, after_seq: int) -> int | None:
        """``diverged``: no training until an operator acts (the runbook ElasticdRunDiverged).
        ``elasticctl rewind --to-step N`` restarts the group from the committed step N (a fresh
        guard budget; a paused run then waits for ``elasticctl resume``); SIGTERM stops."""
        assert self.group is not None
        self.log.error("stopped_training", state=self.state.value, detail=self.detail)
        while not self.terminate.is_set():
            request = self.group.take_restart(after_seq)
            if request is not None:
                self.restart_request = request
                self.detail = ""
                self.log.info("operator_restart", to_step=request[1], seq=request[0])
                self.transition(State.JOINING, reason=f"operator rewind to step {request[1]}")
                return None
            self.wake.wait(self.config.watchdog.poll_seconds)
            self.wake.clear()
        return ExitCode.DIVERGED

    def _linger(self, code: int) -> int:
        """Stay up (serving /healthz and status) until told to stop: operators need to see why."""
        self.log.error("stopped_training", state=self.state.value, detail=self.detail)
        self.terminate.wait()
        return code


def train_summary(step_line: Mapping[str, Any], *, now_unix: float) -> dict[str, Any]:
    """The run status's ``train``: a step line's ``TRAIN_FIELDS`` that it has, its step and
    when it arrived (``time_unix``: readers tell how old the numbers are)."""
    summary = {k: step_line[k] for k in TRAIN_FIELDS if step_line.get(k) is not None}
    return {**summary, "step": step_line.get("step"), "time_unix": round(now_unix, 3)}


class _Progress:
    """Step progress of this node's workers from their heartbeats (none from a loop without
    the worker API: then ``heartbeats_seen`` stays False and the step stays 0)."""

    def __init__(self, now: float, *, world_size: int = 0) -> None:
        self._started = now
        self.last_change = now
        self.step = 0
        self.start_step: int | None = None  # the step the workers resumed from
        self.slow_phase = True
        self.paused = False
        self._seen: dict[int, tuple[int, Phase]] = {}
        self.step_seconds = 0.0  # wall time per step between the newest beats, 0 unknown
        self.world_size = world_size  # of the round: this node's share of its throughput
        self._step_tokens: float | None = None  # the group's tokens of the newest step
        self._newest: tuple[int, float] | None = None  # (step, time_unix) of the newest beat

    @property
    def trained_a_step(self) -> bool:
        return self.start_step is not None and self.step > self.start_step

    @property
    def heartbeats_seen(self) -> bool:
        return bool(self._seen)

    def training(self, now: float, *, blind_after_seconds: float) -> bool:
        """Whether the round is past its start-up (the pool may warm the next one). A loop
        without heartbeats shows nothing: taken as training once it has run that long."""
        if self.heartbeats_seen:
            return self.trained_a_step
        return now - self._started > blind_after_seconds

    def update(self, beats: Mapping[int, Heartbeat], now: float) -> None:
        if not beats:
            return
        changed = False
        for rank, beat in beats.items():
            key = (beat.step, beat.phase)
            if self._seen.get(rank) != key:
                self._seen[rank] = key
                changed = True
        if changed:
            self.last_change = now
        if self.start_step is None:
            self.start_step = min(b.step for b in beats.values())
        phases = {b.phase for b in beats.values()}
        self.slow_phase = bool(phases & SLOW_PHASES) or all(b.step == 0 for b in beats.values())
        self.paused = phases == {Phase.PAUSED}
        self.step = max(b.step for b in beats.values())
        self._rate(max(beats.values(), key=lambda b: (b.step, b.time_unix)))

    def _rate(self, newest: Heartbeat) -> None:
        if newest.step_tokens is not None:
            self._step_tokens = newest.step_tokens
        if self._newest is not None and newest.step > self._newest[0]:
            steps = newest.step - self._newest[0]
            self.step_seconds = max(newest.time_unix - self._newest[1], 0.0) / steps
        if self._newest is None or newest.step != self._newest[0]:
            self._newest = (newest.step, newest.time_unix)

    def tokens_per_second(self, nproc_per_node: int) -> float:
        """This node's share (its ranks of the world) of the group's throughput; 0 unknown."""
        if not self.step_seconds or self._step_tokens is None or not self.world_size:
            return 0.0
        return self._step_tokens * nproc_per_node / self.world_size / self.step_seconds

    @staticmethod
    def oldest_beat_age(beats: Mapping[int, Heartbeat], now: float) -> float:
        return max((now - b.time_unix for b in beats.values()), default=0.0)


def _exit_codes(workers: WorkerGroup, nproc: int) -> list[int | None]:
    codes: list[int | None] = [None] * nproc
    for e in workers.poll():
        codes[e.local_rank] = e.returncode
    return codes

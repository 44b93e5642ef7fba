"""Straggler detection: is this node's step compute time an outlier among the group's?

Decentralised, with no collective of its own and O(nodes) work per daemon:

1. every worker puts its step compute time (the time up to the step's collective, see
   :class:`elastic.protocol.Heartbeat`) into its heartbeat; the daemon keeps each local rank's
   samples of the last ``stragglers.sample_seconds`` (:class:`ComputeWindow`) and publishes the
   node's value, the median of its slowest rank (a node goes at the pace of its slowest GPU), in
   its node status (``step_compute_seconds``, the lease info every daemon watches);
2. every daemon scores only itself against the values the other nodes of its round published
   (:func:`score`): ``ratio = own / median(others)`` and a robust z-score
   ``(own - median(others)) / (1.4826 * MAD(others))``. The reference leaves the node itself out,
   so an outlier cannot pull its own reference and two nodes already compare (the median of all
   nodes of a two-node group would be the mean of the pair);
3. :class:`StragglerDetector` flags the node once it has been slow continuously for
   ``stragglers.window_seconds``. Slow starts at ``ratio >= stragglers.factor`` and ends only
   below halfway between 1 and the factor (1.25 for 1.5): a hysteresis band, so that noise
   around the factor (a busy peer raising the reference for a moment) neither restarts the
   window nor makes a flagged node flap, while a node back at the others' pace (ratio ~1)
   resets it at once. The decision uses the ratio; the z-score (undefined when the others
   agree exactly, MAD = 0) goes into the event for the reader.

What the supervisor does with a verdict (event, metrics, the opt-in drain) is its business; this
module does no I/O and reads no clock: time comes in as ``now`` (monotonic seconds).

Caveat: the measurement sees time spent before the step's last collective. A loop whose forward or
backward itself synchronises the ranks (FSDP all-gathers, DDP gradient all-reduce) makes the
fast ranks wait inside their "compute" for a rank that is slow in those phases; such a straggler
shows a smaller ratio than its real slowdown. Slowness outside them (data loading, host work,
the ``slow`` fault) shows in full.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from elastic.config import check
from elastic.guard.detector import MAD_TO_SIGMA
from elastic.protocol import Heartbeat

STATUS_KEY = "step_compute_seconds"  # the node's value in its published status


@dataclass(frozen=True)
class StragglersConfig:
    """YAML section ``stragglers``: flag (and optionally drain) a node slower than the others."""

    enabled: bool = True
    """Measure, publish and score this node's step compute time (off: never flagged)."""
    factor: float = 1.5
    """A node whose compute time is this many times the median of the other nodes' is slow
    (until its ratio falls below halfway between 1 and this factor)."""
    window_seconds: float = 60.0
    """Slow continuously for this long: the node is a straggler (event, metric, alert)."""
    sample_seconds: float = 10.0
    """The node's published compute time is the median of its samples of this long."""
    drain: bool = False
    """A straggler drains itself as on SIGTERM (checkpoint at a step boundary, then leaves)."""

    def __post_init__(self) -> None:
        check(self.factor > 1.0, "factor", self.factor, "must be > 1")
        check(self.window_seconds >= 0, "window_seconds", self.window_seconds, "must be >= 0")
        check(self.sample_seconds > 0, "sample_seconds", self.sample_seconds, "must be > 0")


@dataclass(frozen=True)
class Score:
    """This node against the others of its round."""

    own_seconds: float
    reference_seconds: float  # median of the other nodes' values
    ratio: float  # own / reference
    robust_z: float | None  # None when the others' MAD is 0 (z undefined)
    num_nodes: int  # this node included


@dataclass(frozen=True)
class Verdict:
    score: Score | None  # None: nothing to compare (no own value, or no other node's)
    straggler: bool
    changed: bool  # ``straggler`` flipped at this observation
    slow_seconds: float  # how long the ratio has held at or above the factor (0 when not)


def score(own_seconds: float, others: Sequence[float]) -> Score | None:
    """This node's score against ``others`` (one value per other node); None without others."""
    if not others:
        return None
    reference = statistics.median(others)
    if reference <= 0:
        return None
    mad = statistics.median(abs(v - reference) for v in others)
    z = (own_seconds - reference) / (MAD_TO_SIGMA * mad) if mad > 0 else None
    return Score(own_seconds, reference, own_seconds / reference, z, len(others) + 1)


class StragglerDetector:
    """Straggler once slow (``ratio >= factor``, until below the hysteresis band's floor)
    for ``window_seconds``; cleared when no longer slow."""

    def __init__(self, *, factor: float, window_seconds: float) -> None:
        self._factor = factor
        self._recovered_below = 1.0 + (factor - 1.0) / 2
        self._window_seconds = window_seconds
        self._slow_since: float | None = None
        self.straggler = False

    def observe(self, own_seconds: float | None, others: Sequence[float], *, now: float) -> Verdict:
        s = None if own_seconds is None else score(own_seconds, others)
        threshold = self._factor if self._slow_since is None else self._recovered_below
        slow = s is not None and s.ratio >= threshold
        if not slow:
            self._slow_since = None
        elif self._slow_since is None:
            self._slow_since = now
        slow_seconds = 0.0 if self._slow_since is None else now - self._slow_since
        was = self.straggler
        self.straggler = slow and slow_seconds >= self._window_seconds
        return Verdict(s, self.straggler, self.straggler != was, slow_seconds)

    def reset(self) -> None:
        self._slow_since = None
        self.straggler = False


class ComputeWindow:
    """Each local rank's compute-time samples of the last ``sample_seconds``.

    Heartbeats are read every watchdog poll and rewritten at most every half second: a beat is
    a new sample only when its ``time_unix`` changed.
    """

    def __init__(self, *, sample_seconds: float) -> None:
        self._sample_seconds = sample_seconds
        self._samples: dict[int, deque[tuple[float, float]]] = {}  # rank -> (now, seconds)
        self._seen: dict[int, float] = {}  # rank -> time_unix of its last sampled beat

    def add(self, beats: Mapping[int, Heartbeat], *, now: float) -> None:
        for rank, beat in beats.items():
            if beat.compute_seconds is None or self._seen.get(rank) == beat.time_unix:
                continue
            self._seen[rank] = beat.time_unix
            self._samples.setdefault(rank, deque()).append((now, beat.compute_seconds))

    def value(self, *, now: float) -> float | None:
        """The node's compute time: the median of its slowest rank; None without samples."""
        medians = []
        for samples in self._samples.values():
            while samples and now - samples[0][0] > self._sample_seconds:
                samples.popleft()
            if samples:
                medians.append(statistics.median(v for _, v in samples))
        return max(medians) if medians else None


def peer_values(
    nodes: Mapping[str, Mapping[str, object]], *, node: str, round_id: int
) -> list[float]:
    """The values published by the other live nodes of round ``round_id``."""
    values = []
    for name, info in nodes.items():
        value = info.get(STATUS_KEY)
        if name == node or info.get("round") != round_id:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            values.append(float(value))
    return values


class StragglerWatch:
    """One node's straggler state: its compute window and detector, reset on a new round (a
    new world size changes every rank's share of the batch: old samples do not compare)."""

    def __init__(self, config: StragglersConfig) -> None:
        self.config = config
        self.compute_seconds: float | None = None  # the value this node publishes
        self._round: int | None = None
        self._window = ComputeWindow(sample_seconds=config.sample_seconds)
        self._detector = StragglerDetector(
            factor=config.factor, window_seconds=config.window_seconds
        )

    @property
    def straggler(self) -> bool:
        return self._detector.straggler

    def update(
        self,
        beats: Mapping[int, Heartbeat],
        *,
        others: Sequence[float],
        round_id: int,
        now: float,
    ) -> Verdict:
        if round_id != self._round:
            self._round = round_id
            self._window = ComputeWindow(sample_seconds=self.config.sample_seconds)
            self._detector.reset()
        self._window.add(beats, now=now)
        self.compute_seconds = self._window.value(now=now)
        return self._detector.observe(self.compute_seconds, others, now=now)

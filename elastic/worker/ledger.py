"""The run ledger: data decisions and divergence events of a run, and the data ledger's rules.

The data ledger (:class:`DataLedger`) maps a training step to its ``(data step, salt)``; it holds
the data decisions taken when a run rewinds after a divergence, in the order they were taken:

- ``reshuffle [a, b)``: training steps ``a..b-1`` draw fresh, deterministic samples (a new salt).
- ``skip [a, b)``: the data of training steps ``a..b-1`` is never used; training step ``s >= a``
  uses the data that step ``s + (b - a)`` used before the entry. Entries compose in order, so
  several skips add up (one skip alone: data step ``= s + (b - a)``).

The windows are in the training-step numbering of the moment the entry was made. Resolving step
``s`` walks the entries newest first: each skip with ``a <= t`` moves ``t`` forward by ``b - a``,
and the newest reshuffle whose window holds ``t`` gives the salt (0 when none does).

The run ledger (:class:`RunLedger`) travels in every checkpoint manifest (``meta.ledger``) and,
at each rewind, is also written to ``<checkpoint.url>/<run_id>/ledger.json``: a rewind changes
the data of steps after a checkpoint that already exists, so a worker killed during the replay
must find the decision somewhere newer than that checkpoint. Entries are only ever added, so two
ledgers merge by union. Samplers (the worker API's :class:`~elastic.worker.sampler.
ElasticSampler`, the bundled trainer's mixture) read the data ledger; nothing here imports torch.

The data chain (:class:`DataChain`) is the audit record of what a run consumed. Per step, each
rank adds :func:`sample_sums` of the sample ids it really drew to the step's vote (one
all-reduce, no extra round trip); the agreed :class:`StepDigest` (count and 64-bit multiset
hash of the global batch's ids) extends ``chain_s = sha256(chain_{s-1} || step || digest_s)``.
Every manifest carries the chain at its step and the digests since the previous checkpoint of
its lineage (``meta.data_chain``), so ``elasticctl audit`` (:mod:`ops.audit`) can recompute the
chain from the pure sampler and name the first step that consumed other samples. The hash
catches accidents (a sample lost, repeated or replaced), not a forger: the chain is not keyed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

SALT_BITS = 11
LedgerKind = Literal["skip", "reshuffle"]


@dataclass(frozen=True)
class LedgerEntry:
    kind: LedgerKind
    start_step: int
    end_step: int  # exclusive
    salt: int

    def __post_init__(self) -> None:
        if self.kind not in ("skip", "reshuffle"):
            raise ValueError(f"kind={self.kind!r}: must be skip or reshuffle")
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(f"[{self.start_step}, {self.end_step}): need 0 <= start < end")
        if not 0 < self.salt < 2**SALT_BITS:
            raise ValueError(f"salt={self.salt}: must be in [1, {2**SALT_BITS})")


@dataclass(frozen=True)
class DataLedger:
    """Skip and reshuffle decisions, in the order they were taken (immutable)."""

    entries: tuple[LedgerEntry, ...] = ()

    def with_entry(
        self, kind: LedgerKind, start_step: int, end_step: int, *, salt: int | None = None
    ) -> DataLedger:
        """A new ledger with one more entry; the default salt is fresh (1 + number of entries)."""
        entry = LedgerEntry(kind, start_step, end_step, salt or 1 + len(self.entries))
        return DataLedger((*self.entries, entry))

    def resolve(self, step: int) -> tuple[int, int]:
        """``(data_step, salt)`` of training step ``step``."""
        data_step, salt = step, 0
        for entry in reversed(self.entries):
            if entry.kind == "skip" and data_step >= entry.start_step:
                data_step += entry.end_step - entry.start_step
            elif entry.kind == "reshuffle" and not salt and entry.start_step <= data_step:
                salt = entry.salt if data_step < entry.end_step else 0
        return data_step, salt

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [
                {"kind": e.kind, "start_step": e.start_step, "end_step": e.end_step, "salt": e.salt}
                for e in self.entries
            ]
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | None) -> DataLedger:
        if data is None:
            return cls()
        obj = json.loads(data) if isinstance(data, str) else data
        return cls(
            tuple(
                LedgerEntry(
                    kind=e["kind"],
                    start_step=int(e["start_step"]),
                    end_step=int(e["end_step"]),
                    salt=int(e["salt"]),
                )
                for e in obj.get("entries", ())
            )
        )


MAX_EVENTS = 1000


@dataclass(frozen=True)
class LrWindow:
    """A learning-rate multiplier over steps [start_step, end_step) (the lr_spike fault)."""

    start_step: int
    end_step: int  # exclusive
    factor: float


@dataclass
class RunLedger:
    FILE: ClassVar[str] = "ledger.json"

    data_entries: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    guard: dict[str, Any] | None = None  # guard state right after the last rewind
    at_step: int | None = None  # the step the last rewind went back to

    @property
    def data(self) -> DataLedger:
        return DataLedger.from_json({"entries": self.data_entries})

    def add_data_action(self, kind: str, start_step: int, end_step: int) -> None:
        """Reshuffle or skip the data of steps [start_step, end_step); salts never repeat."""
        salt = 1 + len(self.data_entries)
        self.data_entries.append(
            {"kind": kind, "start_step": start_step, "end_step": end_step, "salt": salt}
        )

    def record(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})
        del self.events[:-MAX_EVENTS]

    def merged(self, other: RunLedger) -> RunLedger:
        """Union of both ledgers' entries (order of first appearance)."""
        out = RunLedger(
            data_entries=_union(self.data_entries, other.data_entries),
            events=_union(self.events, other.events)[-MAX_EVENTS:],
            guard=other.guard if other.guard is not None else self.guard,
            at_step=other.at_step if other.at_step is not None else self.at_step,
        )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data_entries,
            "events": self.events,
            "guard": self.guard,
            "at_step": self.at_step,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> RunLedger:
        if not obj:
            return cls()
        return cls(
            data_entries=list(obj.get("data", [])),
            events=list(obj.get("events", [])),
            guard=obj.get("guard"),
            at_step=obj.get("at_step"),
        )

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @staticmethod
    def loads(blob: bytes) -> dict[str, Any]:
        data = json.loads(blob)
        return data if isinstance(data, dict) else {}


def _union(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for entry in (*first, *second):
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


# ----------------------------------------------------------------------------- the data chain
CHAIN_VERSION = 1
LIMB_BITS = 16
NUM_LIMBS = 4  # a 64-bit hash as 16-bit limbs: a float64 sum stays exact up to 2**37 samples
MAX_CHAIN_DIGESTS = 4096  # per manifest; older digests fold into its base chain
GENESIS_CHAIN = hashlib.sha256(b"elasticd data chain v1").hexdigest()
_MASK64 = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LIMB_MASK = np.uint64(2**LIMB_BITS - 1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on uint64 (the products wrap): a bijection."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _as_ids(sample_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    signed = isinstance(sample_ids, np.ndarray) and sample_ids.dtype.kind == "i"
    if signed and int(np.min(sample_ids, initial=0)) < 0:  # the cast below would wrap them
        raise ValueError("sample ids must be >= 0")
    try:
        return np.asarray(sample_ids, dtype=np.uint64).reshape(-1)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ValueError(f"sample ids must be integers in [0, 2**64): {exc}") from exc


def sample_hashes(step: int, sample_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The 64-bit hash of each ``(step, id)``: for a given step a bijection of the id, so two
    distinct ids of one step never collide."""
    key = _mix64(np.array([(step * _GAMMA) & _MASK64], dtype=np.uint64))  # (1,)
    return _mix64(_as_ids(sample_ids) ^ key)


def sample_sums(step: int, sample_ids: Sequence[int] | np.ndarray) -> tuple[float, ...]:
    """What one rank adds to the step's vote: its number of samples, then the sums of the
    16-bit limbs of their hashes (integers, exact in float64 and in any summation order)."""
    hashes = sample_hashes(step, sample_ids)
    limbs = [
        int(((hashes >> np.uint64(LIMB_BITS * i)) & _LIMB_MASK).sum(dtype=np.uint64))
        for i in range(NUM_LIMBS)
    ]
    return (float(hashes.size), *(float(limb) for limb in limbs))


@dataclass(frozen=True)
class StepDigest:
    """The samples one step consumed, over all ranks: their count and their multiset hash
    (the sum of the per-sample hashes modulo 2**64; the order of the samples does not count)."""

    count: int
    value: int

    @classmethod
    def of(cls, step: int, sample_ids: Sequence[int] | np.ndarray) -> StepDigest:
        """The digest of ``step`` had it consumed exactly ``sample_ids`` (the audit's)."""
        return cls.from_sums(sample_sums(step, sample_ids))

    @classmethod
    def from_sums(cls, sums: Sequence[float]) -> StepDigest:
        """From :func:`sample_sums` added over ranks (the vote's all-reduce)."""
        count, *limbs = (int(v) for v in sums)
        assert len(limbs) == NUM_LIMBS
        value = sum(limb << (LIMB_BITS * i) for i, limb in enumerate(limbs)) & _MASK64
        return cls(count, value)

    def __str__(self) -> str:
        return f"{self.count}:{self.value:016x}"

    @classmethod
    def parse(cls, text: str) -> StepDigest:
        count, sep, value = text.partition(":")
        if not sep or not count.isdigit() or len(value) != 16:
            raise ValueError(f"step digest {text!r}: expected COUNT:16 hex digits")
        return cls(int(count), int(value, 16))


def chain_next(chain: str, step: int, digest: StepDigest) -> str:
    """``sha256(chain || step || count || hash)`` (hex; integers as 8 bytes, big-endian)."""
    payload = bytes.fromhex(chain) + b"".join(
        n.to_bytes(8, "big") for n in (step, digest.count, digest.value)
    )
    return hashlib.sha256(payload).hexdigest()


@dataclass
class DataChain:
    """A worker's data chain: the sampler its steps follow, the chain at ``step``, and the
    digests since the last checkpoint of its lineage (``meta.data_chain`` of the next one).

    A restore or a rewind continues from the loaded checkpoint's chain (the abandoned steps
    of a rewound stretch drop out with it). A checkpoint without a chain, or one whose sampler
    differs from the loop's (another dataset or batch size), starts the chain over at its step
    (``origin_step``): the steps before it followed something this sampler cannot reproduce.
    """

    sampler: dict[str, Any] | None = None  # declared by the loop, as JSON ({"kind": ...})
    origin_step: int = 0  # the chain covers steps origin_step + 1 .. step
    step: int = 0
    chain: str = GENESIS_CHAIN
    base_step: int = 0  # the previous checkpoint of the lineage (or the origin)
    base_chain: str = GENESIS_CHAIN
    digests: list[str] = field(default_factory=list)  # steps base_step + 1 .. step
    _restored_sampler: dict[str, Any] | None = field(default=None, repr=False)

    def declare(self, sampler: Mapping[str, Any]) -> None:
        """The pure sampler the run's data follows (:meth:`ElasticSampler.describe`, or a
        loop's own ``{"kind": ...}`` that :mod:`ops.audit` knows)."""
        spec = json.loads(json.dumps(dict(sampler), sort_keys=True))
        if not isinstance(spec.get("kind"), str):
            raise ValueError(f"sampler={spec!r}: needs a 'kind'")
        if self.sampler is not None and spec != self.sampler:
            raise ValueError(
                f"sampler={spec!r}: this run's data already follows {self.sampler!r}; one "
                "sampler feeds training (pass audit=False to run.sampler() for others)"
            )
        self.sampler = spec
        self._reconcile()

    def advance(self, step: int, digest: StepDigest) -> None:
        assert step == self.step + 1, (step, self.step)
        self.chain = chain_next(self.chain, step, digest)
        self.step = step
        self.digests.append(str(digest))
        if len(self.digests) > MAX_CHAIN_DIGESTS:  # no checkpoint for that long: fold the oldest
            self.base_step += 1
            self.base_chain = chain_next(
                self.base_chain, self.base_step, StepDigest.parse(self.digests.pop(0))
            )

    def meta(self) -> dict[str, Any] | None:
        """``meta.data_chain`` of a checkpoint at ``step`` (None: no sampler declared)."""
        if self.sampler is None:
            return None
        return {
            "version": CHAIN_VERSION,
            "sampler": dict(self.sampler),
            "origin_step": self.origin_step,
            "step": self.step,
            "chain": self.chain,
            "base_step": self.base_step,
            "base_chain": self.base_chain,
            "digests": list(self.digests),
        }

    def saved(self) -> None:
        """A checkpoint of ``step`` was committed: the next one's digests start after it."""
        self.base_step, self.base_chain, self.digests = self.step, self.chain, []

    def restore(self, meta: Mapping[str, Any] | None, *, step: int) -> None:
        """Continue from the checkpoint of ``step`` (``meta``: its ``meta.data_chain``; one
        that is absent or unreadable starts the chain over at ``step``)."""
        self.origin_step, self.chain, self._restored_sampler = step, GENESIS_CHAIN, None
        if isinstance(meta, Mapping) and meta.get("version") == CHAIN_VERSION:
            try:
                continued = (int(meta["origin_step"]), str(meta["chain"]), dict(meta["sampler"]))
            except (KeyError, TypeError, ValueError):
                continued = None
            if continued is not None and meta.get("step") == step:
                self.origin_step, self.chain, self._restored_sampler = continued
        self.step = step
        self.saved()
        self._reconcile()

    def _reconcile(self) -> None:
        restored, declared = self._restored_sampler, self.sampler
        if restored is None or declared is None or restored == declared:
            return
        self.origin_step, self.chain, self._restored_sampler = self.step, GENESIS_CHAIN, declared
        self.saved()

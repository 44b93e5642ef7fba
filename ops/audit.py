"""``elasticctl audit``: did a run train on exactly the samples its sampler prescribes?

Every checkpoint of a run whose loop declared its sampler carries ``meta.data_chain``
(:class:`elastic.worker.ledger.DataChain`): the hash chain over the per-step digests of the
sample ids the ranks really drew, from the run's first step (its ``origin_step``) to the
checkpoint's, plus the digests since the previous checkpoint of its lineage. The audit rebuilds
the pure sampler from the manifest (its ``sampler`` description and its data ledger,
``meta.ledger``), recomputes the chain every step should have produced, and compares:

- a checkpoint whose chain matches proves that every step up to it, across every restart,
  resize and rewind of its lineage, consumed exactly the sampler's batch: no sample dropped,
  none repeated (skipped and reshuffled windows of the ledger are the sampler's own choice);
- the oldest checkpoint whose chain does not match holds the first divergence: the first of
  its recorded steps whose digest differs from the expected one (with the sample ids that step
  should have drawn). When the divergence lies before its record (the checkpoints holding
  those steps were retired or never committed), the audit says which steps it is among.

Manifests are read as JSON through :meth:`CheckpointManager.list` (which also checks their
signatures when a key is configured): nothing is unpickled. A checkpoint is checked against
its own ledger: entries added later (rewinds after it) only touch steps after it. Cost: one
hash per expected sample and one SHA-256 per step, for each distinct ledger of the run.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from elastic.checkpoint import CheckpointConfig, CheckpointManager, Manifest
from elastic.worker.ledger import (
    CHAIN_VERSION,
    GENESIS_CHAIN,
    DataLedger,
    RunLedger,
    StepDigest,
    chain_next,
)
from elastic.worker.sampler import ElasticSampler
from model.mixture import POSITION_BITS, STEP_BITS

__all__ = ["AuditResult", "Divergence", "audit", "audit_manifests", "format_text"]

EXIT_OK = 0
EXIT_DIVERGED = 1
SHOWN_SAMPLE_IDS = 8  # expected sample ids printed with a divergence

ExpectedIds = Callable[[int], np.ndarray]  # step -> the global batch's sample ids


# --------------------------------------------------------------------------- the samplers
def _elastic_ids(described: Mapping[str, Any], ledger: DataLedger) -> ExpectedIds:
    sampler = ElasticSampler.from_description(dict(described), ledger=ledger)
    return lambda step: np.asarray(sampler.global_indices(step), dtype=np.uint64)


def _mixture_ids(described: Mapping[str, Any], ledger: DataLedger) -> ExpectedIds:
    """``model.mixture.Sampler.global_batch``'s ids without opening a shard: ``salt << 52 |
    data_step << 20 | position`` for the positions of the step's batch (tests/ops/test_audit.py
    holds it to the real sampler)."""
    tokens = int(described["global_batch_tokens"])
    stages = sorted((int(start), int(seq_len)) for start, seq_len in described["stages"])
    if not stages or stages[0][0] != 0 or any(seq_len <= 0 for _, seq_len in stages):
        raise ValueError(f"stages={described['stages']!r}: need [start_step, seq_len] from 0")
    starts = [start for start, _ in stages]

    def ids(step: int) -> np.ndarray:
        seq_len = stages[bisect.bisect_right(starts, step) - 1][1]
        data_step, salt = ledger.resolve(step)
        base = (salt << (STEP_BITS + POSITION_BITS)) | (data_step << POSITION_BITS)
        return np.arange(tokens // seq_len, dtype=np.uint64) | np.uint64(base)

    return ids


SAMPLERS: dict[str, Callable[[Mapping[str, Any], DataLedger], ExpectedIds]] = {
    "elastic": _elastic_ids,  # elastic.worker.sampler.ElasticSampler (run.sampler())
    "mixture": _mixture_ids,  # the bundled trainer's model.mixture.Sampler
}


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Divergence:
    """The first place where what the run consumed differs from what its sampler prescribes."""

    checkpoint_step: int  # the oldest checkpoint whose chain does not match
    step: int | None  # the first divergent step; None: before the checkpoint's record
    reason: str
    agreed_up_to_step: int  # the newest checkpoint at or before which every chain matched (0)
    expected_digest: str | None = None
    recorded_digest: str | None = None
    num_expected_samples: int | None = None
    expected_sample_ids: tuple[int, ...] = ()  # the first SHOWN_SAMPLE_IDS

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "checkpoint_step": self.checkpoint_step,
            "reason": self.reason,
            "agreed_up_to_step": self.agreed_up_to_step,
            "expected_digest": self.expected_digest,
            "recorded_digest": self.recorded_digest,
            "num_expected_samples": self.num_expected_samples,
            "expected_sample_ids": list(self.expected_sample_ids),
        }


@dataclass(frozen=True)
class AuditResult:
    run_id: str
    checked: tuple[int, ...]  # checkpoint steps whose chain was checked
    first_step: int  # the data of steps first_step..last_step was checked (with no divergence)
    last_step: int
    samplers: tuple[str, ...]  # kinds met
    unaudited: dict[int, str] = field(default_factory=dict)  # checkpoint step -> why not
    divergence: Divergence | None = None

    @property
    def ok(self) -> bool:
        return self.divergence is None

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_DIVERGED

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "ok": self.ok,
            "checked": list(self.checked),
            "steps": [self.first_step, self.last_step],
            "samplers": list(self.samplers),
            "unaudited": {str(step): why for step, why in sorted(self.unaudited.items())},
            "divergence": None if self.divergence is None else self.divergence.to_json(),
        }


def format_text(result: AuditResult) -> str:
    """What ``elasticctl audit`` prints without ``--json``."""
    lines = []
    d = result.divergence
    if d is None:
        lines.append(f"audit of run {result.run_id!r}: ok")
        lines.append(
            f"  {len(result.checked)} checkpoints ({_steps(result.checked)}): steps "
            f"{result.first_step}..{result.last_step} consumed exactly the sampler's batches "
            f"({', '.join(result.samplers)}), no sample dropped or repeated"
        )
    else:
        where = (
            f"at step {d.step} (recorded in checkpoint {d.checkpoint_step})"
            if d.step is not None
            else f"at or before checkpoint {d.checkpoint_step}"
        )
        lines.append(f"audit of run {result.run_id!r}: DIVERGED {where}")
        lines.append(f"  {d.reason}")
        if d.expected_digest is not None:
            lines.append(f"  expected digest {d.expected_digest}, recorded {d.recorded_digest}")
        if d.num_expected_samples is not None:
            shown = ", ".join(str(i) for i in d.expected_sample_ids)
            more = d.num_expected_samples - len(d.expected_sample_ids)
            tail = f", ... (+{more} more)" if more > 0 else ""
            lines.append(
                f"  expected sample ids of step {d.step} ({d.num_expected_samples}): {shown}{tail}"
            )
        agreed = [s for s in result.checked if s <= d.agreed_up_to_step]
        lines.append(
            f"  checkpoints up to step {d.agreed_up_to_step} agree: {_steps(agreed)}"
            if agreed
            else "  no checkpoint before it agrees"
        )
    for step, why in sorted(result.unaudited.items()):
        lines.append(f"  not checked: checkpoint {step}: {why}")
    return "\n".join(lines)


def _steps(steps: Iterable[int]) -> str:
    listed = list(steps)
    if len(listed) > 10:
        return f"steps {', '.join(map(str, listed[:4]))}, ..., {', '.join(map(str, listed[-4:]))}"
    return f"steps {', '.join(map(str, listed))}" if listed else "none"


# --------------------------------------------------------------------------- the audit
def audit(
    source: CheckpointManager | str,
    run_id: str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> AuditResult:
    """Audit the committed checkpoints of a run: ``source`` is its checkpoint manager (the
    run id is its own) or a ``checkpoint.url`` with ``run_id``. ``ValueError`` when there is
    nothing to audit (no checkpoint there, or none carries a data chain)."""
    if isinstance(source, CheckpointManager):
        if run_id is not None and run_id != source.run_id:
            raise ValueError(f"run_id={run_id!r}: the manager reads run {source.run_id!r}")
        manager = source
    else:
        if not run_id:
            raise ValueError("run_id: needed with a checkpoint URL")
        config = CheckpointConfig(url=source, storage_options=dict(storage_options or {}))
        manager = CheckpointManager(config, run_id=run_id, rank=0, world_size=1)
    manifests = manager.list()
    if not manifests:
        raise ValueError(f"no committed checkpoint of run {manager.run_id!r} under {manager.root}")
    return audit_manifests(manifests, run_id=manager.run_id)


def audit_manifests(manifests: Iterable[Manifest], *, run_id: str) -> AuditResult:
    """:func:`audit` on manifests already read (any order)."""
    records: list[_Record] = []
    unaudited: dict[int, str] = {}
    broken: list[Divergence] = []
    for manifest in sorted(manifests, key=lambda m: m.step):
        try:
            record = _Record.of(manifest)
        except _NotAudited as exc:
            unaudited[manifest.step] = str(exc)
            continue
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            reason = f"checkpoint {manifest.step}'s data chain is unreadable: {exc}"
            broken.append(Divergence(manifest.step, None, reason, agreed_up_to_step=0))
            continue
        records.append(record)
    if not records and not broken:
        raise ValueError(
            f"run {run_id!r}: no checkpoint carries a data chain "
            f"({'; '.join(sorted(set(unaudited.values())))})"
        )
    failed = _check_chains(records)
    divergence = _first_divergence(records, failed, broken)
    checked = tuple(r.step for r in records)
    return AuditResult(
        run_id=run_id,
        checked=checked,
        first_step=min((r.origin_step + 1 for r in records), default=0),
        last_step=max(checked, default=0),
        samplers=tuple(sorted({str(r.sampler["kind"]) for r in records})),
        unaudited=unaudited,
        divergence=divergence,
    )


class _NotAudited(Exception):
    """A checkpoint the audit cannot check (no chain, another version, an unknown sampler)."""


@dataclass(frozen=True)
class _Record:
    """One manifest's ``meta.data_chain``, validated."""

    step: int
    sampler: dict[str, Any]
    ledger: DataLedger
    origin_step: int
    chain: str
    base_step: int
    base_chain: str
    digests: tuple[StepDigest, ...]  # of steps base_step + 1 .. step

    @classmethod
    def of(cls, manifest: Manifest) -> _Record:
        meta = manifest.meta.get("data_chain")
        if meta is None:
            raise _NotAudited(
                "no data chain (saved before elasticd recorded one, or the loop "
                "declares no sampler)"
            )
        if meta.get("version") != CHAIN_VERSION:
            raise _NotAudited(
                f"data chain version {meta.get('version')!r}: this audit reads {CHAIN_VERSION}"
            )
        kind = meta["sampler"]["kind"]
        if kind not in SAMPLERS:
            raise _NotAudited(f"sampler kind {kind!r}: the audit knows {sorted(SAMPLERS)}")
        record = cls(
            step=manifest.step,
            sampler=dict(meta["sampler"]),
            ledger=RunLedger.from_json(manifest.meta.get("ledger")).data,
            origin_step=int(meta["origin_step"]),
            chain=_hex64(meta["chain"]),
            base_step=int(meta["base_step"]),
            base_chain=_hex64(meta["base_chain"]),
            digests=tuple(StepDigest.parse(d) for d in meta["digests"]),
        )
        if meta["step"] != manifest.step:
            raise ValueError(f"says step {meta['step']}")
        if not record.origin_step <= record.base_step <= record.step:
            raise ValueError(f"origin {record.origin_step}, base {record.base_step}: out of order")
        if len(record.digests) != record.step - record.base_step:
            raise ValueError(
                f"{len(record.digests)} digests for steps {record.base_step + 1}..{record.step}"
            )
        return record

    @property
    def group(self) -> str:
        """Records with the same key expect the same chain at every step."""
        key = [self.sampler, self.ledger.to_json(), self.origin_step]
        return json.dumps(key, sort_keys=True)


def _hex64(value: Any) -> str:
    if not (isinstance(value, str) and len(value) == 64):
        raise ValueError(f"{value!r}: not a SHA-256 in hex")
    bytes.fromhex(value)
    return value


class _Expected:
    """The digests and chain a group's sampler prescribes, step by step from its origin."""

    def __init__(self, record: _Record) -> None:
        self.ids = SAMPLERS[str(record.sampler["kind"])](record.sampler, record.ledger)
        self.origin_step = record.origin_step

    def digest(self, step: int) -> StepDigest:
        return StepDigest.of(step, self.ids(step))

    def chains(self, wanted: Iterable[int]) -> dict[int, str]:
        """The expected chain at each of the ``wanted`` steps (one pass)."""
        targets = sorted(set(wanted))
        found: dict[int, str] = {}
        chain, step = GENESIS_CHAIN, self.origin_step
        for target in targets:
            while step < target:
                step += 1
                chain = chain_next(chain, step, self.digest(step))
            found[target] = chain
        return found


def _check_chains(records: list[_Record]) -> dict[int, str]:
    """Step -> expected chain of every record whose recorded chain differs from it."""
    groups: dict[str, list[_Record]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    failed: dict[int, str] = {}
    for members in groups.values():
        expected = _Expected(members[0]).chains(r.step for r in members)
        failed.update({r.step: expected[r.step] for r in members if r.chain != expected[r.step]})
    return failed


def _first_divergence(
    records: list[_Record], failed: Mapping[int, str], broken: list[Divergence]
) -> Divergence | None:
    first = next((r for r in records if r.step in failed), None)
    candidates = [*broken]
    if first is not None:
        agreed = max((r.step for r in records if r.step < first.step), default=0)
        candidates.append(_diagnose(first, agreed_up_to_step=agreed))
    if not candidates:
        return None
    return min(candidates, key=lambda d: d.checkpoint_step)


def _diagnose(record: _Record, *, agreed_up_to_step: int) -> Divergence:
    """Where in ``record`` (whose chain differs from the expected one) the data diverged."""
    expected = _Expected(record)
    base_chain = expected.chains([record.base_step])[record.base_step]
    if record.base_chain != base_chain:
        return Divergence(
            record.step,
            None,
            f"the chain already differs at step {record.base_step}, where this checkpoint's "
            f"record starts: the divergence lies in steps {agreed_up_to_step + 1}.."
            f"{record.base_step}, which no remaining checkpoint records step by step",
            agreed_up_to_step=agreed_up_to_step,
        )
    for step, recorded in enumerate(record.digests, start=record.base_step + 1):
        wanted = expected.digest(step)
        if recorded != wanted:
            ids = expected.ids(step)
            return Divergence(
                record.step,
                step,
                _why(step, recorded, wanted),
                agreed_up_to_step=agreed_up_to_step,
                expected_digest=str(wanted),
                recorded_digest=str(recorded),
                num_expected_samples=int(ids.size),
                expected_sample_ids=tuple(int(i) for i in ids[:SHOWN_SAMPLE_IDS]),
            )
    return Divergence(
        record.step,
        None,
        f"every recorded digest of steps {record.base_step + 1}..{record.step} matches, but "
        "the recorded chain does not follow from them: the manifest was altered",
        agreed_up_to_step=agreed_up_to_step,
    )


def _why(step: int, recorded: StepDigest, wanted: StepDigest) -> str:
    if recorded.count < wanted.count:
        missing = wanted.count - recorded.count
        return (
            f"step {step} consumed {recorded.count} samples where its batch has "
            f"{wanted.count}: {missing} dropped"
        )
    if recorded.count > wanted.count:
        extra = recorded.count - wanted.count
        return (
            f"step {step} consumed {recorded.count} samples where its batch has "
            f"{wanted.count}: {extra} repeated or extra"
        )
    return (
        f"step {step} consumed {recorded.count} samples, as many as its batch has, but not "
        "the same ones: a sample repeated or replaced"
    )

"""CheckpointManager: the commit protocol, retention, rewind support and resharded loading.

Layout: ``<url>/<run_id>/step-<N>/`` holds the DCP files (``__<rank>_<i>.distcp``,
``storage.WRITE_THREADS`` per rank, and ``.metadata``), then ``manifest.json``, written last by
rank 0 once ``dcp.save`` has returned there (DCP's coordinator finishes only after every rank
has reported its shards written). A directory without a manifest is not a checkpoint: a crash
at any point before the manifest PUT leaves an invisible, torn directory that the next save of
that step or retention removes.

Collective calls (``save``, ``load``) are made by every rank. Rank 0 decides everything that
touches shared metadata (does the step exist, which checkpoint to load, what to delete) and
broadcasts the decision, errors included, so ranks never disagree or wait on each other forever.
``mark_known_good`` and ``retire_after`` act on rank 0 only and are no-ops elsewhere, so the
trainer may call them on every rank.

Async saves: ``dcp.async_save`` stages the state (a CPU copy, into buffers reused from save to
save: see ``staging.py``), then the upload and the manifest commit run in the background over a
dedicated gloo group; the next ``save``, ``load``, ``wait`` or ``close`` first completes the
pending save and raises its error, if any. By default ``save`` returns once the copy is made.
With ``background_staging=True`` it returns before the copy; the caller overlaps it with work
that does not write the state (forward, backward) and calls ``wait_staged()`` before the next
in-place update (``optimizer.step()``). A save whose tensors changed during the copy is never
committed (:class:`StagedStateChanged`, on every rank).

Integrity: every rank hashes (BLAKE3) each file as it writes it; rank 0 gathers the digests
and lists them in the manifest, signed (HMAC-SHA256) when ``checkpoint.signing_key_file`` is
set. A load reads each file once, and DCP deserialises it only after its digest matched; a
manifest without a valid signature (when a key is set) is never loaded. Either failure falls
back to the previous checkpoint with one ``checkpoint_fallback`` line naming the file, and
never deletes or rewrites anything.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import functools
import hmac
import json
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from elastic import jsonlog
from elastic.checkpoint.collective import RankGroup
from elastic.checkpoint.config import CheckpointConfig
from elastic.checkpoint.dcp_io import CheckpointWriter
from elastic.checkpoint.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointUntrusted,
    StagedStateChanged,
    TemporaryStorageError,
    dcp_error,
    find_error,
    is_temporary,
    summary,
)
from elastic.checkpoint.integrity import DIGEST_CHUNK_BYTES, WrittenFile
from elastic.checkpoint.manifest import Manifest
from elastic.checkpoint.retention import RewindHorizon, plan_retention
from elastic.checkpoint.staging import ReusingStager
from elastic.checkpoint.storage import Storage

__all__ = ["DCP_METADATA", "MANIFEST", "RETIRED", "CheckpointManager", "step_dir"]

MANIFEST = "manifest.json"
RETIRED = "retired.json"
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(step: int) -> str:
    """Directory name of the checkpoint for ``step`` (relative to the run root)."""
    return f"step-{step}"


class CheckpointManager:
    """Saves and loads training state as DCP checkpoints on any fsspec URL."""

    def __init__(
        self,
        config: CheckpointConfig,
        *,
        run_id: str,
        rank: int,
        world_size: int,
        process_group: Any = None,
        clock: Callable[[], float] = time.time,
        rewind_horizon: RewindHorizon | None = None,
    ) -> None:
        """``rewind_horizon``: what a divergence guard may still rewind to, so retention never
        deletes it (the worker API passes it); ``None``: ``keep_last`` plus the newest
        known-good checkpoint."""
        if not run_id or "/" in run_id or run_id.strip(".") == "":
            raise ValueError(f"run_id={run_id!r}: must be a non-empty name without '/'")
        self.config = config
        self.run_id = run_id
        self._group = RankGroup(rank=rank, world_size=world_size, process_group=process_group)
        self._storage = Storage(config.url, storage_options=config.storage_options)
        self._signing_key = config.signing_key
        self._clock = clock
        self._rewind_horizon = rewind_horizon
        self._log = jsonlog.get("checkpoint")
        # Rank 0 mutates manifests from the main thread and from the async commit thread.
        self._meta_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._pending_step: int | None = None
        # Created on the first async save; holds the staged CPU copy between saves.
        self._stager: ReusingStager | None = None

    @property
    def root(self) -> str:
        """``<url>/<run_id>`` as a full URL."""
        return self._storage.join(self.run_id)

    @property
    def storage(self) -> Storage:
        return self._storage

    # ----------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        meta: dict[str, Any],
        background_staging: bool = False,
    ) -> None:
        """COLLECTIVE. Write ``state`` as the checkpoint of ``step`` and commit it.

        Raises :class:`CheckpointExists` on every rank when ``step`` is already committed.
        With ``config.async_save`` this returns once the state is staged in CPU memory, or,
        with ``background_staging=True``, at once: then the caller must call
        :meth:`wait_staged` before it next changes a tensor of ``state`` in place. Ignored
        for synchronous saves.
        """
        if step < 0:
            raise ValueError(f"step={step!r}: must be >= 0")
        # Checked and copied (a JSON round trip): with async saves the trainer may change its
        # dict before the commit.
        meta = _check_meta(meta)
        self.wait()
        started = time.monotonic()
        self._group.decide(lambda: self._prepare(step))
        writer = self._storage.writer(self._rel(step), background_nice=self.config.background_nice)
        if not self.config.async_save:
            self._write(step, state, writer)
            written = self._gather_written(writer)
            self._group.decide(lambda: self._commit(step, meta, written, started=started))
            return
        side = self._group.side_group()
        upload = self._start_async_write(step, state, writer, side, background=background_staging)
        ctx = contextvars.copy_context()
        self._pending = self._commit_pool().submit(
            ctx.run, self._finish_async, upload, writer, step, meta, started, side
        )
        self._pending_step = step

    def wait_staged(self) -> None:
        """Return once the last async save's CPU copy is made: the state may change again.

        Cheap when there is nothing to wait for. Errors of the save itself surface in
        :meth:`wait` (or the next ``save``/``load``/``close``), on every rank together.
        """
        if self._stager is not None:
            with contextlib.suppress(Exception):
                # A failed copy fails the upload too; wait() reports it, on every rank.
                self._stager.wait()

    def wait(self) -> None:
        """Complete a pending async save (manifest included); re-raise its error, if any."""
        pending, self._pending, self._pending_step = self._pending, None, None
        if pending is not None:
            pending.result()

    def _prepare(self, step: int) -> None:
        rel = self._rel(step)
        if self._storage.exists(f"{rel}/{MANIFEST}"):
            raise CheckpointExists(f"{self._storage.join(rel)} is committed; not overwriting it")
        if self._storage.exists(rel):
            # Torn save or retired checkpoint: no manifest, so nothing refers to these files.
            self._storage.remove(rel, recursive=True)
            self._log.info("checkpoint_delete", step=step, reason="cleared_before_save")

    def _write(self, step: int, state: dict[str, Any], writer: Any) -> None:
        try:
            with _single_process_quiet():
                dcp.save(
                    state,
                    storage_writer=writer,
                    process_group=self._group.process_group,
                    no_dist=not self._group.distributed,
                )
        except (CheckpointException, Exception) as exc:
            where = self._storage.join(self._rel(step))
            raise dcp_error(exc, f"save step {step} to {where}") from exc

    def _start_async_write(
        self, step: int, state: dict[str, Any], writer: Any, group: Any, *, background: bool
    ) -> Future[Any]:
        if self._stager is None:
            self._stager = ReusingStager()
        self._stager.background = background
        try:
            with _single_process_quiet():
                response = dcp.async_save(
                    state,
                    storage_writer=writer,
                    process_group=group,
                    async_stager=self._stager,
                    no_dist=not self._group.distributed,
                )
        except (CheckpointException, Exception) as exc:
            raise dcp_error(exc, f"async save step {step}") from exc
        # Newer torch may return a response object holding the upload future.
        upload = getattr(response, "upload_completion", response)
        assert isinstance(upload, Future), type(upload)
        return upload

    def _finish_async(
        self,
        upload: Future[Any],
        writer: CheckpointWriter,
        step: int,
        meta: dict[str, Any],
        started: float,
        group: Any,
    ) -> None:
        try:
            upload.result()
        except (CheckpointException, Exception) as exc:
            # DCP reports a failure on every rank, so no rank waits in the commit below.
            raise dcp_error(exc, f"async save step {step}") from exc
        assert self._stager is not None
        changed = self._stager.changed
        if self._group.any_rank(bool(changed), group=group):
            # The files hold a torn copy; without a manifest they stay invisible.
            if changed:
                self._log.error("checkpoint_staging_raced", step=step, tensors=changed[:10])
            raise StagedStateChanged(
                f"step {step} not committed: the state changed while it was being copied "
                f"({', '.join(changed[:5]) or 'on another rank'}); call wait_staged() before "
                "changing it after save(..., background_staging=True)"
            )
        written = self._gather_written(writer, group=group)
        self._group.decide(lambda: self._commit(step, meta, written, started=started), group=group)

    def _gather_written(
        self, writer: CheckpointWriter, *, group: Any = None
    ) -> dict[str, WrittenFile]:
        """COLLECTIVE. Every rank's written files (size and BLAKE3), merged."""
        merged: dict[str, WrittenFile] = {}
        for part in self._group.gather(writer.written, group=group):
            merged.update(part)
        return merged

    def _commit(
        self, step: int, meta: dict[str, Any], written: dict[str, WrittenFile], *, started: float
    ) -> None:
        rel = self._rel(step)
        if DCP_METADATA not in written:
            raise CheckpointCorrupt(f"{self._storage.join(rel)}: DCP wrote no {DCP_METADATA}")
        stored = self._storage.sizes(rel)
        for name, record in sorted(written.items()):
            if stored.get(name) != record.size_bytes:
                raise CheckpointCorrupt(
                    f"{self._storage.join(rel, name)}: {stored.get(name, 'no')} bytes stored, "
                    f"{record.size_bytes} written"
                )
        chunk_sizes = {record.chunk_bytes for record in written.values()}
        if len(chunk_sizes) != 1:
            raise CheckpointCorrupt(f"{self._storage.join(rel)}: files chunked {chunk_sizes}")
        manifest = Manifest(
            step=step,
            world_size=self._group.world_size,
            time_unix=self._clock(),
            files={name: record.size_bytes for name, record in written.items()},
            blake3={name: record.blake3 for name, record in written.items()},
            chunk_bytes=chunk_sizes.pop(),
            chunks={name: list(record.chunks) for name, record in written.items()},
            meta=meta,
        )
        manifest = self._signed(manifest)
        with self._meta_lock:
            self._storage.write_bytes(f"{rel}/{MANIFEST}", manifest.to_json().encode())
            self._log.info(
                "checkpoint_commit",
                step=step,
                world_size=manifest.world_size,
                size_bytes=manifest.size_bytes,
                duration_seconds=round(time.monotonic() - started, 3),
                url=self._storage.join(rel),
            )
            self._retain()

    # --------------------------------------------------------------------------- reading
    def list(self) -> builtins.list[Manifest]:
        """Committed checkpoints (manifest present and readable), oldest first."""
        committed, _, _ = self._scan()
        return committed

    def latest(
        self, *, max_step: int | None = None, known_good_only: bool = False
    ) -> Manifest | None:
        """The newest committed checkpoint whose files verify, within the filters."""
        for manifest in reversed(self.list()):
            wanted = _selected(manifest, max_step=max_step, known_good_only=known_good_only)
            if wanted and not self.verify(manifest):
                return manifest
        return None

    def verify(self, manifest: Manifest, *, contents: bool = False) -> builtins.list[str]:
        """Problems with ``manifest``'s files (missing, wrong size), each naming the file.

        Sizes come from a listing. ``contents=True`` also reads every file and compares its
        BLAKE3 with the manifest (a load does that anyway, for the files each rank reads).
        """
        rel = self._rel(manifest.step)
        actual = self._storage.sizes(rel)
        problems = []
        if DCP_METADATA not in manifest.files:
            problems.append(f"{DCP_METADATA}: not listed in the manifest")
        for name, size_bytes in sorted(manifest.files.items()):
            if name not in actual:
                problems.append(f"{name}: missing")
            elif actual[name] != size_bytes:
                problems.append(f"{name}: size {actual[name]} bytes, manifest says {size_bytes}")
            elif contents and manifest.has_digests and not self._digest_matches(manifest, name):
                problems.append(f"{name}: digest mismatch")
        return problems

    def _digest_matches(self, manifest: Manifest, name: str) -> bool:
        chunk_bytes = manifest.chunk_bytes or DIGEST_CHUNK_BYTES
        stored = self._storage.digest(f"{self._rel(manifest.step)}/{name}", chunk_bytes=chunk_bytes)
        chunks_match = not manifest.has_chunks or list(stored.chunks) == manifest.chunks[name]
        return hmac.compare_digest(stored.blake3, manifest.blake3[name]) and chunks_match

    def load(
        self,
        state: dict[str, Any],
        *,
        step: int | None = None,
        max_step: int | None = None,
        known_good_only: bool = False,
    ) -> Manifest | None:
        """COLLECTIVE. Load the newest committed checkpoint (or exactly ``step``) into ``state``.

        A checkpoint that fails verification or cannot be read is skipped with one
        ``checkpoint_fallback`` line and the previous one is tried (also when ``step`` was
        given: the returned manifest says which step was loaded). ``max_step`` and
        ``known_good_only`` filter candidates as in :meth:`latest` (divergence rewinds).

        Returns the manifest used, ``None`` when there is no checkpoint. Raises
        :class:`CheckpointNotFound` when ``step`` is not committed, :class:`CheckpointCorrupt`
        when checkpoints exist but none loads, :class:`TemporaryStorageError` on network errors
        (never a fallback: an older checkpoint would silently lose progress).
        """
        self.wait()
        started = time.monotonic()
        failed: builtins.list[str] = []
        below: int | None = None
        while True:
            choose = functools.partial(
                self._choose,
                step=step,
                max_step=max_step,
                known_good_only=known_good_only,
                below=below,
                failed=failed,
            )
            chosen = self._group.decide(choose)
            if chosen is None:
                return None
            try:
                self._read(chosen, state)
            except _LoadFailed as exc:
                failed.append(f"step {chosen.step}: {exc.problem}")
                if self._group.is_leader:
                    self._log.warning(
                        "checkpoint_fallback", step=chosen.step, file=exc.file, problem=exc.problem
                    )
                below = chosen.step
                continue
            if self._group.is_leader:
                self._log.info(
                    "checkpoint_load",
                    step=chosen.step,
                    world_size_saved=chosen.world_size,
                    world_size_now=self._group.world_size,
                    duration_seconds=round(time.monotonic() - started, 3),
                    url=self._storage.join(self._rel(chosen.step)),
                )
            return chosen

    def _choose(
        self,
        *,
        step: int | None,
        max_step: int | None,
        known_good_only: bool,
        below: int | None,
        failed: builtins.list[str],
    ) -> Manifest | None:
        committed, _, refused = self._scan()
        present = {m.step for m in committed} | set(refused)
        if step is not None and below is None and step not in present:
            raise CheckpointNotFound(f"no committed checkpoint at step {step} under {self.root}")
        bounds = [s for s in (step, max_step) if s is not None]
        limit = min(bounds) if bounds else None
        # Manifests that cannot be trusted (unparseable, unsigned, badly signed) are
        # candidates too: skipping one is a fallback, logged, never a silent fresh start.
        # Not for known-good-only loads (rewinds): whether a refused one was known-good is
        # unknown, and a rewind without a target must stay a rewind without a target.
        candidates: builtins.list[tuple[int, Manifest | str]] = [
            (m.step, m)
            for m in committed
            if _selected(m, max_step=limit, known_good_only=known_good_only)
        ]
        candidates += [
            (s, problem)
            for s, problem in refused.items()
            if not known_good_only and (limit is None or s <= limit)
        ]
        for candidate_step, candidate in sorted(candidates, key=lambda c: c[0], reverse=True):
            if below is not None and candidate_step >= below:
                continue
            problems = self.verify(candidate) if isinstance(candidate, Manifest) else [candidate]
            if not problems:
                assert isinstance(candidate, Manifest)
                return candidate
            failed.append(f"step {candidate_step}: {problems[0]}")
            self._log.warning(
                "checkpoint_fallback",
                step=candidate_step,
                file=problems[0].split(":", 1)[0],
                problem=problems[0],
                num_problems=len(problems),
            )
        if failed:
            raise CheckpointCorrupt(f"no checkpoint under {self.root} loads: {'; '.join(failed)}")
        return None

    def _read(self, manifest: Manifest, state: dict[str, Any]) -> None:
        if not manifest.has_digests and self._group.is_leader:
            self._log.warning(
                "checkpoint_unverified",
                step=manifest.step,
                reason=f"manifest format {manifest.format_version} lists no digests; "
                "files are checked by size only",
            )
        rel = self._rel(manifest.step)
        reader = self._storage.reader(
            rel,
            files=manifest.files,
            blake3=manifest.blake3,
            chunks=manifest.chunks,
            chunk_bytes=manifest.chunk_bytes,
        )
        try:
            with _single_process_quiet():
                dcp.load(
                    state,
                    storage_reader=reader,
                    process_group=self._group.process_group,
                    no_dist=not self._group.distributed,
                )
        except (CheckpointException, Exception) as exc:
            if is_temporary(exc):
                raise TemporaryStorageError(f"load step {manifest.step}: {summary(exc)}") from exc
            # DCP gathers failures from all ranks, so every rank lands here together. A file
            # that failed its digest is named by the rank that read it; .metadata failures
            # reach DCP's caller as text only, so this rank's own reader names those.
            untrusted = find_error(exc, CheckpointUntrusted) or reader.failure
            if untrusted is not None:
                raise _LoadFailed(str(untrusted), file=untrusted.file) from exc
            raise _LoadFailed(f"load failed: {summary(exc)}") from exc

    # ------------------------------------------------------------------ rank-0 metadata
    def mark_known_good(self, step: int) -> None:
        """Rank 0: flag the committed checkpoint of ``step`` as a rewind target.

        Waits for a pending async save only when it is of ``step`` or earlier (its manifest
        is not written yet): promoting an older checkpoint while the newest one is still
        being written must not hold training until the write ends.
        """
        if not self._group.is_leader:
            return
        if self._pending_step is not None and self._pending_step <= step:
            self.wait()
        with self._meta_lock:
            manifest = self._read_manifest(step)
            if manifest is None:
                raise CheckpointNotFound(
                    f"no committed checkpoint at step {step} under {self.root}"
                )
            if not manifest.known_good:
                data = self._signed(manifest.with_known_good()).to_json().encode()
                self._storage.write_bytes(f"{self._rel(step)}/{MANIFEST}", data)
                self._log.info("checkpoint_known_good", step=step)

    def retire_after(self, step: int) -> builtins.list[int]:
        """Rank 0: hide committed checkpoints with a step above ``step`` (divergence rewind).

        Each keeps its old manifest as ``retired.json`` (for forensics) and loses
        ``manifest.json``, so a replay may save those steps again. Returns the retired steps.
        """
        self.wait()
        if not self._group.is_leader:
            return []
        retired = []
        with self._meta_lock:
            for manifest in self.list():
                if manifest.step <= step:
                    continue
                rel = self._rel(manifest.step)
                self._storage.write_bytes(f"{rel}/{RETIRED}", manifest.to_json().encode())
                self._storage.remove(f"{rel}/{MANIFEST}")
                retired.append(manifest.step)
        if retired:
            self._log.info("checkpoint_retire", after_step=step, steps=retired)
        return retired

    def close(self) -> None:
        """Complete a pending save, then release threads, staging memory and the side group."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            self._group.close()

    # ------------------------------------------------------------------------- internals
    def _rel(self, step: int) -> str:
        return f"{self.run_id}/{step_dir(step)}"

    def _commit_pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        return self._executor

    def _signed(self, manifest: Manifest) -> Manifest:
        return manifest if self._signing_key is None else manifest.signed(self._signing_key)

    def _read_manifest(self, step: int) -> Manifest | None:
        """The manifest of ``step``; ``None`` when absent; :class:`CheckpointCorrupt` (its
        message starts with ``manifest.json:``) when unreadable, or, with a signing key,
        :class:`CheckpointUntrusted` when its signature is missing or wrong."""
        try:
            data = self._storage.read_bytes(f"{self._rel(step)}/{MANIFEST}")
        except CheckpointNotFound:
            return None
        try:
            manifest = Manifest.from_json(data)  # JSON only: never pickle
        except CheckpointCorrupt as exc:
            raise CheckpointCorrupt(f"{MANIFEST}: {exc}") from exc
        if self._signing_key is not None:
            problem = manifest.signature_problem(self._signing_key)
            if problem is not None:
                raise CheckpointUntrusted(f"{MANIFEST}: {problem}", file=MANIFEST)
        if manifest.step != step:
            raise CheckpointCorrupt(f"{MANIFEST}: says step {manifest.step}, in {step_dir(step)}")
        return manifest

    def _scan(self) -> tuple[builtins.list[Manifest], builtins.list[int], dict[int, str]]:
        """(committed manifests, torn steps, {step: why its manifest is refused}), by step.

        Refused manifests (unparseable, unsigned or badly signed) are neither committed nor
        torn: nothing loads them, and retention leaves them in place.
        """
        committed, torn, refused = [], [], {}
        for step in self._step_dirs():
            try:
                manifest = self._read_manifest(step)
            except CheckpointCorrupt as exc:
                refused[step] = str(exc)
                continue
            if manifest is None:
                torn.append(step)
            else:
                committed.append(manifest)
        return committed, torn, refused

    def _step_dirs(self) -> builtins.list[int]:
        steps = []
        for name in self._storage.list_dir(self.run_id):
            match = _STEP_DIR.match(name)
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def _retain(self) -> None:
        """Apply retention after a commit (caller holds the lock); errors delete nothing."""
        try:
            committed, torn, _ = self._scan()
            plan = plan_retention(
                committed, torn, keep_last=self.config.keep_last, horizon=self._rewind_horizon
            )
            for step in plan.delete_committed:
                # Manifest first: from that moment the checkpoint is invisible, never half-there.
                self._storage.remove(f"{self._rel(step)}/{MANIFEST}")
                self._storage.remove(self._rel(step), recursive=True)
                self._log.info("checkpoint_delete", step=step, reason="retention")
            for step in plan.delete_torn:
                self._storage.remove(self._rel(step), recursive=True)
                self._log.info("checkpoint_delete", step=step, reason="torn")
        except CheckpointError as exc:
            # The commit already succeeded; retention retries after the next one.
            self._log.warning("checkpoint_retention_failed", error=str(exc))


class _LoadFailed(Exception):
    """dcp.load failed for a non-temporary reason (every rank sees it together)."""

    def __init__(self, problem: str, *, file: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.file = file


def _selected(manifest: Manifest, *, max_step: int | None, known_good_only: bool) -> bool:
    if max_step is not None and manifest.step > max_step:
        return False
    return manifest.known_good or not known_good_only


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Single-process saves/loads are intended here; DCP warns about them on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A JSON round-tripped copy of ``meta``; ``ValueError`` when it is not JSON."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta={meta!r}: must be a dict")
    text = Manifest(step=0, world_size=1, time_unix=0.0, files={}, meta=meta).to_json()
    return dict(json.loads(text)["meta"])

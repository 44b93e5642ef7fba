"""CheckpointManager behaviour on one process (storage-independent, so local disk)."""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import _fsspec_filesystem
from torch.distributed.checkpoint._state_dict_stager import StateDictStager

from elastic.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointExists,
    CheckpointManager,
    CheckpointNotFound,
    StagedStateChanged,
    StorageError,
)
from elastic.guard import Action, CheckpointInfo, Guard, GuardConfig, RewindConfig, RewindPlan
from elastic.worker.recovery import rewind_horizon
from tests.elastic.checkpoint.conftest import (
    Backend,
    assert_states_equal,
    blank_like,
    toy_state,
)
from tests.elastic.guard.curves import healthy_curve

GATE_TIMEOUT_SECONDS = 30.0


def _steps(manager: CheckpointManager) -> list[int]:
    return [m.step for m in manager.list()]


def _dirs(local: Backend) -> list[str]:
    return local.storage().list_dir("run")


def test_root_is_url_slash_run_id(local: Backend) -> None:
    assert local.manager("exp-7").root == f"{local.url}/exp-7"


@pytest.mark.parametrize("run_id", ["", "a/b", ".."])
def test_bad_run_id_is_rejected(local: Backend, run_id: str) -> None:
    with pytest.raises(ValueError, match="run_id"):
        local.manager(run_id)


def test_load_without_checkpoints_returns_none(local: Backend) -> None:
    assert local.manager().load(blank_like(toy_state(0))) is None
    assert local.manager().latest() is None


def test_commit_writes_manifest_with_clock_time_and_logs(local: Backend, log_lines: Any) -> None:
    manager = CheckpointManager(
        local.config(), run_id="run", rank=0, world_size=1, clock=lambda: 1234.5
    )
    manager.save(3, toy_state(3), meta={"fingerprint": "f"})
    (manifest,) = manager.list()
    assert (manifest.step, manifest.world_size, manifest.time_unix) == (3, 1, 1234.5)
    assert manifest.meta == {"fingerprint": "f"} and not manifest.known_good
    (commit,) = [line for line in log_lines() if line["event"] == "checkpoint_commit"]
    assert commit["step"] == 3 and commit["world_size"] == 1
    assert commit["size_bytes"] == manifest.size_bytes > 0
    assert commit["duration_seconds"] >= 0


def test_save_refuses_to_overwrite_a_committed_step(local: Backend) -> None:
    manager = local.manager()
    manager.save(5, toy_state(5), meta={})
    with pytest.raises(CheckpointExists, match="step-5"):
        manager.save(5, toy_state(6), meta={})
    got = blank_like(toy_state(0))
    manager.load(got)
    assert_states_equal(got, toy_state(5))


def test_torn_dir_is_invisible_and_cleared_by_a_save_of_its_step(local: Backend) -> None:
    manager = local.manager()
    manager.save(1, toy_state(1), meta={})
    storage = local.storage()
    storage.write_bytes("run/step-2/__0_0.distcp", b"partial shard")
    storage.write_bytes("run/step-2/stale-from-a-crash", b"x")

    assert _steps(manager) == [1]
    assert manager.latest() is not None and manager.latest().step == 1  # type: ignore[union-attr]
    assert manager.load(blank_like(toy_state(0))).step == 1  # type: ignore[union-attr]

    manager.save(2, toy_state(2), meta={})
    assert "stale-from-a-crash" not in storage.list_dir("run/step-2")
    assert _steps(manager) == [1, 2]


def test_missing_file_falls_back_with_a_log_line_naming_it(local: Backend, log_lines: Any) -> None:
    manager = local.manager()
    manager.save(1, toy_state(1), meta={})
    manager.save(2, toy_state(2), meta={})
    local.storage().remove("run/step-2/.metadata")

    got = blank_like(toy_state(0))
    assert manager.load(got).step == 1  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(1))
    (line,) = [x for x in log_lines() if x["event"] == "checkpoint_fallback"]
    assert line["file"] == ".metadata" and line["problem"] == ".metadata: missing"
    assert manager.verify(manager.list()[-1]) == [".metadata: missing"]


def test_load_exact_step_and_missing_step(local: Backend) -> None:
    manager = local.manager()
    for step in (1, 2, 3):
        manager.save(step, toy_state(step), meta={"s": step})
    got = blank_like(toy_state(0))
    assert manager.load(got, step=2).meta == {"s": 2}  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(2))
    with pytest.raises(CheckpointNotFound, match="step 9"):
        manager.load(got, step=9)


def test_all_checkpoints_corrupt_raises_instead_of_starting_over(local: Backend) -> None:
    manager = local.manager()
    manager.save(1, toy_state(1), meta={})
    local.storage().remove("run/step-1/.metadata")
    with pytest.raises(CheckpointCorrupt, match="step 1"):
        manager.load(blank_like(toy_state(0)))


def test_unreadable_shard_content_falls_back(local: Backend, log_lines: Any) -> None:
    manager = local.manager()
    manager.save(1, toy_state(1), meta={})
    manager.save(2, toy_state(2), meta={})
    storage = local.storage()
    # Same size, garbage bytes: sizes verify, the digest does not (DCP never sees them).
    size = storage.sizes("run/step-2")["__0_0.distcp"]
    storage.write_bytes("run/step-2/__0_0.distcp", b"\0" * size)

    got = blank_like(toy_state(0))
    assert manager.load(got).step == 1  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(1))
    (line,) = [x for x in log_lines() if x["event"] == "checkpoint_fallback"]
    assert line["step"] == 2 and line["file"] == "__0_0.distcp"
    assert "digest mismatch" in line["problem"]


def test_latest_filters_by_max_step_and_known_good(local: Backend) -> None:
    manager = local.manager(keep_last=5)
    for step in (10, 20, 30):
        manager.save(step, toy_state(step), meta={})
    manager.mark_known_good(10)
    assert manager.latest().step == 30  # type: ignore[union-attr]
    assert manager.latest(max_step=25).step == 20  # type: ignore[union-attr]
    assert manager.latest(known_good_only=True).step == 10  # type: ignore[union-attr]
    assert manager.latest(max_step=5) is None
    got = blank_like(toy_state(0))
    assert manager.load(got, known_good_only=True).step == 10  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(10))


def test_mark_known_good_rewrites_only_the_flag(local: Backend) -> None:
    manager = local.manager()
    manager.save(4, toy_state(4), meta={"m": 1})
    before = manager.list()[0]
    manager.mark_known_good(4)
    after = manager.list()[0]
    assert after.known_good and after == before.with_known_good()
    with pytest.raises(CheckpointNotFound):
        manager.mark_known_good(99)


def test_non_leader_ranks_do_not_touch_metadata(local: Backend) -> None:
    manager = local.manager()
    manager.save(1, toy_state(1), meta={})
    other = CheckpointManager(local.config(), run_id="run", rank=0, world_size=1)
    other._group.rank = 1  # what a non-zero rank sees; the calls must be no-ops there
    other.mark_known_good(1)
    assert other.retire_after(0) == []
    assert not manager.list()[0].known_good


def test_retention_keeps_last_k_and_newest_known_good(local: Backend, log_lines: Any) -> None:
    manager = local.manager(keep_last=2)
    manager.save(1, toy_state(1), meta={})
    manager.save(2, toy_state(2), meta={})
    manager.mark_known_good(2)
    for step in (3, 4, 5):
        manager.save(step, toy_state(step), meta={})
    assert _steps(manager) == [2, 4, 5]
    assert _dirs(local) == ["step-2", "step-4", "step-5"]
    deleted = [x["step"] for x in log_lines() if x["event"] == "checkpoint_delete"]
    assert deleted == [1, 3]


def test_retention_removes_torn_dirs_below_newest_only(local: Backend) -> None:
    manager = local.manager(keep_last=3)
    storage = local.storage()
    manager.save(10, toy_state(10), meta={})
    storage.write_bytes("run/step-5/__0_0.distcp", b"torn below")
    storage.write_bytes("run/step-15/__0_0.distcp", b"torn between")
    storage.write_bytes("run/step-99/__0_0.distcp", b"torn above: maybe in flight")
    manager.save(20, toy_state(20), meta={})
    assert _dirs(local) == ["step-10", "step-20", "step-99"]


def test_retention_never_deletes_a_dir_whose_manifest_is_unreadable(local: Backend) -> None:
    manager = local.manager(keep_last=2)
    storage = local.storage()
    manager.save(1, toy_state(1), meta={})
    storage.write_bytes("run/step-1/manifest.json", b"{broken")
    for step in (2, 3, 4):
        manager.save(step, toy_state(step), meta={})
    assert _steps(manager) == [3, 4]
    assert "step-1" in _dirs(local)


def test_retire_after_hides_newer_checkpoints_and_allows_replay(
    local: Backend, log_lines: Any
) -> None:
    manager = local.manager(keep_last=5)
    for step in (10, 20, 30):
        manager.save(step, toy_state(step), meta={"v": "first"})
    assert manager.retire_after(10) == [20, 30]
    assert _steps(manager) == [10]
    retired = local.storage().read_bytes("run/step-30/retired.json")
    assert b'"step": 30' in retired
    (line,) = [x for x in log_lines() if x["event"] == "checkpoint_retire"]
    assert line["after_step"] == 10 and line["steps"] == [20, 30]

    manager.save(20, toy_state(21), meta={"v": "replay"})  # would be CheckpointExists otherwise
    got = blank_like(toy_state(0))
    assert manager.load(got).meta == {"v": "replay"}  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(21))
    assert "retired.json" not in local.storage().list_dir("run/step-20")


def test_meta_must_be_json(local: Backend) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        local.manager().save(1, toy_state(1), meta={"bad": {1, 2}})
    assert _dirs(local) == []


@contextlib.contextmanager
def _gated_shard_writes() -> Iterator[threading.Event]:
    """Hold every DCP shard write until the returned event is set."""
    gate = threading.Event()
    original = _fsspec_filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self: Any, path: Any, mode: str) -> Iterator[Any]:
        if str(path).endswith(".distcp") and not gate.wait(GATE_TIMEOUT_SECONDS):
            raise TimeoutError("test gate never opened")
        with original(self, path, mode) as stream:
            yield stream

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fsspec_filesystem.FileSystem, "create_stream", create_stream)
        yield gate
        gate.set()


def test_async_save_commits_only_after_the_background_write(local: Backend) -> None:
    manager = local.manager(async_save=True)
    state = toy_state(1)
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else dict(v) for k, v in state.items()}
    expected["model"] = {k: v.clone() for k, v in state["model"].items()}
    meta = {"a": 1}
    with _gated_shard_writes() as gate:
        manager.save(1, state, meta=meta)  # returns while the shard write is held
        state["model"]["w"].add_(100.0)  # staged copy must be unaffected
        meta["a"] = 2  # so must the manifest
        assert manager.list() == []
        assert not local.storage().exists("run/step-1/manifest.json")
        gate.set()
        manager.wait()
    assert _steps(manager) == [1]
    got = blank_like(expected)
    assert manager.load(got).meta == {"a": 1}  # type: ignore[union-attr]
    assert_states_equal(got, expected)
    manager.close()


def _copy_of(state: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy_of(v) if isinstance(v, dict) else v.clone() for k, v in state.items()}


def _load(manager: CheckpointManager, step: int, like: dict[str, Any]) -> dict[str, Any]:
    got = blank_like(like)
    assert manager.load(got, step=step).step == step  # type: ignore[union-attr]
    return got


def test_background_staged_save_keeps_values_as_of_the_save_call(local: Backend) -> None:
    manager = local.manager(async_save=True)
    state = toy_state(1)
    expected = _copy_of(state)
    with _gated_shard_writes() as gate:
        manager.save(1, state, meta={}, background_staging=True)
        manager.wait_staged()  # what the trainer does before optimizer.step()
        state["model"]["w"].add_(100.0)
        state["step"].add_(1)
        gate.set()
        manager.wait()
    assert_states_equal(_load(manager, 1, expected), expected)
    manager.close()


def test_async_saves_reusing_staging_memory_keep_each_step_intact(local: Backend) -> None:
    manager = local.manager(async_save=True)
    state = toy_state(1)
    snapshots = {}
    for step in (1, 2, 3):
        snapshots[step] = _copy_of(state)
        manager.save(step, state, meta={}, background_staging=step == 3)
        manager.wait_staged()
        state["model"]["w"].mul_(-2.0)  # a new value while step's write is in flight
        state["model"]["b"].add_(1.0)
    manager.close()
    for step, expected in snapshots.items():
        assert_states_equal(_load(manager, step, expected), expected)


def test_state_changed_during_background_staging_is_never_committed(
    local: Backend, log_lines: Any
) -> None:
    manager = local.manager(async_save=True)
    started, gate = threading.Event(), threading.Event()
    original = StateDictStager.stage

    def held(self: StateDictStager, state_dict: Any, **kwargs: Any) -> Any:
        started.set()
        if not gate.wait(GATE_TIMEOUT_SECONDS):
            raise TimeoutError("test gate never opened")
        return original(self, state_dict, **kwargs)

    state = toy_state(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StateDictStager, "stage", held)
        manager.save(1, state, meta={}, background_staging=True)
        assert started.wait(GATE_TIMEOUT_SECONDS)
        state["model"]["w"].add_(1.0)  # no wait_staged(): the copy may be torn
        gate.set()
        with pytest.raises(StagedStateChanged, match=r"model\.w"):
            manager.wait()
    assert manager.list() == []
    assert any(x["event"] == "checkpoint_staging_raced" for x in log_lines())
    manager.save(1, state, meta={})  # the uncommitted dir does not block a retry
    manager.close()
    assert _steps(manager) == [1]


def test_forgetting_wait_staged_is_covered_by_the_next_save(local: Backend) -> None:
    manager = local.manager(async_save=True)
    manager.save(1, toy_state(1), meta={}, background_staging=True)
    manager.save(2, toy_state(2), meta={}, background_staging=True)
    manager.close()
    assert _steps(manager) == [1, 2]


def test_background_staging_is_ignored_by_sync_saves(local: Backend) -> None:
    manager = local.manager()
    manager.wait_staged()  # nothing staged yet: returns at once
    state = toy_state(1)
    expected = _copy_of(state)
    manager.save(1, state, meta={}, background_staging=True)
    assert _steps(manager) == [1]  # committed before save() returned
    state["model"]["w"].add_(1.0)
    assert_states_equal(_load(manager, 1, expected), expected)


def test_next_save_completes_the_pending_async_save(local: Backend) -> None:
    manager = local.manager(async_save=True)
    manager.save(1, toy_state(1), meta={})
    manager.save(2, toy_state(2), meta={})
    assert 1 in _steps(manager)  # committed before save(2) started writing
    manager.close()
    assert _steps(manager) == [1, 2]


def test_async_write_failure_surfaces_on_wait_and_commits_nothing(local: Backend) -> None:
    manager = local.manager(async_save=True)

    @contextlib.contextmanager
    def disk_full(self: Any, path: Any, mode: str) -> Iterator[Any]:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
        yield  # pragma: no cover

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fsspec_filesystem.FileSystem, "create_stream", disk_full)
        manager.save(1, toy_state(1), meta={})
        with pytest.raises(StorageError, match="No space left"):
            manager.wait()
    assert manager.list() == []
    manager.save(1, toy_state(1), meta={})  # the torn dir does not block a retry
    manager.close()
    assert _steps(manager) == [1]


def test_sync_write_failure_raises_storage_error(local: Backend) -> None:
    manager = local.manager()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local.storage().__class__, "writer", lambda self, rel, **_: _BrokenWriter())
        with pytest.raises(CheckpointError):
            manager.save(1, toy_state(1), meta={})
    assert manager.list() == []


class _BrokenWriter:
    """Not a StorageWriter at all: DCP fails before writing anything."""


def test_saves_skip_torch_save_crc32_only_while_writing(local: Backend) -> None:
    # The shards are written without torch.save's per-record CRC (torch.load never checks it);
    # the process-wide option is back to what it was afterwards, and the state round-trips.
    seen: list[bool] = []
    original = _fsspec_filesystem.FsspecWriter.write_data

    def spy(self: Any, plan: Any, planner: Any) -> Any:
        result = original(self, plan, planner)
        seen.append(torch.serialization.get_crc32_options())
        return result

    manager = local.manager()
    before = torch.serialization.get_crc32_options()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fsspec_filesystem.FsspecWriter, "write_data", spy)
        manager.save(1, toy_state(1), meta={})
    assert seen == [False]
    assert torch.serialization.get_crc32_options() == before
    got = blank_like(toy_state(0))
    manager.load(got, step=1)
    assert_states_equal(got, toy_state(1))


def test_promoting_an_older_checkpoint_does_not_wait_for_the_save_in_flight(
    local: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = local.manager(async_save=True, keep_last=3)
    manager.save(1, toy_state(1), meta={})
    manager.wait()
    release = threading.Event()
    finish = manager._finish_async

    def held(*args: Any, **kwargs: Any) -> None:  # the write of step 2 takes until released
        assert release.wait(60)
        finish(*args, **kwargs)

    monkeypatch.setattr(manager, "_finish_async", held)
    manager.save(2, toy_state(2), meta={})

    older = threading.Thread(target=manager.mark_known_good, args=(1,))
    older.start()
    older.join(30)
    assert not older.is_alive() and not release.is_set()  # done while step 2 is in flight
    newest = threading.Thread(target=manager.mark_known_good, args=(2,))
    newest.start()
    newest.join(0.5)
    assert newest.is_alive()  # step 2's manifest is not written yet: it waits for the save
    release.set()
    newest.join(30)
    assert not newest.is_alive()
    assert {m.step: m.known_good for m in manager.list()} == {1: True, 2: True}
    manager.close()


def test_keep_last_one_keeps_the_rewind_target_and_a_rewind_loads_it(local: Backend) -> None:
    """keep_last 1, a checkpoint every 10 steps, the guard promoting and then rewinding past
    several checkpoints: its target is still on disk and loads; the old history is gone."""
    guard_config, rewind_config = GuardConfig(), RewindConfig()  # min_steps_back 100
    manager = CheckpointManager(
        local.config(keep_last=1, interval_steps=10),
        run_id="run",
        rank=0,
        world_size=1,
        rewind_horizon=rewind_horizon(guard_config, rewind_config),
    )
    guard = Guard(guard_config, rewind_config)
    committed: dict[int, bool] = {}  # what the trainer's Recovery knows, deleted steps included
    for p in healthy_curve(seed=3, num_steps=400, start_step=1):
        assert guard.observe(p.step, loss=p.loss, grad_norm=p.grad_norm, finite=True).action is (
            Action.OK
        )
        if p.step % 10 == 0:
            manager.save(p.step, toy_state(p.step), meta={})
            committed[p.step] = False
        infos = [CheckpointInfo(s, good) for s, good in sorted(committed.items())]
        for step in guard.promotions(step=p.step, checkpoints=infos):
            manager.mark_known_good(step)  # raises CheckpointNotFound had retention deleted it
            committed[step] = True
    for step in (401, 402):
        verdict = guard.observe(step, loss=float("nan"), grad_norm=1.0, finite=False)
    assert verdict.action is Action.REWIND and verdict.onset_step == 401
    infos = [CheckpointInfo(s, good) for s, good in sorted(committed.items())]
    plan = guard.plan_rewind(verdict, trigger_step=402, checkpoints=infos)
    # The newest known-good at least 100 steps before the onset; 310..350 are known-good too.
    assert isinstance(plan, RewindPlan) and plan.to_step == 300

    kept = _steps(manager)
    assert 300 in kept and kept[-1] == 400
    assert 10 not in kept and len(kept) <= 3 + (100 + 49 + 51) // 10  # bounded by the horizon
    manager.retire_after(plan.to_step)
    got = blank_like(toy_state(0))
    assert manager.load(got, step=plan.to_step).step == 300  # type: ignore[union-attr]
    assert_states_equal(got, toy_state(300))

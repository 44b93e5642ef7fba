from __future__ import annotations

import pytest

from elastic.checkpoint import Manifest
from elastic.checkpoint.retention import plan_retention


def _committed(*steps: int, good: tuple[int, ...] = ()) -> list[Manifest]:
    return [
        Manifest(step=s, world_size=2, time_unix=0.0, files={}, known_good=s in good) for s in steps
    ]


def test_keeps_the_newest_k_committed() -> None:
    plan = plan_retention(_committed(10, 20, 30, 40), [], keep_last=2)
    assert plan.delete_committed == (10, 20)
    assert plan.delete_torn == ()


def test_keeps_the_newest_known_good_even_when_older_than_k() -> None:
    plan = plan_retention(_committed(10, 20, 30, 40, 50, good=(10, 20)), [], keep_last=2)
    assert plan.delete_committed == (10, 30)


def test_known_good_inside_the_window_adds_nothing() -> None:
    plan = plan_retention(_committed(10, 20, 30, good=(30,)), [], keep_last=2)
    assert plan.delete_committed == (10,)


def test_removes_torn_dirs_only_below_the_newest_committed_step() -> None:
    plan = plan_retention(_committed(10, 20), [5, 15, 20, 25], keep_last=3)
    assert plan.delete_torn == (5, 15)
    assert plan.delete_committed == ()


def test_without_committed_checkpoints_nothing_is_deleted() -> None:
    plan = plan_retention([], [1, 2, 3], keep_last=2)
    assert plan.delete_committed == ()
    assert plan.delete_torn == ()


def test_fewer_than_k_keeps_everything() -> None:
    assert plan_retention(_committed(1, 2), [], keep_last=3).delete_committed == ()


def test_keep_last_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="keep_last=0"):
        plan_retention(_committed(1), [], keep_last=0)

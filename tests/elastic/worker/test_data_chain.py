"""The data chain: step digests of the samples drawn, the chain a run carries through its
checkpoints, restores and rewinds, and what a loop under the worker API records in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import elastic.worker
from elastic.channel import DaemonChannel
from elastic.checkpoint import CheckpointConfig
from elastic.protocol import Env, ExitCode
from elastic.worker import Run, RunConfig
from elastic.worker.ledger import (
    GENESIS_CHAIN,
    MAX_CHAIN_DIGESTS,
    DataChain,
    StepDigest,
    chain_next,
    sample_sums,
)
from elastic.worker.split import BatchSplit
from ops.audit import audit, format_text

INTERVAL = 4
ELASTIC = {"kind": "elastic", "num_samples": 64, "global_batch_size": 8, "seed": 0}


# --------------------------------------------------------------------------- digests
def test_a_step_digest_does_not_depend_on_order_or_on_how_ranks_split_the_batch() -> None:
    ids = list(range(1000, 1024))
    whole = StepDigest.of(7, ids)
    assert StepDigest.of(7, ids[::-1]) == whole
    for world_size in (2, 3, 5):
        split = BatchSplit(len(ids), world_size, 4)
        shares = [
            ids[split.rank_slice(r).start : split.rank_slice(r).stop] for r in range(world_size)
        ]
        sums = np.sum([sample_sums(7, share) for share in shares], axis=0)  # the all-reduce
        assert StepDigest.from_sums(list(sums)) == whole


def test_a_dropped_repeated_or_replaced_sample_changes_the_digest() -> None:
    ids = list(range(24))
    whole = StepDigest.of(3, ids)
    assert StepDigest.of(3, ids[1:]) != whole
    assert StepDigest.of(3, [*ids, 5]) != whole
    assert StepDigest.of(3, [0, *ids[:-1]]) != whole  # 0 twice, 23 gone: same count
    assert StepDigest.of(4, ids) != whole  # the same samples at another step


def test_limb_sums_are_exact_in_float64_for_the_largest_ids() -> None:
    ids = np.arange(2**63, 2**63 + 4096, dtype=np.uint64)
    sums = sample_sums(1, ids)
    assert all(float(int(v)) == v and v < 2**53 for v in sums)
    assert StepDigest.from_sums(sums) == StepDigest.of(1, [int(i) for i in ids])


def test_negative_sample_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="sample ids"):
        sample_sums(1, [3, -1])
    with pytest.raises(ValueError, match="sample ids"):
        sample_sums(1, np.array([3, -1]))


def test_a_digest_reads_back_from_its_text() -> None:
    digest = StepDigest.of(9, [1, 2, 3])
    assert StepDigest.parse(str(digest)) == digest
    with pytest.raises(ValueError, match="COUNT"):
        StepDigest.parse("3-abc")


# --------------------------------------------------------------------------- the chain
def advanced(chain: DataChain, steps: range) -> DataChain:
    for step in steps:
        chain.advance(step, StepDigest.of(step, [step]))
    return chain


def test_a_restore_continues_from_the_checkpoint_chain_and_drops_later_steps() -> None:
    chain = DataChain()
    chain.declare(ELASTIC)
    advanced(chain, range(1, 5))
    at_4 = chain.meta()
    chain.saved()
    advanced(chain, range(5, 8))
    chain.restore(at_4, step=4)  # a rewind to 4
    again = advanced(DataChain(), range(1, 9))
    assert advanced(chain, range(5, 9)).chain == again.chain
    assert (chain.base_step, len(chain.digests)) == (4, 4)


def test_a_checkpoint_without_a_chain_starts_it_over_at_its_step() -> None:
    chain = DataChain()
    chain.declare(ELASTIC)
    chain.restore(None, step=12)
    meta = advanced(chain, range(13, 15)).meta()
    assert meta is not None
    assert (meta["origin_step"], meta["base_step"], meta["base_chain"]) == (12, 12, GENESIS_CHAIN)
    chain.restore({"version": 1, "step": 14, "chain": 3}, step=14)  # unreadable: start over
    assert (chain.origin_step, chain.chain) == (14, GENESIS_CHAIN)


def test_another_sampler_than_the_checkpoints_starts_the_chain_over() -> None:
    chain = DataChain()
    chain.declare(ELASTIC)
    at_4 = advanced(chain, range(1, 5)).meta()
    resumed = DataChain()
    resumed.restore(at_4, step=4)
    resumed.declare({**ELASTIC, "num_samples": 128})  # a bigger dataset after the restart
    assert (resumed.origin_step, resumed.chain) == (4, GENESIS_CHAIN)
    same = DataChain()
    same.restore(at_4, step=4)
    same.declare(ELASTIC)
    assert (same.origin_step, same.chain) == (0, chain.chain)


def test_a_second_sampler_description_in_one_run_is_refused() -> None:
    chain = DataChain()
    chain.declare(ELASTIC)
    chain.declare(dict(ELASTIC))
    with pytest.raises(ValueError, match="audit=False"):
        chain.declare({**ELASTIC, "seed": 1})
    with pytest.raises(ValueError, match="kind"):
        DataChain().declare({"num_samples": 3})


def test_digests_beyond_the_bound_fold_into_the_base_chain() -> None:
    chain = DataChain()
    chain.declare(ELASTIC)
    advanced(chain, range(1, MAX_CHAIN_DIGESTS + 11))
    assert len(chain.digests) == MAX_CHAIN_DIGESTS and chain.base_step == 10
    folded = chain.base_chain
    for step, digest in enumerate(chain.digests, start=chain.base_step + 1):
        folded = chain_next(folded, step, StepDigest.parse(digest))
    assert folded == chain.chain


def test_no_sampler_declared_means_no_chain_in_the_manifest() -> None:
    assert advanced(DataChain(), range(1, 3)).meta() is None


# --------------------------------------------------------------------------- under a run
def run_config(tmp_path: Path) -> RunConfig:
    checkpoint = CheckpointConfig(url=str(tmp_path / "ckpt"), interval_steps=INTERVAL, keep_last=20)
    return RunConfig(run_id="unit", run_dir=str(tmp_path / "run"), checkpoint=checkpoint)


def start(tmp_path: Path, environ: dict[str, str] | None = None) -> Run:
    return elastic.worker.init(run_config(tmp_path), device="cpu", environ=environ or {})


def train(run: Run, total: int, *, before: Any = lambda step: None, audited: bool = True) -> int:
    """A regression on a 64-sample dataset through ``run.sampler()``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optim = torch.optim.SGD(model.parameters(), lr=0.05)
    run.track(model=model, optim=optim)
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    sampler = run.sampler(64, global_batch_size=8, audit=audited)
    for step in run.steps(total):
        before(step)
        batch = data[sampler.local_indices(step)]
        loss = (model(batch) - batch.sum(dim=1, keepdim=True)).square().mean()
        optim.zero_grad()
        loss.backward()
        if run.report(loss=loss, tokens=8).apply:
            optim.step()
    return run.finish()


def test_every_checkpoint_of_a_run_carries_its_chain_and_a_rewind_and_restart_audit_ok(
    tmp_path: Path, no_group: None, log_lines: Any
) -> None:
    daemon = DaemonChannel(tmp_path / "round")
    run = start(tmp_path, {Env.WORKER_DIR: str(daemon.directory)})
    seen: list[int] = []

    def rewind_at_10(step: int) -> None:
        seen.append(step)
        if step == 10 and seen.count(10) == 1:
            daemon.send("rewind", to_step=8)

    assert train(run, 14, before=rewind_at_10) == ExitCode.OK
    torch.distributed.destroy_process_group()
    again = start(tmp_path)  # a restart from 14
    assert train(again, 22) == ExitCode.OK

    manifests = {m.step: m for m in again.ckpt.list()}
    chain = manifests[20].meta["data_chain"]
    assert chain["sampler"] == ELASTIC
    assert {m.meta["data_chain"]["origin_step"] for m in manifests.values()} == {0}
    assert (chain["base_step"], len(chain["digests"])) == (16, 4)
    assert all(StepDigest.parse(d).count == 8 for d in chain["digests"])
    assert manifests[12].meta["ledger"]["data"][0]["start_step"] == 9  # the rewind's reshuffle
    result = audit(again.ckpt)
    assert result.ok, format_text(result)
    assert result.checked == (4, 8, 12, 14, 16, 20, 22)


def test_a_sampler_not_audited_records_nothing(
    tmp_path: Path, no_group: None, log_lines: Any
) -> None:
    run = start(tmp_path)
    assert train(run, 4, audited=False) == ExitCode.OK
    assert "data_chain" not in run.ckpt.list()[0].meta

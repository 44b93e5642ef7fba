"""``ops.audit``: the data a run consumed, checked against its pure sampler (issue 18 item 2).

Unit tests build manifests the way a run does (:class:`DataChain` advanced by the digest of
what each step drew, a checkpoint every ``INTERVAL`` steps, rewinds that retire later ones);
the end-to-end test audits a real daemon run with a worker kill and an operator rewind.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from elastic.checkpoint import CheckpointConfig, CheckpointManager, Manifest
from elastic.worker.ledger import DataChain, RunLedger, StepDigest, chain_next
from elastic.worker.sampler import ElasticSampler
from model.mixture import Sampler, Stage
from model.shards import ShardWriter, open_shard
from ops.audit import SAMPLERS, audit, audit_manifests, format_text
from tests.support.daemons import daemons, start_daemon, tiny_job, wait_step
from tests.support.etcd import EtcdServer, etcd_server
from tests.support.procs import elasticctl, wait_for

__all__ = ["etcd_server"]

NUM_SAMPLES, BATCH, SEED, INTERVAL = 50, 8, 3, 10
DESCRIPTION = {
    "kind": "elastic",
    "num_samples": NUM_SAMPLES,
    "global_batch_size": BATCH,
    "seed": SEED,
}
Draw = Callable[[int, ElasticSampler], list[int]]


def exact(step: int, sampler: ElasticSampler) -> list[int]:
    return sampler.global_indices(step)


class SimulatedRun:
    """A run's data chain and manifests, without training: each step draws ``draw(step)``."""

    def __init__(self, draw: Draw = exact) -> None:
        self.draw = draw
        self.ledger = RunLedger()
        self.sampler = ElasticSampler(
            NUM_SAMPLES, global_batch_size=BATCH, seed=SEED, ledger=lambda: self.ledger.data
        )
        self.chain = DataChain()
        self.chain.declare(self.sampler.describe())
        self.manifests: dict[int, Manifest] = {}

    def train(self, to_step: int) -> SimulatedRun:
        for step in range(self.chain.step + 1, to_step + 1):
            self.chain.advance(step, StepDigest.of(step, self.draw(step, self.sampler)))
            if step % INTERVAL == 0:
                self.save()
        return self

    def save(self) -> None:
        meta = {"ledger": self.ledger.to_json(), "data_chain": self.chain.meta()}
        step = self.chain.step
        self.manifests[step] = Manifest(step=step, world_size=1, time_unix=0.0, files={}, meta=meta)
        self.chain.saved()

    def rewind(self, to_step: int, *, kind: str = "reshuffle") -> SimulatedRun:
        """A rewind at the current step back to the checkpoint ``to_step`` (later ones retired)."""
        self.ledger.add_data_action(kind, to_step + 1, self.chain.step + 1)
        self.manifests = {s: m for s, m in self.manifests.items() if s <= to_step}
        self.restart(to_step)
        return self

    def restart(self, step: int) -> SimulatedRun:
        """A restart (worker lost, resize) from the checkpoint of ``step``."""
        self.chain.restore(self.manifests[step].meta["data_chain"], step=step)
        return self

    def audit(self) -> Any:
        return audit_manifests(self.manifests.values(), run_id="sim")


def test_a_run_that_drew_exactly_its_batches_is_ok() -> None:
    result = SimulatedRun().train(30).restart(20).train(45).audit()
    assert result.ok and result.exit_code == 0
    assert result.checked == (10, 20, 30, 40)
    assert (result.first_step, result.last_step) == (1, 40)
    assert "ok" in format_text(result).splitlines()[0]


def test_a_dropped_sample_is_reported_at_its_step_with_the_expected_ids() -> None:
    def drop_one_at_13(step: int, sampler: ElasticSampler) -> list[int]:
        ids = sampler.global_indices(step)
        return ids[1:] if step == 13 else ids

    run = SimulatedRun(drop_one_at_13).train(40)
    result = run.audit()
    d = result.divergence
    assert d is not None and result.exit_code == 1
    assert (d.step, d.checkpoint_step, d.agreed_up_to_step) == (13, 20, 10)
    assert "1 dropped" in d.reason
    assert d.recorded_digest is not None and d.recorded_digest.startswith(f"{BATCH - 1}:")
    assert d.expected_digest == str(StepDigest.of(13, run.sampler.global_indices(13)))
    assert d.num_expected_samples == BATCH
    assert list(d.expected_sample_ids) == run.sampler.global_indices(13)[:8]
    text = format_text(result)
    assert "DIVERGED at step 13 (recorded in checkpoint 20)" in text
    assert "checkpoints up to step 10 agree" in text


def test_a_sample_repeated_in_place_of_another_is_reported_at_its_step() -> None:
    def repeat_at_27(step: int, sampler: ElasticSampler) -> list[int]:
        ids = sampler.global_indices(step)
        return [ids[0], *ids[:-1]] if step == 27 else ids

    d = SimulatedRun(repeat_at_27).train(40).audit().divergence
    assert d is not None and (d.step, d.checkpoint_step) == (27, 30)
    assert "not the same ones" in d.reason


def test_a_worker_resumed_at_a_wrong_data_position_is_reported_at_its_first_step() -> None:
    run = SimulatedRun().train(20)
    run.draw = lambda step, sampler: sampler.global_indices(step - 1)  # replays a step's data
    d = run.restart(20).train(30).audit().divergence
    assert d is not None and (d.step, d.checkpoint_step, d.agreed_up_to_step) == (21, 30, 20)


def test_steps_whose_data_a_ledger_skip_removed_are_not_a_divergence() -> None:
    run = SimulatedRun().train(27).rewind(20, kind="skip").train(50)
    assert run.ledger.data_entries[0]["kind"] == "skip"
    assert run.audit().ok
    # Step 21 trained on the data of step 28: the data of 21..27 was never drawn again.
    plain = ElasticSampler(NUM_SAMPLES, global_batch_size=BATCH, seed=SEED)
    assert run.sampler.global_indices(21) == plain.global_indices(28)


def test_a_lineage_of_rewinds_and_restarts_is_ok() -> None:
    run = SimulatedRun().train(34).rewind(30).train(47).restart(40).train(52).rewind(40)
    result = run.train(70).audit()
    assert result.ok, format_text(result)
    assert result.checked == (10, 20, 30, 40, 50, 60, 70)
    assert len(run.ledger.data_entries) == 2


def test_a_replay_that_ignores_the_ledger_is_reported() -> None:
    run = SimulatedRun().train(34).rewind(30)
    plain = ElasticSampler(NUM_SAMPLES, global_batch_size=BATCH, seed=SEED)
    run.draw = lambda step, sampler: plain.global_indices(step)  # the reshuffle not applied
    d = run.train(40).audit().divergence
    assert d is not None and (d.step, d.checkpoint_step) == (31, 40)


def test_a_divergence_before_a_checkpoint_record_is_placed_between_checkpoints() -> None:
    def drop_at_13(step: int, sampler: ElasticSampler) -> list[int]:
        return sampler.global_indices(step)[: -1 if step == 13 else None]

    run = SimulatedRun(drop_at_13).train(40)
    del run.manifests[20]  # retention took the checkpoint whose record holds step 13
    d = run.audit().divergence
    assert d is not None and (d.step, d.checkpoint_step, d.agreed_up_to_step) == (None, 30, 10)
    assert "steps 11..20" in d.reason


def test_a_chain_edited_without_its_digests_is_reported_as_altered() -> None:
    run = SimulatedRun().train(30)
    meta = run.manifests[20].meta
    meta["data_chain"]["chain"] = chain_next(meta["data_chain"]["chain"], 99, StepDigest(1, 1))
    d = run.audit().divergence
    assert d is not None and (d.step, d.checkpoint_step) == (None, 20)
    assert "altered" in d.reason


def test_an_unreadable_chain_is_a_divergence_and_a_missing_one_is_listed() -> None:
    run = SimulatedRun().train(40)
    del run.manifests[10].meta["data_chain"]
    run.manifests[30].meta["data_chain"]["digests"].pop()
    result = run.audit()
    assert result.checked == (20, 40)
    assert "no data chain" in result.unaudited[10]
    d = result.divergence
    assert d is not None and (d.step, d.checkpoint_step) == (None, 30)
    assert "unreadable" in d.reason
    assert "not checked: checkpoint 10" in format_text(result)


def test_a_run_without_any_chain_cannot_be_audited() -> None:
    bare = Manifest(step=10, world_size=1, time_unix=0.0, files={}, meta={})
    with pytest.raises(ValueError, match="no checkpoint carries a data chain"):
        audit_manifests([bare], run_id="old")


def test_the_json_result_names_the_divergence() -> None:
    def drop_at_5(step: int, sampler: ElasticSampler) -> list[int]:
        return sampler.global_indices(step)[: -2 if step == 5 else None]

    body = json.loads(json.dumps(SimulatedRun(drop_at_5).train(20).audit().to_json()))
    assert body["ok"] is False and body["run_id"] == "sim"
    assert body["checked"] == [10, 20]
    assert body["divergence"]["step"] == 5
    assert body["divergence"]["checkpoint_step"] == 10
    assert body["divergence"]["num_expected_samples"] == BATCH
    assert len(body["divergence"]["expected_sample_ids"]) == 8


def test_audit_reads_a_checkpoint_url_and_refuses_an_empty_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no committed checkpoint"):
        audit(str(tmp_path), "nothing")
    with pytest.raises(ValueError, match="run_id"):
        audit(str(tmp_path))
    manager = CheckpointManager(
        CheckpointConfig(url=str(tmp_path)), run_id="r", rank=0, world_size=1
    )
    with pytest.raises(ValueError, match="reads run 'r'"):
        audit(manager, "other")


# --------------------------------------------------------------------------- the mixture
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        writer = ShardWriter(
            str(root / name), source=name, tokenizer="byte", vocab_size=257, eos_id=256
        )
        for _ in range(20):
            writer.add(rng.integers(0, 256, size=300))
        writer.close(holdout_fraction=0.1)
    return root


def test_the_mixture_ids_the_audit_expects_are_the_bundled_samplers(shard_dir: Path) -> None:
    ledger = RunLedger()
    ledger.add_data_action("skip", 4, 9)
    ledger.add_data_action("reshuffle", 6, 8)
    sampler = Sampler(
        {name: open_shard(str(shard_dir / name)) for name in ("a", "b")},
        stages=[Stage(0, {"a": 0.5, "b": 0.5}, 8), Stage(7, {"a": 1.0, "b": 0.0}, 16)],
        seed=11,
        global_batch_tokens=96,
        ledger=ledger.data,
    )
    described = {"kind": "mixture", "global_batch_tokens": 96, "stages": [[0, 8], [7, 16]]}
    expected = SAMPLERS["mixture"](described, ledger.data)
    for step in range(1, 12):
        assert expected(step).tolist() == [s.sample_id for s in sampler.global_batch(step)], step


# --------------------------------------------------------------------------- end to end
FAULTS_ENV = {"ELASTICD_ALLOW_FAULTS": "1"}
KILL_STEP, REWIND_TO, TAMPERED_STEP = 25, 30, 36


def ctl(endpoint: str, run_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = elasticctl("--etcd", endpoint, "--run-id", run_id, *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def tamper(manifest_path: Path, step: int) -> str:
    """Rewrite a manifest as if ``step`` had drawn one sample fewer: its digest and the chain
    from there on, consistently (what a worker that lost a sample would have written)."""
    doc = json.loads(manifest_path.read_text())
    record = doc["meta"]["data_chain"]
    index = step - record["base_step"] - 1
    original = StepDigest.parse(record["digests"][index])
    record["digests"][index] = str(StepDigest(original.count - 1, original.value ^ 0x5A5A))
    chain = record["base_chain"]
    for at, digest in enumerate(record["digests"], start=record["base_step"] + 1):
        chain = chain_next(chain, at, StepDigest.parse(digest))
    record["chain"] = chain
    manifest_path.write_text(json.dumps(doc))
    return str(original)


@pytest.mark.slow
def test_a_daemon_run_with_a_kill_and_a_rewind_audits_ok_and_a_tampered_step_is_found(
    tmp_path: Path, demo_corpus: Path, etcd_server: EtcdServer
) -> None:
    ep, run = etcd_server.endpoint, "audit"
    doc = tiny_job(
        tmp_path,
        demo_corpus,
        endpoint=ep,
        run_id=run,
        nodes={"min": 1, "max": 1},
        nproc_per_node=2,  # the digest of each step is summed over two ranks' draws
        train={"steps": 100000, "log_sample_ids": False},
        faults=[
            {"kind": "kill", "step": KILL_STEP},  # SIGKILL before step 25: resume from 20
            # Steps from 21 on take 0.2 s more, so the rewind lands long before the drain.
            {"kind": "slow", "step": 21, "ms": 200, "times": 0},
        ],
    )
    with daemons() as group:
        node = start_daemon(doc, name="solo", log_dir=tmp_path, env=FAULTS_ENV)
        group.append(node)
        wait_for(lambda: node.events("restart"), timeout_seconds=120, what="the kill's restart")
        wait_step(group, REWIND_TO + 6, timeout_seconds=120)
        ctl(ep, run, "rewind", "--to-step", str(REWIND_TO))
        wait_for(lambda: node.events("rewind"), timeout_seconds=60, what="the rewind")
        rewound_at = node.events("rewind")[-1]["ts"]
        wait_for(
            lambda: any(r["step"] > 41 and r["ts"] > rewound_at for r in node.events("step")),
            timeout_seconds=60,
            what="step 42 after the rewind",
        )
        node.signal(signal.SIGTERM)  # a drain: one more checkpoint, then the daemon stops
        assert node.wait(timeout_seconds=60) == 0

    checkpoints = tmp_path / "ckpt"
    result = audit(str(checkpoints), run)
    assert result.ok, format_text(result)
    assert {10, 20, 30, 40} <= set(result.checked) and result.last_step > 40
    assert result.samplers == ("mixture",)
    print(format_text(result))

    expected = tamper(checkpoints / run / "step-40" / "manifest.json", TAMPERED_STEP)
    tampered = audit(str(checkpoints), run)
    d = tampered.divergence
    assert d is not None, format_text(tampered)
    assert (d.step, d.checkpoint_step, d.agreed_up_to_step) == (TAMPERED_STEP, 40, 30)
    assert d.expected_digest == expected
    assert d.num_expected_samples == 24 and "1 dropped" in d.reason
    print(format_text(tampered))
    # The same through elasticctl (storage only: the run's etcd is gone): exit 1, and the JSON.
    proc = elasticctl("--run-id", run, "audit", "--url", str(checkpoints), "--json")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["divergence"]["step"] == TAMPERED_STEP
    text = elasticctl("--run-id", run, "audit", "--url", str(checkpoints))
    assert f"DIVERGED at step {TAMPERED_STEP}" in text.stdout

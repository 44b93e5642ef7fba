"""bench/gpu.py's measurements, run on the CPU with the tiny model: the code that a GPU
machine runs is the code CI runs (only the device and the sizes differ)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench import gpu

CPU = torch.device("cpu")


def test_loop_throughput_counts_tokens_per_timed_step() -> None:
    r = gpu.throughput("tiny", 2, compile_mode=None, device=CPU, seq=16, warmup=1, steps=3)
    assert r["step_ms"] > 0
    assert r["step_ms_max"] >= r["step_ms"]
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1000))
    assert math.isnan(r["mfu"])  # no card peak on a CPU
    assert r["flops_per_token"] > 0


def test_checkpoint_blocking_times_sync_and_async_saves() -> None:
    r = gpu.checkpoint_blocking("tiny", device=CPU, repeats=2)
    assert r["sync"] > 0 and r["async"] > 0 and r["async_first"] > 0
    # model (float32) + AdamW's two moments: three copies of every parameter, plus step counts
    params = sum(p.numel() for p in gpu.build("tiny", CPU, seq=8)[0].parameters())
    assert r["state_gib"] * 2**30 >= 3 * 4 * params


@pytest.mark.slow
def test_trainer_run_reads_the_step_log(tmp_path: Path) -> None:
    r = gpu.trainer_run(
        tmp_path,
        device="cpu",
        size="tiny",
        micro_batch=2,
        seq=32,
        steps=6,
        **{"checkpoint.interval_steps": 3, "train.threads": 1},
    )
    assert r["steps"] == 6
    assert r["commits"] == 2
    assert r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"])


def test_section_reports_the_best_350m_mfu_and_failures() -> None:
    loop = {
        "step_ms": 100.0,
        "tokens_per_s": 1.0,
        "mfu": 0.35,
        "peak_memory_gib": 1.0,
        "warmup_s": 1.0,
        "flops_per_token": 1.0,
    }
    loops = [(("350m", 8, "regions"), loop), (("350m", 16, "regions"), {**loop, "mfu": 0.42})]
    ckpt = {"sync": 2.0, "async": 0.1, "async_first": 0.5, "state_gib": 4.0}
    s = gpu.section(loops, ["trainer failed: boom"], ckpt, None)
    assert [(t.name, t.measured, t.met) for t in s.targets] == [
        ("MFU, 350M", "42.0%", True),
        ("async GPU blocking", "0.050x", True),
    ]
    assert "- trainer failed: boom" in s.body

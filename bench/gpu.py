"""GPU: tokens/s and MFU of the ~125M and ~350M GPTs in bf16 with torch.compile, and the GPU
blocking time of an async checkpoint vs. a synchronous one. Skipped without CUDA.

One process, one GPU, a plain loop over ``model.gpt.GPT`` (bf16 autocast, fused AdamW,
``torch.compile``), batch ``BATCH`` x ``SEQ`` tokens; ``WARMUP`` steps (compilation) are not
timed, then ``STEPS`` steps are, synchronised with the device. MFU = tokens/s x
``GPT.flops_per_token(SEQ)`` / the card's dense bf16 peak (H100/H200 SXM: 989 TFLOPS).
Checkpoint: model + optimizer state of the 350M model through ``CheckpointManager`` to local
disk, sync vs. async (time until ``save()`` returns, i.e. training is blocked).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Section, Target, fmt, table

TITLE = "7. GPU throughput, MFU and async checkpoint blocking"
SEQ = 1024
BATCH = {"125m": 16, "350m": 8}
WARMUP = 10
STEPS = 30
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def build(size: str) -> tuple[Any, Any]:
    from model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(size=size, max_seq_len=SEQ)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, optimizer


def throughput(size: str) -> dict[str, float]:
    model, optimizer = build(size)
    step_fn = torch.compile(model)
    batch = BATCH[size]
    idx = torch.randint(0, model.dims.vocab_size, (batch, SEQ + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]  # (B, T) each

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()  # sync point: per-step timing
        times.append(time.perf_counter() - started)
    tokens_per_s = batch * SEQ / statistics.median(times)
    peak = peak_flops()
    mfu = tokens_per_s * model.flops_per_token(SEQ) / peak if peak else float("nan")
    step_ms = 1000 * statistics.median(times)
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "step_ms": step_ms}


def checkpoint_blocking(size: str, repeats: int = 3) -> dict[str, float]:
    from elastic.checkpoint import CheckpointConfig, CheckpointManager

    model, optimizer = build(size)
    model(torch.zeros(1, 8, dtype=torch.long, device="cuda"))[0].sum().backward()
    optimizer.step()  # creates the optimizer state
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    out: dict[str, list[float]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            config = CheckpointConfig(
                url=(Path(tmp) / mode).as_uri(), keep_last=repeats + 1, async_save=mode == "async"
            )
            manager = CheckpointManager(config, run_id="gpu", rank=0, world_size=1)
            for i in range(repeats):
                torch.cuda.synchronize()
                started = time.perf_counter()
                manager.save(i, state, meta={})
                torch.cuda.synchronize()
                out[mode].append(time.perf_counter() - started)
                manager.wait()
            manager.close()
    return {k: statistics.median(v) for k, v in out.items()}


def run(work: Path, *, quick: bool) -> Section:
    del work
    if not torch.cuda.is_available():
        return Section(
            "gpu",
            TITLE,
            "Skipped: no CUDA device on this machine.",
            [Target("MFU, 350M", ">= 40% on an H100", "skipped (no GPU)", None)],
        )
    torch.backends.cuda.matmul.allow_tf32 = True
    sizes = ["125m"] if quick else ["125m", "350m"]
    rows, results = [], {}
    for size in sizes:
        r = throughput(size)
        results[size] = r
        rows.append(
            [
                size,
                BATCH[size],
                SEQ,
                fmt(r["step_ms"], 1),
                f"{r['tokens_per_s']:.0f}",
                fmt(100 * r["mfu"], 1),
            ]
        )
    ckpt = checkpoint_blocking(sizes[-1])
    ratio = ckpt["async"] / ckpt["sync"]
    body = "\n\n".join(
        [
            f"Device: {torch.cuda.get_device_name(0)}.",
            table(["model", "batch", "seq", "median step ms", "tokens/s", "MFU %"], rows),
            table(
                ["checkpoint save", "median s training is blocked"],
                [["sync", fmt(ckpt["sync"], 3)], ["async", fmt(ckpt["async"], 3)]],
            ),
            f"async / sync blocking: **{ratio:.3f}x**.",
        ]
    )
    targets = []
    if "350m" in results:
        mfu = results["350m"]["mfu"]
        targets.append(Target("MFU, 350M", ">= 40% on an H100", f"{100 * mfu:.1f}%", mfu >= 0.4))
    targets.append(Target("async GPU blocking", "<= 0.1x sync", f"{ratio:.3f}x", ratio <= 0.1))
    return Section("gpu", TITLE, body, targets, data={"throughput": results, "checkpoint": ckpt})

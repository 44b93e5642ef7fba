"""GPU: tokens/s and MFU of the ~125M and ~350M GPTs in bf16 with torch.compile, the GPU
blocking time of an async checkpoint vs. a synchronous one, and the trainer's own GPU path
(NCCL, FSDP2 with bf16 parameters, regional compile, async checkpoints). Skipped without CUDA.

- **Loop**: one process, a plain loop over ``model.gpt.GPT`` (bf16 autocast over float32
  weights, fused AdamW), batch x ``SEQ`` tokens; ``WARMUP`` steps (compilation) are not timed,
  then ``STEPS`` steps are, each synchronised with the device. Compiled either by regions
  (``GPT.compile_regions``, what ``train.compile`` does) or whole (``torch.compile(model)``).
  MFU = tokens/s x ``GPT.flops_per_token(SEQ)`` / the card's dense bf16 peak (H100/H200 SXM:
  989 TFLOPS).
- **Checkpoint**: model + optimizer state of the 350M model through ``CheckpointManager`` to
  local disk, sync vs. async: the time until ``save()`` returns, i.e. training is blocked.
- **Trainer**: ``python -m model.train`` (a one-process NCCL group) on the demo corpus with
  ``train.compile`` and async checkpoints; its own step log gives tokens/s.

Every function takes a device, so ``tests/bench/test_gpu.py`` runs the same code on the CPU.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.common import BENCH_DIR, Section, Target, fmt, machine, table

T = TypeVar("T", bound=dict[str, Any])
TITLE = "7. GPU throughput, MFU and async checkpoint blocking"
SEQ = 1024
WARMUP = 8
STEPS = 20
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# (size, micro-batch, compile) in the order run: the target's configuration first, so a run
# cut short still has it. The whole-model compile (minutes of compiling) runs last of all,
# after the checkpoint and trainer measurements.
LOOPS_FULL: tuple[tuple[str, int, str], ...] = (
    ("350m", 16, "regions"),
    ("350m", 8, "regions"),
    ("350m", 32, "regions"),
    ("125m", 16, "regions"),
)
LOOPS_LAST: tuple[tuple[str, int, str], ...] = (("350m", 16, "whole"),)
LOOPS_QUICK: tuple[tuple[str, int, str], ...] = (("125m", 16, "regions"),)
# The trainer run: model size, micro-batch (no accumulation), steps, checkpoint interval.
TRAINER_SIZE, TRAINER_BATCH, TRAINER_STEPS, TRAINER_INTERVAL = "350m", 16, 40, 15


def log(**fields: Any) -> None:
    """One JSON line on stderr per measurement, so a run cut short still shows its results."""
    print(json.dumps(fields), file=sys.stderr, flush=True)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def release_memory() -> None:
    """Drop compiled graphs (they hold the last model) and return cached GPU memory."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(size: str, device: torch.device, seq: int) -> tuple[Any, Any]:
    from model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(size=size, max_seq_len=seq)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, optimizer


def throughput(
    size: str,
    batch: int,
    *,
    compile_mode: str | None,
    device: torch.device,
    seq: int = SEQ,
    warmup: int = WARMUP,
    steps: int = STEPS,
) -> dict[str, float]:
    """Median step time of the plain loop; ``compile_mode`` None, "regions" or "whole"."""
    torch._dynamo.reset()
    model, optimizer = build(size, device, seq)

    def mean_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, _ = model(x)  # (B, T, V)
        terms = model.loss_terms(logits, y)
        return model.objective(terms, num_tokens=terms.num_tokens)

    if compile_mode == "regions":
        model.compile_regions()
    elif compile_mode == "whole":
        mean_loss = torch.compile(mean_loss, dynamic=False)
    idx = torch.randint(0, model.dims.vocab_size, (batch, seq + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]  # (B, T) each

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = mean_loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync(device)  # per-step timing
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    peak = peak_flops()
    mfu = tokens_per_s * model.flops_per_token(seq) / peak if peak else float("nan")
    memory_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {
        "step_ms": 1000 * step_s,
        "step_ms_max": 1000 * max(times),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "warmup_s": warmup_s,
        "peak_memory_gib": memory_gib,
        "flops_per_token": model.flops_per_token(seq),
    }


def checkpoint_blocking(size: str, *, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Median seconds ``save()`` blocks the caller, sync and async, and the state's size."""
    from elastic.checkpoint import CheckpointConfig, CheckpointManager

    model, optimizer = build(size, device, seq=8)
    model(torch.zeros(1, 8, dtype=torch.long, device=device))[0].float().sum().backward()
    optimizer.step()  # creates the optimizer state
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    out: dict[str, list[float]] = {"sync": [], "async": []}
    state_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            config = CheckpointConfig(
                url=(Path(tmp) / mode).as_uri(), keep_last=2, async_save=mode == "async"
            )
            manager = CheckpointManager(config, run_id="gpu", rank=0, world_size=1)
            for i in range(repeats):
                sync(device)
                started = time.perf_counter()
                manager.save(i + 1, state, meta={})
                sync(device)
                out[mode].append(time.perf_counter() - started)
                manager.wait()
            state_bytes = manager.list()[-1].size_bytes  # as committed: every shard file
            manager.close()
    result = {mode: statistics.median(v) for mode, v in out.items()}
    result["async_first"] = out["async"][0]
    result["state_gib"] = state_bytes / 2**30
    return result


def trainer_run(
    work: Path, *, device: str, size: str, micro_batch: int, seq: int, steps: int, **sets: Any
) -> dict[str, Any]:
    """Run ``python -m model.train`` (one process) and read tokens/s from its step lines."""
    overrides = {
        "run_dir": work / "run",
        "checkpoint.url": work / "ckpt",
        "checkpoint.async": "true",
        "model.size": size,
        "model.max_seq_len": seq,
        "data.eval_every_steps": 0,
        "train.device": device,
        "train.steps": steps,
        "train.seq_len": seq,
        "train.micro_batch_size": micro_batch,
        "train.global_batch_tokens": micro_batch * seq,
        "train.warmup_steps": 5,
        **sets,
    }
    argv = [sys.executable, "-m", "model.train", "--config", "examples/tiny.yaml"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICD_")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH_DIR.parent), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        argv, cwd=BENCH_DIR.parent, env=env, capture_output=True, text=True, timeout=900
    )
    lines = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    if proc.returncode != 0:
        raise RuntimeError(f"model.train exited {proc.returncode}: {proc.stderr[-2000:]}")
    step_lines = [r for r in lines if r.get("event") == "step"]
    commits = [r for r in lines if r.get("event") == "checkpoint_commit"]
    steady = [r["tokens_per_s"] for r in step_lines[steps // 4 :]]  # after compile warm-up
    return {
        "size": size,
        "micro_batch": micro_batch,
        "seq": seq,
        "interval_steps": overrides.get("checkpoint.interval_steps"),
        "steps": len(step_lines),
        "tokens_per_s": statistics.median(steady),
        "first_step_s": step_lines[0]["step_seconds"],
        "final_loss": step_lines[-1]["loss"],
        "commits": len(commits),
    }


def loop_rows(results: Sequence[tuple[tuple[str, int, str], dict[str, float]]]) -> list[list[Any]]:
    return [
        [
            size,
            batch,
            mode,
            fmt(r["step_ms"], 1),
            f"{r['tokens_per_s']:.0f}",
            fmt(100 * r["mfu"], 1),
            fmt(r["peak_memory_gib"], 1),
            fmt(r["warmup_s"], 0),
        ]
        for (size, batch, mode), r in results
    ]


def run(work: Path, *, quick: bool) -> Section:
    if not torch.cuda.is_available():
        return Section(
            "gpu",
            TITLE,
            "Skipped: no CUDA device on this machine.",
            [Target("MFU, 350M", ">= 40% on an H100", "skipped (no GPU)", None)],
        )
    device = torch.device("cuda", 0)
    loops: list[tuple[tuple[str, int, str], dict[str, float]]] = []
    failures: list[str] = []
    run_loops(LOOPS_QUICK if quick else LOOPS_FULL, device, loops, failures)
    ckpt = attempt(
        failures, "checkpoint", checkpoint_blocking, "125m" if quick else "350m", device=device
    )
    trainer = None
    if not quick:
        trainer = attempt(
            failures,
            "trainer",
            trainer_run,
            work,
            device="cuda",
            size=TRAINER_SIZE,
            micro_batch=TRAINER_BATCH,
            seq=SEQ,
            steps=TRAINER_STEPS,
            **{"train.compile": "true", "checkpoint.interval_steps": TRAINER_INTERVAL},
        )
        run_loops(LOOPS_LAST, device, loops, failures)
    return section(loops, failures, ckpt, trainer)


def run_loops(
    configs: Sequence[tuple[str, int, str]],
    device: torch.device,
    loops: list[tuple[tuple[str, int, str], dict[str, float]]],
    failures: list[str],
) -> None:
    """Measure each (size, micro-batch, compile) into ``loops``; out of memory is a failure."""
    for size, batch, mode in configs:
        try:
            r = throughput(size, batch, compile_mode=mode, device=device)
        except torch.OutOfMemoryError:
            failures.append(f"{size} micro-batch {batch} ({mode}): out of GPU memory")
            continue
        except Exception as exc:  # e.g. a compile error: the other configurations still run
            failures.append(f"{size} micro-batch {batch} ({mode}) failed: {exc!r}"[:2000])
            continue
        finally:
            release_memory()
        log(bench="gpu_loop", size=size, batch=batch, compile=mode, **r)
        loops.append(((size, batch, mode), r))


def attempt(
    failures: list[str], name: str, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T | None:
    """``fn(*args, **kwargs)``, logged; a failure is noted and the other measurements go on."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # one failed part must not lose the loops' results
        failures.append(f"{name} failed: {exc!r}"[:2000])
        return None
    finally:
        release_memory()
    log(bench=f"gpu_{name}", **result)
    return result


def section(
    loops: list[tuple[tuple[str, int, str], dict[str, float]]],
    failures: list[str],
    ckpt: dict[str, float] | None,
    trainer: dict[str, Any] | None,
    device_machine: str | None = None,
) -> Section:
    parts = [
        f"Device machine: {device_machine or machine()}.",
        table(
            [
                "model",
                "micro-batch",
                "compile",
                "median step ms",
                "tokens/s",
                "MFU %",
                "peak GiB",
                "warm-up s",
            ],
            loop_rows(loops),
        ),
    ]
    parts += [f"- {f}" for f in failures]
    targets = []
    best_350m = max(
        (r for (size, _, _), r in loops if size == "350m"), key=lambda r: r["mfu"], default=None
    )
    if best_350m is not None:
        mfu = best_350m["mfu"]
        targets.append(Target("MFU, 350M", ">= 40% on an H100", f"{100 * mfu:.1f}%", mfu >= 0.4))
    if ckpt is not None:
        ratio = ckpt["async"] / ckpt["sync"]
        targets.append(Target("async GPU blocking", "<= 0.1x sync", f"{ratio:.3f}x", ratio <= 0.1))
        parts += [
            table(
                ["checkpoint save", f"median s training is blocked ({ckpt['state_gib']:.1f} GiB)"],
                [
                    ["sync", fmt(ckpt["sync"], 3)],
                    ["async (steady state)", fmt(ckpt["async"], 3)],
                    ["async (first save)", fmt(ckpt["async_first"], 3)],
                ],
            ),
            f"async / sync blocking: **{ratio:.3f}x**.",
        ]
    if trainer is not None:
        # MFU is linear in tokens/s for one model and card: scale a loop row of the same size.
        same = next((r for (z, _, _), r in loops if z == trainer["size"]), None)
        mfu = trainer["tokens_per_s"] * same["mfu"] / same["tokens_per_s"] if same else float("nan")
        parts.append(
            f"Trainer (`python -m model.train`, NCCL, FSDP2 bf16, `train.compile`, async "
            f"checkpoints every {trainer['interval_steps']} steps): {trainer['size']}, "
            f"micro-batch {trainer['micro_batch']} x {trainer['seq']}: "
            f"**{trainer['tokens_per_s']:.0f} tokens/s**, MFU {fmt(100 * mfu, 1)}% "
            f"(median of steps {trainer['steps'] // 4 + 1}-{trainer['steps']}), "
            f"{trainer['commits']} checkpoints committed, final loss {trainer['final_loss']:.3f}."
        )
    data = {
        "loops": [{"size": s, "batch": b, "compile": m, **r} for (s, b, m), r in loops],
        "checkpoint": ckpt,
        "trainer": trainer,
    }
    return Section("gpu", TITLE, "\n\n".join(parts), targets, data=data)

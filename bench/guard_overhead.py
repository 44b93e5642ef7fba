"""Divergence guard cost and detection delay, measured on real gloo worker groups (CPU).

Usage: ``python bench/guard_overhead.py [--steps 600] [--world-size 2] [--fault-step 150]
[--skip-overhead] [--skip-delays]``

Overhead: one worker group (``--world-size`` ranks, gloo, tiny model, 8 x 32 tokens per step:
the cheapest step, so the guard's share is largest) runs the trainer's own ``train_step()``
through the worker API (``run.steps()``, ``run.report()``: vote, guard, step boundary with
known-good promotion), and swaps the run's guard (``run.recovery.guard``) between the
configured one and a disabled one (``guard.enabled: false``) in the step pattern on, off, off,
on (so neither setting owns the odd or the even steps); both settings see the same machine load
and the same warm caches. The guard never escalates here (``skips_to_rewind`` out of reach,
``sustained_steps: 0``): a rewind or a give-up would end the measurement; skipped steps still
count. No checkpoint falls inside the run. Reported per setting: the median time of a step
(body and the previous step's boundary) over its steps after the first ``--discard``; the
ratio on / off is the result (target <= 1.02). Separate runs per
setting are no good on a shared 2-core machine: their medians differed by 5-15%, in both
directions, between identical runs. ``Guard.observe()`` is also timed alone in this process
(full 128-step window).

Detection delay: one short run per injected fault kind (``nan``, ``poison_batch``,
``lr_spike``) at ``--fault-step`` with 16 x 32 tokens per step and the default guard. Reported:
the first step at or after the fault's step that the guard flagged, its kind, the delay in steps,
and the first escalation (rewind or give-up; ``-`` when the anomaly stayed skipped steps). An
``lr_spike`` at step ``s`` scales the update of step ``s``, so the earliest loss that can show it
is step ``s + 1``.

Prints a table on stdout and one JSON summary line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.ports import free_port
from elastic.guard import Guard, GuardConfig, RewindConfig
from model.prepare import ensure_demo
from tests.support.jobs import SEQ_LEN, train_job
from tests.support.procs import base_env, events, running, write_config

FAULT_KINDS = ("nan", "poison_batch", "lr_spike")


def job(root: Path, demo: Path, *, name: str, **overrides: Any) -> dict[str, Any]:
    return train_job(root / name, demo, run_id=name, steps=300, **overrides)


def run(root: Path, doc: dict[str, Any], *, world_size: int) -> Path:
    """Run ``doc`` to the end; rank 0's log (exit codes 0 and 3 are both results here)."""
    name = doc["run_id"]
    config = write_config(root / f"{name}.yaml", doc)
    env = {"ELASTICD_ALLOW_FAULTS": "1"}
    with running(config, world_size=world_size, log_dir=root / name / "logs", env=env) as group:
        codes = group.wait(timeout_seconds=900)
        if any(code not in (0, 3) for code in codes):
            raise SystemExit(f"{name}: exit codes {codes}\n{group.rank0_log.read_text()[-3000:]}")
        return group.rank0_log


def overhead(root: Path, demo: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``--world-size`` copies of this script in ``--worker`` mode; rank 0's results."""
    doc = job(
        root,
        demo,
        name="overhead",
        train={"steps": args.steps},
        checkpoint={"url": str(root / "overhead" / "ckpt"), "interval_steps": args.steps + 1},
        guard={"skips_to_rewind": 1_000_000, "sustained_steps": 0},
    )
    config = write_config(root / "overhead.yaml", doc)
    out = root / "overhead.json"
    port = free_port()
    procs = []
    for rank in range(args.world_size):
        env = base_env(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(args.world_size),
                "LOCAL_WORLD_SIZE": str(args.world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        cmd = [sys.executable, __file__, "--worker", str(config), str(out), str(args.discard)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    try:
        codes = [proc.wait(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if codes != [0] * args.world_size:
        raise SystemExit(f"overhead workers exited with {codes}")
    return dict(json.loads(out.read_text()))


def worker(config: str, out: str, discard: int) -> None:
    """One rank of the paired measurement: the guard alternates on, off, off, on.

    The trainer's step runs through the worker API (``run.steps()`` + ``run.report()``) as in
    ``python -m model.train``; the run's guard (``run.recovery.guard``) is swapped between the
    configured one and a disabled one before each step. A step's time includes the previous
    step's boundary (known-good promotion, step line, heartbeat), as bench/api_overhead.py.
    """
    from bench.api_overhead import Workload

    with tempfile.TemporaryDirectory(prefix="guard-bench-round-") as round_dir:
        workload = Workload(config, worker_dir=round_dir)
        recovery = workload.run.recovery
        job = workload.trainer.job
        guards = {"on": recovery.guard, "off": Guard(GuardConfig(enabled=False), job.rewind)}
        times: dict[str, list[float]] = {"on": [], "off": []}
        for step in range(1, job.train.steps + 1):
            setting = "on" if step % 4 in (0, 3) else "off"  # ABBA: no odd/even bias
            recovery.guard = guards[setting]
            elapsed = workload.api_step()
            if step > discard:
                times[setting].append(elapsed)
        recovery.guard = guards["on"]
        info = workload.run.info
        workload.close()
    result: dict[str, Any] = {}
    for setting, values in times.items():
        result[setting] = {"steps": len(values), "median_step_ms": 1000 * statistics.median(values)}
    result["ratio"] = result["on"]["median_step_ms"] / result["off"]["median_step_ms"]
    if info.is_main:
        Path(out).write_text(json.dumps(result))


def observe_microseconds(calls: int = 20_000) -> float:
    """Mean cost of one ``Guard.observe()`` with a full window of realistic values."""
    guard = Guard(GuardConfig(), RewindConfig())
    for step in range(1, 200):  # fill the 128-step window
        guard.observe(
            step, loss=3.0 + 0.01 * (step % 7), grad_norm=0.8 + 0.01 * (step % 5), finite=True
        )
    started = time.perf_counter()
    for i in range(calls):
        step = 200 + i
        guard.observe(
            step, loss=3.0 + 0.01 * (step % 7), grad_norm=0.8 + 0.01 * (step % 5), finite=True
        )
    return 1e6 * (time.perf_counter() - started) / calls


def fault(kind: str, step: int) -> dict[str, Any]:
    if kind == "lr_spike":
        return {"kind": kind, "step": step, "factor": 100.0, "duration_steps": 10}
    if kind == "poison_batch":
        return {"kind": kind, "step": step, "mode": "random"}
    return {"kind": kind, "step": step}


def detection(root: Path, demo: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for kind in FAULT_KINDS:
        doc = job(
            root,
            demo,
            name=f"delay-{kind.replace('_', '-')}",
            train={
                "steps": args.fault_step + 20,
                "global_batch_tokens": 16 * SEQ_LEN,
                "micro_batch_size": 8,
            },
            faults=[fault(kind, args.fault_step)],
        )
        flagged = [e for e in events(run(root, doc, world_size=args.world_size), "divergence")]
        after = [e for e in flagged if e["step"] >= args.fault_step]
        first = after[0] if after else None
        escalated = next((e for e in after if e["action"] != "skip_step"), None)
        rows.append(
            {
                "kind": kind,
                "fault_step": args.fault_step,
                "first_flagged_step": None if first is None else first["step"],
                "flagged_as": None if first is None else first["kind"],
                "delay_steps": None if first is None else first["step"] - args.fault_step,
                "escalation_step": None if escalated is None else escalated["step"],
                "skips_before_fault": len(flagged) - len(after),
            }
        )
    return rows


def print_table(result: dict[str, Any], observe_us: float, delays: list[dict[str, Any]]) -> None:
    print(f"Guard.observe(): {observe_us:.1f} us per call (full 128-step window)")
    if result:
        print_overhead(result, observe_us)
    if delays:
        print_delays(delays)


def print_overhead(result: dict[str, Any], observe_us: float) -> None:
    print("\nguard overhead: tiny model, 8 x 32 tokens/step, gloo; guard on, off, off, on, ...")
    print(f"{'guard':<8}{'steps':>8}{'median step ms':>18}")
    for setting in ("on", "off"):
        r = result[setting]
        print(f"{setting:<8}{r['steps']:>8}{r['median_step_ms']:>18.3f}")
    print(f"{'on/off':<8}{'':>8}{result['ratio']:>18.4f}   (target <= 1.02)")
    share = observe_us / (1000 * result["on"]["median_step_ms"])
    print(f"Guard.observe() alone: {100 * share:.2f}% of the median step")


def print_delays(delays: list[dict[str, Any]]) -> None:
    print("\ndetection delay: 16 x 32 tokens per step, default guard")
    head = (
        f"{'fault':<14}{'at step':>8}{'flagged at':>12}{'as':>12}{'delay':>7}{'escalated at':>14}"
    )
    print(head)
    for d in delays:
        flagged = "-" if d["first_flagged_step"] is None else str(d["first_flagged_step"])
        delay = "-" if d["delay_steps"] is None else str(d["delay_steps"])
        escalated = "-" if d["escalation_step"] is None else str(d["escalation_step"])
        print(
            f"{d['kind']:<14}{d['fault_step']:>8}{flagged:>12}{d['flagged_as'] or '-':>12}"
            f"{delay:>7}{escalated:>14}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="steps of the overhead run")
    parser.add_argument("--discard", type=int, default=20, help="first steps of a run ignored")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--fault-step", type=int, default=150)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-delays", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "OUT", "DISCARD"), help="internal")
    args = parser.parse_args()
    if args.worker:
        config, out, discard = args.worker
        worker(config, out, int(discard))
        from model import distributed

        distributed.exit_now(0)  # as model.train: no gloo teardown (it races with exiting peers)
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        root = Path(tmp)
        demo = root / "demo"
        ensure_demo(demo)
        result = {} if args.skip_overhead else overhead(root, demo, args)
        observe_us = observe_microseconds()
        delays = [] if args.skip_delays else detection(root, demo, args)
    print_table(result, observe_us, delays)
    print(json.dumps({"overhead": result, "observe_us": observe_us, "detection": delays}))


if __name__ == "__main__":
    main()

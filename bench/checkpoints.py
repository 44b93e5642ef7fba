"""Checkpoint throughput vs. raw disk, async blocking vs. sync, resharded load, S3 vs. raw s3fs.

All through ``elastic.checkpoint.CheckpointManager`` (DCP on fsspec, manifest commit included).
Raw disk baseline: the same bytes written to one file with fsync and read back, on the same
filesystem. Before every read (raw or DCP) the files are dropped from the page cache
(``posix_fadvise DONTNEED`` after ``sync``), so both reads hit the disk the same way.
Resharding: a state of DTensors sharded over 2 gloo processes is saved once, then loaded by
1 process (2 -> 1, plain full tensors) and by 2 processes (2 -> 2, same sharding).
S3: a local ``moto_server`` (in-memory) via bench/checkpoint_throughput.py; it measures the
client stack (s3fs, botocore, HTTP on loopback), not a real object store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import checkpoint_throughput as ct
from bench.common import MB, Section, Target, evict, fmt, spread, table
from elastic import jsonlog
from elastic.checkpoint import CheckpointConfig, CheckpointManager, Storage

TITLE = "4. Checkpoints"
REPO = Path(__file__).resolve().parent.parent


def raw_write(path: Path, tensors: list[torch.Tensor]) -> float:
    """Seconds to write every tensor's bytes into one file and fsync it."""
    started = time.perf_counter()
    with path.open("wb") as fh:
        for t in tensors:
            fh.write(memoryview(t.numpy()).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - started


def raw_read(path: Path, chunk_bytes: int) -> float:
    """Seconds to read ``path`` back (uncached) into a reused buffer."""
    evict(path.parent)
    buffer = bytearray(chunk_bytes)
    started = time.perf_counter()
    with path.open("rb", buffering=0) as fh:
        while fh.readinto(buffer):
            pass
    return time.perf_counter() - started


def timed_save(manager: CheckpointManager, step: int, state: dict[str, Any]) -> tuple[float, float]:
    """(seconds ``save()`` blocked, seconds until committed)."""
    started = time.perf_counter()
    manager.save(step, state, meta={})
    blocked = time.perf_counter() - started
    manager.wait()
    return blocked, time.perf_counter() - started


def local_disk(directory: Path, state: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Raw and DCP trials interleaved (raw, sync, async per trial): the same disk load for all."""
    tensors = list(state["model"].values())
    chunk = tensors[0].numel() * tensors[0].element_size()
    managers = {
        mode: CheckpointManager(
            CheckpointConfig(
                url=(directory / mode).as_uri(),
                keep_last=repeats + 2,
                async_save=mode == "async",
            ),
            run_id="bench",
            rank=0,
            world_size=1,
        )
        for mode in ("sync", "async")
    }
    out: dict[str, list[float]] = {
        k: [] for k in ("write", "read", "save", "load", "async_block", "async_total")
    }
    target = ct.blank(state)
    for i in range(repeats):
        raw = directory / "raw" / f"raw-{i}.bin"
        raw.parent.mkdir(exist_ok=True)
        out["write"].append(raw_write(raw, tensors))
        out["save"].append(timed_save(managers["sync"], i, state)[1])
        blocked, total = timed_save(managers["async"], i, state)
        out["async_block"].append(blocked)
        out["async_total"].append(total)
        out["read"].append(raw_read(raw, chunk))
        raw.unlink()
        evict(directory / "sync")
        started = time.perf_counter()
        managers["sync"].load(target, step=i)
        out["load"].append(time.perf_counter() - started)
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    for manager in managers.values():
        manager.close()
    return out


# ----------------------------------------------------------------------------- reshard
def reshard_worker(mode: str, directory: str, size_mb: int, repeats: int, out: str) -> None:
    """One rank: ``save`` (world 2) or ``load`` (world 1 or 2) of a Shard(0) DTensor state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    jsonlog.configure(stream=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    full = ct.make_state(size_mb)["model"]
    if world > 1:
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        state = {"model": {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}}
    else:
        state = {"model": dict(full)}
    config = CheckpointConfig(url=Path(directory).as_uri(), keep_last=4)
    manager = CheckpointManager(config, run_id="reshard", rank=rank, world_size=world)
    times = []
    if mode == "save":
        manager.save(1, state, meta={})
    else:
        for _ in range(repeats):
            blank = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
            if rank == 0:
                evict(Path(directory))
            if world > 1:
                dist.barrier()
            started = time.perf_counter()
            manager.load(blank, step=1)
            times.append(time.perf_counter() - started)
        if world > 1:
            ok = all(torch.equal(blank["model"][k].full_tensor(), full[k]) for k in full)
        else:
            ok = all(torch.equal(blank["model"][k], full[k]) for k in full)
        assert ok, "resharded load returned different tensors"
    manager.close()
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def spawn(world: int, args: list[str], timeout_seconds: float) -> None:
    from tests.support.procs import base_env, free_port

    port = free_port()
    procs = []
    for rank in range(world):
        env = base_env(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        cmd = [sys.executable, "-m", "bench.checkpoints", "--reshard-worker", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL))
    try:
        codes = [p.wait(timeout=timeout_seconds) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise RuntimeError(f"reshard workers {args[0]} (world {world}) exited with {codes}")


def reshard(directory: Path, size_mb: int, repeats: int) -> dict[str, list[float]]:
    ckpt = directory / "reshard"
    out = directory / "reshard.json"
    common = [str(ckpt), str(size_mb), str(repeats), str(out)]
    spawn(2, ["save", *common], 600)
    result = {}
    for world in (1, 2):
        spawn(world, ["load", *common], 600)
        result[f"2->{world}"] = json.loads(out.read_text())
    return result


# ----------------------------------------------------------------------------- s3
def s3(size_mb: int, repeats: int) -> dict[str, float]:
    """Best seconds per operation from checkpoint_throughput's S3 part (moto_server)."""
    import boto3

    state = ct.make_state(size_mb)
    captured = io.StringIO()
    with ct.moto_server() as options, contextlib.redirect_stdout(captured):
        boto3.client(
            "s3",
            endpoint_url=options["endpoint_url"],
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")
        ct.bench_raw_object(
            Storage("s3://bench", storage_options=options), ct.state_bytes(state), repeats
        )
        config = CheckpointConfig(
            url="s3://bench/ckpts", storage_options=options, keep_last=repeats + 1
        )
        ct.bench_manager("s3", config, state, repeats)
    lines = [json.loads(x) for x in captured.getvalue().splitlines() if x.startswith("{")]
    return {x["what"]: x["seconds"] for x in lines}


# ----------------------------------------------------------------------------- report
def run(work: Path, *, quick: bool) -> Section:
    size_mb = 128 if quick else 1024
    reshard_mb = 64 if quick else 512
    s3_mb = 32 if quick else 256
    repeats = 2 if quick else 5
    torch.set_num_threads(1)
    jsonlog.configure(stream=open(os.devnull, "w"))  # noqa: SIM115 (the manager's lines)
    state = ct.make_state(size_mb)
    size = ct.state_bytes(state)
    dcp = local_disk(work, state, repeats)
    raw = {"write": dcp.pop("write"), "read": dcp.pop("read")}
    del state
    shard = reshard(work, reshard_mb, repeats)
    s3_times = s3(s3_mb, 2)

    def mbps(seconds: list[float], size_bytes: int = size) -> float:
        return size_bytes / MB / spread(seconds)["median"]

    def row(what: str, seconds: list[float], size_bytes: int = size) -> list[str]:
        s = spread(seconds)
        return [
            what,
            f"{size_bytes / MB:.0f}",
            s["n"],
            fmt(s["median"]),
            f"{fmt(s['min'])} - {fmt(s['max'])}",
            f"{mbps(seconds, size_bytes):.0f}",
        ]

    head = ["operation", "MiB", "trials", "median s", "min - max s", "MiB/s (median)"]
    save_ratio = mbps(dcp["save"]) / mbps(raw["write"])
    load_ratio = mbps(dcp["load"]) / mbps(raw["read"])
    block_ratio = spread(dcp["async_block"])["median"] / spread(dcp["save"])["median"]
    reshard_ratio = spread(shard["2->1"])["median"] / spread(shard["2->2"])["median"]
    rshard = reshard_mb * MB
    s3_size = s3_mb * MB
    body = "\n\n".join(
        [
            f"Local disk, one process, a float32 state of {size / MB:.0f} MiB "
            f"({size // (4 * MB)} tensors of 1024 x 1024); page cache dropped before every read; "
            "raw write, sync save, async save, raw read and load interleaved in each trial.",
            table(
                head,
                [
                    row("raw write + fsync (baseline)", raw["write"]),
                    row("CheckpointManager.save (sync, DCP + manifest)", dcp["save"]),
                    row("raw read, uncached (baseline)", raw["read"]),
                    row("CheckpointManager.load (uncached)", dcp["load"]),
                    row("async save: time save() blocks", dcp["async_block"]),
                    row("async save: until committed", dcp["async_total"]),
                ],
            ),
            f"Ratios: save / raw write = **{save_ratio:.2f}x**, load / raw read = "
            f"**{load_ratio:.2f}x** (throughput); async blocking / sync save = "
            f"**{block_ratio:.3f}x** (time).",
            f"Resharded load: {reshard_mb} MiB of Shard(0) DTensors saved by 2 gloo processes, "
            "loaded by 1 process (2 -> 1, full tensors) and by 2 processes (2 -> 2).",
            table(
                head,
                [
                    row("load 2 -> 2 (same sharding)", shard["2->2"], rshard),
                    row("load 2 -> 1 (resharded)", shard["2->1"], rshard),
                ],
            ),
            f"Resharded / same-size load time: **{reshard_ratio:.2f}x**.",
            f"S3 on a local moto_server, {s3_mb} MiB, best of 2 (bench/checkpoint_throughput.py):",
            table(
                ["operation", "MiB", "best s", "MiB/s"],
                [
                    [k, s3_mb, fmt(v), f"{s3_size / MB / v:.0f}"]
                    for k, v in sorted(s3_times.items())
                ],
            ),
            "S3 ratios: save / raw put = "
            f"**{s3_times['baseline_put'] / s3_times['dcp_save']:.2f}x**"
            f", load / raw get = **{s3_times['baseline_get'] / s3_times['dcp_load']:.2f}x**"
            " (throughput).",
        ]
    )
    targets = [
        Target("save throughput", ">= 0.8x raw write", f"{save_ratio:.2f}x", save_ratio >= 0.8),
        Target("load throughput", ">= 0.7x raw read", f"{load_ratio:.2f}x", load_ratio >= 0.7),
        Target(
            "async blocking",
            "<= 0.1x sync save",
            f"{block_ratio:.3f}x",
            block_ratio <= 0.1,
            note=""
            if block_ratio <= 0.1
            else "on CPU, async save still copies the whole state into staging memory before "
            "save() returns (a memcpy of the state); the ratio is memcpy vs disk bandwidth",
        ),
        Target(
            "reshard load", "<= 1.2x same-size load", f"{reshard_ratio:.2f}x", reshard_ratio <= 1.2
        ),
    ]
    data = {"raw": raw, "dcp": dcp, "reshard": shard, "s3": s3_times, "size_bytes": size}
    return Section("checkpoints", TITLE, body, targets, data=data)


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--reshard-worker":
        mode, directory, size_mb, repeats, out = sys.argv[2:]
        reshard_worker(mode, directory, int(size_mb), int(repeats), out)
        return
    raise SystemExit("internal entry point; run `python -m bench --only checkpoints`")


if __name__ == "__main__":
    main()

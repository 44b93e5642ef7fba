"""Checkpoint throughput vs. raw disk, async blocking vs. sync, resharded load, S3 vs. raw s3fs.

All through ``elastic.checkpoint.CheckpointManager`` (DCP on fsspec, manifest commit included),
with integrity on: every file hashed (BLAKE3) as it is written and checked before it is
deserialised on load, manifests signed (HMAC). The digest's own throughput (BLAKE3 and, for
comparison, SHA-256 and BLAKE2b, one thread over the state's bytes) is measured in the same run.
Raw disk baseline: the same bytes written to one file with fsync and read back, on the same
filesystem; a second raw write starts disk writeback as it goes (as the checkpoint writer does,
elastic/checkpoint/writeback.py), the best this disk does. Before every operation (raw or DCP,
write or read) the bench directory is dropped from the page cache (``posix_fadvise DONTNEED``
after ``sync``): reads hit the disk, and every write starts from the same page-cache state.
Async saves: time the caller is blocked (``save()`` + ``wait_staged()``) in three modes, first
save and later saves apart (see ``ASYNC_MODES``), against the median sync save. The raw and
DCP operations of a trial run back to back in rotating order; throughput ratios compare
operations that ran in the same place of their trials (first with first, ...) and the targets
take the worst of those (``by_position``).
Resharding: a state of DTensors sharded over 2 gloo processes is saved once, then loaded by
1 process (2 -> 1, plain full tensors), against the same state saved and loaded by 1 process.
S3: a local ``moto_server`` (in-memory) via bench/checkpoint_throughput.py; it measures the
client stack (s3fs, botocore, HTTP on loopback), not a real object store.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from bench import checkpoint_throughput as ct
from bench.common import MB, Section, Target, evict, fmt, spread, table
from elastic import jsonlog
from elastic.checkpoint import CheckpointConfig, CheckpointManager, Storage
from elastic.checkpoint.integrity import DIGEST_CHUNK_BYTES, DigestingFile, verified_chunks
from elastic.checkpoint.writeback import WritebackFile

TITLE = "4. Checkpoints"
REPO = Path(__file__).resolve().parent.parent


def raw_write(path: Path, tensors: list[torch.Tensor], *, early_writeback: bool = False) -> float:
    """Seconds to write every tensor's bytes into one file and fsync it; with
    ``early_writeback``, through the checkpoint writer's :class:`WritebackFile`."""
    started = time.perf_counter()
    with path.open("wb") as raw:
        fh = WritebackFile(raw) if early_writeback else raw
        for t in tensors:
            fh.write(t.numpy().data.cast("B"))
        raw.flush()
        os.fsync(raw.fileno())
    return time.perf_counter() - started


def chunk_digests(tensors: list[torch.Tensor]) -> tuple[str, ...]:
    """The chunk digests of the raw file (every tensor's bytes, in order), as a save lists
    them in the manifest."""
    with open(os.devnull, "wb") as sink:
        digesting = DigestingFile(sink)
        for t in tensors:
            digesting.write(t.numpy().data.cast("B"))
        return digesting.record().chunks


def checked_read(path: Path, digests: tuple[str, ...]) -> float:
    """Seconds to read ``path`` as a load reads and checks a file (``verified_chunks``: one
    reused buffer, each chunk hashed and compared with ``digests``), with no DCP and no copy
    into the state: the part of a load before its bytes are used."""
    size_bytes = path.stat().st_size
    started = time.perf_counter()
    with path.open("rb", buffering=0) as fh:
        chunks = verified_chunks(
            fh,
            name=path.name,
            size_bytes=size_bytes,
            chunk_bytes=DIGEST_CHUNK_BYTES,
            digests=digests,
        )
        for _ in chunks:
            pass
    return time.perf_counter() - started


def raw_read(path: Path, chunk_bytes: int) -> float:
    """Seconds to read ``path`` back into a reused buffer (the caller drops it from the cache)."""
    buffer = bytearray(chunk_bytes)
    started = time.perf_counter()
    with path.open("rb", buffering=0) as fh:
        while fh.readinto(buffer):
            pass
    return time.perf_counter() - started


OVERLAP_SECONDS = 0.5
"""Compute the trainer does between ``save()`` and ``wait_staged()`` in the overlap mode."""
ASYNC_MODES = ("inline", "idle", "overlap")
"""inline: the default (save() copies, then returns); idle: background copy, then
wait_staged() at once; overlap: background copy, OVERLAP_SECONDS of compute, wait_staged()."""


def paired_throughput_ratio(seconds: list[float], baseline_seconds: list[float]) -> float:
    """Median over trials of throughput / baseline throughput (= baseline time / time)."""
    pairs = [base / t for t, base in zip(seconds, baseline_seconds, strict=True)]
    return spread(pairs)["median"]


def in_turn(names: list[str], trial: int) -> list[str]:
    """The order trial number ``trial`` runs ``names`` in: rotated by one place per trial, so
    over ``len(names)`` trials each name runs once in each place."""
    k = trial % len(names)
    return names[k:] + names[:k]


def by_position(
    names: list[str], seconds: dict[str, list[float]], measured: str, baseline: str
) -> list[float]:
    """Throughput ratios ``measured`` / ``baseline`` with both in the same place of their trials.

    ``seconds[name][i]`` is trial ``i``'s time, the trial running ``in_turn(names, i)``.
    Element ``p`` compares the medians over the trials where each ran ``p``-th. On this machine
    the first and later operations of a trial meet the disk and the page cache in different
    states, so one trial's ratio says much about which went first; like places remove that.
    """
    trials = range(len(seconds[measured]))
    ratios = []
    for place in range(len(names)):
        ran = [seconds[measured][i] for i in trials if in_turn(names, i)[place] == measured]
        base = [seconds[baseline][i] for i in trials if in_turn(names, i)[place] == baseline]
        if ran and base:
            ratios.append(statistics.median(base) / statistics.median(ran))
    return ratios


def timed_save(manager: CheckpointManager, step: int, state: dict[str, Any]) -> float:
    """Seconds until a synchronous save has committed."""
    started = time.perf_counter()
    manager.save(step, state, meta={})
    return time.perf_counter() - started


def busy(seconds: float) -> None:
    """Stand-in for forward + backward: CPU work that reads but never writes the state."""
    a = torch.randn(256, 256)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a @ a


def timed_async_save(
    manager: CheckpointManager, step: int, state: dict[str, Any], mode: str
) -> tuple[float, float]:
    """(seconds the caller was blocked, seconds until committed) for one async ``mode``.

    Blocked = time inside ``save()`` + time inside ``wait_staged()``, the call the trainer
    makes before ``optimizer.step()``; the overlapped compute is not counted as blocked.
    """
    started = time.perf_counter()
    manager.save(step, state, meta={}, background_staging=mode != "inline")
    blocked = time.perf_counter() - started
    if mode == "overlap":
        busy(OVERLAP_SECONDS)
    waited = time.perf_counter()
    manager.wait_staged()
    blocked += time.perf_counter() - waited
    manager.wait()
    return blocked, time.perf_counter() - started


WRITES = ["write", "write_wb", "save"]
"""A trial's writes, in :func:`in_turn` order: raw, raw with early writeback, sync save."""
READS = ["read", "read_checked", "load"]
"""A trial's reads: raw, raw with each chunk checked, load (rotated as the writes)."""


def _xs(ratios: list[float]) -> str:
    return " / ".join(f"{r:.2f}x" for r in ratios)


def _per_trial(seconds: list[float], baseline_seconds: list[float]) -> str:
    return ", ".join(f"{b / t:.2f}x" for t, b in zip(seconds, baseline_seconds, strict=True))


def _manager(directory: Path, name: str, *, keep_last: int, async_save: bool) -> CheckpointManager:
    config = CheckpointConfig(
        url=(directory / name).as_uri(),
        keep_last=keep_last,
        async_save=async_save,
        signing_key_file=ct.signing_key_file(directory),
    )
    return CheckpointManager(config, run_id="bench", rank=0, world_size=1)


def local_disk(
    directory: Path, state: dict[str, Any], *, trials: int, async_trials: int
) -> dict[str, list[float]]:
    """Raw vs. DCP in ``trials`` trials (the ``WRITES``, then the ``READS``, each in the
    trial's :func:`in_turn` order), then ``async_trials`` trials of every async mode.

    Each async mode has its own manager, so its trial 0 is that manager's first save (staging
    memory allocated and faulted in) and later trials reuse the staging buffers.
    """
    tensors = list(state["model"].values())
    chunk = tensors[0].numel() * tensors[0].element_size()
    sync = _manager(directory, "sync", keep_last=trials + 2, async_save=False)
    out: dict[str, list[float]] = {k: [] for k in WRITES + READS}
    target = ct.blank(state)
    raw = directory / "raw" / "raw.bin"
    raw.parent.mkdir(exist_ok=True)
    digests = chunk_digests(tensors)

    def timed_load(step: int) -> float:
        started = time.perf_counter()
        sync.load(target, step=step)
        return time.perf_counter() - started

    for i in range(trials):
        ops = {
            "write": functools.partial(raw_write, raw, tensors),
            "write_wb": functools.partial(
                raw_write, raw.with_name("wb.bin"), tensors, early_writeback=True
            ),
            "save": functools.partial(timed_save, sync, i, state),
            "read": functools.partial(raw_read, raw, chunk),
            "read_checked": functools.partial(checked_read, raw, digests),
            "load": functools.partial(timed_load, i),
        }
        for key in in_turn(WRITES, i) + in_turn(READS, i):
            evict(directory)  # the same page-cache state before each, written or read
            out[key].append(ops[key]())
        raw.unlink()
        raw.with_name("wb.bin").unlink()
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    sync.close()
    for mode in ASYNC_MODES:
        manager = _manager(directory, mode, keep_last=2, async_save=True)
        out[f"{mode}_block"], out[f"{mode}_total"] = [], []
        for i in range(async_trials):
            blocked, total = timed_async_save(manager, i, state, mode)
            out[f"{mode}_block"].append(blocked)
            out[f"{mode}_total"].append(total)
        manager.load(target, step=async_trials - 1)  # the reused staging buffers were right
        assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items()), mode
        manager.close()
    return out


# ----------------------------------------------------------------------------- reshard
def reshard_worker(mode: str, directory: str, size_mb: int, repeats: int, out: str) -> None:
    """One rank: ``save`` (world 2) or ``load`` (world 1 or 2) of a Shard(0) DTensor state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

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
            got = {k: cast(DTensor, v).full_tensor() for k, v in blank["model"].items()}
            ok = all(torch.equal(got[k], full[k]) for k in full)
        else:
            ok = all(torch.equal(blank["model"][k], full[k]) for k in full)
        assert ok, "resharded load returned different tensors"
    manager.close()
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    from model import distributed

    distributed.shutdown(clean=True)


def spawn(world: int, args: list[str], timeout_seconds: float) -> None:
    from daemon.ports import free_port
    from tests.support.procs import base_env

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


RESHARD = ["1->1", "2->1"]
"""A reshard trial's loads: same size, then resharded (rotated per trial)."""


def reshard(directory: Path, size_mb: int, repeats: int) -> dict[str, list[float]]:
    """Load time of a checkpoint saved by 2 processes (2 -> 1, resharded) and of one saved by
    1 process (1 -> 1, same size), both loaded by 1 process: the only difference is the
    resharding. One load per process; the two loads of a trial back to back in alternating
    order (same size first in even trials), as the local-disk pairs."""
    out = directory / "reshard.json"
    for world in (1, 2):
        ckpt = directory / f"reshard-{world}"
        spawn(world, ["save", str(ckpt), str(size_mb), "1", str(out)], 600)
    result: dict[str, list[float]] = {k: [] for k in RESHARD}
    for i in range(repeats):
        for key in in_turn(RESHARD, i):
            ckpt = directory / f"reshard-{key[0]}"
            spawn(1, ["load", str(ckpt), str(size_mb), "1", str(out)], 600)
            result[key] += json.loads(out.read_text())
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
    trials = 6 if quick else 12  # each of WRITES and READS in each place equally often
    repeats = 2 if quick else 5
    torch.set_num_threads(1)
    jsonlog.configure(stream=open(os.devnull, "w"))  # noqa: SIM115 (the manager's lines)
    state = ct.make_state(size_mb)
    size = ct.state_bytes(state)
    digests = {a: ct.digest_seconds(state, a, repeats) for a in ct.DIGESTS}
    dcp = local_disk(work, state, trials=trials, async_trials=repeats)
    raw = {k: dcp.pop(k) for k in ("write", "write_wb", "read", "read_checked")}
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
            str(s["n"]),
            fmt(s["median"]),
            f"{fmt(s['min'])} - {fmt(s['max'])}",
            f"{mbps(seconds, size_bytes):.0f}",
        ]

    head = ["operation", "MiB", "trials", "median s", "min - max s", "MiB/s (median)"]
    # Paired: each trial's raw and DCP operations ran back to back, so their ratio cancels the
    # disk's slow drifts (this shared disk varies 3x between minutes). Judged by position (the
    # worst of first-vs-first, second-vs-second, ...), since the order decides single trials.
    times = {**raw, **dcp}
    save_pos = by_position(WRITES, times, "save", "write")
    save_wb_pos = by_position(WRITES, times, "save", "write_wb")
    load_pos = by_position(READS, times, "load", "read")
    checked_pos = by_position(READS, times, "read_checked", "read")  # BLAKE3 per chunk
    rest_pos = by_position(READS, times, "load", "read_checked")  # DCP, copies, manifest
    save_ratio, load_ratio = min(save_pos), min(load_pos)
    save_paired = paired_throughput_ratio(dcp["save"], raw["write"])
    save_wb_paired = paired_throughput_ratio(dcp["save"], raw["write_wb"])
    load_paired = paired_throughput_ratio(dcp["load"], raw["read"])
    sync_median = spread(dcp["save"])["median"]

    def later(key: str) -> list[float]:
        return dcp[key][1:]  # trial 0 is each manager's first save

    ratios = {m: spread(later(f"{m}_block"))["median"] / sync_median for m in ASYNC_MODES}
    first_ratio = spread(dcp["overlap_block"][:1])["median"] / sync_median
    block_ratio = ratios["overlap"]
    reshard_pos = by_position(RESHARD, shard, "2->1", "1->1")  # throughput: same-size / reshard
    reshard_ratio = 1 / min(reshard_pos)  # time, the worse position
    rshard = reshard_mb * MB
    s3_size = s3_mb * MB
    body = "\n\n".join(
        [
            f"Local disk, one process, a float32 state of {size / MB:.0f} MiB "
            f"({size // (4 * MB)} tensors of 1024 x 1024); the bench directory dropped from the "
            "page cache before every operation; "
            f"{len(raw['write'])} trials of raw write, raw write with early writeback and sync "
            "save, then raw read and load, back to back, the order rotated one place per trial "
            "(this machine takes the first burst of writes faster than the next, so a fixed "
            f"order favours whichever runs first); then {len(dcp['overlap_block'])} trials of "
            "each async mode. The checkpoint writer starts disk writeback every "
            "16 MiB as it writes (elastic/checkpoint/writeback.py), so the disk works while "
            "DCP still serialises; the plain raw write leaves it all to the final fsync. The "
            "raw write with early writeback does what the checkpoint writer does, with no DCP.",
            table(
                head,
                [
                    row("raw write + fsync (baseline)", raw["write"]),
                    row("raw write + early writeback + fsync", raw["write_wb"]),
                    row("CheckpointManager.save (sync, DCP + manifest)", dcp["save"]),
                    row("raw read, uncached (baseline)", raw["read"]),
                    row(
                        "raw read, each chunk checked (BLAKE3), one reused buffer",
                        raw["read_checked"],
                    ),
                    row("CheckpointManager.load (uncached)", dcp["load"]),
                    row(
                        "async, copy in save(): save() blocks, first save", dcp["inline_block"][:1]
                    ),
                    row("async, copy in save(): save() blocks, later saves", later("inline_block")),
                    row(
                        "async, background copy, nothing to overlap: "
                        "save() + wait_staged(), first save",
                        dcp["idle_block"][:1],
                    ),
                    row(
                        "async, background copy, nothing to overlap: "
                        "save() + wait_staged(), later saves",
                        later("idle_block"),
                    ),
                    row(
                        f"async, background copy, {OVERLAP_SECONDS} s compute overlapped: "
                        "save() + wait_staged(), first save",
                        dcp["overlap_block"][:1],
                    ),
                    row(
                        f"async, background copy, {OVERLAP_SECONDS} s compute overlapped: "
                        "save() + wait_staged(), later saves",
                        later("overlap_block"),
                    ),
                    row("async (background copy): until committed", dcp["idle_total"]),
                ],
            ),
            "Integrity: the save hashes every file as it writes it (BLAKE3 of the file and of "
            f"each {DIGEST_CHUNK_BYTES // MB} MiB chunk, in DCP's write threads), the load "
            "reads each file once, a chunk at a time, and checks each chunk's digest before any "
            "of its bytes is used, and every manifest is signed (HMAC-SHA256); all rows above "
            f"include that. The hash alone, one thread, best of {repeats}: "
            + ", ".join(
                f"{a} **{size / 1e9 / seconds:.2f} GB/s**" for a, seconds in digests.items()
            )
            + " (BLAKE3 is the one used: the faster here; see elastic/checkpoint/integrity.py).",
            "Async rows are the time the caller is **blocked**: inside `save()`, plus inside "
            "`wait_staged()` (the call a trainer makes before `optimizer.step()` when it saves "
            "with `background_staging=True`); MiB/s there is state size / blocked time. "
            "*Copy in save()* is the default: `save()` returns once the state is copied to CPU "
            "memory. *Background copy, nothing to overlap* calls `wait_staged()` right after "
            "`save()`, so the whole copy is blocking time. *Overlapped* runs "
            f"{OVERLAP_SECONDS} s of CPU compute (a stand-in for forward + backward, which read "
            "but do not write the state) between the two calls; that compute is not counted. "
            "The first save of a manager allocates and faults in the staging memory; later "
            "saves copy into the same buffers (one memcpy of the state).",
            "Ratios (throughput) by place in the trial (first / second / ...): save / raw "
            f"write **{_xs(save_pos)}**, load / raw read **{_xs(load_pos)}**; the targets take "
            f"the worst. Save / raw write with early writeback: {_xs(save_wb_pos)}. Median of "
            f"the per-trial ratios: save / raw write {save_paired:.2f}x, save / raw write with "
            f"early writeback {save_wb_paired:.2f}x, load {load_paired:.2f}x. Per-trial save / "
            f"raw write: {_per_trial(dcp['save'], raw['write'])}; load / raw read: "
            f"{_per_trial(dcp['load'], raw['read'])}. "
            "Where the load's time goes, by position: the checked read (the same file read "
            "through one buffer, each chunk hashed and compared, no DCP) / raw read "
            f"**{_xs(checked_pos)}**, load / checked read **{_xs(rest_pos)}** (DCP's planning, "
            "copying each chunk's tensor bytes into the state, the manifest). "
            "Async blocking / sync save median (time), "
            f"later saves: copy in save() **{ratios['inline']:.3f}x**, background copy with "
            f"nothing to overlap **{ratios['idle']:.3f}x**, overlapped "
            f"**{ratios['overlap']:.3f}x**; first save (overlapped) **{first_ratio:.3f}x**. "
            "The target row below is judged on what the trainer does (model/train.py saves "
            "with the background copy and calls wait_staged() just before optimizer.step(), "
            "after forward and backward), in the steady state (later saves: a trainer saves "
            "many times per run). With a step shorter than the copy, the rest of the copy "
            "blocks: the 'nothing to overlap' figure is that worst case.",
            f"Resharded load: {reshard_mb} MiB saved as Shard(0) DTensors by 2 gloo processes "
            "and loaded into full tensors by 1 process (2 -> 1), against the same tensors "
            "saved and loaded by 1 process (1 -> 1).",
            table(
                head,
                [
                    row("load 1 -> 1 (same size)", shard["1->1"], rshard),
                    row("load 2 -> 1 (resharded)", shard["2->1"], rshard),
                ],
            ),
            f"Resharded / same-size load time by position in the pair, first / second: "
            f"**{_xs([1 / r for r in reshard_pos])}** (each trial loads "
            "once per process, the two loads back to back in alternating order); the target "
            "takes the worse.",
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
        Target(
            "save throughput (digests on)",
            ">= 0.9x raw write",
            f"{save_ratio:.2f}x (by position {_xs(save_pos)}; vs raw with early writeback "
            f"{_xs(save_wb_pos)})",
            save_ratio >= 0.9,
        ),
        Target(
            "load throughput (digests checked)",
            ">= 0.8x raw read",
            f"{load_ratio:.2f}x (by position {_xs(load_pos)})",
            load_ratio >= 0.8,
        ),
        Target(
            "async blocking",
            "<= 0.1x sync save",
            f"steady state {block_ratio:.3f}x (first save {first_ratio:.3f}x; "
            f"nothing to overlap {ratios['idle']:.3f}x, copy in save() {ratios['inline']:.3f}x)",
            block_ratio <= 0.1,
            note="judged on later saves (staging buffers reused), background copy overlapped "
            f"with {OVERLAP_SECONDS} s of compute, as model/train.py saves; the first save also "
            "allocates the staging memory",
        ),
        Target(
            "reshard load", "<= 1.2x same-size load", f"{reshard_ratio:.2f}x", reshard_ratio <= 1.2
        ),
    ]
    data = {
        "raw": raw,
        "dcp": dcp,
        "reshard": shard,
        "s3": s3_times,
        "digest_seconds": digests,
        "size_bytes": size,
    }
    return Section("checkpoints", TITLE, body, targets, data=data)


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--reshard-worker":
        mode, directory, size_mb, repeats, out = sys.argv[2:]
        reshard_worker(mode, directory, int(size_mb), int(repeats), out)
        from model import distributed

        distributed.exit_now(0)  # as model.train: no gloo teardown (it races with exiting peers)
    raise SystemExit("internal entry point; run `python -m bench --only checkpoints`")


if __name__ == "__main__":
    main()

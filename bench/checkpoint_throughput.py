"""Checkpoint save/load throughput, single process, local disk (file://) and S3 (moto_server).

Usage: ``python bench/checkpoint_throughput.py [--size-mb 256] [--repeats 2] [--skip-s3]``

Each backend saves a float32 state of ``--size-mb`` through ``CheckpointManager`` (DCP via
fsspec, BLAKE3 of every file, a signed manifest commit) and loads it back, every file checked
against its digest, into preallocated tensors, ``--repeats`` times; the best run is reported.
The digests' own cost: BLAKE3 (what the checkpoints use), SHA-256 and BLAKE2b of the state's
bytes in one thread, in GB/s (``what``: ``digest_blake3``, ``digest_sha256``,
``digest_blake2b``). Baselines measured in
the same run on the same data: ``torch.save``/``torch.load`` of one file for local disk, and
one raw object PUT/GET of the same number of bytes through ``Storage`` for S3. moto_server is
an in-memory S3 emulator on loopback, so the S3 numbers measure the client stack (s3fs,
botocore, HTTP), not a real store.
Prints one JSON line per measurement on stdout (the manager's own log lines go to stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blake3
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.ports import free_port
from elastic import jsonlog
from elastic.checkpoint import CheckpointConfig, CheckpointManager, Storage

MB = 1024 * 1024


def make_state(size_mb: int) -> dict[str, Any]:
    per_tensor = 4 * MB  # 1024 x 1024 float32
    count = max(1, size_mb * MB // per_tensor)
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {f"layer{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(count)}
    }


def state_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state["model"].values())


def blank(state: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}


def best_seconds(fn: Callable[[int], object], repeats: int) -> float:
    best = float("inf")
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - start)
    return best


def report(backend: str, what: str, size: int, seconds: float) -> None:
    line = {
        "event": "bench_checkpoint",
        "backend": backend,
        "what": what,
        "size_bytes": size,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / MB / seconds, 1),
        "gb_per_s": round(size / 1e9 / seconds, 2),
    }
    print(json.dumps(line), flush=True)


DIGESTS = ("blake3", "sha256", "blake2b")


def digest_seconds(state: dict[str, Any], algorithm: str, repeats: int) -> float:
    """Best seconds to hash every tensor's bytes with ``algorithm``, one thread."""
    views = [memoryview(t.numpy()).cast("B") for t in state["model"].values()]

    def run(_: int) -> None:
        hasher = blake3.blake3() if algorithm == "blake3" else hashlib.new(algorithm)
        for view in views:
            hasher.update(view)
        hasher.hexdigest()

    return best_seconds(run, repeats)


def bench_digests(state: dict[str, Any], repeats: int) -> None:
    for algorithm in DIGESTS:
        seconds = digest_seconds(state, algorithm, repeats)
        report("cpu", f"digest_{algorithm}", state_bytes(state), seconds)


def signing_key_file(directory: Path) -> str:
    """A key file for signed manifests (what a production run would configure)."""
    path = directory / "signing.key"
    path.write_text(os.urandom(32).hex())
    return str(path)


def bench_manager(
    backend: str, config: CheckpointConfig, state: dict[str, Any], repeats: int
) -> None:
    manager = CheckpointManager(config, run_id="bench", rank=0, world_size=1)
    size = state_bytes(state)
    report(
        backend, "dcp_save", size, best_seconds(lambda i: manager.save(i, state, meta={}), repeats)
    )
    target = blank(state)
    report(backend, "dcp_load", size, best_seconds(lambda i: manager.load(target, step=i), repeats))
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    manager.close()


def bench_torch_save(directory: Path, state: dict[str, Any], repeats: int) -> None:
    size = state_bytes(state)
    path = directory / "baseline.pt"

    def save(_: int) -> None:
        with path.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    report("file", "baseline_torch_save", size, best_seconds(save, repeats))
    report("file", "baseline_torch_load", size, best_seconds(lambda _: torch.load(path), repeats))


def bench_raw_object(storage: Storage, size: int, repeats: int) -> None:
    blob = os.urandom(size)
    report(
        "s3",
        "baseline_put",
        size,
        best_seconds(lambda i: storage.write_bytes(f"raw/{i}", blob), repeats),
    )
    report(
        "s3",
        "baseline_get",
        size,
        best_seconds(lambda i: storage.read_bytes(f"raw/{i}") and None, repeats),
    )


@contextmanager
def moto_server() -> Iterator[dict[str, Any]]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    binary = shutil.which("moto_server")
    if binary is None:
        raise SystemExit("moto_server not found (pip install 'moto[server]')")
    proc = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.05)
        yield {
            "endpoint_url": endpoint,
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"region_name": "us-east-1"},
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    jsonlog.configure(stream=sys.stderr)  # stdout carries only the bench lines
    state = make_state(args.size_mb)
    bench_digests(state, args.repeats)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        directory = Path(tmp)
        bench_torch_save(directory, state, args.repeats)
        config = CheckpointConfig(
            url=(directory / "ckpts").as_uri(),
            keep_last=args.repeats + 1,
            signing_key_file=signing_key_file(directory),
        )
        bench_manager("file", config, state, args.repeats)
    if args.skip_s3:
        return
    with moto_server() as options:
        import boto3  # test extra; only the S3 part of the bench needs it

        boto3.client(
            "s3",
            endpoint_url=options["endpoint_url"],
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")
        bench_raw_object(
            Storage("s3://bench", storage_options=options), state_bytes(state), args.repeats
        )
        config = CheckpointConfig(
            url="s3://bench/ckpts", storage_options=options, keep_last=args.repeats + 1
        )
        bench_manager("s3", config, state, args.repeats)


if __name__ == "__main__":
    main()

"""Rendezvous scale: one round with N participants, etcd v3 backend vs. torch's c10d backend.

Reuses bench/rendezvous_scale.py (participants are threads of one process, each with its own
connection; both run torch's rendezvous algorithm with the same settings: min = max = N, last
call 1 s). etcd3 is elasticd's handler (``create_handler``: torch's DynamicRendezvousHandler,
backoff after a lost compare-and-set, events named without ``inspect.stack()``); c10d is torch's
stock handler on its c10d backend, what torchrun users get. Most of the difference at 64 and
128 is torch's ``inspect.stack()`` per recorded event, which saturates the shared CPU. Each
cell runs in its own process with a wall-clock bound, so a round that does not finish is
reported as a timeout instead of stalling the suite; a size is skipped for a backend after that
backend timed out at a smaller size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import Section, Target, figure, fmt, table
from tests.support.etcd import EtcdServer
from tests.support.procs import REPO, base_env

TITLE = "6. Rendezvous scale"


def cell(backend: str, size: int, endpoint: str, bound_seconds: float) -> float | None:
    """Seconds for one round, ``None`` on timeout or error."""
    call = f"r.etcd3_round({endpoint!r}, {size})" if backend == "etcd3" else f"r.c10d_round({size})"
    code = f"from bench import rendezvous_scale as r; print('SECONDS', {call})"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=bound_seconds,
        )
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines():
        if line.startswith("SECONDS"):
            return float(line.split()[1])
    print(f"[rendezvous] {backend} {size} failed: {out.stderr[-500:]}", file=sys.stderr)
    return None


def plot(sizes: list[int], results: dict[str, dict[int, float | None]], bound: float) -> str:
    name = "rendezvous.png"
    with figure(name, (6, 4)) as ax:
        for backend, color in (("etcd3", "C0"), ("c10d", "C1")):
            done = [(n, results[backend][n]) for n in sizes if results[backend].get(n) is not None]
            ax.plot([n for n, _ in done], [s for _, s in done], "o-", color=color, label=backend)
            late = [n for n in sizes if n in results[backend] and results[backend][n] is None]
            if late:
                ax.plot(
                    late,
                    [bound] * len(late),
                    "x",
                    ms=10,
                    color=color,
                    label=f"{backend}: no round within {bound:.0f} s",
                )
        ax.axhline(10, color="k", ls="--", lw=1, label="target at 128: 10 s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("participants")
        ax.set_ylabel("seconds for one round")
        ax.grid(alpha=0.3, which="both")
    return name


def run(work: Path, *, quick: bool) -> Section:
    sizes = [8, 16] if quick else [8, 16, 32, 64, 128]
    bound = 60.0 if quick else 90.0
    results: dict[str, dict[int, float | None]] = {"etcd3": {}, "c10d": {}}
    server = EtcdServer(work / "etcd").start()
    try:
        for size in sizes:
            for backend in ("etcd3", "c10d"):
                if None in results[backend].values():
                    continue  # it already timed out at a smaller size
                results[backend][size] = cell(backend, size, server.endpoint, bound)
                print(
                    f"[rendezvous] {backend} {size}: {results[backend][size]}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.kill()

    def show(backend: str, n: int) -> str:
        if n not in results[backend]:
            return "not run"
        value = results[backend][n]
        return f"> {bound:.0f} (timeout)" if value is None else fmt(value)

    rows = []
    for n in sizes:
        e, c = results["etcd3"].get(n), results["c10d"].get(n)
        rows.append(
            [
                n,
                show("etcd3", n),
                show("c10d", n),
                fmt(e / c) if e is not None and c is not None else "-",
            ]
        )
    largest = sizes[-1]
    at_largest = results["etcd3"].get(largest)
    first = sizes[0]

    def growth(backend: str) -> float | None:
        a, z = results[backend].get(first), results[backend].get(largest)
        return None if a is None or z is None else z / a

    ge, gc = growth("etcd3"), growth("c10d")
    targets = [
        Target(
            f"{largest} participants",
            "<= 10 s",
            "timeout" if at_largest is None else f"{at_largest:.2f} s",
            at_largest is not None and at_largest <= 10,
        ),
        Target(
            f"growth {first} -> {largest}",
            "no worse than c10d's",
            f"etcd3 x{fmt(ge)}, c10d x{fmt(gc)}",
            ge is not None and (gc is None or ge <= gc),
        ),
    ]
    body = "\n\n".join(
        [
            __doc__.split("\n", 2)[2].strip(),
            table(["participants", "etcd3 s", "c10d s", "etcd3 / c10d"], rows),
        ]
    )
    return Section(
        "rendezvous",
        TITLE,
        body,
        targets,
        [plot(sizes, results, bound)],
        data={str(k): {str(n): v for n, v in d.items()} for k, d in results.items()},
    )

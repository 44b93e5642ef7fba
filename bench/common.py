"""Shared pieces of the benchmarks: result sections, statistics, tables, machine description."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"  # one JSON per benchmark, merged into RESULTS.md
MB = 1024 * 1024


@contextmanager
def figure(name: str, size_inches: tuple[float, float]) -> Iterator[Any]:
    """One matplotlib axes (Agg, no display); on exit: legend, tight layout, saved as
    ``bench/<name>`` at 100 dpi, figure closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size_inches)
    try:
        yield ax
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(BENCH_DIR / name, dpi=100)
    finally:
        plt.close(fig)


@dataclass
class Target:
    """One target of issue 8 with the measured value and whether it was met."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measurable here (skipped)
    note: str = ""


@dataclass
class Section:
    """What one benchmark contributes to RESULTS.md."""

    name: str
    title: str
    body: str  # markdown: tables and notes
    targets: list[Target] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # file names under bench/
    seconds: float = 0.0
    quick: bool = False
    date: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path = RESULTS_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(asdict(self), indent=1, default=str))
        return path

    @staticmethod
    def load(path: Path) -> Section:
        raw = json.loads(path.read_text())
        raw["targets"] = [Target(**t) for t in raw.get("targets", [])]
        return Section(**raw)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of ``values`` (empty -> NaNs)."""
    if not values:
        nan = float("nan")
        return {"n": 0, "median": nan, "min": nan, "max": nan}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def median_interval(values: Sequence[float], confidence: float = 0.9) -> tuple[float, float, float]:
    """(low, high, coverage): the narrowest interval between order statistics that holds the
    true median with probability >= ``confidence`` whatever the distribution (sign-test
    interval; ``coverage`` is its exact probability). With too few values for ``confidence``
    it is (min, max) and its own, lower, coverage. Written out here rather than taken from
    scipy, which the project does not otherwise need.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        nan = float("nan")
        return nan, nan, 0.0

    def coverage(k: int) -> float:  # P(k <= Binomial(n, 1/2) <= n - k - 1), 0-based order k
        return sum(math.comb(n, i) for i in range(k + 1, n - k)) / 2**n

    k = 0
    while k + 1 < n - k - 1 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k], ordered[n - k - 1], coverage(k)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One paragraph: CPU, cores, memory, OS, Python, torch."""
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, GPU: {gpu}; "
        f"{platform.platform()}; Python {platform.python_version()}, torch {torch.__version__}"
    )


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (no psutil)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def evict(directory: Path) -> None:
    """Drop ``directory``'s files from the page cache, so reads come from the disk.

    ``POSIX_FADV_DONTNEED`` drops clean pages only, hence the ``os.sync()`` first.
    """
    os.sync()
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

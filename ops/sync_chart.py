"""Generate the Helm chart's copies of the alert rules and the Grafana dashboard from ``ops/``.

The rules (``ops/prometheus/alerts.yaml``) and the dashboard (``ops/grafana/elasticd.json``)
live once, in ``ops/``. Helm can only read files inside the chart directory, so the chart holds
generated copies under ``helm/elasticd/files/``: the rule file behind a one-line "generated"
header (YAML comment), the dashboard byte for byte (JSON has no comments). Never edit the copies.

    python ops/sync_chart.py           # write the copies
    python ops/sync_chart.py --check   # exit 1 and name the stale copies (tests/helm run this)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Copy:
    """One generated chart file and the ``ops/`` file it comes from."""

    source: Path
    target: Path
    header: str  # prepended to the source text; "" for formats without comments

    def expected(self) -> str:
        return self.header + self.source.read_text(encoding="utf-8")

    def is_current(self) -> bool:
        return self.target.exists() and self.target.read_text(encoding="utf-8") == self.expected()

    def write(self) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.target.write_text(self.expected(), encoding="utf-8")


def _yaml_header(source: Path, repo: Path) -> str:
    relative = source.relative_to(repo).as_posix()
    return f"# GENERATED from {relative} by ops/sync_chart.py: edit the source, not this copy.\n"


def copies(repo: Path = REPO) -> tuple[Copy, ...]:
    """The chart's generated files, in a fixed order."""
    rules = repo / "ops" / "prometheus" / "alerts.yaml"
    files = repo / "helm" / "elasticd" / "files"
    return (
        Copy(source=rules, target=files / "alerts.yaml", header=_yaml_header(rules, repo)),
        Copy(
            source=repo / "ops" / "grafana" / "elasticd.json",
            target=files / "elasticd.json",
            header="",
        ),
    )


def stale(repo: Path = REPO) -> list[Path]:
    """Generated files that differ from what their sources give now."""
    return [c.target for c in copies(repo) if not c.is_current()]


def main(argv: Sequence[str] | None = None, *, repo: Path = REPO) -> int:
    parser = argparse.ArgumentParser(prog="python ops/sync_chart.py", description=__doc__)
    parser.add_argument("--check", action="store_true", help="report stale copies, write none")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale(repo)
        for path in out_of_date:
            print(f"stale: {path.relative_to(repo)} (run: python ops/sync_chart.py)")
        return 1 if out_of_date else 0
    for item in copies(repo):
        if not item.is_current():
            item.write()
            print(f"wrote {item.target.relative_to(repo)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

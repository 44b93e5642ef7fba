"""Generate the Helm chart's copies of the alert rules and the Grafana dashboard from ``ops/``.

The rules (``ops/prometheus/alerts.yaml``) and the dashboard (``ops/grafana/elasticd.json``)
live once, in ``ops/``. Helm can only read files inside the chart directory, so the chart holds
generated copies under ``helm/elasticd/files/``: the rule file behind a one-line "generated"
header (YAML comment), the dashboard byte for byte (JSON has no comments). Never edit the copies.

In the rule copy, the numbers that ``ops/prometheus/thresholds.yaml`` lists (an alert's
threshold, where its expression compares and where its description mentions it) are
placeholders ``__<alert>_<key>__``; the chart's ``prometheusrule.yaml`` replaces them with
``monitoring.prometheusRule.alerts.<alert>.<key>``. A listed snippet that is missing from its
alert's rule, or present twice, stops the generation (:class:`SyncError`).

    python ops/sync_chart.py           # write the copies
    python ops/sync_chart.py --check   # exit 1 and name the stale copies (tests/helm run this)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


class SyncError(ValueError):
    """A source cannot be turned into its chart copy (a threshold snippet not found once)."""


@dataclass(frozen=True)
class Threshold:
    """One tunable number of an alert rule (an entry of ``ops/prometheus/thresholds.yaml``)."""

    alert: str
    key: str  # the values key under monitoring.prometheusRule.alerts.<alert>
    default: int | float
    texts: tuple[str, ...]  # snippets of the rule, "@" standing for the number

    @property
    def placeholder(self) -> str:
        return f"__{self.alert}_{self.key}__"

    def literal(self, text: str) -> str:
        return text.replace("@", _number(self.default))


def _number(value: int | float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def load_thresholds(path: Path) -> tuple[Threshold, ...]:
    """The entries of a thresholds file; raises :class:`SyncError` on a malformed one."""
    data: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found = []
    for alert, keys in data.items():
        for key, spec in keys.items():
            default, texts = spec.get("default"), spec.get("text")
            if not isinstance(default, int | float) or isinstance(default, bool):
                raise SyncError(f"{path.name}: {alert}.{key}.default={default!r}: not a number")
            if not texts or not all(isinstance(t, str) and "@" in t for t in texts):
                raise SyncError(f"{path.name}: {alert}.{key}.text={texts!r}: strings with @")
            found.append(Threshold(alert, key, default, tuple(texts)))
    return tuple(found)


def _alert_span(text: str, alert: str) -> tuple[int, int]:
    """Where the rule of ``alert`` is in a rule file's text: its item up to the next item."""
    start = re.search(rf"^\s*- alert: {re.escape(alert)}\s*$", text, re.M)
    if start is None:
        raise SyncError(f"alert {alert} is not in the rule file")
    end = re.compile(r"^\s*- (?:alert|record|name):", re.M).search(text, start.end())
    return start.start(), end.start() if end else len(text)


def with_placeholders(text: str, thresholds: Sequence[Threshold]) -> str:
    """The rule file ``text`` with each threshold's snippets holding its placeholder."""
    for threshold in thresholds:
        start, end = _alert_span(text, threshold.alert)
        block = text[start:end]
        for snippet in threshold.texts:
            literal = threshold.literal(snippet)
            if block.count(literal) != 1:
                raise SyncError(
                    f"{threshold.alert}.{threshold.key}: {literal!r} occurs "
                    f"{block.count(literal)} times in the rule, not once"
                )
            block = block.replace(literal, snippet.replace("@", threshold.placeholder))
        text = text[:start] + block + text[end:]
    return text


@dataclass(frozen=True)
class Copy:
    """One generated chart file and the ``ops/`` file(s) it comes from."""

    source: Path
    target: Path
    header: str  # prepended to the source text; "" for formats without comments
    thresholds: Path | None = None  # rules only: the numbers that become placeholders

    @property
    def sources(self) -> tuple[Path, ...]:
        return (self.source,) if self.thresholds is None else (self.source, self.thresholds)

    def expected(self) -> str:
        text = self.source.read_text(encoding="utf-8")
        if self.thresholds is not None:
            text = with_placeholders(text, load_thresholds(self.thresholds))
        return self.header + text

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
        Copy(
            source=rules,
            target=files / "alerts.yaml",
            header=_yaml_header(rules, repo),
            thresholds=rules.with_name("thresholds.yaml"),
        ),
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

"""The metric catalog: loads and validates ``daemon/metrics.yaml`` and checks things against it.

``daemon/metrics.yaml`` is the one list of elasticd's metrics. This module owns:

- loading it into frozen dataclasses (:func:`load`), rejecting unknown keys;
- the naming rules (:func:`naming_problems`): ``elasticd_`` prefix, snake case, base units,
  ``_total`` for counters only, ``_seconds`` for durations and timestamps, bounded labels and
  never ``step``, ``pid`` or ``path`` as a label;
- checking a PromQL expression (an alert rule, a dashboard query) against the catalog
  (:func:`expression_problems`): every metric it names exists, every label it matches exists on
  that metric and every literal value of a closed label is one of the listed values;
- checking a scraped ``/metrics`` text against the catalog (:func:`exposition_problems`), which
  is how the daemon (which must not import ``ops``) is held to the catalog;
- the metrics table in ``docs/metrics.md`` (:func:`markdown_table`).

Caveat: the PromQL check is a tokenizer, not a parser. It is exact for the expressions this
repository writes (no label matchers or strings containing braces or quotes); Prometheus itself
(``promtool check rules``, a live server) checks the syntax.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The daemon owns its metric definitions (it builds its collectors from this file); ops reads it.
CATALOG_PATH = Path(__file__).resolve().parent.parent / "daemon" / "metrics.yaml"

PREFIX = "elasticd_"
FORBIDDEN_LABELS = frozenset({"step", "pid", "path"})
# Labels Prometheus attaches or uses itself; exposing them leads to renamed `exported_*` labels.
RESERVED_LABELS = frozenset({"instance", "job", "le", "quantile"})
# Series suffixes that client libraries derive from counters and histograms.
DERIVED_SUFFIXES = ("_bucket", "_sum", "_count", "_created")
# Name tokens that mean a non-base unit (Prometheus wants seconds and bytes).
NON_BASE_UNITS = _words(
    "ms msec millis milliseconds us microseconds ns nanoseconds minutes hours days"
    " kb mb gb kib mib gib kilobytes megabytes gigabytes bits percent pct"
)
# Name tokens that mean a time quantity, so the name must end in `_seconds`.
TIME_TOKENS = _words("duration latency age timeout timestamp elapsed")

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_LABEL_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_VALUE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_TOP_KEYS = frozenset({"common_labels", "metrics"})
_METRIC_KEYS = frozenset({"name", "type", "help", "labels", "buckets", "scope"})
SCOPES = ("node", "run")  # run: exported only by the node that hosts global rank 0


class CatalogError(ValueError):
    """The catalog file is malformed or breaks a naming rule; the message lists every problem."""


class MetricType(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclasses.dataclass(frozen=True)
class Label:
    """An extra label; ``values`` is the closed list of values, ``None`` when config-bounded."""

    name: str
    values: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    type: MetricType
    help: str
    labels: tuple[Label, ...] = ()
    buckets: tuple[float, ...] = ()
    common_labels: tuple[str, ...] = ("run_id", "node")
    scope: str = "node"

    @property
    def label_names(self) -> tuple[str, ...]:
        """Every label a series of this metric carries (common first), ``le`` excluded."""
        return self.common_labels + tuple(label.name for label in self.labels)

    def label(self, name: str) -> Label | None:
        return next((label for label in self.labels if label.name == name), None)

    def series_names(self) -> tuple[str, ...]:
        """The series names a query may select (``_created`` is exposition noise, not for use)."""
        if self.type is MetricType.HISTOGRAM:
            return tuple(self.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        return (self.name,)


@dataclasses.dataclass(frozen=True)
class Catalog:
    common_labels: tuple[str, ...]
    metrics: tuple[Metric, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(metric.name for metric in self.metrics)

    def get(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(name)

    def metric_for_series(self, series_name: str) -> Metric | None:
        """The metric a queried series name belongs to (``x_bucket`` -> histogram ``x``)."""
        for metric in self.metrics:
            if series_name in metric.series_names():
                return metric
        return None


def load(path: Path = CATALOG_PATH) -> Catalog:
    """Load and validate the catalog; raise :class:`CatalogError` listing every problem."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: cannot read: {exc}") from exc
    catalog = parse(data)
    problems = naming_problems(catalog)
    if problems:
        raise CatalogError(f"{path}: " + "; ".join(problems))
    return catalog


def parse(data: Any) -> Catalog:
    """Build a :class:`Catalog` from the YAML document's structure (no naming rules)."""
    if not isinstance(data, Mapping):
        raise CatalogError("catalog must be a mapping with 'common_labels' and 'metrics'")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise CatalogError(f"unknown top-level keys {unknown}")
    common = tuple(_str_list(data.get("common_labels", []), "common_labels"))
    entries = data.get("metrics")
    if not isinstance(entries, list) or not entries:
        raise CatalogError("metrics: must be a non-empty list")
    return Catalog(common, tuple(_parse_metric(entry, common) for entry in entries))


def _parse_metric(entry: Any, common: tuple[str, ...]) -> Metric:
    if not isinstance(entry, Mapping):
        raise CatalogError(f"metrics entry {entry!r}: must be a mapping")
    name = entry.get("name")
    unknown = sorted(set(entry) - _METRIC_KEYS)
    if unknown:
        raise CatalogError(f"{name}: unknown keys {unknown}")
    if not isinstance(name, str):
        raise CatalogError(f"metrics entry {entry!r}: 'name' must be a string")
    kind_text = entry.get("type")
    if kind_text not in _types():
        raise CatalogError(f"{name}: type={kind_text!r}: must be one of {_types()}")
    help_text = entry.get("help")
    if not isinstance(help_text, str):
        raise CatalogError(f"{name}: 'help' must be a string")
    labels = entry.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise CatalogError(f"{name}: 'labels' must be a mapping of label -> values or null")
    buckets = entry.get("buckets") or []
    if not isinstance(buckets, list) or not all(isinstance(b, int | float) for b in buckets):
        raise CatalogError(f"{name}: 'buckets' must be a list of numbers")
    scope = entry.get("scope", "node")
    if scope not in SCOPES:
        raise CatalogError(f"{name}: scope={scope!r}: must be one of {list(SCOPES)}")
    return Metric(
        name=name,
        type=MetricType(kind_text),
        help=help_text,
        labels=tuple(_parse_label(name, key, values) for key, values in labels.items()),
        buckets=tuple(float(b) for b in buckets),
        common_labels=common,
        scope=scope,
    )


def _parse_label(metric: str, name: Any, values: Any) -> Label:
    if not isinstance(name, str):
        raise CatalogError(f"{metric}: label name {name!r} must be a string")
    if values is None:
        return Label(name)
    return Label(name, tuple(_str_list(values, f"{metric}.labels.{name}")))


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"{key}={value!r}: must be a list of strings")
    return value


def _types() -> list[str]:
    return [t.value for t in MetricType]


# --- naming rules ------------------------------------------------------------------------------


def naming_problems(catalog: Catalog) -> list[str]:
    """Every naming-rule violation in ``catalog``, as ``"<metric>: <problem>"`` strings."""
    problems = [f"common label {p}" for p in _label_name_problems(catalog.common_labels)]
    owner: dict[str, str] = {}
    for metric in catalog.metrics:
        problems += [f"{metric.name}: {p}" for p in _metric_problems(metric)]
        if metric.name in owner.values():
            problems.append(f"{metric.name}: listed twice")
            continue
        for series in {metric.name, *metric.series_names()}:
            if series in owner:
                problems.append(f"{metric.name}: series {series} collides with {owner[series]}")
            owner[series] = metric.name
    return problems


def _metric_problems(metric: Metric) -> list[str]:
    return [
        *_name_problems(metric),
        *_help_problems(metric.help),
        *_label_problems(metric),
        *_bucket_problems(metric),
    ]


def _name_problems(metric: Metric) -> list[str]:
    name = metric.name
    problems = []
    if not name.startswith(PREFIX):
        problems.append(f"must start with {PREFIX!r}")
    if not _NAME_RE.match(name):
        problems.append("must be snake case: lower-case letters, digits, single underscores")
    tokens = name.split("_")
    if len(tokens) < 3:
        problems.append("must read elasticd_<subsystem>_<what>[_<unit>]")
    is_counter = metric.type is MetricType.COUNTER
    if is_counter != name.endswith("_total"):
        problems.append("counters, and only counters, end in '_total'")
    if name.endswith(DERIVED_SUFFIXES):
        problems.append(f"must not end in a derived-series suffix {DERIVED_SUFFIXES}")
    bad_units = sorted(NON_BASE_UNITS.intersection(tokens))
    if bad_units:
        problems.append(f"non-base unit {bad_units}: use seconds or bytes")
    unit_name = name.removesuffix("_total")
    if TIME_TOKENS.intersection(tokens) and not unit_name.endswith("_seconds"):
        problems.append("a duration or timestamp must end in '_seconds'")
    return problems


def _help_problems(help_text: str) -> list[str]:
    if not help_text.strip():
        return ["help must not be empty"]
    if "\n" in help_text or help_text != help_text.strip():
        return ["help must be one line without surrounding whitespace"]
    if not help_text.endswith("."):
        return ["help must be a sentence ending in '.'"]
    return []


def _label_problems(metric: Metric) -> list[str]:
    names = [label.name for label in metric.labels]
    problems = _label_name_problems(names)
    problems += [f"label {n} repeats a common label" for n in names if n in metric.common_labels]
    if len(set(names)) != len(names):
        problems.append("extra labels must be unique")
    for label in metric.labels:
        if label.values is None:
            continue
        if not label.values:
            problems.append(f"label {label.name}: value list must not be empty (or null)")
        if len(set(label.values)) != len(label.values):
            problems.append(f"label {label.name}: values must be unique")
        bad = [v for v in label.values if not _VALUE_RE.match(v)]
        if bad:
            problems.append(f"label {label.name}: values {bad} must be snake case")
    return problems


def _label_name_problems(names: Iterable[str]) -> list[str]:
    problems = []
    for name in names:
        if name in FORBIDDEN_LABELS:
            problems.append(f"label {name!r} is forbidden (unbounded: {sorted(FORBIDDEN_LABELS)})")
        elif name in RESERVED_LABELS or name.startswith("__"):
            problems.append(f"label {name!r} is reserved by Prometheus")
        elif not _LABEL_RE.match(name):
            problems.append(f"label {name!r} must be snake case")
    return problems


def _bucket_problems(metric: Metric) -> list[str]:
    buckets = metric.buckets
    if metric.type is not MetricType.HISTOGRAM:
        return ["only histograms have buckets"] if buckets else []
    if not buckets:
        return ["a histogram needs buckets"]
    if not all(math.isfinite(b) and b > 0 for b in buckets):
        return ["buckets must be finite and > 0 (+Inf is implicit)"]
    if any(b >= c for b, c in itertools.pairwise(buckets)):
        return ["buckets must be strictly increasing"]
    return []


# --- PromQL references -------------------------------------------------------------------------

PROMQL_FUNCTIONS = _words(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase irate
    label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time
    min_over_time minute month pi predict_linear present_over_time quantile_over_time rad rate
    resets round scalar sgn sin sinh sort sort_desc sqrt stddev_over_time stdvar_over_time
    sum_over_time tan tanh time timestamp vector year start end
    """
)
PROMQL_AGGREGATIONS = _words(
    "avg bottomk count count_values group max min quantile stddev stdvar sum topk"
)
PROMQL_KEYWORDS = _words(
    "and or unless by without on ignoring group_left group_right offset bool inf nan atan2"
)

_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR_RE = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER_RE = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT_RE = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?")


@dataclasses.dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclasses.dataclass(frozen=True)
class Selector:
    """One series selector in an expression: ``metric{matchers}``."""

    metric: str
    matchers: tuple[Matcher, ...]


def selectors(expr: str) -> list[Selector]:
    """Every selector of a named metric in ``expr``, with its label matchers (maybe none)."""
    found: list[Selector] = []
    with_braces: set[tuple[int, int]] = set()
    for match in _SELECTOR_RE.finditer(expr):
        with_braces.add(match.span(1))
        if match.group(1):
            found.append(Selector(match.group(1), _matchers(match.group(2))))
    for name, span in _bare_identifiers(expr):
        if span not in with_braces:
            found.append(Selector(name, ()))
    return found


def _matchers(body: str) -> tuple[Matcher, ...]:
    return tuple(Matcher(*m.groups()) for m in _MATCHER_RE.finditer(body))


def _bare_identifiers(expr: str) -> list[tuple[str, tuple[int, int]]]:
    """Metric names outside strings, braces, groupings and ranges, with their spans."""
    # Blank out (same length, so spans stay valid) what cannot hold a metric name.
    blanked = _STRING_RE.sub(lambda m: " " * len(m.group()), expr)
    blanked = re.sub(r"\{[^{}]*\}", lambda m: " " * len(m.group()), blanked)
    blanked = _GROUPING_RE.sub(lambda m: " " * len(m.group()), blanked)
    blanked = re.sub(r"\[[^\]]*\]", lambda m: " " * len(m.group()), blanked)
    names = []
    for match in _IDENT_RE.finditer(blanked):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_KEYWORDS or word in PROMQL_AGGREGATIONS:
            continue
        names.append((word, match.span(1)))
    return names


def function_calls(expr: str) -> list[str]:
    """Names called as functions or aggregations in ``expr`` (``rate``, ``sum``...)."""
    blanked = _STRING_RE.sub(lambda m: " " * len(m.group()), expr)
    blanked = _GROUPING_RE.sub(" ", blanked)
    return [m.group(1) for m in _IDENT_RE.finditer(blanked) if m.group(2)]


def expression_problems(expr: str, catalog: Catalog) -> list[str]:
    """Problems with ``expr`` against ``catalog``: unknown metrics, functions, labels, values."""
    problems = [
        f"unknown function {name!r}"
        for name in function_calls(expr)
        if name not in PROMQL_FUNCTIONS | PROMQL_AGGREGATIONS | PROMQL_KEYWORDS
    ]
    for selector in selectors(expr):
        metric = catalog.metric_for_series(selector.metric)
        if metric is None:
            problems.append(f"unknown metric {selector.metric!r}")
            continue
        problems += _matcher_problems(selector, metric)
    return problems


def _matcher_problems(selector: Selector, metric: Metric) -> list[str]:
    allowed = set(metric.label_names)
    if selector.metric.endswith("_bucket"):
        allowed.add("le")
    problems = []
    for matcher in selector.matchers:
        if matcher.label not in allowed:
            problems.append(f"{selector.metric} has no label {matcher.label!r}")
            continue
        label = metric.label(matcher.label)
        if label is None or label.values is None or matcher.op not in ("=", "=~"):
            continue
        # A plain alternation (`crash|hang`) names values; anything fancier is not checked.
        if not re.fullmatch(r"[a-z0-9_|]+", matcher.value):
            continue
        unknown = [v for v in matcher.value.split("|") if v not in label.values]
        if unknown:
            problems.append(f"{selector.metric}: {matcher.label} has no value {unknown}")
    return problems


# --- exposition --------------------------------------------------------------------------------


def exposition_problems(
    text: str, catalog: Catalog, *, require_all: bool = False, check_help: bool = True
) -> list[str]:
    """Problems with a Prometheus text exposition against ``catalog``.

    Checks every ``elasticd_`` family: known name, same type (and help, unless ``check_help``
    is false), exactly the catalog's labels, closed label values within their lists, histogram
    buckets as listed. With ``require_all`` every catalog metric must be exposed (a labelled
    metric with no children still exposes HELP and TYPE).
    """
    from prometheus_client.parser import text_string_to_metric_families

    seen: set[str] = set()
    problems: list[str] = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue
        metric = _metric_for_family(family.name, family.type, catalog)
        if metric is None:
            if not _is_created_family(family.name, catalog):
                problems.append(f"{family.name}: not in the catalog")
            continue
        seen.add(metric.name)
        problems += _family_problems(metric, family, check_help=check_help)
    if require_all:
        problems += [f"{name}: not exposed" for name in catalog.names() if name not in seen]
    return problems


def _metric_for_family(name: str, kind: str, catalog: Catalog) -> Metric | None:
    # The text parser drops `_total` from counter family names.
    candidates = (name + "_total", name) if kind == "counter" else (name,)
    return next((catalog.get(n) for n in candidates if n in catalog.names()), None)


def _is_created_family(name: str, catalog: Catalog) -> bool:
    base = name.removesuffix("_created")
    return base != name and any(
        m.name in (base, base + "_total") and m.type is not MetricType.GAUGE
        for m in catalog.metrics
    )


def _family_problems(metric: Metric, family: Any, *, check_help: bool) -> list[str]:
    problems = []
    if family.type != metric.type.value:
        problems.append(f"{metric.name}: type {family.type}, catalog says {metric.type.value}")
    if check_help and family.documentation != metric.help:
        problems.append(f"{metric.name}: help {family.documentation!r} != {metric.help!r}")
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        if set(labels) != set(metric.label_names):
            problems.append(
                f"{sample.name}: labels {sorted(labels)}, catalog says {sorted(metric.label_names)}"
            )
            continue
        for label in metric.labels:
            if label.values is not None and labels[label.name] not in label.values:
                problems.append(f"{sample.name}: {label.name}={labels[label.name]!r} not listed")
    bounds = {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
    if bounds and bounds != {*metric.buckets, math.inf}:
        exposed = sorted(b for b in bounds if b != math.inf)
        problems.append(f"{metric.name}: buckets {exposed}, catalog says {list(metric.buckets)}")
    return sorted(set(problems))


# --- where the expressions live ---------------------------------------------------------------

RULES_PATH = Path(__file__).parent / "prometheus" / "alerts.yaml"
DASHBOARD_PATH = Path(__file__).parent / "grafana" / "elasticd.json"
# What Grafana puts for its built-in variables; any value works for a syntax/metric check.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES_RE = re.compile(r"^\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class Query:
    """One PromQL expression of a rule or dashboard; ``where`` says which, for messages."""

    where: str
    expr: str


def rule_queries(rules: Mapping[str, Any]) -> list[Query]:
    """Every rule expression of a parsed Prometheus rule file, named by alert or record."""
    return [
        Query(str(rule.get("alert") or rule.get("record")), str(rule["expr"]))
        for group in rules.get("groups", [])
        for rule in group.get("rules", [])
    ]


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """Every PromQL expression of a Grafana dashboard: panel targets, annotations, variables.

    Expressions keep their ``$variables`` (see :func:`substitute_variables`); a variable's
    ``label_values(selector, label)`` becomes the equivalent ``group by (label) (selector)``.
    """
    found = []
    for panel in _all_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append(
                    Query(f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"])
                )
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append(Query(f"annotation {annotation.get('name')!r}", annotation["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            found.append(Query(f"variable {variable['name']!r}", _variable_expr(variable)))
    return found


def _all_panels(panels: list[Any]) -> list[Mapping[str, Any]]:
    # Collapsed rows hold their panels inside the row.
    return [p for panel in panels for p in (panel, *_all_panels(panel.get("panels", [])))]


def _variable_expr(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    text = query.get("query", "") if isinstance(query, Mapping) else str(query)
    match = _LABEL_VALUES_RE.match(text)
    return f"group by ({match.group(2)}) ({match.group(1)})" if match else text


def substitute_variables(expr: str, values: Mapping[str, str] | None = None) -> str:
    """Replace Grafana ``$var``/``${var}``/``[[var]]``: built-ins, ``values``, else ``.*``."""
    known = {**GRAFANA_BUILTINS, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return known.get(name, ".*")

    return _VARIABLE_RE.sub(replace, expr)


# --- documentation -----------------------------------------------------------------------------


def markdown_table(catalog: Catalog) -> str:
    """The metrics table of ``docs/metrics.md`` (a test keeps the document in sync)."""
    rows = [
        "| Metric | Type | Scope | Extra labels (values) | Help |",
        "| --- | --- | --- | --- | --- |",
    ]
    for metric in catalog.metrics:
        labels = ", ".join(_label_cell(label) for label in metric.labels) or "-"
        rows.append(
            f"| `{metric.name}` | {metric.type.value} | {metric.scope} | {labels} | {metric.help} |"
        )
    return "\n".join(rows) + "\n"


def _label_cell(label: Label) -> str:
    if label.values is None:
        return f"`{label.name}` (from config)"
    return f"`{label.name}` ({', '.join(label.values)})"

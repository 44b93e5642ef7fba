"""Typed configuration: nested frozen dataclasses built from plain mappings.

Every component owns a frozen dataclass ``Config`` next to its code; this module only knows how
to turn the layered sources (defaults < YAML < ``ELASTICD_*`` env < ``--set``) into those
dataclasses. It is shared by the daemon and the workers, so it lives in ``elastic`` (which both
may import).

Rules a user relies on:

- Unknown keys are errors that name the full dotted key; so is a missing required key.
- A ``__post_init__`` that rejects a value raises ``ValueError`` via :func:`check`; the builder
  prefixes the dotted path, so the message reads ``checkpoint.interval_steps=0: must be > 0``.
- Every error is one line (:class:`ConfigError` escapes line breaks in keys and values).
- Rules no section repeats: an ``int`` fits in 64 bits; a ``float`` is finite, and a
  ``*_seconds`` one at most :data:`MAX_SECONDS`; no string holds a NUL character. Names (run
  ids, node ids, key prefix segments) follow :func:`check_name`.
- ``--config`` is a regular file (a FIFO or a device is refused without being opened) holding
  one YAML mapping without duplicate keys; a syntax error is one line ``FILE:LINE:COLUMN``.
- Env overrides: ``ELASTICD_SECTION__KEY=value`` (``__`` separates levels, names are lower-cased,
  values are parsed as YAML scalars). Names in :data:`RESERVED_ENV` and names starting with
  ``ELASTICD_WORKER_`` are process plumbing, not configuration.
- A field whose YAML key differs from its Python name (``async`` is a keyword) declares it with
  ``field(metadata={"key": "async"})``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import re
import stat
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

ENV_PREFIX = "ELASTICD_"
WORKER_ENV_PREFIX = "ELASTICD_WORKER_"
RESERVED_ENV = frozenset({"ELASTICD_ALLOW_FAULTS", "ELASTICD_LOG_LEVEL"})

# Integers are stored and compared as 64-bit values downstream (etcd records, torch seeds).
MAX_INT = 2**63 - 1
# No wait, timeout or window is meaningful past a year, and far longer ones overflow the
# platform's timers (threading's TIMEOUT_MAX, time.sleep) where they are used.
MAX_SECONDS = 365 * 24 * 3600
# Names become etcd key segments and path components: ASCII only, no separators, not a
# hidden file or "..", and at most a DNS name's length (a pod name is a node id).
NAME_MAX_CHARS = 253
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_RULE = f"1-{NAME_MAX_CHARS} ASCII letters, digits, '.', '_', '-', from a letter or digit"
# A config file larger than this is not a config; a document that expands (YAML aliases) to
# more values than this is refused before anything walks it.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_DOCUMENT_VALUES = 100_000
_LINE_BREAK = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with every line break escaped as Python writes it (``\\n``): one line."""
    return _LINE_BREAK.sub(lambda m: repr(m.group())[1:-1], text)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key and value.

    Always one line: line breaks in the message (a key or a value holding one) are escaped.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def check(condition: bool, key: str, value: object, requirement: str) -> None:
    """Raise ``ValueError("key=value: requirement")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{key}={value!r}: {requirement}")


def is_name(value: object) -> bool:
    """Whether ``value`` is a name by :data:`NAME_RULE` (run ids, node ids, prefix segments)."""
    return (
        isinstance(value, str)
        and len(value) <= NAME_MAX_CHARS
        and _NAME.fullmatch(value) is not None
    )


def check_name(key: str, value: str) -> None:
    """The one naming rule of run ids, node ids and key prefix segments (:data:`NAME_RULE`)."""
    check(is_name(value), key, value, f"must be {NAME_RULE}")


def check_regular_file(key: str, path: str) -> None:
    """``path`` is a readable regular file (``ConfigError`` naming ``key`` otherwise), found
    without opening it: a FIFO would block the reader, a device never end."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}={path!r}: {_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{key}={path!r}: not a regular file ({_file_kind(mode)})")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}={path!r}: not readable")


def check_creatable_dir(key: str, value: str, path: str | None = None) -> None:
    """``path`` (default ``value``) is a writable directory or can be created as one: no
    component is a file, the nearest existing one is a writable directory. Creates nothing."""
    try:
        target = Path(path if path is not None else value).absolute()
        existing = next(p for p in (target, *target.parents) if os.path.lexists(p))
    except ValueError as exc:  # a NUL byte
        raise ConfigError(f"{key}={value!r}: {exc}") from None
    if not existing.is_dir():
        what = "is" if existing == target else "is under"
        raise ConfigError(f"{key}={value!r}: {what} {str(existing)!r}, which is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value!r}: directory {str(existing)!r} is not writable")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def yaml_key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("key", f.name))


def build(cls: type[T], data: Mapping[str, Any] | None, *, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing keys take the field defaults."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or '<root>'}={data!r}: must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {f'{path}{key}'!r}")
    for key, f in fields.items():
        if key not in data and _required(f):
            raise ConfigError(f"{path}{key}: missing (required)")
    kwargs = {
        f.name: _convert(hints[f.name], data[key], f"{path}{key}", secret=_secret(f))
        for key, f in fields.items()
        if key in data
    }
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}{exc}") from exc


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _secret(f: dataclasses.Field[Any]) -> bool:
    """A field declared ``field(metadata={"secret": True})``: errors never show its value."""
    return bool(f.metadata.get("secret", False))


def _fail(key: str, value: Any, requirement: str, *, secret: bool = False) -> ConfigError:
    shown = "<redacted>" if secret else repr(value)
    return ConfigError(f"{key}={shown}: {requirement}")


def _convert(tp: Any, value: Any, key: str, *, secret: bool = False) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, key, secret=secret)
        return value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path=f"{key}.")  # type: ignore[arg-type]
    if origin is typing.Literal:
        if value not in args:
            raise _fail(key, value, f"must be one of {', '.join(map(str, args))}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise _fail(key, value, f"must be one of {allowed}") from None
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _fail(key, value, "must be a list", secret=secret)
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{key}[{i}]", secret=secret) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        return _mapping(args, value, key, secret=secret)
    return _scalar(tp, value, key, secret=secret)


def _mapping(args: tuple[Any, ...], value: Any, key: str, *, secret: bool) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(key, value, "must be a mapping", secret=secret)
    vt = args[1] if len(args) == 2 else Any
    out = {}
    for k, v in value.items():
        number = isinstance(k, int | float) and not isinstance(k, bool)
        if not (isinstance(k, str) or number) or "\x00" in str(k):
            raise ConfigError(f"{key}: key {k!r} must be a string without NUL characters")
        out[str(k)] = _convert(vt, v, f"{key}.{k}", secret=secret)
    return out


def _scalar(tp: Any, value: Any, key: str, *, secret: bool = False) -> Any:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, value, "must be true or false", secret=secret)
    if tp is int:
        if not (isinstance(value, int) and number):
            raise _fail(key, value, "must be an integer", secret=secret)
        if not -MAX_INT - 1 <= value <= MAX_INT:
            raise _fail(key, value, "must fit in 64 bits (-2**63 .. 2**63-1)", secret=secret)
        return value
    if tp is float:
        return _float(value, key, secret=secret)
    if tp is str:
        if not (isinstance(value, str) or number):
            raise _fail(key, value, "must be a string", secret=secret)
        text = str(value)
        if "\x00" in text:
            raise _fail(key, value, "must not hold a NUL character", secret=secret)
        return text
    return value


def _float(value: Any, key: str, *, secret: bool) -> float:
    """A finite float (from a number or a numeric string); ``*_seconds``: <= MAX_SECONDS."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number or isinstance(value, str)):
        raise _fail(key, value, "must be a number", secret=secret)
    try:
        # YAML 1.1 (PyYAML) reads "1e-7" as a string; a number is what the user meant.
        converted = float(value)
    except ValueError:
        raise _fail(key, value, "must be a number", secret=secret) from None
    except OverflowError:  # an int past float's range
        converted = math.inf
    if not math.isfinite(converted):
        raise _fail(key, value, "must be a finite number", secret=secret)
    if key.endswith("_seconds") and converted > MAX_SECONDS:
        raise _fail(key, value, f"must be <= {MAX_SECONDS} (365 days)", secret=secret)
    return converted


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-serialisable form of a config object (inverse of :func:`build`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {yaml_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def fingerprint(obj: Any) -> str:
    """Stable short hash of a config (or section), recorded in checkpoints."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in; mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(dotted: str, value: Any) -> dict[str, Any]:
    """``nest("a.b", 1) == {"a": {"b": 1}}``."""
    parts = dotted.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar or flow collection (``3``, ``true``, ``[1,2]``)."""
    try:
        return yaml.load(text, Loader=_Loader) if text != "" else ""  # a safe loader
    except (yaml.YAMLError, RecursionError):
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Overrides from ``ELASTICD_SECTION__KEY`` variables (see the module docstring)."""
    out: dict[str, Any] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        if name.startswith(WORKER_ENV_PREFIX):
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        out = deep_merge(out, nest(dotted, parse_value(text)))
    return out


def set_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Overrides from ``--set a.b=v`` arguments."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        out = deep_merge(out, nest(key.strip(), parse_value(text)))
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the last would win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *defaults`` merges; explicit keys override merged ones
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | None) -> dict[str, Any]:
    """Read one YAML document (a mapping) from a regular file; every problem is a one-line
    ConfigError naming the path (and ``FILE:LINE:COLUMN`` for a syntax error)."""
    if path is None:
        return {}
    check_regular_file("--config", path)
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config={path!r}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        with open(path, "rb") as fh:  # bytes: PyYAML reports a bad encoding as a YAML error
            data = yaml.load(fh, Loader=_Loader)  # a safe loader
    except OSError as exc:
        raise ConfigError(f"--config={path!r}: {_reason(exc)}") from None
    except yaml.YAMLError as exc:
        problem = _yaml_problem(path, exc)
        raise ConfigError(f"--config={path!r}: not valid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"--config={path!r}: not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config={path!r}: must hold a mapping at the top level")
    check_expanded_size(f"--config={path!r}", data)
    return data


def _yaml_problem(path: str, exc: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: problem (context)`` of a parse error, one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"{path}:{mark.line + 1}:{mark.column + 1}: {exc.problem}{context}"
    return " ".join(str(exc).split())


def check_expanded_size(label: str, document: Any) -> None:
    """ConfigError when ``document`` holds more than MAX_DOCUMENT_VALUES values counted as a
    walk sees them: YAML aliases can make a few lines expand to billions (or loop forever)."""
    stack, count = [document], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_DOCUMENT_VALUES:
            raise ConfigError(
                f"{label}: expands to more than {MAX_DOCUMENT_VALUES} values (YAML aliases?)"
            )
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)


def layered(
    path: str | None, *, environ: Mapping[str, str], sets: Iterable[str] = ()
) -> dict[str, Any]:
    """YAML < env < --set, as one plain mapping (defaults come from the dataclasses)."""
    merged = deep_merge(load_yaml(path), env_overrides(environ))
    merged = deep_merge(merged, set_overrides(sets))
    check_expanded_size("config", merged)
    return merged

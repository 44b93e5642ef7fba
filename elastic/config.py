"""Typed configuration: nested frozen dataclasses built from plain mappings.

Every component owns a frozen dataclass ``Config`` next to its code; this module only knows how
to turn the layered sources (defaults < YAML < ``ELASTICD_*`` env < ``--set``) into those
dataclasses. It is shared by the daemon and the workers, so it lives in ``elastic`` (which both
may import).

Rules a user relies on:

- Unknown keys are errors that name the full dotted key.
- A ``__post_init__`` that rejects a value raises ``ValueError`` via :func:`check`; the builder
  prefixes the dotted path, so the message reads ``checkpoint.interval_steps=0: must be > 0``.
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
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

ENV_PREFIX = "ELASTICD_"
WORKER_ENV_PREFIX = "ELASTICD_WORKER_"
RESERVED_ENV = frozenset({"ELASTICD_ALLOW_FAULTS", "ELASTICD_LOG_LEVEL"})


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key and value."""


def check(condition: bool, key: str, value: object, requirement: str) -> None:
    """Raise ``ValueError("key=value: requirement")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{key}={value!r}: {requirement}")


def check_name(key: str, value: str) -> None:
    """Run ids and similar names: letters, digits, ``.``, ``_``, ``-`` (they become paths)."""
    ok = bool(value) and all(c.isalnum() or c in "._-" for c in value)
    check(ok, key, value, "letters, digits, . _ - only")


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
            raise ConfigError(f"unknown key '{path}{key}'")
    kwargs = {
        f.name: _convert(hints[f.name], data[key], f"{path}{key}")
        for key, f in fields.items()
        if key in data
    }
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}{exc}") from exc


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], value, key) if len(non_none) == 1 else value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path=f"{key}.")  # type: ignore[arg-type]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise ConfigError(f"{key}={value!r}: must be one of {allowed}") from None
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r}: must be a list")
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: must be a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    return _scalar(tp, value, key)


def _scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads "1e-7" as a string; a number is what the user meant.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: must be a string")
    return value


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
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
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


def load_yaml(path: str | None) -> dict[str, Any]:
    """Read one YAML document (a mapping); a missing file is a ConfigError naming the path."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config={path!r}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config={path!r}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config={path!r}: must hold a mapping at the top level")
    return data


def layered(
    path: str | None, *, environ: Mapping[str, str], sets: Iterable[str] = ()
) -> dict[str, Any]:
    """YAML < env < --set, as one plain mapping (defaults come from the dataclasses)."""
    merged = deep_merge(load_yaml(path), env_overrides(environ))
    return deep_merge(merged, set_overrides(sets))

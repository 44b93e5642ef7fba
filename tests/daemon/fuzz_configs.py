"""Bad job configurations derived from the config schema (for tests/daemon/test_bad_input.py).

Every leaf key of the daemon's config (``DaemonConfig`` and its sections, list items included)
and of the workload sections that ``python -m model.config --check`` validates (``model``,
``data``, ``train`` of ``JobConfig``) gets the mutations its type calls for: wrong types, wrong
list and mapping shapes, negative, zero, non-finite and out-of-range numbers, empty and NUL
strings, unknown keys at every level. A few keys add what only they refuse (names, bounds,
URLs and storage protocols, files and directories, the metrics address). Beside documents:
YAML texts that do not parse or hold no mapping, ``--config`` paths that are not regular
files. Deterministic: no randomness, the same cases in the same order on every run.

A mutation that is valid for its key (``metrics.port: 0`` picks a free port) is listed in
:data:`VALID` with the reason. The tests check that each of those is accepted (the list cannot
go stale) and that every other case is refused with one line naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.registry import known_implementations

from daemon.config import DaemonConfig
from model.config import JobConfig

WORKLOAD_SECTIONS = ("model", "data", "train")
# A valid item for each list of records: the mutations change one field of it.
ITEM_BASE: dict[str, dict[str, Any]] = {
    "faults": {"kind": "kill", "step": 1},
    "data.sources": {"name": "web", "url": "{root}/web"},
    "data.stages": {"start_step": 10, "weights": {"code": 1.0}},
}
# Keys checked together with others: their mutations are made with these set (a client
# certificate needs its key, a user needs a password and an endpoint with TLS).
CONTEXT: dict[str, dict[str, Any]] = {
    "etcd.tls_cert": {"etcd.tls_key": "{root}/key.pem"},
    "etcd.tls_key": {"etcd.tls_cert": "{root}/cert.pem"},
    "etcd.user": {"etcd.password": "pw", "etcd.endpoints": ["https://127.0.0.1:2379"]},
    "etcd.password": {"etcd.user": "u", "etcd.endpoints": ["https://127.0.0.1:2379"]},
}
# Environment of every case: fault injection allowed, so the fault keys themselves are checked.
ENVIRON = {"ELASTICD_ALLOW_FAULTS": "1"}
BAD_NAMES = ("é-run", "a/b", "..", "-x", "a b", "x" * 254)
HUGE_INT = 2**64  # past the 64-bit range every integer key must fit in


@dataclass(frozen=True)
class Case:
    """One bad (or, when listed in VALID, deliberately valid) configuration document."""

    key: str  # the dotted key the error must name
    category: str
    value: Any  # what the key was given; its repr must be in the message when ``shown``
    document: dict[str, Any]
    shown: bool = True  # unknown keys and missing keys have no value to show
    secret: bool = False  # the value must NOT be shown (field(metadata={"secret": True}))

    @property
    def id(self) -> str:
        return f"{self.key} {self.category} {_short(self.value)}"


@dataclass(frozen=True)
class TextCase:
    """A ``--config`` file whose text (bytes) is not a valid document."""

    id: str
    text: bytes
    expected: str  # in the one-line message


# (key, category) -> why that mutation is a valid config.
VALID: dict[tuple[str, str], str] = {
    ("metrics.port", "zero"): "0 picks a free port",
    ("metrics.bind", "empty"): "'' binds every interface (as http.server does)",
    ("nodes.address", "empty"): "'' is the default: the host's FQDN",
    ("worker.cwd", "empty"): "'' is the default: the daemon's directory",
    ("worker.env", "empty"): "no extra variables",
    ("worker.silence_timeout_seconds", "zero"): "0 turns the silence check off",
    ("watchdog.max_restarts", "zero"): "0: the first crash fails the run",
    ("stragglers.window_seconds", "zero"): "0: slow once is a straggler",
    ("rewind.min_steps_back", "zero"): "0: the newest known-good checkpoint",
    ("rewind.lr_multiplier_steps", "zero"): "0: the learning rate is not changed",
    ("rewind.max_rewinds", "zero"): "0: the first escalation stops the run",
    ("rewind.good_after_steps", "zero"): "0: known-good at once",
    ("guard.sustained_steps", "zero"): "0 turns the elevation check off",
    ("guard.scale_floor_fraction", "zero"): "0: no floor under the robust sigma",
    ("checkpoint.background_nice", "zero"): "0: the trainer's priority",
    ("checkpoint.storage_options", "empty"): "no fsspec options",
    ("faults[0].step", "zero"): "before step 0",
    ("faults[0].rank", "zero"): "global rank 0",
    ("faults[0].times", "zero"): "0: every time",
    ("faults[0].ms", "zero"): "kind kill takes no ms",
    ("faults[0].steps", "zero"): "0: to the end of training",
    ("model.z_loss", "zero"): "0 turns the z-loss off",
    ("data.seed", "zero"): "seed 0",
    ("data.eval_every_steps", "zero"): "0 turns evaluation off",
    ("data.storage_options", "empty"): "no fsspec options",
    ("data.stages[0].start_step", "zero"): "a stage from step 0",
    ("train.warmup_steps", "zero"): "no warmup",
    ("train.weight_decay", "zero"): "no weight decay",
    ("train.peak_flops_per_device", "zero"): "0: the worker API's table of known GPUs",
    ("train.beta1", "zero"): "AdamW accepts beta 0",
    ("train.beta2", "zero"): "AdamW accepts beta 0",
    ("train.seed", "zero"): "seed 0",
    ("train.threads", "zero"): "0: torch's default",
    ("train.min_lr", "zero"): "decay to 0",
    ("data.demo_dir", "empty"): "'' is the default: <run_dir>/data",
    ("data.sources[0].name", "non-ascii"): (
        "source names follow model/data_config.py's rule (any letters); only path "
        "separators are refused there"
    ),
}


def base_document(root: Path) -> dict[str, Any]:
    """A valid document whose files all live under ``root`` (nothing elsewhere is touched)."""
    return {
        "run_id": "fuzz",
        "run_dir": str(root / "run"),
        "checkpoint": {"url": str(root / "ckpt")},
        "metrics": {"port": 0},
    }


def prepare(root: Path) -> None:
    """The files and directories the cases name: a regular file, a source directory, PEMs."""
    (root / "afile").write_text("not a directory\n")
    (root / "web").mkdir(exist_ok=True)
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (root / name).write_text("-----BEGIN CERTIFICATE-----\n")


def cases(root: Path, *, busy_port: int) -> list[Case]:
    """Every document case, ids unique, in a fixed order. ``busy_port``: a port in use."""
    out: list[Case] = []
    for cls, prefix, skip in roots():
        for key, tp, optional in leaves(cls, prefix=prefix, skip=skip):
            extra = CONTEXT.get(key)
            out += [
                _case(root, key, m, extra=extra) for m in _mutations(key, tp, optional=optional)
            ]
    out += _unknown_keys(root)
    out += _special(root, busy_port=busy_port)
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return out


def leaves(
    cls: type, *, prefix: str = "", skip: tuple[str, ...] = ()
) -> Iterator[tuple[str, Any, bool]]:
    """``(dotted key, type, optional)`` of every leaf of config dataclass ``cls``; a section is
    a leaf too (its own shape mutations), a list of records also yields its item's leaves."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + str(f.metadata.get("key", f.name))
        if f.name in skip:
            continue
        tp, optional = _unwrap(hints[f.name])
        yield key, tp, optional
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, prefix=f"{key}.")  # type: ignore[arg-type]
        elif _record_type(tp) is not None:
            yield from leaves(_record_type(tp), prefix=f"{key}[0].")  # type: ignore[arg-type]


def _unwrap(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _record_type(tp: Any) -> type | None:
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return item  # type: ignore[return-value]
    return None


@dataclass(frozen=True)
class Mutation:
    category: str
    value: Any
    sub: str | int | None = None  # the bad one is the value at this key or index


def _m(category: str, *values: Any) -> list[Mutation]:
    return [Mutation(category, v) for v in values]


def _mutations(key: str, tp: Any, *, optional: bool) -> list[Mutation]:
    """The mutations of a key of type ``tp``, from the type alone."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    none = [] if optional else _m("type", None)
    if dataclasses.is_dataclass(tp):
        return _m("shape", "x", [1], 7)
    record = _record_type(tp)
    if record is not None:
        required = any(_required(f) for f in dataclasses.fields(record))
        items = [Mutation("shape", ["x"], 0), Mutation("shape", [[1]], 0)]
        return _m("shape", "x", {"a": 1}) + items + (_m("missing", [{}]) if required else [])
    if origin is typing.Literal:
        return _m("choice", "bogus", 1) + _m("shape", [args[0]])
    if tp is bool:
        return _m("type", "maybe", 1) + _m("shape", [True]) + none
    if tp is int:
        numbers = _m("negative", -1) + _m("zero", 0) + _m("huge", HUGE_INT)
        return _m("type", "x", 1.5, True) + _m("shape", [1]) + numbers + none
    if tp is float:
        return _floats(key) + none
    if tp is str:
        return (
            _m("type", True)
            + _m("shape", [], {"a": "b"})
            + _m("empty", "")
            + _m("nul", "a\x00b")
            + none
        )
    if origin is tuple:
        items = [Mutation("shape", [[]], 0), Mutation("type", [None], 0)]
        return _m("shape", "a b", {"a": "b"}) + items + [Mutation("nul", ["a\x00b"], 0)]
    if origin is dict:
        return _mappings(args[1] if args else Any)
    raise AssertionError(f"{key}: no mutations for type {tp!r}")


def _floats(key: str) -> list[Mutation]:
    found = _m("type", "x", True) + _m("shape", [1.0])
    found += _m("non-finite", math.nan, math.inf, -math.inf, "nan", "-inf")
    found += _m("huge", 10**400) + _m("negative", -1.0) + _m("zero", 0.0)
    if key.endswith("_seconds"):  # durations have an upper bound (docs/configuration.md)
        found += _m("huge", 1e300)
    return found


def _mappings(value_type: Any) -> list[Mutation]:
    found = _m("shape", [], "x") + _m("empty", {})
    if value_type is str:
        found += [Mutation("type", {"A": None}, "A"), Mutation("type", {"A": [1]}, "A")]
        found += [Mutation("nul", {"A": "a\x00"}, "A")]
    elif value_type is float:
        found += [Mutation("type", {"code": "x"}, "code")]
        found += [Mutation("non-finite", {"code": math.nan}, "code")]
        found += [Mutation("negative", {"code": -1.0}, "code")]
    return found


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _case(
    root: Path,
    key: str,
    mutation: Mutation,
    *,
    extra: dict[str, Any] | None = None,
    named: tuple[str, Any] | None = None,
) -> Case:
    """The base document with ``key`` set (after the ``extra`` dotted keys). The message must
    name ``key`` and the value, or ``named`` (key, value) where the error is narrower."""
    document = base_document(root)
    for other, other_value in (extra or {}).items():
        _set(root, document, other, _fill(root, other_value))
    _set(root, document, key, mutation.value)
    category, value = mutation.category, mutation.value
    if key in _secret_keys():
        return Case(key, category, value, document, shown=False, secret=True)
    if named is not None:
        return Case(key=named[0], category=category, value=named[1], document=document)
    if category == "missing":
        record = _record_type(_type_at(key))
        first = next(f for f in dataclasses.fields(record) if _required(f))  # type: ignore[arg-type]
        return Case(f"{key}[0].{first.name}", category, value, document, shown=False)
    if isinstance(mutation.sub, int):  # a list whose item ``sub`` is bad
        return Case(f"{key}[{mutation.sub}]", category, value[mutation.sub], document)
    if mutation.sub is not None:  # a mapping whose value at ``sub`` is bad
        return Case(f"{key}.{mutation.sub}", category, value[mutation.sub], document)
    return Case(key, category, value, document, shown=category != "unknown")


@functools.cache
def _secret_keys() -> frozenset[str]:
    """Keys declared ``field(metadata={"secret": True})``: errors never show their values."""
    sections: list[tuple[Any, str]] = [(cls, prefix) for cls, prefix, _ in roots()]
    for cls, prefix, skip in roots():
        for key, tp, _ in leaves(cls, prefix=prefix, skip=skip):
            if dataclasses.is_dataclass(tp):
                sections.append((tp, f"{key}."))
    return frozenset(
        prefix + str(f.metadata.get("key", f.name))
        for cls, prefix in sections
        for f in dataclasses.fields(cls)
        if f.metadata.get("secret")
    )


def _type_at(key: str) -> Any:
    for cls, prefix, skip in roots():
        for leaf, tp, _ in leaves(cls, prefix=prefix, skip=skip):
            if leaf == key:
                return tp
    raise KeyError(key)


def roots() -> list[tuple[type, str, tuple[str, ...]]]:
    """``(config class, key prefix, fields to skip)``: the daemon's view (its opaque workload
    sections skipped) and the workload sections as the bundled trainer's check types them."""
    workload = typing.get_type_hints(JobConfig)
    return [(DaemonConfig, "", WORKLOAD_SECTIONS)] + [
        (workload[s], f"{s}.", ()) for s in WORKLOAD_SECTIONS
    ]


def _set(root: Path, document: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (``faults[0].step`` included) in ``document``, in place."""
    node: dict[str, Any] = document
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.endswith("[0]"):
            name = part.removesuffix("[0]")
            if name not in node:
                base = ITEM_BASE[".".join([*parts[:i], name])]
                node[name] = [{k: _fill(root, v) for k, v in base.items()}]
            node = node[name][0]
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value


def _fill(root: Path, value: Any) -> Any:
    return value.replace("{root}", str(root)) if isinstance(value, str) else value


def _unknown_keys(root: Path) -> list[Case]:
    """``bogus`` at the top level, in every section and in every list item."""
    unknown = Mutation("unknown", 1)
    found = [_case(root, "bogus", unknown)]
    for cls, prefix, skip in roots():
        for key, tp, _ in leaves(cls, prefix=prefix, skip=skip):
            if dataclasses.is_dataclass(tp):
                found.append(_case(root, f"{key}.bogus", unknown))
            elif _record_type(tp) is not None:
                found.append(_case(root, f"{key}[0].bogus", unknown))
    found += [_case(root, f"{section}.bogus", unknown) for section in WORKLOAD_SECTIONS]
    return found


# Upper bounds and cross-key bounds: the first value past each.
BOUNDS: dict[str, Any] = {
    "nproc_per_node": 1025,
    "watchdog.standby_rounds": 9,
    "watchdog.poll_seconds": 5.5,
    "metrics.port": 65536,
    "nodes.max": 65537,
    "checkpoint.background_nice": 20,
    "train.threads": 1025,
    "train.beta1": 1.0,
    "train.beta2": 1.5,
    "train.min_lr": 1.0,
    "train.global_batch_tokens": 64,
    "nodes.join_timeout_seconds": 31_536_001.0,
    "etcd.ttl_seconds": 0.5,
}


def _special(root: Path, *, busy_port: int) -> list[Case]:
    """What only some keys refuse: names, bounds, URLs, files and directories, addresses."""
    found = [_case(root, "run_id", Mutation("name", name)) for name in BAD_NAMES]
    for prefix in ("/é", "/a//b", "nope", "/a/", "/a b"):
        found.append(_case(root, "etcd.key_prefix", Mutation("name", prefix)))
    for endpoint in ("not a url", "h:99999", "ftp://h:1", "é.example:2379"):
        found.append(_case(root, "etcd.endpoints", Mutation("url", [endpoint], 0)))
    found += [_case(root, key, Mutation("bound", value)) for key, value in BOUNDS.items()]
    for protocol in ("foo", _uninstalled_protocol()):
        url = Mutation("protocol", f"{protocol}://bucket/x")
        found += [_case(root, "checkpoint.url", url), _case(root, "data.sources[0].url", url)]
    missing, under_file = str(root / "missing"), str(root / "afile" / "x")
    key_pem, cert_pem = str(root / "key.pem"), str(root / "cert.pem")
    found += [
        _case(root, key, Mutation(category, value))
        for key, category, value in (
            ("checkpoint.url", "under-file", under_file),
            ("checkpoint.url", "under-file", f"file://{under_file}"),
            ("checkpoint.url", "empty", "   "),
            ("data.sources[0].url", "missing-file", missing),
            ("data.sources[0].name", "name", "a/b"),
            ("data.sources[0].name", "non-ascii", "wéb"),
            ("run_dir", "under-file", under_file),
            ("run_dir", "is-file", str(root / "afile")),
            ("etcd.tls_ca", "missing-file", missing),
            ("etcd.tls_ca", "not-a-file", str(root / "web")),
            ("etcd.tls_cert", "unpaired", cert_pem),
            ("checkpoint.signing_key_file", "missing-file", missing),
            ("metrics.bind", "unresolvable", "no-such-host.invalid"),
            ("metrics.bind", "not-local", "192.0.2.1"),
            ("metrics.bind", "non-ascii", "hóst"),
            ("metrics.port", "in-use", busy_port),
            ("worker.cwd", "missing-file", missing),
            ("worker.cwd", "under-file", under_file),
            ("worker.command", "missing-file", ["no-such-program-xyz"]),
            ("worker.command", "placeholder", ["{python}", "{nodes}"]),
            ("worker.env", "name", {"A=B": "1"}),
            ("worker.env", "name", {"": "1"}),
            ("model.size", "choice", "7b"),
            ("train.device", "choice", "tpu"),
        )
    ]
    missing_file = Mutation("missing-file", missing)
    found += [
        _case(root, "etcd.tls_cert", missing_file, extra={"etcd.tls_key": key_pem}),
        _case(root, "etcd.tls_key", missing_file, extra={"etcd.tls_cert": cert_pem}),
        _case(root, "faults[0].ms", Mutation("bound", 0), extra={"faults[0].kind": "slow"}),
        _case(root, "model.n_head", Mutation("shape", 5), named=("model.d_model", 64)),
        _case(
            root,
            "data.stages[0].weights",
            Mutation("name", {"nope": 1.0}),
            named=("data.stages[0].weights.nope", "nope"),
        ),
    ]
    return found


def _uninstalled_protocol() -> str:
    """A protocol fsspec knows whose package is not installed here (``dropbox`` if all are)."""
    for protocol, spec in sorted(known_implementations.items()):
        module = str(spec["class"]).split(".", 1)[0]
        if importlib.util.find_spec(module) is None:
            return str(protocol)
    return "dropbox"


def text_cases() -> list[TextCase]:
    """``--config`` texts that are not a document: each refused in one line naming the file."""
    return [
        TextCase("unclosed flow list", b"nodes: {min: 1\n", ":2:1: "),
        TextCase("mapping in a scalar", b"run_id: a: b\n", ":1:10: mapping values"),
        TextCase("tab indentation", b"nodes:\n\tmin: 1\n", ":2:1: "),
        TextCase("unterminated quote", b"run_id: 'abc\n", ":2:1: "),
        TextCase("bad indentation", b"nodes:\n  min: 1\n max: 2\n", ":3:"),
        TextCase("duplicate key", b"run_id: a\nrun_id: b\n", "duplicate key 'run_id'"),
        TextCase("nested duplicate key", b"nodes:\n  min: 1\n  min: 2\n", "duplicate key 'min'"),
        TextCase("top-level list", b"- a\n- b\n", "mapping at the top level"),
        TextCase("top-level scalar", b"just text\n", "mapping at the top level"),
        TextCase("not UTF-8", b"run_id: \xff\xfe\n", "not valid YAML"),
        TextCase("deep nesting", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested"),
        TextCase("alias bomb", _alias_bomb(), "values"),
        TextCase("unhashable key", b"? [a, b]\n: 1\n", "not valid YAML"),
        TextCase("non-string key", b"1: x\n", "unknown key '1'"),
    ]


def _alias_bomb(levels: int = 9) -> bytes:
    """The "billion laughs" shape: 10 ** levels values from a few lines of aliases."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"checkpoint: {{storage_options: {{bomb: *a{levels - 1}}}}}")
    return ("\n".join(lines) + "\n").encode()


def _short(value: Any, limit_chars: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit_chars else text[: limit_chars - 3] + "..."

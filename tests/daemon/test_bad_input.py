"""Every bad input is one line naming the key and the value: the generated cases, in-process.

tests/daemon/fuzz_configs.py derives the bad documents from the config schema. Each goes
through what ``elasticd run`` checks before it writes anything (the document, the workload's
own check, the start-up checks of this node) and must be refused with one ConfigError line
that names the key and shows the value (a secret's value never). Mutations listed valid must
be accepted. The same rules through the real CLI: tests/daemon/test_bad_input_cli.py.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from daemon.config import DEFAULT_COMMAND, check_document, check_start, resolve
from elastic.config import NAME_RULE, ConfigError, is_name
from elastic.rendezvous.keys import RunKeys
from model.config import check_workload
from tests.daemon import fuzz_configs
from tests.daemon.fuzz_configs import VALID, Case


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz")
    fuzz_configs.prepare(path)
    return path


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def cases(root: Path, busy_port: int) -> list[Case]:
    return fuzz_configs.cases(root, busy_port=busy_port)


def refusal(document: Mapping[str, Any]) -> str | None:
    """The error ``elasticd run`` gives ``document`` before writing anything (None: none)."""
    environ = {**fuzz_configs.ENVIRON, "PATH": os.environ.get("PATH", "")}
    try:
        config = check_document(document, environ=environ, workload=False)
        check_start(config)
        if config.worker.command == DEFAULT_COMMAND:  # the daemon runs this as a subprocess
            check_workload(document, environ=environ)
    except ConfigError as exc:
        return str(exc)
    return None


def shows(message: str, case: Case) -> bool:
    """The message shows the value as given, or as the number a float key made of it."""
    shown = {repr(case.value)}
    if isinstance(case.value, int | float) and not isinstance(case.value, bool):
        with contextlib.suppress(OverflowError):
            shown.add(repr(float(case.value)))
    return any(text in message for text in shown)


def problem(case: Case, message: str | None) -> str | None:
    """What is wrong with how ``case`` was answered (None: right)."""
    if (case.key, case.category) in VALID:
        return None if message is None else f"valid, refused: {message}"
    if message is None:
        return "accepted"
    if "\n" in message or "\r" in message:
        return f"not one line: {message!r}"
    if case.key not in message:
        return f"does not name {case.key}: {message}"
    if case.secret and repr(case.value) in message and case.value not in ("", None):
        return f"shows the secret: {message}"
    if case.shown and not shows(message, case):
        return f"does not show {case.value!r}: {message}"
    return None


def test_the_generator_derives_at_least_400_bad_configurations_covering_every_key(
    cases: list[Case],
) -> None:
    bad = [c for c in cases if (c.key, c.category) not in VALID]
    assert len(bad) >= 400, len(bad)
    keys = {
        key
        for cls, prefix, skip in fuzz_configs.roots()
        for key, *_ in fuzz_configs.leaves(cls, prefix=prefix, skip=skip)
    }
    named = {c.key for c in cases}
    assert sorted(k for k in keys if not any(n.startswith(k) for n in named)) == []
    categories = collections.Counter(c.category for c in bad)
    for category in ("type", "shape", "negative", "zero", "non-finite", "huge", "nul", "unknown"):
        assert categories[category] >= 10, categories


def test_every_bad_configuration_is_one_config_error_line_naming_the_key_and_the_value(
    cases: list[Case],
) -> None:
    wrong = [f"{case.id}: {p}" for case in cases if (p := problem(case, refusal(case.document)))]
    assert wrong == [], f"{len(wrong)} of {len(cases)}:\n" + "\n".join(wrong)


def test_every_mutation_listed_valid_is_generated_and_accepted(cases: list[Case]) -> None:
    generated = {(c.key, c.category) for c in cases}
    assert sorted(set(VALID) - generated) == []
    refused = {c.id: refusal(c.document) for c in cases if (c.key, c.category) in VALID}
    assert {k: v for k, v in refused.items() if v is not None} == {}


@pytest.mark.parametrize("case", fuzz_configs.text_cases(), ids=lambda c: c.id)
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line_naming_the_file(
    tmp_path: Path, case: fuzz_configs.TextCase
) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(case.text)
    with pytest.raises(ConfigError) as refused:
        resolve(str(path), environ={})
    message = str(refused.value)
    assert "\n" not in message and case.expected in message, message
    assert "unknown key" in message or str(path) in message


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "missing"])
def test_a_config_path_that_is_not_a_regular_file_is_refused_without_reading_it(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "job.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # opened for reading, it would block until a writer came
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path(os.devnull)
    expected = {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}
    with pytest.raises(ConfigError) as refused:
        resolve(str(path), environ={})
    assert str(refused.value) == (
        f"--config={str(path)!r}: "
        + (f"not a regular file ({expected[kind]})" if kind in expected else "file not found")
    )


def test_a_yaml_syntax_error_is_file_line_column_and_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("run_id: a\nnodes: {min: 1, max: 2\ntrain: {}\n")
    with pytest.raises(ConfigError) as refused:
        resolve(str(path), environ={})
    assert str(refused.value).startswith(f"--config={str(path)!r}: not valid YAML: {path}:3:")
    assert "expected ',' or '}'" in str(refused.value)


def test_yaml_merge_keys_still_override_and_an_explicit_key_twice_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("x: &base {min: 1, max: 1}\nnodes: {<<: *base, max: 2}\n")
    with pytest.raises(ConfigError, match="unknown key 'x'"):
        resolve(str(path), environ={})  # parsed: the merge itself is no duplicate
    path.write_text("nodes: {min: 1, max: 1, max: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'max'"):
        resolve(str(path), environ={})


def test_a_secret_is_never_shown_in_an_error(root: Path) -> None:
    document = fuzz_configs.base_document(root)
    document["etcd"] = {"user": "u", "password": ["hunter2-secret"], "endpoints": ["https://h:1"]}
    message = refusal(document)
    assert message == "etcd.password=<redacted>: must be a string"


def test_non_finite_and_overlong_durations_are_refused_for_every_float_key(root: Path) -> None:
    for value, requirement in ((math.inf, "finite"), (".inf", "number"), (4e7, "<= 31536000")):
        document = {**fuzz_configs.base_document(root), "nodes": {"join_timeout_seconds": value}}
        message = refusal(document)
        assert message is not None and message.startswith("nodes.join_timeout_seconds=")
        assert requirement in message


@pytest.mark.parametrize("name", fuzz_configs.BAD_NAMES)
def test_run_ids_node_ids_and_key_prefixes_follow_one_naming_rule(root: Path, name: str) -> None:
    document = fuzz_configs.base_document(root)
    messages = [refusal({**document, "run_id": name})]
    if "/" not in name:  # in a key prefix, '/' separates names
        messages.append(refusal({**document, "etcd": {"key_prefix": f"/jobs/{name}"}}))
    with pytest.raises(ConfigError) as node:
        check_start(check_document(document, environ={}, workload=False), node_id=name)
    messages.append(str(node.value))
    with pytest.raises(ValueError) as keys:
        RunKeys(key_prefix="/elasticd", run_id=name)
    messages.append(str(keys.value))
    assert all(m is not None and NAME_RULE in m for m in messages), messages
    assert is_name("a") and not is_name(name)


def test_the_start_checks_of_a_valid_config_create_nothing(root: Path) -> None:
    document = fuzz_configs.base_document(root)
    document["run_dir"] = str(root / "new" / "run")
    document["checkpoint"] = {"url": f"file://{root}/new/ckpt"}
    assert refusal(document) is None
    check_start(check_document(document, environ={}, workload=False), node_id="node-0.a_b")
    assert not (root / "new").exists()
